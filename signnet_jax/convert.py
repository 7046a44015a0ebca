"""Convert VideoMAEv2 / Hugging Face VideoMAE PyTorch weights to a signnet_jax checkpoint.

    python -m signnet_jax.convert --input vit_b_k710_dl_from_giant.pth --output ckpt/vit_b \\
        --model B --num-frames 32 --num-classes 2000
    python -m signnet_jax.convert --to-pytorch --input ckpt/vit_b --output vit_b.pth

The mapping is one declarative table ``{flax path: (torch key, transform)}``;
every key is accounted for on both sides and problems are reported by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from signnet_jax import checkpointing, files
from signnet_jax.models import vit

TOOL_VERSION = "signnet_jax.convert 1"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the keys or file and the fix."""


# --- per-key transforms -------------------------------------------------------------


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _linear(x: np.ndarray) -> np.ndarray:  # torch (out, in) <-> flax (in, out)
    return x.T


def _conv3d(x: np.ndarray) -> np.ndarray:  # torch OIDHW -> flax DHWIO
    return x.transpose(2, 3, 4, 1, 0)


def _conv3d_inv(x: np.ndarray) -> np.ndarray:  # flax DHWIO -> torch OIDHW
    return x.transpose(4, 3, 0, 1, 2)


_INVERSE = {_identity: _identity, _linear: _linear, _conv3d: _conv3d_inv}

Path = tuple[Any, ...]
Table = dict[Path, tuple[str, Callable[[np.ndarray], np.ndarray]]]


def param_table(cfg: vit.ViTConfig) -> Table:
    """The declarative map from Flax parameter path to VideoMAEv2 key and transform."""
    t: Table = {
        ("patch_embed", "proj", "kernel"): ("patch_embed.proj.weight", _conv3d),
        ("patch_embed", "proj", "bias"): ("patch_embed.proj.bias", _identity),
        ("fc_norm", "scale"): ("fc_norm.weight", _identity),
        ("fc_norm", "bias"): ("fc_norm.bias", _identity),
        ("head", "kernel"): ("head.weight", _linear),
        ("head", "bias"): ("head.bias", _identity),
    }
    if cfg.learned_pos_emb:
        t[("pos_embed",)] = ("pos_embed", _identity)
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        rows = {
            ("norm1", "scale"): ("norm1.weight", _identity),
            ("norm1", "bias"): ("norm1.bias", _identity),
            ("attn", "qkv", "kernel"): ("attn.qkv.weight", _linear),
            ("attn", "q_bias"): ("attn.q_bias", _identity),
            ("attn", "v_bias"): ("attn.v_bias", _identity),
            ("attn", "proj", "kernel"): ("attn.proj.weight", _linear),
            ("attn", "proj", "bias"): ("attn.proj.bias", _identity),
            ("norm2", "scale"): ("norm2.weight", _identity),
            ("norm2", "bias"): ("norm2.bias", _identity),
            ("mlp", "fc1", "kernel"): ("mlp.fc1.weight", _linear),
            ("mlp", "fc1", "bias"): ("mlp.fc1.bias", _identity),
            ("mlp", "fc2", "kernel"): ("mlp.fc2.weight", _linear),
            ("mlp", "fc2", "bias"): ("mlp.fc2.bias", _identity),
        }
        if cfg.cos_attn:
            rows[("attn", "scale")] = ("attn.scale", _identity)
        if cfg.init_values > 0:
            rows[("gamma_1",)] = ("gamma_1", _identity)
            rows[("gamma_2",)] = ("gamma_2", _identity)
        for path, (key, fn) in rows.items():
            t[("blocks", i) + path] = (b + key, fn)
    return t


# Hugging Face VideoMAE names -> VideoMAEv2 names (per layer, after the `videomae.` prefix).
_HF_LAYER = {
    "attention.attention.q_bias": "attn.q_bias",
    "attention.attention.v_bias": "attn.v_bias",
    # transformers >= 5 names the same two vectors as biases in memory
    "attention.attention.query.bias": "attn.q_bias",
    "attention.attention.value.bias": "attn.v_bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
}
_HF_TOP = {
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "fc_norm.weight": "fc_norm.weight",
    "fc_norm.bias": "fc_norm.bias",
    # the encoder's final norm (use_mean_pooling=False), VideoMAEv2's `norm`
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# Parts of pre-training checkpoints that the classifier does not use.
_PRETRAIN_ONLY = ("decoder.", "encoder_to_decoder.", "mask_token", "norm.weight", "norm.bias")


# --- reading ------------------------------------------------------------------------


def _torch_safe_globals() -> list:
    """Non-tensor objects real VideoMAEv2 / DeepSpeed files carry; all inert data."""
    import argparse as _argparse

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    dtype_classes = [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType")]
    return [
        _argparse.Namespace,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtype_classes,
    ]


def _torch(needs: str) -> Any:
    """The torch module; without it (optional for users who only run the model) an error
    saying what ``needs`` it and how to install it."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{needs} needs PyTorch: pip install 'signnet_jax[convert]'") from e
    return torch


def _load_torch_file(path: pathlib.Path) -> Any:
    torch = _torch(f"reading {path}")
    import pickle

    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip (PK..); older checkpoints are bare pickles (protocol >= 2: 0x80)
    if head and not head.startswith(b"PK") and head[:1] != b"\x80":
        raise ConversionError(
            f"{path} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle; "
            f"it starts with {head!r}); give the .pth/.pt/.bin weights file, or a .safetensors "
            "file"
        )
    try:
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ConversionError(
            f"{path} holds pickled objects outside the allow-list of plain checkpoint data "
            f"({first}); refusing to run code from a downloaded file. Re-save just the state "
            "dict (torch.save(model.state_dict(), ...)) from a trusted environment."
        ) from e
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise ConversionError(
            f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e}); "
            "is the file complete (re-download it) and a .pth/.pt/.bin checkpoint?"
        ) from e


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(
            f"cannot read {path} as safetensors ({e}); is the file complete?"
        ) from e


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def _find_state_dict(obj: Any, path: pathlib.Path) -> dict[str, Any]:
    """The tensor dict in a checkpoint: top level, or under `model`, `module` or `state_dict`."""
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} does not hold a state dict (found {type(obj).__name__})")

    def is_tensor_dict(d: Any) -> bool:
        return isinstance(d, dict) and d and all(hasattr(v, "shape") for v in d.values())

    if is_tensor_dict(obj):
        return obj
    for key in ("model", "module", "state_dict"):
        if is_tensor_dict(obj.get(key)):
            return obj[key]
    raise ConversionError(
        f"{path} holds no tensor state dict at the top level or under 'model', 'module' or "
        f"'state_dict' (top-level keys: {sorted(map(str, obj))[:10]})"
    )


def _drop_prefix(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _strip_prefix(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


@dataclasses.dataclass
class Source:
    """A checkpoint read into VideoMAEv2 names."""

    state: dict[str, np.ndarray]
    format: str  # 'videomae_v2' | 'huggingface'
    pretrain: bool  # encoder-only pre-training checkpoint (decoder dropped)
    dropped: list[str]


def _from_huggingface(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sd = {(k[len("videomae.") :] if k.startswith("videomae.") else k): v for k, v in sd.items()}
    out: dict[str, np.ndarray] = {}
    qkv: dict[int, dict[str, np.ndarray]] = {}
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        if k.startswith("encoder.layer."):
            i_str, rest = k[len("encoder.layer.") :].split(".", 1)
            i = int(i_str)
            if rest in _HF_LAYER:
                out[f"blocks.{i}.{_HF_LAYER[rest]}"] = v
                continue
            for part in ("query", "key", "value"):
                if rest == f"attention.attention.{part}.weight":
                    qkv.setdefault(i, {})[part] = v
                    break
            else:
                out[k] = v  # unknown: reported as unexpected
            continue
        out[k] = v
    for i, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            missing = sorted({"query", "key", "value"} - set(parts))
            raise ConversionError(
                f"layer {i} lacks attention weights {missing}: the checkpoint is incomplete or "
                "not a VideoMAE model; download or save it again"
            )
        out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
            [parts["query"], parts["key"], parts["value"]], axis=0
        )
    return out


def _is_weights_file(path: pathlib.Path) -> bool:
    return path.is_file() and path.suffix.lower() in checkpointing.WEIGHTS_SUFFIXES


def read_checkpoint(path: str | os.PathLike) -> Source:
    """Read a VideoMAEv2 `.pth`/DeepSpeed `.pt` or Hugging Face `.safetensors`/`.bin` file.

    Args:
      path: the checkpoint file.

    Returns:
      The weights under VideoMAEv2 names, as float32 numpy arrays.
    """
    path = checkpointing.local_path(path)
    if path.is_dir():  # a Hugging Face model folder, or a checkpoint folder of ours
        inside = sorted(p.name for p in path.iterdir() if _is_weights_file(p))
        hint = (
            f"; give the weights file in it: {path / inside[0]}"
            if len(inside) == 1
            else f"; give one of its weights files ({', '.join(inside)})"
            if inside
            else ""
        )
        # a training run, its checkpoints/, a step of them: the other direction's input
        step = (
            path.name if path.name.isdigit() and checkpointing.checkpoint_steps(path.parent) else ""
        )
        if step:
            hint = (
                f", one step of a signnet_jax checkpoint (orbax); to write it as a PyTorch "
                f"state dict: --to-pytorch --input {path.parent} --step {step} --output FILE.pth"
            )
        elif not inside and any(map(checkpointing.checkpoint_steps, (path, path / "checkpoints"))):
            hint = (
                ", a signnet_jax checkpoint (orbax); to write it as a PyTorch state dict, add "
                "--to-pytorch and give --output FILE.pth"
            )
        raise ConversionError(f"input checkpoint {path} is a folder{hint}")
    if not path.is_file():
        raise ConversionError(f"input checkpoint {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        raw: dict[str, Any] = _load_safetensors(path)
    else:
        raw = _find_state_dict(_load_torch_file(path), path)
    sd = {str(k): _to_numpy(v) for k, v in raw.items()}
    sd = _strip_prefix(sd, "module.")
    is_hf = any(k.startswith(("videomae.", "embeddings.patch_embeddings")) for k in sd)
    if is_hf:
        try:
            sd = _from_huggingface(sd)
        except ConversionError as e:
            raise ConversionError(f"{path}: {e}") from e
        pretrain = any(k.startswith(_PRETRAIN_ONLY[:3]) for k in sd)
    else:
        pretrain = any(k.startswith(("encoder.", "backbone.")) for k in sd)
        if pretrain:
            sd = {_drop_prefix(k, ("encoder.", "backbone.")): v for k, v in sd.items()}
    if not pretrain and "norm.weight" in sd and "fc_norm.weight" not in sd:
        if "head.weight" in sd:
            name = "videomae.layernorm" if is_hf else "norm"
            raise ConversionError(
                f"{path} is a classifier fine-tuned with use_mean_pooling=False: its head reads "
                f"the first token after the encoder's final LayerNorm ({name}), while this model "
                "(VideoMAEv2 / SignNet) mean-pools the tokens into fc_norm -> head; that head "
                "is not supported. Convert the pre-training checkpoint it started from, or "
                "re-save the file without its classifier to use the encoder alone"
            )
        pretrain = True  # an encoder with its final norm and no classifier: a backbone
    dropped = sorted(k for k in sd if pretrain and k.startswith(_PRETRAIN_ONLY))
    sd = {k: v for k, v in sd.items() if k not in dropped}
    if "patch_embed.proj.weight" not in sd:
        raise ConversionError(
            f"{path} is not a VideoMAEv2 or Hugging Face VideoMAE checkpoint: no patch "
            f"embedding found (first keys: {sorted(sd)[:5]})"
        )
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    return Source(sd, "huggingface" if is_hf else "videomae_v2", pretrain, dropped)


# --- mapping ------------------------------------------------------------------------


def _guess_preset(sd: dict[str, np.ndarray]) -> str:
    shape = sd["patch_embed.proj.weight"].shape  # torch OIDHW
    dim, patch = shape[0], shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for name, p in vit.PRESETS.items():
        if (p["embed_dim"], p["depth"], p["patch_size"]) == (dim, depth, patch):
            return f"preset {name}"
    return f"no preset (embed dim {dim}, {depth} blocks, patch {patch})"


def _interpolation_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's ``interpolate(mode="linear" | "bicubic",
    align_corners=False)`` along one axis: half-pixel centres, no antialiasing when shrinking,
    edge samples repeated; bicubic with Keys' a = -0.75, as PyTorch."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    weights = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    if method == "linear":
        x = np.maximum(x, 0.0)  # PyTorch clamps linear's source index, not cubic's
        i = np.floor(x).astype(int)
        frac = x - i
        np.add.at(weights, (rows, i), 1 - frac)
        np.add.at(weights, (rows, np.minimum(i + 1, n_in - 1)), frac)
        return weights
    a = -0.75
    i = np.floor(x).astype(int)
    for offset in (-1, 0, 1, 2):
        d = np.abs(x - (i + offset))  # distance to the tap: 1 or 2 outside, 0..1 inside
        w = np.where(
            d <= 1,
            ((a + 2) * d - (a + 3)) * d * d + 1,
            ((a * d - 5 * a) * d + 8 * a) * d - 4 * a,
        )
        np.add.at(weights, (rows, np.clip(i + offset, 0, n_in - 1)), w)
    return weights


def _resize_pos_embed(table: np.ndarray, src: tuple[int, int, int], dst: tuple[int, int, int]):
    """Resize a learned (1, T*H*W, C) position table: linear in time, bicubic in space, as
    PyTorch's ``interpolate(align_corners=False)`` does (VideoMAEv2 fine-tuning resizes its
    table's spatial grid with ``mode="bicubic"``); computed in float64."""
    c = table.shape[-1]
    grid = np.asarray(table, np.float64).reshape(*src, c)
    t, h, w = (_interpolation_matrix(n, m, "linear" if k == 0 else "bicubic")
               for k, (n, m) in enumerate(zip(src, dst, strict=True)))  # fmt: skip
    out = np.einsum("at,bh,cw,thwk->abck", t, h, w, grid)
    return out.astype(table.dtype).reshape(1, -1, c)


@dataclasses.dataclass
class Report:
    fresh: list[str]
    dropped: list[str]
    warnings: list[str]


def to_flax(
    source: Source,
    preset: str,
    num_frames: int,
    num_classes: int,
    img_size: int = 224,
    seed: int = 0,
    pos_grid: tuple[int, int, int] | None = None,
) -> tuple[vit.ViTConfig, dict, Report]:
    """Map VideoMAEv2-named weights onto the Flax model.

    Layer scale, cosine attention and a learned position table are taken from the
    checkpoint's own keys; everything else must fit ``preset``. ``pos_grid`` is the token grid
    (time, rows, columns) of a learned position table, where its size leaves it ambiguous.

    Returns:
      The model config, the nested parameter dict and a report of fresh, dropped and
      adjusted weights.

    Raises:
      ConversionError: listing missing, unexpected and mis-shaped keys by name.
    """
    sd = source.state
    cfg = vit.ViTConfig.from_preset(
        preset,
        num_classes=num_classes,
        num_frames=num_frames,
        img_size=img_size,
        init_values=0.1 if "blocks.0.gamma_1" in sd else 0.0,
        cos_attn="blocks.0.attn.scale" in sd,
        learned_pos_emb="pos_embed" in sd,
    )
    table = param_table(cfg)
    shapes = {
        path: leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(vit.abstract_params(cfg))[0]
        for path in [tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)]
    }
    assert set(shapes) == set(table), "conversion table out of step with the model"

    report = Report(fresh=[], dropped=list(source.dropped), warnings=[])
    params: dict[Path, np.ndarray] = {}
    missing, misshaped = [], []
    head_keys = {"head.weight", "head.bias"}
    no_head = not (head_keys & set(sd))
    for path, (key, fn) in table.items():
        if key not in sd:
            if key in head_keys and no_head:
                continue  # backbone-only checkpoint: fresh head below
            if key.startswith("fc_norm.") and source.pretrain:
                continue  # pre-training has no fc_norm: fresh below
            missing.append(key)
            continue
        value = fn(sd[key])
        if key == "pos_embed" and value.shape[-1] == cfg.embed_dim:
            src = _pos_grid(value.shape[1], cfg, pos_grid)
            if src != cfg.grid:
                value = _resize_pos_embed(value, src, cfg.grid)
                report.warnings.append(
                    f"learned position table resized from grid {src} to {cfg.grid}"
                )
        if value.shape != shapes[path]:
            if key in head_keys and sd["head.weight"].shape[1] == cfg.embed_dim:
                continue  # another class count: re-initialised below
            else:
                misshaped.append(
                    f"{key}: checkpoint {sd[key].shape}, model needs "
                    f"{_torch_shape(fn, shapes[path])}"
                )
                continue
        params[path] = value
    unexpected = sorted(set(sd) - {key for key, _ in table.values()})
    if missing or unexpected or misshaped:
        lines = [
            f"the checkpoint does not fit preset {cfg.preset} (it looks like {_guess_preset(sd)}):"
        ]
        for title, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ):
            if keys:
                shown = ", ".join(keys[:12]) + (
                    f", ... ({len(keys)} in all)" if len(keys) > 12 else ""
                )
                lines.append(f"  {title} keys: {shown}")
        lines.append("choose the matching --model preset, or check the file")
        raise ConversionError("\n".join(lines))

    key = jax.random.key(seed)
    fresh_head = ("head", "kernel") not in params
    if fresh_head:
        if not no_head:
            report.warnings.append(
                f"head re-initialised: checkpoint has {sd['head.weight'].shape[0]} classes, "
                f"--num-classes is {num_classes}"
            )
        init = vit.timm_trunc_normal(0.02, cfg.init_scale)
        params[("head", "kernel")] = np.asarray(init(key, (cfg.embed_dim, num_classes)))
        params[("head", "bias")] = np.zeros((num_classes,), np.float32)
        report.fresh += ["head.weight", "head.bias"]
    if ("fc_norm", "scale") not in params:
        params[("fc_norm", "scale")] = np.ones((cfg.embed_dim,), np.float32)
        params[("fc_norm", "bias")] = np.zeros((cfg.embed_dim,), np.float32)
        report.fresh += ["fc_norm.weight", "fc_norm.bias"]
    return cfg, _nest(params), report


def _pos_grid(
    n: int, cfg: vit.ViTConfig, given: tuple[int, int, int] | None = None
) -> tuple[int, int, int]:
    """Token grid (time, rows, columns) of a stored n-token position table.

    ``given`` (--pos-grid) wins. Otherwise the plausible grids are the model's spatial grid,
    the model's temporal grid with a square spatial grid, and the 224-px grid; their one
    answer, or an error naming them when they disagree.
    """
    if given is not None:
        if int(np.prod(given)) != n:
            raise ConversionError(
                f"--pos-grid {_fmt_grid(given)} is {int(np.prod(given))} tokens but the "
                f"checkpoint's position table has {n}"
            )
        return tuple(given)
    if n == cfg.num_patches:
        return cfg.grid
    t, h, w = cfg.grid
    candidates = []
    if n % (h * w) == 0:
        candidates.append((n // (h * w), h, w))
    side = int(round((n / t) ** 0.5))
    if t * side * side == n:
        candidates.append((t, side, side))
    p224 = 224 // cfg.patch_size
    if n % (p224 * p224) == 0:
        candidates.append((n // (p224 * p224), p224, p224))
    candidates = list(dict.fromkeys(candidates))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ConversionError(
            f"cannot infer the token grid of the checkpoint's {n}-token position table; give "
            "it as --pos-grid T,H,W (time x rows x columns of tokens)"
        )
    raise ConversionError(
        f"the checkpoint's {n}-token position table could be a token grid of "
        f"{' or '.join(_fmt_grid(c) for c in candidates)} (time x rows x columns); say which "
        f"with --pos-grid T,H,W, e.g. --pos-grid {','.join(map(str, candidates[-1]))}"
    )


def _fmt_grid(grid: tuple[int, ...]) -> str:
    return "x".join(map(str, grid))


def _torch_shape(fn: Callable, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return _INVERSE[fn](np.empty(flax_shape, np.uint8)).shape


def _nest(flat: dict[Path, np.ndarray]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def _get(tree: dict, path: Path) -> Any:
    for p in path:
        tree = tree[p] if p in tree else tree[str(p)]
    return tree


def to_torch(params: dict, cfg: vit.ViTConfig) -> dict[str, np.ndarray]:
    """Flax parameters back to a VideoMAEv2-named state dict (numpy arrays)."""
    return {
        key: np.ascontiguousarray(_INVERSE[fn](np.asarray(_get(params, path))))
        for path, (key, fn) in param_table(cfg).items()
    }


# --- whole jobs ---------------------------------------------------------------------


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names as data_prep.build_records reads its --class-list (the same names on both
    sides): one gloss a line, or `index gloss` lines like wlasl_class_list.txt."""
    from data_prep import manifests

    try:
        return manifests.load_class_list(path, "--class-list")
    except (FileNotFoundError, ValueError) as e:  # each message names the file
        raise ConversionError(str(e)) from e


def convert(
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    preset: str,
    num_frames: int,
    num_classes: int,
    img_size: int = 224,
    class_names: list[str] | None = None,
    seed: int = 0,
    pos_grid: tuple[int, int, int] | None = None,
    hht: dict | None = None,
) -> Report:
    """Convert a PyTorch checkpoint into an orbax model checkpoint at ``output``.

    Nothing is written unless the whole conversion succeeds. ``pos_grid``: see ``to_flax``.
    ``hht``: the H&HT settings the weights were trained with (``HHTSettings.to_dict()``),
    recorded for predict; None records none.
    """
    vit.resolve_preset(preset)  # unknown preset: fail before reading a large file
    if class_names is not None and len(class_names) != num_classes:
        raise ConversionError(
            f"the class list has {len(class_names)} names but --num-classes is {num_classes}"
            + (
                f"; for a WLASL-{num_classes} model (the first {num_classes} glosses of "
                f"wlasl_class_list.txt) give a list of those: head -n {num_classes} LIST > "
                f"classes{num_classes}.txt"
                if len(class_names) > num_classes
                else ""
            )
        )
    out = checkpointing.local_path(output, write=True)  # before reading a large input
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"output {out} already exists; choose a new path or delete it")
    _check_creatable(out)
    source = read_checkpoint(input_path)
    cfg, params, report = to_flax(source, preset, num_frames, num_classes, img_size, seed, pos_grid)
    meta = {
        "model": cfg.to_dict(),
        "classes": class_names,
        "source": {
            "file": os.path.basename(str(input_path)),
            "format": source.format,
            "pretrain": source.pretrain,
            "fresh": report.fresh,
            "tool": TOOL_VERSION,
        },
    }
    if hht is not None:
        meta["hht"] = hht
    checkpointing.save_model(out, params, meta)
    return report


def hht_settings(value: str) -> dict:
    """``--hht``: 'faithful', 'default', or a records folder (or its dataset_info.json) whose
    H&HT settings to record; as ``HHTSettings.to_dict()``."""
    from signnet_jax.data import records
    from signnet_jax.hht.settings import HHTSettings

    if value in ("faithful", "default"):
        return HHTSettings(faithful=value == "faithful").to_dict()
    path = pathlib.Path(value).expanduser()
    folder = path.parent if path.name == records.DATASET_INFO else path
    if not (folder / records.DATASET_INFO).is_file():
        raise ConversionError(
            f"--hht {value}: give 'faithful', 'default' or a records folder; "
            f"{folder / records.DATASET_INFO} does not exist"
        )
    try:
        settings = records.load_dataset_info(folder).get("hht_settings")
        if settings is None:
            raise ValueError(f"{folder / records.DATASET_INFO} records none")
        return HHTSettings.from_dict(settings).to_dict()
    except (OSError, ValueError, TypeError) as e:
        raise ConversionError(f"--hht {value}: no usable H&HT settings ({e})") from e


def _check_creatable(output: pathlib.Path) -> None:
    # probed beside it, where the checkpoint is built under a temporary name (an empty folder
    # at output is replaced by it)
    problem = files.creation_problem(output.parent / f".{output.name}.probe")
    if problem:
        raise ConversionError(
            f"cannot write --output {output}: {problem}; choose a folder you can write to"
        )


def class_list_path(output: str | os.PathLike) -> pathlib.Path:
    """Where --to-pytorch writes the class names of ``output`` (NAME.pth -> NAME.classes.txt)."""
    return pathlib.Path(output).with_suffix(".classes.txt")


def export_pytorch(
    checkpoint: str | os.PathLike, output: str | os.PathLike, step: int | str = "latest"
) -> tuple[int, list[str] | None, int]:
    """Write a signnet_jax checkpoint as a VideoMAEv2-named PyTorch state dict (.pth).

    A state dict holds tensors only, so the class names (which head row is which gloss) go
    beside it as ``class_list_path(output)``, in the `index<TAB>gloss` lines --class-list reads.

    ``step``: 'latest', 'best' (highest validation top-1 of a training run) or a number.

    Returns:
      The number of tensors written, the class names (None: the checkpoint has none) and
      the step exported.
    """
    torch = _torch(f"writing {output}, a PyTorch state dict,")
    output = checkpointing.local_path(output, write=True)
    if output.suffix.lower() not in (".pth", ".pt"):
        raise ConversionError(f"--output {output}: give a .pth (or .pt) file name")
    for path in (output, class_list_path(output)):
        if path.exists():
            raise ConversionError(f"output {path} already exists; choose a new path or delete it")
    _check_creatable(output)
    # a training workdir works as well as its checkpoints folder (as for predict)
    checkpoint = checkpointing.resolve_checkpoint(checkpoint)
    step = checkpointing.select_step(checkpoint, step)
    params, meta = checkpointing.load_model(checkpoint, step)
    cfg = vit.ViTConfig.from_dict(meta["model"])
    sd = {k: torch.from_numpy(np.array(v)) for k, v in to_torch(params, cfg).items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    classes, names = meta.get("classes"), class_list_path(output)
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        try:
            if classes is not None:  # the names first, so a .pth is never left without them
                lines = "".join(f"{i}\t{name}\n" for i, name in enumerate(classes))
                files.atomic_write(names, lines.encode("utf-8"))
            torch.save(sd, tmp)
        except (OSError, RuntimeError) as e:  # a full disk: torch's zip writer says "enforce fail"
            tmp.unlink(missing_ok=True)  # (the space it took is free again)
            need = sum(t.numel() * t.element_size() for t in sd.values()) / 2**20
            free = shutil.disk_usage(tmp.parent).free / 2**20
            reason = str(e).strip().splitlines()[0][:200]
            raise ConversionError(
                f"cannot write {output} ({reason}); it takes about {need:.0f} MiB, {free:.0f} MiB "
                "are free there: make room, or give another path"
            ) from e
        os.replace(tmp, output)
    except BaseException:  # Ctrl-C too
        # nothing of a failed export stays (a rerun would refuse it); a Ctrl-C right after the
        # rename leaves the whole export
        if classes is not None and not output.exists():
            names.unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return len(sd), classes, step


def _grid_arg(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"give three positive integers T,H,W, not {text!r}")
    return tuple(int(p) for p in parts)


# The options of each direction; each is refused in the other, where it would be ignored.
_TO_FLAX = (
    "model", "num_frames", "num_classes", "img_size", "class_list", "seed", "pos_grid", "hht"
)  # fmt: skip
_TO_TORCH = ("step",)
_DEFAULTS = {"img_size": 224, "seed": 0, "step": "latest"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse(argv: Iterable[str] | None) -> argparse.Namespace:
    prog = "python -m signnet_jax.convert"
    p = argparse.ArgumentParser(
        prog=prog,
        usage=f"\n  {prog} --input FILE --output DIR\n"
        "      --model PRESET --num-frames N --num-classes N\n"
        "      [--img-size N] [--class-list FILE] [--seed N] [--pos-grid T,H,W]\n"
        "      [--hht faithful|default|RECORDS]\n"
        f"  {prog} --to-pytorch --input DIR --output FILE.pth [--step STEP]",
        description="Convert VideoMAEv2 (.pth, DeepSpeed .pt) or Hugging Face VideoMAE "
        "(.safetensors, .bin) weights to a signnet_jax orbax checkpoint, or back with "
        "--to-pytorch.",
    )
    p.add_argument(
        "--input", required=True, metavar="PATH",
        help="checkpoint file (or, with --to-pytorch, checkpoint dir or training workdir)",
    )  # fmt: skip
    p.add_argument(
        "--output", required=True, metavar="PATH", help="new checkpoint dir (or .pth file)"
    )
    to_flax = p.add_argument_group("to a signnet_jax checkpoint (the default)")
    to_flax.add_argument(
        "--model", metavar="PRESET",
        help="required: preset S, B, L, H, g (or a VideoMAEv2 model name)",
    )  # fmt: skip
    to_flax.add_argument(
        "--num-frames", type=int, metavar="N",
        help="required: clip length the model will see, a multiple of 2, e.g. 16 or 32",
    )  # fmt: skip
    to_flax.add_argument(
        "--num-classes", type=int, metavar="N",
        help="required: classes of the head (re-initialised if new)",
    )  # fmt: skip
    to_flax.add_argument(
        "--img-size", type=int, metavar="N",
        help="frame size, a multiple of the patch size (default 224)",
    )  # fmt: skip
    to_flax.add_argument(
        "--class-list", metavar="FILE",
        help="class names, one per line (wlasl_class_list.txt works)",
    )  # fmt: skip
    to_flax.add_argument(
        "--seed", type=int, metavar="N", help="seed of a freshly initialised head (default 0)"
    )
    to_flax.add_argument(
        "--pos-grid", type=_grid_arg, metavar="T,H,W",
        help="token grid of the checkpoint's learned position table, where its size is ambiguous",
    )  # fmt: skip
    to_flax.add_argument(
        "--hht", metavar="faithful|default|RECORDS",
        help="the H&HT settings the weights were trained with, recorded in the checkpoint for "
        "predict: 'faithful' (the original SignNet preprocessing, for its published weights), "
        "'default' (this project's), or a records folder (its dataset_info.json); default: "
        "none recorded, predict then uses the defaults",
    )  # fmt: skip
    to_torch = p.add_argument_group("back to a PyTorch state dict")
    to_torch.add_argument("--to-pytorch", action="store_true", help="export a checkpoint to .pth")
    to_torch.add_argument(
        "--step",
        help="the step of a training run to export: 'latest' (default), 'best' or N",
    )
    args = p.parse_args(None if argv is None else list(argv))
    given, unused = (_TO_TORCH, _TO_FLAX) if args.to_pytorch else (_TO_FLAX, _TO_TORCH)
    ignored = [_flag(name) for name in unused if getattr(args, name) is not None]
    if ignored:
        them = "it" if len(ignored) == 1 else "them"
        p.error(
            f"{', '.join(ignored)}: not used by --to-pytorch, which exports the checkpoint as "
            f"it is (its model and class names included); leave {them} out"
            if args.to_pytorch
            else f"{', '.join(ignored)}: only with --to-pytorch, to pick the step of a "
            "checkpoint to export (a PyTorch file has one set of weights); leave it out"
        )
    for name in given:
        if getattr(args, name) is None and name in _DEFAULTS:
            setattr(args, name, _DEFAULTS[name])
    if not args.to_pytorch:
        _check_sizes(p, args)
    return args


def _check_sizes(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The conversion's required flags are given and make a model (before any file is read)."""
    for name in ("model", "num_frames", "num_classes"):
        if getattr(args, name) is None:
            p.error(f"{_flag(name)} is required (unless --to-pytorch)")
    if args.num_classes < 1:
        p.error(f"--num-classes {args.num_classes}: the head needs at least 1 class")
    try:
        preset = vit.resolve_preset(args.model)
    except ValueError:
        preset = None  # convert() names the presets (before it reads the input)
    flags = ("--num-frames", "--img-size")
    for problem in vit.clip_problems(preset, args.num_frames, args.img_size, flags):
        p.error(problem)


def main(argv: Iterable[str] | None = None) -> int:
    files.interrupt_as_usual()
    args = _parse(argv)
    output = pathlib.Path(args.output).expanduser()
    before = files.stamp(output)
    try:
        if args.to_pytorch:
            n, classes, step = export_pytorch(args.input, args.output, args.step)
        else:
            names = read_class_list(args.class_list) if args.class_list else None
            hht = None if args.hht is None else hht_settings(args.hht)
            report = convert(
                args.input,
                args.output,
                args.model,
                args.num_frames,
                args.num_classes,
                args.img_size,
                names,
                args.seed,
                args.pos_grid,
                hht,
            )
    except (ConversionError, checkpointing.CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # both directions write under a temporary name, then rename
        if files.stamp(output) != before:  # Ctrl-C came right after the rename
            return files.interrupted(f"after {args.output} was written")
        return files.interrupted(f"nothing written at {args.output}")
    if args.to_pytorch:
        names = (
            f" and the {len(classes)} class names to "
            f"{class_list_path(args.output)} (give it to --class-list when converting back)"
            if classes
            else ""
        )
        print(f"wrote {n} tensors of step {step} to {args.output}{names}")
        return 0
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if report.dropped:
        print(
            f"dropped {len(report.dropped)} pre-training keys (decoder, mask token, encoder norm)",
            file=sys.stderr,
        )
    if report.fresh:
        print(f"freshly initialised: {', '.join(report.fresh)}", file=sys.stderr)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
