"""Training on a device mesh: ``train_and_evaluate(config, workdir)``.

The published VideoMAEv2 fine-tuning recipe: AdamW with layer decay and the
per-step warmup + cosine schedule, mixup / cutmix and random erasing on the
device, drop path, periodic single-view validation, orbax checkpoints that also
hold the data-iterator position (exact resume), and the multi-view test at the
end (``evaluate.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from signnet_jax import checkpointing, evaluate, files, optim, sharding
from signnet_jax.data import augment, device, pipeline, records
from signnet_jax.data.records import load_dataset_info
from signnet_jax.metrics import plot_training_curves
from signnet_jax.models import vit
from signnet_jax.models.flops import peak_flops, train_flops


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


# --- set-up (everything is checked before anything is written) ---------------------


def dataset_classes(config: ml_collections.ConfigDict) -> tuple[list[str], dict]:
    """Class names and dataset_info of ``config.records_dir``; clear errors when absent."""
    if not config.records_dir:
        raise TrainingError(
            "config.records_dir is empty: set --config.records_dir to a folder written by "
            "python -m data_prep.build_records"
        )
    if "://" not in config.records_dir and not os.path.exists(config.records_dir):
        raise TrainingError(
            f"records folder {config.records_dir} does not exist; build it with python -m "
            "data_prep.build_records, or fix --config.records_dir"
        )
    try:
        info = load_dataset_info(config.records_dir)
    except FileNotFoundError as e:
        raise TrainingError(
            f"records folder {config.records_dir} has no dataset_info.json ({e}); build it with "
            "python -m data_prep.build_records, or fix --config.records_dir"
        ) from e
    except (ImportError, NotADirectoryError) as e:
        raise TrainingError(f"config.records_dir: {e}") from e
    except records.DatasetInfoError as e:
        raise TrainingError(
            f"{e}: restore it from a good copy, or build the records again (python -m "
            "data_prep.build_records)"
        ) from e
    classes = list(info["classes"])
    try:
        augment.check_flip_layout(config.data.flip, info.get("hht_settings"), config.records_dir)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    # what the mode reads (eval mode: the test split alone); each host looks at its own copy,
    # and a host that lacks files stops the others too
    splits = (config.train_split, config.val_split, config.test_split)
    used = [s for s in (splits if config.mode != "eval" else splits[2:]) if s]
    for split in used:
        if not info["splits"].get(split, {}).get("num_records"):
            counts = {k: v.get("num_records", 0) for k, v in sorted(info["splits"].items())}
            raise TrainingError(
                f"records folder {config.records_dir} has no records in split {split!r} "
                f"(records per split: {counts}); rebuild it, or set --config.train_split / "
                "val_split / test_split ('' skips validation or the test)"
            )

    def look_for_files() -> None:
        try:
            missing = records.missing_files(config.records_dir, info, used)
        except OSError as e:  # a bucket that refuses this machine's account, say
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(
                f"cannot look for the files of records folder {config.records_dir} ({reason}); "
                "check that this machine may read it"
            ) from e
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            shown = ", ".join(missing[:3]) + more
            raise TrainingError(
                f"records folder {config.records_dir} lacks {len(missing)} of the files its "
                f"{records.DATASET_INFO} lists ({shown}): copy the whole folder again, or "
                "build the records again (python -m data_prep.build_records)"
            )

    first_on_process_0(look_for_files, "find the records' files")
    return classes, info


def ensure_smoke(config: ml_collections.ConfigDict) -> None:
    """Generate the synthetic smoke dataset into records_dir unless it is there (the model
    settings are checked first: generating takes a while)."""
    from data_prep.synthetic import SmokeDatasetError, ensure_smoke_dataset

    model_config(config, config.smoke.classes)
    if not config.records_dir:
        raise TrainingError(
            "config.records_dir is empty: set --config.records_dir to the folder the smoke "
            "dataset is made in (configs/smoke.py: runs/smoke_records)"
        )
    opts = {k: v for k, v in config.smoke.items() if k != "enabled"}
    if jax.process_index() == 0:
        print(f"smoke dataset in {config.records_dir} ({opts})", flush=True)

    def build() -> None:
        try:
            ensure_smoke_dataset(config.records_dir, **opts)
        except SmokeDatasetError as e:  # bad options, or a folder it cannot use
            raise TrainingError(
                f"config.smoke: {e} (the smoke config makes its synthetic records in "
                "config.records_dir; for records of your own add --config.smoke.enabled=False)"
            ) from e

    # on several hosts, process 0 builds first: a folder they share is then built once (file
    # locks do not reach across hosts on every filesystem), a folder of each host's own is
    # built by each
    first_on_process_0(build, "make the smoke dataset")


def first_on_process_0(fn, doing: str) -> None:
    """Runs ``fn`` on process 0, then on the others; when it fails anywhere, every process
    raises (the error itself where it failed, a TrainingError naming those processes
    elsewhere) instead of the others waiting for the failed one forever. ``doing``: what ``fn``
    does, for that message ("make the smoke dataset")."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    for turn in ("first", "then"):
        error = None
        if (jax.process_index() == 0) == (turn == "first"):
            try:
                fn()
            except Exception as e:  # raised once every process knows
                error = e
        failed = np.flatnonzero(multihost_utils.process_allgather(np.int32(error is not None)))
        if error is not None:
            raise error
        if len(failed):
            which = ", ".join(map(str, failed))
            raise TrainingError(
                f"process{'es' * (len(failed) > 1)} {which} failed to {doing}; see "
                f"{'their messages' if len(failed) > 1 else 'its message'}"
            )


def arch_overrides(src: vit.ViTConfig) -> dict[str, Any]:
    """The ``model.*`` config values that build the architecture of ``src``: its preset, and
    each dimension that differs from the preset's (0: the preset's own)."""
    base = vit.PRESETS[src.preset]
    dims = ("embed_dim", "depth", "num_heads", "mlp_dim")
    return {"model.preset": src.preset} | {
        f"model.{k}": 0 if getattr(src, k) == base[k] else getattr(src, k) for k in dims
    }


def model_config(config: ml_collections.ConfigDict, num_classes: int) -> vit.ViTConfig:
    """The model of ``config.model``; a bad preset, dtype, attention or clip size is named."""
    m = config.model
    overrides = {
        k: getattr(m, k) for k in ("embed_dim", "depth", "num_heads", "mlp_dim") if getattr(m, k)
    }
    try:
        return vit.ViTConfig.from_preset(
            m.preset,
            num_classes=num_classes,
            num_frames=m.num_frames,
            img_size=m.img_size,
            drop_path_rate=m.drop_path_rate,
            head_drop_rate=m.head_drop_rate,
            init_scale=m.init_scale,
            dtype=m.dtype,
            remat=m.remat,
            remat_policy=m.remat_policy,
            scan_layers=m.scan_layers,
            attention=m.attention,
            **overrides,
        )
    except ValueError as e:
        raise TrainingError(f"config.model: {e}") from e


_ARCH = ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size", "tubelet_size", "in_chans")


def load_init(
    config: ml_collections.ConfigDict, cfg: vit.ViTConfig, classes: list[str]
) -> tuple[vit.ViTConfig, dict, str, list[str]]:
    """Warm-start parameters from ``config.init_from`` fitted to this model and class list.

    Returns:
      (model config with the checkpoint's structural options, params, a note for the log,
      warnings for the log).
    """
    try:
        # a training workdir stands for its checkpoints/ folder, as in predict
        source = checkpointing.resolve_checkpoint(config.init_from)
        params, meta = checkpointing.load_model(source, config.load_step)
    except checkpointing.CheckpointError as e:
        # eval mode reads its checkpoint (the workdir's own, or init_from) through here; the
        # message names it
        label = "" if config.mode == "eval" else "config.init_from: "
        raise TrainingError(f"{label}{e}") from e
    src = vit.ViTConfig.from_dict(meta["model"])
    differ = [k for k in _ARCH if getattr(src, k) != getattr(cfg, k)]
    if differ:
        fix = {k: v for k, v in arch_overrides(src).items() if config.model[k[6:]] != v}
        raise TrainingError(
            f"init checkpoint {config.init_from} is a ViT-{src.preset} "
            f"({', '.join(f'{k}={getattr(src, k)}' for k in differ)}) but the config asks for "
            f"ViT-{cfg.preset} ({', '.join(f'{k}={getattr(cfg, k)}' for k in differ)}); "
            f"set {' '.join(f'--config.{k}={v}' for k, v in fix.items())} to match, or convert "
            "a checkpoint of the config's model"
        )
    # Structural options (layer scale, cosine attention, learned positions) come with the weights.
    cfg = dataclasses.replace(
        cfg,
        init_values=src.init_values,
        cos_attn=src.cos_attn,
        learned_pos_emb=src.learned_pos_emb,
    )
    if cfg.learned_pos_emb and cfg.num_patches != params["pos_embed"].shape[1]:
        raise TrainingError(
            f"init checkpoint {config.init_from} has a learned position table for "
            f"{params['pos_embed'].shape[1]} tokens but the clips give {cfg.num_patches}; "
            "re-convert it with --num-frames/--img-size of this config"
        )
    params = vit.match_structure(vit.abstract_params(cfg), params)
    src_classes = meta.get("classes")
    head_k = params["head"]["kernel"]
    note = f"warm start from {config.init_from}"
    if src_classes is None and head_k.shape[1] == len(classes):
        unnamed = (
            f"init checkpoint {config.init_from} has no class names, so its "
            f"{len(classes)} head rows cannot be matched to the records' classes"
        )
        fix = "convert it again with --class-list (the class list it was trained with)"
        if config.mode == "eval":
            raise TrainingError(f"{unnamed}; {fix}")
        warned = f"{unnamed}: they are taken in the records' order; if it was trained with "
        return cfg, params, note, [warned + f"another order, {fix}"]
    if src_classes == classes:
        return cfg, params, note, []
    if src_classes is not None and sorted(src_classes) == sorted(classes):
        order = [src_classes.index(c) for c in classes]
        params["head"]["kernel"] = head_k[:, order]
        params["head"]["bias"] = params["head"]["bias"][order]
        return cfg, params, note + " (head rows reordered to the records' class order)", []
    if config.mode == "eval":  # init_reset_head would only test an untrained head
        raise TrainingError(
            f"eval mode: checkpoint {config.init_from} has a {head_k.shape[1]}-class head but "
            f"the records in {config.records_dir} have {len(classes)} classes"
            + (" with other names" if src_classes and len(src_classes) == len(classes) else "")
            + "; test it on records of the classes it was trained on (--config.records_dir)"
        )
    if not config.init_reset_head:
        raise TrainingError(
            f"init checkpoint {config.init_from} has a {head_k.shape[1]}-class head "
            f"but the records have {len(classes)} classes"
            + (" with other names" if src_classes and len(src_classes) == len(classes) else "")
            + "; set --config.init_reset_head=True to start a new head"
        )
    fresh = vit.timm_trunc_normal(0.02, cfg.init_scale)(
        jax.random.key(config.seed), (cfg.embed_dim, len(classes))
    )
    params["head"] = {"kernel": np.asarray(fresh), "bias": np.zeros(len(classes), np.float32)}
    return cfg, params, note + f" (new {len(classes)}-class head)", []


# Settings a run may be resumed with other values of: where data and checkpoints are, how the
# work is spread and fed, what is logged and evaluated, and how the same update is computed
# (accumulation, dtype, kernels). The architecture is compared as the model it builds
# (_resumed_model: model.embed_dim=0 is preset B's 768). Every other setting shapes the run's
# trajectory.
_RESUMABLE_WITH_CHANGES = {
    "mode", "records_dir", "val_split", "test_split", "init_from", "load_step",
    "init_reset_head", "model.preset", "model.embed_dim", "model.depth", "model.num_heads",
    "model.mlp_dim", "model.num_frames", "model.img_size", "model.dtype", "model.remat",
    "model.remat_policy", "model.scan_layers", "model.attention", "model.init_scale",
    "data.short_side_size", "data.test_num_segment", "data.test_num_crop", "data.eval_batch_size",
    "data.eval_views_per_device", "data.num_workers", "data.num_threads",
    "data.prefetch", "optim.grad_accum", "optim.loss_scale", "optim.loss_scale_window",
    "optim.loss_scale_hysteresis",
}  # fmt: skip
_RESUMABLE_GROUPS = ("mesh.", "train.", "distributed.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _changed_settings(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """``KEY=SAVED (config: NOW)`` for each setting that shapes the run and differs from the
    run's own (settings the run's version did not have are not compared)."""
    saved = _flat(saved)
    return [
        f"{k}={saved[k]!r} (config: {v!r})"
        for k, v in _flat(json.loads(config.to_json_best_effort())).items()
        if k in saved
        and saved[k] != v
        and k not in _RESUMABLE_WITH_CHANGES
        and not k.startswith(_RESUMABLE_GROUPS)
    ]


def _resumed_model(
    resume: pathlib.Path, cfg: vit.ViTConfig, classes: list[str], config: ml_collections.ConfigDict
) -> vit.ViTConfig:
    """The model config of a run being resumed, checked against what the config asks for."""
    try:
        meta = checkpointing.load_meta(resume)
    except checkpointing.CheckpointError as e:
        raise TrainingError(f"cannot resume: {e}") from e
    workdir = resume.parent
    src = vit.ViTConfig.from_dict(meta["model"])
    differ = [k for k in _ARCH + ("num_frames", "img_size") if getattr(src, k) != getattr(cfg, k)]
    if differ:
        what = ", ".join(f"{k} {getattr(src, k)} (config: {getattr(cfg, k)})" for k in differ)
        raise TrainingError(
            f"the run in {workdir} has {what}; resume it with the config it was started with, "
            "or give a new --workdir"
        )
    saved_classes = meta.get("classes") or []
    if saved_classes != classes:
        other = " with other names or in another order" * (len(saved_classes) == len(classes))
        raise TrainingError(
            f"the run in {workdir} was trained on {len(saved_classes)} classes, but the records "
            f"in {config.records_dir} have {len(classes)}{other}; give the records it was "
            "trained on (--config.records_dir), or a new --workdir"
        )
    changed = _changed_settings(meta.get("config", {}), config)
    if changed:
        raise TrainingError(
            f"the run in {workdir} was started with other settings: {', '.join(changed)}; "
            "resume it with the settings it was started with, or give a new --workdir "
            f"(--config.init_from={workdir} starts from its weights)"
        )
    return dataclasses.replace(
        cfg, init_values=src.init_values, cos_attn=src.cos_attn, learned_pos_emb=src.learned_pos_emb
    )


def parameter_shardings(cfg: vit.ViTConfig, config: ml_collections.ConfigDict, mesh):
    """``(graphdef, shardings, dropped)`` of the model's parameters on ``mesh`` by the config's
    rules table (``config.mesh.rules``); ``dropped`` as ``sharding.param_shardings``."""
    abstract = nnx.eval_shape(lambda: vit.create_model(cfg))
    graphdef, abstract_state = nnx.split(abstract, nnx.Param)
    rules = {k: (v or None) for k, v in config.mesh.rules.items()}
    shardings, dropped = sharding.param_shardings(abstract_state, mesh, rules)
    return graphdef, nnx.to_pure_dict(shardings), dropped


def sharded_params(shapes, param_sh):
    """The parameters' ShapeDtypeStructs (``vit.abstract_params``) carrying their shardings."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_sh
    )


def train_state_layout(abstract_params, tx, mesh, ema: bool, loss_scale: bool = False):
    """How the training state lies on the mesh, without allocating it.

    The optimizer state is sharded like the parameters it tracks (its step counters
    replicated) and the EMA weights, when kept, like the parameters. Needs no mesh in context;
    traces the optimizer's init on the default device (so it also serves a topology compiled
    for ahead of time, outside its mesh).

    Args:
      abstract_params: the parameters as ShapeDtypeStructs with shardings (``sharded_params``).
      tx: the optimizer.
      mesh: the mesh.
      ema: whether the state keeps an exponential moving average of the parameters.
      loss_scale: whether it keeps a dynamic loss scale (float16, replicated).

    Returns:
      ``(shardings, abstract state)``: pytrees ``{"params", "opt_state"[, "ema"]
      [, "loss_scale"]}``.
    """
    param_sh = jax.tree.map(lambda a: a.sharding, abstract_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract_opt, param_sh, transform_non_params=lambda _: replicated
    )
    abstract = {"params": abstract_params, "opt_state": abstract_opt}
    state_sh = {"params": param_sh, "opt_state": opt_sh}
    if ema:
        abstract["ema"], state_sh["ema"] = abstract_params, param_sh
    if loss_scale:
        scale = jax.eval_shape(lambda: optim.loss_scale_init(optim.LossScaleConfig()))
        abstract["loss_scale"] = scale
        state_sh["loss_scale"] = jax.tree.map(lambda _: replicated, scale)
    abstract_state = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, state_sh
    )
    return state_sh, abstract_state


def loss_scaling(config: ml_collections.ConfigDict, cfg: vit.ViTConfig):
    """The dynamic loss scaling a run uses: float16 compute only (None otherwise). Its
    settings are checked whatever the dtype."""
    try:
        scaling = optim.LossScaleConfig(
            init=float(config.optim.loss_scale),
            window=int(config.optim.loss_scale_window),
            hysteresis=int(config.optim.loss_scale_hysteresis),
        )
    except ValueError as e:
        raise TrainingError(str(e)) from e
    return scaling if jnp.dtype(cfg.dtype) == jnp.float16 else None


def init_state(params, tx, state_sh, scaling, donate: bool = True) -> dict:
    """The training state at step 0 around ``params`` (donated unless ``donate`` is False):
    the optimizer's, the EMA weights when ``state_sh`` keeps them, and the loss scale when
    ``scaling`` (``loss_scaling``) is given."""

    def make(p):
        state = {"params": p, "opt_state": tx.init(p)}
        if "ema" in state_sh:
            state["ema"] = jax.tree.map(jnp.copy, p)
        if scaling is not None:
            state["loss_scale"] = optim.loss_scale_init(scaling)
        return state

    return jax.jit(
        make,
        in_shardings=(state_sh["params"],),
        out_shardings=state_sh,
        donate_argnums=(0,) if donate else (),
    )(params)


@dataclasses.dataclass
class Setup:
    model_cfg: vit.ViTConfig
    classes: list[str]
    info: dict
    mesh: jax.sharding.Mesh
    graphdef: Any
    param_sh: Any
    init_params: dict | None  # host arrays from init_from, else None (random init)
    note: str
    eval_fn: Any = None  # (views per device at a time, the jitted eval step): evaluate.py
    warnings: list[str] = dataclasses.field(default_factory=list)  # logged at the start


def prepare(config: ml_collections.ConfigDict, resume: pathlib.Path | None = None) -> Setup:
    """Resolve data, model and mesh from the config; raises before anything is written.

    Args:
      config: the run's config.
      resume: the checkpoints folder of a run being resumed: its own metadata gives the
        model's structural options, and ``init_from`` is not read again (it may be gone).
    """
    classes, info = dataset_classes(config)
    cfg = model_config(config, len(classes))
    init_params, note = None, f"random init (seed {config.seed})"
    init_warnings: list[str] = []
    if resume is not None:
        cfg = _resumed_model(resume, cfg, classes, config)
        note = f"resuming {resume}"
    elif config.init_from:
        cfg, init_params, note, init_warnings = load_init(config, cfg, classes)
    devices = mesh_devices(config)
    why = vit.unsupported_dtype(cfg.dtype, devices[0].platform)
    if why:
        raise TrainingError(f"config.model.dtype: {why}; set --config.model.dtype=bfloat16")
    try:
        mesh = sharding.make_mesh(config.mesh.fsdp, devices)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    graphdef, param_sh, dropped = parameter_shardings(cfg, config, mesh)
    check_view_sizes(config, cfg)
    setup = Setup(cfg, classes, info, mesh, graphdef, param_sh, init_params, note)
    setup.warnings += init_warnings
    if config.data.short_side_size != cfg.img_size:
        setup.warnings.append(
            f"data.short_side_size {config.data.short_side_size} differs from model.img_size "
            f"{cfg.img_size}: test views are {config.data.short_side_size}-pixel squares "
            f"while training crops and validation views are {cfg.img_size} (the published "
            "recipe uses the same size for both)"
        )
    short = [
        f"{split} {n['num_failures']} of {n['num_entries']}"
        for split in dict.fromkeys(
            (config.train_split, config.val_split, config.test_split)
            if config.mode == "train"
            else (config.test_split,)
        )
        if split and (n := info["splits"].get(split, {})).get("num_failures")
    ]
    if short:
        setup.warnings.append(
            f"{config.records_dir} lacks videos its build could not make ({', '.join(short)}; "
            f"{records.FAILURES} there says why): accuracies are over the videos it holds, "
            "not the whole split"
        )
    if resume is None and not config.init_from and not config.smoke.enabled:
        setup.warnings.append(
            "training from a random init: the published recipe and its accuracies start from "
            "a warm start, the --config.init_from in the command atop the config file (a "
            "converted VideoMAEv2 checkpoint for ASL-Citizen, the ASL-Citizen run for WLASL)"
        )
    if dropped:
        sizes = sorted({dim for _, dim, _ in dropped})
        setup.warnings.append(
            f"{len(dropped)} parameters stay replicated because mesh.fsdp={config.mesh.fsdp} "
            f"does not divide their size ({', '.join(map(str, sizes))}; e.g. {dropped[0][0]}); "
            f"pick a mesh.fsdp that divides {sizes[0]}"
        )
    return setup


def check_view_sizes(config: ml_collections.ConfigDict, cfg: vit.ViTConfig) -> None:
    """Validation and test views the model can take (checked up front: the first validation
    comes only after an epoch of training, the test after the whole run)."""
    short = config.data.short_side_size
    if config.mode == "train" and config.val_split and short < cfg.img_size:
        raise TrainingError(
            f"data.short_side_size {short} is smaller than model.img_size {cfg.img_size}: "
            f"validation views are {cfg.img_size}-pixel centre crops of frames resized to a "
            f"{short}-pixel short side; set --config.data.short_side_size={cfg.img_size}"
        )
    if not config.test_split or short == cfg.img_size:
        return
    if short % cfg.patch_size:
        raise TrainingError(
            f"data.short_side_size {short}: test views are {short}-pixel squares, which the "
            f"model's {cfg.patch_size}-pixel patches do not divide; set "
            f"--config.data.short_side_size={cfg.img_size} (model.img_size) or a multiple of "
            f"{cfg.patch_size}"
        )
    if cfg.learned_pos_emb:
        raise TrainingError(
            f"data.short_side_size {short}: test views are {short}-pixel squares, but the "
            f"model's learned position table fits {cfg.img_size}-pixel clips only; set "
            f"--config.data.short_side_size={cfg.img_size}"
        )


def mesh_devices(config: ml_collections.ConfigDict) -> list:
    """The devices of the run's mesh: all of them, or the first ``mesh.num_devices`` (one
    process only: on several, it would leave hosts without any)."""
    pc = jax.process_count()
    if config.mesh.num_devices and pc > 1:
        raise TrainingError(
            f"mesh.num_devices={config.mesh.num_devices} takes the first devices, which on "
            f"{pc} processes would leave hosts without any; leave it at 0 (every device)"
        )
    return jax.devices()[: config.mesh.num_devices or None]


def check_eval_batch(config: ml_collections.ConfigDict) -> None:
    """data.eval_batch_size must split over the devices and processes (checked up front:
    the first validation comes only after an epoch of training)."""
    size, pc, n = config.data.eval_batch_size, jax.process_count(), len(mesh_devices(config))
    if size < 1 or size % n or size % pc:
        raise TrainingError(
            f"data.eval_batch_size {size} does not split over the {n} devices "
            f"({pc} processes); set --config.data.eval_batch_size to a multiple of {n}"
        )
    views = config.data.eval_views_per_device
    if views < 0:
        raise TrainingError(
            f"data.eval_views_per_device {views!r} must be >= 0 (the views a device "
            "takes through the model at once in evaluation; 0: all of its share of a batch)"
        )


def check_batch_settings(config: ml_collections.ConfigDict) -> None:
    """The mesh, batch size, accumulation and mixup group against the devices and processes,
    before the smoke dataset is generated or anything is compiled."""
    n, pc = len(mesh_devices(config)), jax.process_count()
    try:
        sharding.check_fsdp(config.mesh.fsdp, n)
    except ValueError as e:
        raise TrainingError(str(e)) from e
    batch, accum, repeats = (
        config.data.batch_size,
        config.optim.grad_accum,
        config.data.repeated_aug,
    )
    if batch < 1 or accum < 1 or repeats < 1:
        raise TrainingError(
            f"data.batch_size ({batch}), optim.grad_accum ({accum}) and data.repeated_aug "
            f"({repeats}) must be >= 1"
        )
    if batch % accum or (batch // accum) % pc:
        raise TrainingError(
            f"data.batch_size {batch} must split into optim.grad_accum={accum} micro-batches "
            f"divisible by the {pc} processes"
        )
    clips = batch // accum * repeats
    if clips % n:
        raise TrainingError(
            f"a micro-batch of {clips} clips does not split over {n} devices; change "
            "data.batch_size"
        )
    group = config.loss.mixup_group_size
    if group < 0 or (group and clips % group):
        raise TrainingError(
            f"loss.mixup_group_size {group} must divide the {clips} clips of a micro-batch "
            f"(data.batch_size / optim.grad_accum x data.repeated_aug); "
            f"{clips // n} a device keeps the mixing on each device, 0 mixes them all"
        )
    if config.val_split or config.test_split:
        check_eval_batch(config)


def place_params(setup: Setup, seed: int) -> dict:
    """Parameters on the mesh: the warm start, or a fresh init computed sharded."""
    if setup.init_params is not None:
        return jax.device_put(
            jax.tree.map(lambda x: np.asarray(x, np.float32), setup.init_params), setup.param_sh
        )
    cfg = setup.model_cfg

    def init():
        return vit.params_of(vit.create_model(cfg, seed))

    return jax.jit(init, out_shardings=setup.param_sh)()


# --- the step -----------------------------------------------------------------------


def jit_train_step(setup: Setup, config, tx, state_sh, spec: dict):
    """The training step, jitted so that the state keeps its layout (``state_sh``) from step to
    step and the batch is split over the mesh's batch axes.

    Args:
      spec: the batch's fields, ``(shape, dtype)`` each (``batch_spec``).

    Returns:
      ``(step_fn, abstract batch)``: ``step_fn(state, batch, step)``, and the batch as
      ShapeDtypeStructs with their shardings (for ``step_fn.lower``).
    """
    mesh = setup.mesh
    batch_sh = {k: sharding.batch_sharding(mesh, len(shape)) for k, (shape, _) in spec.items()}
    step_fn = jax.jit(
        make_train_step(setup, config, tx, len(setup.classes)),
        in_shardings=(state_sh, batch_sh, sharding.replicated(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
    abstract = {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sh[k]) for k, (shape, dt) in spec.items()
    }
    return step_fn, abstract


def step_key(seed: int, micro_step: jax.Array, accum: int) -> jax.Array:
    """The device randomness (drop path, mixup, erasing noise) of micro-step ``micro_step``
    (``update step * accum + micro-step within it``).

    Keyed by the update step and the micro-step within it, so a run resumed with another
    ``optim.grad_accum`` draws no key twice (the index alone repeats earlier ones); without
    accumulation it is ``fold_in(key(seed), step)``, as it always was.
    """
    key = jax.random.fold_in(jax.random.key(seed), micro_step // accum)
    if accum == 1:
        return key
    a = micro_step % accum
    return jax.lax.cond(a > 0, lambda k: jax.random.fold_in(k, a), lambda k: k, key)


def make_train_step(setup: Setup, config, tx, num_classes: int):
    mix = optim.MixupConfig(
        mixup=config.loss.mixup,
        cutmix=config.loss.cutmix,
        prob=config.loss.mixup_prob,
        switch_prob=config.loss.switch_prob,
        label_smoothing=config.loss.label_smoothing,
        group_size=config.loss.mixup_group_size,
    )
    seed = config.seed
    graphdef, dtype = setup.graphdef, jnp.dtype(setup.model_cfg.dtype)
    ema_decay = config.optim.ema_decay
    accum = config.optim.grad_accum
    scaling = loss_scaling(config, setup.model_cfg)

    def train_step(state, batch, micro_step):
        # made inside the step: no array is created before it is compiled for its devices
        key = step_key(seed, micro_step, accum)
        k_drop, k_mix, k_erase = jax.random.split(key, 3)
        x = device.normalize_and_erase(batch["clip"], batch["erase_box"], k_erase)
        x, targets = optim.mixup_cutmix(k_mix, x, batch["label"], num_classes, mix)
        x = x.astype(dtype)
        scale = state["loss_scale"]["scale"] if scaling else None

        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(x, train=True, rngs=nnx.Rngs(dropout=k_drop))
            loss = optim.soft_target_cross_entropy(logits, targets)
            return (loss if scale is None else loss * scale), loss

        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        if scale is not None:  # unscaled as DeepSpeed does: times the reciprocal
            inv = 1.0 / scale
            grads = jax.tree.map(lambda g: g * inv.astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        old_opt = state["opt_state"]
        # whether this micro-step ends an update: the step that applies the accumulated mean
        last_micro = old_opt.mini_step == accum - 1 if accum > 1 else jnp.asarray(True)
        if accum > 1:  # the norm of the running mean that the update on the last micro-step uses
            acc, n = old_opt.acc_grads, old_opt.mini_step
            grad_norm = optax.tree.norm(
                jax.tree.map(lambda g, a: a + (g - a) / (n + 1).astype(a.dtype), grads, acc)
            )
        updates, opt_state = tx.update(grads, old_opt, state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if scaling is None:
            ok = optim.is_finite(loss, grads)
        else:
            # Float16 gradients that overflow skip the update (the accumulated one with
            # gradient accumulation: an overflow in any micro-batch spoils the mean) and
            # lower the scale, as DeepSpeed does; a non-finite loss still stops, and so does
            # an overflow with the scale at its minimum (DeepSpeed raises there).
            finite = optim.is_finite(grads)
            if accum > 1:
                finite = finite & optim.is_finite(old_opt.acc_grads)
            overflow = last_micro & ~finite
            # the parameters move on the last micro-step only (before it, optax's MultiSteps
            # adds 0 x its update, which an overflowing micro-batch makes 0 x inf = nan)
            keep = overflow | ~last_micro
            new["params"] = jax.tree.map(
                lambda n, o: jnp.where(keep, o, n), new["params"], state["params"]
            )
            skipped = optim.skipped_update(old_opt, opt_state)
            new["opt_state"] = jax.tree.map(
                lambda s, n: jnp.where(overflow, s, n), skipped, opt_state
            )
            updated, at_minimum = optim.loss_scale_update(state["loss_scale"], overflow, scaling)
            new["loss_scale"] = jax.tree.map(
                lambda u, o: jnp.where(last_micro, u, o), updated, state["loss_scale"]
            )
            ok = jnp.isfinite(loss) & ~at_minimum
            metrics |= {"loss_scale": scale, "skipped": overflow}
        if "ema" in state:  # one step per update, on its last micro-step (as the parameters),
            # and for a float16 update skipped for overflow too, as VideoMAEv2's EMA
            ema = optim.ema_update(state["ema"], new["params"], ema_decay)
            new["ema"] = jax.tree.map(lambda e, o: jnp.where(last_micro, e, o), ema, state["ema"])
        keep = ok
        if "stop" in batch:  # each host's stop code in its rows (see _LocalBatches): the
            # highest counts; a host whose input failed sent zero rows: no host updates
            metrics["stop"] = jnp.max(batch["stop"])
            failed = metrics["stop"] >= STOP_FAILED
            keep, ok = ok & ~failed, ok | failed  # not a non-finite step: the input failed
        # A non-finite step changes nothing: the state stays the last good one.
        new = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, state)
        metrics["ok"] = ok
        return new, metrics

    return train_step


# --- the loop -----------------------------------------------------------------------


class AgreedInterrupt(KeyboardInterrupt):
    """A Ctrl-C every host agreed on at the same point (see AgreedCtrlC)."""


class AgreedCtrlC:
    """On several hosts, the first Ctrl-C as a flag the hosts agree on; the second ends the
    process at once.

    A host that raised KeyboardInterrupt alone would leave the others waiting in the next
    collective until JAX's health check ended them, and hosts that each got the Ctrl-C would
    raise at different points, some inside a collective. So the code that runs collectives
    (the training loop, the evaluation) gathers ``interrupted`` with its own flags and all
    hosts stop at the same point. The flag is the process's: nested uses (a validation
    inside training) see a Ctrl-C the outer one caught. The outermost use starts with it
    clear. On one host, or when SIGINT is ignored (``cmd &``), nothing is installed.

    The Ctrl-Cs are counted by a thread reading the signal wakeup fd, to which Python's C
    handler writes every signal at once: a Python handler runs only when the main thread
    returns to Python, which it does not while it waits in a collective for a stuck host,
    the very case where a second Ctrl-C is pressed (and two Ctrl-Cs there were one call).

    Args:
      active: several hosts run.
    """

    _requested = False  # this process got a Ctrl-C (one per process)
    _depth = 0  # uses entered and not exited

    def __init__(self, active: bool):
        self.active = active
        self._installed = None  # (previous handler, previous wakeup fd, pipe write end)

    @property
    def interrupted(self) -> bool:
        return AgreedCtrlC._requested

    def __enter__(self):
        if AgreedCtrlC._depth == 0:
            AgreedCtrlC._requested = False
        # signal handlers can only be installed from the main thread (not in notebooks' threads)
        if (
            self.active
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            read, write = os.pipe()
            os.set_blocking(write, False)  # the C handler must never block
            previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            previous = signal.signal(signal.SIGINT, _counted_elsewhere)
            self._installed = (previous, previous_fd, write)
            threading.Thread(target=_count_ctrl_c, args=(read,), name="ctrl-c", daemon=True).start()
        AgreedCtrlC._depth += 1  # last: an interrupt above leaves the count as it was
        return self

    def __exit__(self, *exc):
        AgreedCtrlC._depth -= 1
        if self._installed is not None:
            previous, previous_fd, write = self._installed
            self._installed = None
            # the fd first: a Ctrl-C between these lines then reaches the quiet handler, not
            # a KeyboardInterrupt that would leave the pipe and its thread behind
            signal.set_wakeup_fd(previous_fd)
            os.close(write)  # the counting thread reads the end and stops
            signal.signal(signal.SIGINT, previous)


def _counted_elsewhere(signum, frame) -> None:
    """SIGINT's Python handler under AgreedCtrlC: _count_ctrl_c does the work."""


def _count_ctrl_c(read: int) -> None:
    """AgreedCtrlC's thread: the first Ctrl-C sets the flag, the second ends the process."""
    count, first = 0, 0.0
    with os.fdopen(read, "rb", buffering=0) as pipe:
        while data := pipe.read(64):  # b"" once AgreedCtrlC closed the other end
            # other handled signals are written too; SIGINTs within half a second of the
            # first are one press (a launcher forwarding the terminal's as well)
            if int(signal.SIGINT) not in data or time.monotonic() - first < 0.5:
                continue
            count += 1
            first = time.monotonic() if count == 1 else first
            if count == 1:
                AgreedCtrlC._requested = True
                print(
                    f"\nCtrl-C on process {jax.process_index()}: every process stops at the same "
                    "point (training saves its step first); Ctrl-C again stops this one at "
                    "once (the others then wait until JAX's health check ends them)",
                    file=sys.stderr,
                    flush=True,
                )
            elif count > 1:
                sys.stdout.flush()
                print(
                    f"\ninterrupted again: process {jax.process_index()} stopped at once; a "
                    "checkpoint it was writing is left unfinished, which is never restored",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(130)


class AgreedPreemption(Exception):
    """A SIGTERM every host agreed on at the same evaluation batch, or on one host seen
    before the next batch (see Preemption)."""


class Preemption:
    """Turns SIGTERM into a flag checked between steps and between evaluation batches.

    The training loop saves the step and exits; a validation stops at the next batch and the
    step is saved unvalidated (a preemption's grace period is short, and a validation can
    outlast it). On several hosts the flag travels with the batch rows (``code``) and the
    evaluation's gathered flags, so every host stops at the same point even when only one
    got the signal; there it is installed for the whole run (``main``): a SIGTERM while the
    hosts set up stops them after their second step instead of going to JAX's own handler,
    which nothing here reads. The flag is the process's, as AgreedCtrlC's; the outermost use
    starts with it clear.

    Args:
      active: install the handler (in the main thread only; not in notebooks' threads).
    """

    _requested = False  # this process got a SIGTERM
    _depth = 0

    def __init__(self, active: bool = True):
        self.active = active
        self._previous = None

    @property
    def requested(self) -> bool:
        return Preemption._requested

    @property
    def code(self) -> int:
        """This host's stop code for the batch rows: 0, STOP_PREEMPTED or STOP_INTERRUPTED."""
        if AgreedCtrlC._requested:
            return STOP_INTERRUPTED
        return STOP_PREEMPTED if Preemption._requested else 0

    def __enter__(self):
        if Preemption._depth == 0:
            Preemption._requested = False
        if self.active and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _note_sigterm)
        Preemption._depth += 1
        return self

    def __exit__(self, *exc):
        Preemption._depth -= 1
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def _note_sigterm(signum, frame) -> None:
    Preemption._requested = True


class _StepTrace:
    """A jax.profiler trace of the steps after ``after`` up to ``after + steps``.

    Written to ``logdir/plugins/profile/`` (TensorBoard's or XProf's Profile tab, and a
    Perfetto trace); a run that ends or fails inside the window still closes the trace.
    """

    def __init__(self, logdir: pathlib.Path, after: int, steps: int):
        self.logdir, self.after, self.end = logdir, after, after + steps
        self.on, self.last = False, after

    def before(self, step: int) -> None:
        if step == self.after and self.end > self.after and not self.on:
            jax.profiler.start_trace(str(self.logdir), create_perfetto_trace=True)
            self.on = True

    def done(self, step: int, metrics) -> None:
        self.last = step
        if self.on and step == self.end:
            jax.block_until_ready(metrics)
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.on = False
        _log(
            f"profile of steps {self.after + 1}-{self.last} written to "
            f"{self.logdir}/plugins/profile (view it with: xprof --logdir {self.logdir})"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.on:
            self._stop()


def is_out_of_memory(error: Exception) -> bool:
    """Whether an XLA runtime or compile error says the device memory ran out."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def batch_spec(clips: int, cfg: vit.ViTConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
    """(shape, dtype) of each field of a global training batch of ``clips`` clips."""
    t, s = cfg.num_frames, cfg.img_size
    return {
        "clip": ((clips, t, s, s, 3), jnp.uint8),
        "erase_box": ((clips, 4), jnp.int32),
        "label": ((clips,), jnp.int32),
    }


@contextlib.contextmanager
def damaged_records(records_dir: str):
    """A record that fails its checksum (a damaged disk or copy) stops training or evaluation
    with the way out, not a traceback from the input pipeline's worker."""
    try:
        yield
    except records.CorruptRecordError as e:
        raise TrainingError(
            f"{e}: the records in {records_dir} are damaged; restore the file from a good copy, "
            "or build the records again (python -m data_prep.build_records)"
        ) from e


@contextlib.contextmanager
def memory_advice(what: str, advice: str):
    """Device out-of-memory errors become a TrainingError: ``what`` needs more device memory
    than there is (XLA's first line), then ``advice``: which settings help."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0][:300]
        raise TrainingError(
            f"{what} needs more device memory than there is ({first}); {advice}"
        ) from e


def _memory_advice(clips_per_device: int, cfg: vit.ViTConfig):
    if not cfg.remat:
        remat = ["--config.model.remat=True"]
    elif cfg.remat_policy != "full":
        remat = ["--config.model.remat_policy=full (blocks that keep nothing but their input)"]
    else:
        remat = []
    # scanned blocks keep a stacked copy of the weights, and without remat every block's
    # activations: unrolled ones take less
    remat += ["--config.model.scan_layers=False"] * cfg.scan_layers
    return memory_advice(
        "the training step",
        f"with {clips_per_device} clip{'s' * (clips_per_device != 1)} per device, try "
        "--config.optim.grad_accum=2 or more (smaller micro-batches, the same update), "
        + (f"{' or '.join(remat)}, " if remat else "")
        + "or on TPUs --config.model.attention=splash",
    )


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


_CACHE_HIT = "/jax/compilation_cache/cache_hits"
# A compile this long without JAX's compilation cache gets a hint to keep it for restarts.
SLOW_COMPILE_S = 20.0


def compile_seconds(
    compile_: Callable[[], jax.stages.Compiled],
) -> tuple[jax.stages.Compiled, float, bool]:
    """``compile_()`` timed: (its result, seconds, whether JAX's persistent compilation cache
    (``JAX_COMPILATION_CACHE_DIR``) held it)."""
    hits = []

    def on_event(event: str, **_) -> None:
        if event == _CACHE_HIT:
            hits.append(event)

    jax.monitoring.register_event_listener(on_event)
    start = time.perf_counter()
    try:
        compiled = compile_()
    finally:
        jax.monitoring.unregister_event_listener(on_event)
    return compiled, time.perf_counter() - start, bool(hits)


def compile_words(seconds: float, cached: bool) -> str:
    """``compiled in 41.2 s``, or ``loaded from JAX's compilation cache in 1.3 s``."""
    if cached:
        return f"loaded from JAX's compilation cache in {seconds:.1f} s"
    return f"compiled in {seconds:.1f} s"


def timed_compile(compile_: Callable[[], jax.stages.Compiled], what: str):
    """``compile_()`` (lower and compile a step) and the start-up log's words for it: ``WHAT
    compiled in 41.2 s``, or ``WHAT loaded from JAX's compilation cache in 1.3 s`` when the
    persistent cache held it.

    Returns:
      (the compiled step, those words, whether a compile this slow ran without the cache).
    """
    compiled, seconds, cached = compile_seconds(compile_)
    slow = not cached and seconds >= SLOW_COMPILE_S and not jax.config.jax_compilation_cache_dir
    return compiled, f"{what} {compile_words(seconds, cached)}", slow


def _model_name(cfg: vit.ViTConfig) -> str:
    """'ViT-B' for a preset's sizes, else the sizes themselves (smoke and test models)."""
    if all(getattr(cfg, k) == v for k, v in vit.PRESETS[cfg.preset].items()):
        return f"ViT-{cfg.preset}"
    return (
        f"a ViT of {cfg.embed_dim}d x {cfg.depth} blocks ({cfg.num_heads} heads, "
        f"mlp {cfg.mlp_dim}, patch {cfg.patch_size})"
    )


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def checkpoint_meta(setup: Setup, config) -> dict:
    """What predict and init_from need to use a training checkpoint on their own."""
    return {
        "model": setup.model_cfg.to_dict(),
        "classes": setup.classes,
        "hht": setup.info.get("hht_settings"),
        "input": {
            "num_frames": setup.model_cfg.num_frames,
            "sampling_rate": config.data.sampling_rate,
            "img_size": setup.model_cfg.img_size,
            "short_side_size": config.data.short_side_size,
            "test_num_segment": config.data.test_num_segment,
            "test_num_crop": config.data.test_num_crop,
            "jpeg_quality": setup.info.get("jpeg_quality"),
        },
        # Median source frame rate of the training videos (None for records built before
        # dataset_info had it): predict compares a new video's rate with it.
        "train_fps": (setup.info["splits"][config.train_split].get("fps") or {}).get("median"),
        "source": {"format": "signnet_jax train", "records_dir": config.records_dir},
        "config": json.loads(config.to_json_best_effort()),
    }


# what each mode writes in the workdir
_WORKDIR_FOLDERS = {"train": ("checkpoints", "tensorboard"), "eval": ("eval",)}


def check_workdir(workdir: str | os.PathLike, mode: str = "train") -> None:
    """A workdir must be a local (or mounted) folder that ``mode`` can write its folders in:
    a bucket URL, a file in the way or a folder without write permission is refused up front,
    not at the first checkpoint or once the evaluation is done."""
    try:
        path = checkpointing.local_path(workdir, write=True)
    except checkpointing.CheckpointError as e:
        raise TrainingError(
            f"--workdir {e} (or mount the bucket with gcsfuse and give its folder)"
        ) from e
    if path.exists() and not path.is_dir():
        raise TrainingError(f"--workdir {workdir} is a file; give a folder (new or a run's)")

    def probe() -> None:
        for name in _WORKDIR_FOLDERS[mode]:
            if name != "checkpoints" and jax.process_index() != 0:
                continue  # process 0 alone writes these (each process writes checkpoints)
            folder = path / name
            if folder.exists() and not folder.is_dir():
                raise TrainingError(
                    f"{folder} is a file where the run keeps its {name} folder; move it away "
                    "or give another --workdir"
                )
            problem = files.creation_problem(folder)
            if problem:
                raise TrainingError(
                    f"cannot write in --workdir {workdir} ({problem}); give a folder you can "
                    "write to"
                )

    first_on_process_0(probe, "write in the workdir")  # a refusal on one host stops them all


_SHARED_CHECK = ".signnet-shared-check"


def check_shared_workdir(workdir: str | os.PathLike) -> None:
    """On several processes, the workdir must be one folder that all of them see: they write
    each checkpoint together, and a folder local to each host hangs the first save (orbax
    waits for files process 0 made). Process 0 writes a random token there; every process
    reads it back, and all of them agree on the outcome, so all raise together. Leaves
    nothing behind (the folder too, if this made it). One process: nothing to check."""
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    path = pathlib.Path(workdir).expanduser()
    made = not path.exists()

    def write_token() -> None:
        if jax.process_index() == 0:
            try:
                files.atomic_write(path / _SHARED_CHECK, os.urandom(16).hex().encode())
            except OSError as e:
                raise TrainingError(
                    f"cannot write in --workdir {workdir}: {e.strerror or e}; give a folder "
                    "every host can write to"
                ) from e

    # every process waits for the token; a failure to write it stops them all
    first_on_process_0(write_token, "write the workdir check")
    try:
        seen = (path / _SHARED_CHECK).read_bytes()[:32].ljust(32, b"-")
    except OSError:
        seen = b"-" * 32
    tokens = np.asarray(multihost_utils.process_allgather(np.frombuffer(seen, np.uint8)))
    tokens = tokens.reshape(jax.process_count(), -1)
    multihost_utils.sync_global_devices("signnet_jax: workdir token read")
    if jax.process_index() == 0:
        (path / _SHARED_CHECK).unlink()
        if made and not any(path.iterdir()):
            path.rmdir()
    blind = [i for i, row in enumerate(tokens) if (row != tokens[0]).any()]
    if blind:
        raise TrainingError(
            f"--workdir {workdir} is not one folder for all {jax.process_count()} processes: "
            f"{'processes' if len(blind) > 1 else 'process'} {', '.join(map(str, blind))} "
            f"{'do' if len(blind) > 1 else 'does'} not see what process 0 writes there (all "
            "of them write each checkpoint together); give a folder every host shares: a "
            "shared filesystem, or a bucket mounted with gcsfuse"
        )


# train.* settings that count something, and their least values
_TRAIN_MINIMA = {
    "log_every": 1,
    "keep_checkpoints": 1,  # 0 would delete every checkpoint but the best one
    "checkpoint_every_steps": 0,
    "val_every_epochs": 1,  # 0 validated every epoch; val_split='' is the way to skip it
    "max_steps": 0,
    "profile_steps": 0,
    "profile_start": 0,
}


def check_train_settings(train: ml_collections.ConfigDict) -> None:
    """Refuses a train.* count below its least value, before anything is compiled or written."""
    low = [f"train.{k}={train[k]} (least {m})" for k, m in _TRAIN_MINIMA.items() if train[k] < m]
    if low:
        raise TrainingError(f"{', '.join(low)}: set {'them' if len(low) > 1 else 'it'} higher")


def _whole(least: int):
    return lambda v: v >= least, f"a whole number >= {least}"


def _between(low: float, high: float, high_too: bool = True):
    return (
        lambda v: low <= v <= high if high_too else low <= v < high,
        f"{low:g} to {high:g}" if high_too else f"at least {low:g} and below {high:g}",
    )


# the settings a mode reads whose values have a range: (test, what to give)
_EVAL_RANGES = {
    "data.sampling_rate": _whole(1),
    "data.test_num_segment": _whole(1),
    "data.test_num_crop": _whole(1),
    "data.num_workers": _whole(0),
    "data.num_threads": _whole(0),
    "data.prefetch": _whole(1),
}


def _area_range(v) -> bool:
    return (
        isinstance(v, tuple | list)
        and len(v) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        and 0 < v[0] <= v[1] <= 1
    )


_TRAIN_RANGES = _EVAL_RANGES | {
    "data.reprob": _between(0, 1),
    "data.crop_scale": (
        _area_range,
        "the least and most of the area a crop takes, 0 < least <= most <= 1, as "
        "--config.data.crop_scale='(0.08,1.0)'",
    ),
    "loss.label_smoothing": _between(0, 1, high_too=False),
    "loss.mixup": (lambda v: v >= 0, "an alpha >= 0 (0: off)"),
    "loss.cutmix": (lambda v: v >= 0, "an alpha >= 0 (0: off)"),
    "loss.mixup_prob": _between(0, 1),
    "loss.switch_prob": _between(0, 1),
    "model.drop_path_rate": _between(0, 1, high_too=False),
    "model.head_drop_rate": _between(0, 1, high_too=False),
    "optim.base_lr": (lambda v: v > 0, "a rate above 0"),
    "optim.min_lr": (lambda v: v >= 0, "a rate >= 0"),
    "optim.warmup_lr": (lambda v: v >= 0, "a rate >= 0"),
    "optim.epochs": _whole(1),
    "optim.warmup_epochs": _whole(0),
    "optim.weight_decay": (lambda v: v >= 0, "a value >= 0"),
    "optim.layer_decay": (lambda v: 0 < v <= 1, "above 0 and at most 1; 1: no decay"),
    "optim.b1": _between(0, 1, high_too=False),
    "optim.b2": _between(0, 1, high_too=False),
    "optim.eps": (lambda v: v > 0, "a value above 0"),
    "optim.clip_grad": (lambda v: v >= 0, "a norm >= 0 (0: no clipping)"),
    "optim.ema_decay": _between(0, 1, high_too=False),
}


def check_value_ranges(config: ml_collections.ConfigDict, mode: str = "train") -> None:
    """Refuses a setting outside its range, an unknown flip mode or a RandAugment spec that
    does not parse, all named at once, before anything is written: such values used to stop
    a run with a traceback from the input workers, or from the final test after training."""
    bad = []
    for key, (ok, give) in (_TRAIN_RANGES if mode == "train" else _EVAL_RANGES).items():
        group, name = key.split(".")
        value = config[group].get(name)
        if value is not None and not ok(value):
            bad.append(f"{key}={value!r} ({give})")
    if mode == "train":
        if config.data.flip not in augment.FLIP_MODES:
            bad.append(f"data.flip={config.data.flip!r} (plain as published, hht or none)")
        if config.data.rand_augment:
            try:
                augment.RandAugmentSpec.parse(config.data.rand_augment)
            except ValueError as e:
                spec = config.data.rand_augment
                why = str(e).removeprefix(f"RandAugment spec {spec!r}").lstrip(": ")
                bad.append(
                    f"data.rand_augment={spec!r} ({why}; the recipe's is "
                    "'rand-m7-n4-mstd0.5-inc1', '' turns it off)"
                )
    if bad:
        raise TrainingError(f"{', '.join(bad)}: change {'them' if len(bad) > 1 else 'it'}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train, validate periodically, test with the multi-view protocol; resume if possible.

    Args:
      config: a config from ``configs/`` (see configs/wlasl2000.py for every key).
      workdir: checkpoints, TensorBoard events and metrics.json go here.

    Returns:
      The final metrics (also written to ``workdir/metrics.json``).
    """
    check_workdir(workdir)
    if config.val_split and config.val_split == config.test_split:
        raise TrainingError(
            f"config.val_split and config.test_split are both {config.val_split!r}: the best "
            "checkpoint would be selected on the test split; give a validation split of its "
            "own (or --config.val_split='' to train without validation)"
        )
    check_train_settings(config.train)
    check_value_ranges(config)
    check_batch_settings(config)
    if config.smoke.enabled:
        ensure_smoke(config)
    check_shared_workdir(workdir)
    ckpt_dir = pathlib.Path(workdir) / "checkpoints"
    resuming = ckpt_dir.is_dir() and bool(checkpointing.checkpoint_steps(ckpt_dir))
    setup = prepare(config, resume=ckpt_dir if resuming else None)
    for warning in setup.warnings:
        _log(f"warning: {warning}")
    cfg, mesh = setup.model_cfg, setup.mesh
    batch = config.data.batch_size
    accum = config.optim.grad_accum
    micro = batch // accum
    num_train = setup.info["splits"][config.train_split]["num_records"]
    try:
        per_epoch, total, warmup = optim.steps_for(
            num_train, batch, config.optim.epochs, config.optim.warmup_epochs
        )
    except ValueError as e:  # a batch larger than the training set, no epochs, ...
        raise TrainingError(str(e)) from e
    lr, min_lr, warmup_lr = optim.scaled_lrs(
        config.optim.base_lr, config.optim.min_lr, config.optim.warmup_lr, batch
    )
    ocfg = optim.OptimConfig(
        base_lr=lr,
        min_lr=min_lr,
        warmup_lr=warmup_lr,
        total_steps=total,
        warmup_steps=warmup,
        weight_decay=config.optim.weight_decay,
        layer_decay=config.optim.layer_decay,
        b1=config.optim.b1,
        b2=config.optim.b2,
        eps=config.optim.eps,
        clip_grad=config.optim.clip_grad,
        grad_accum=accum,
    )
    try:
        schedule = optim.lr_schedule(lr, min_lr, total, warmup, warmup_lr)
    except ValueError as e:  # warmup as long as the run
        raise TrainingError(str(e)) from e
    last_step = min(total, config.train.max_steps) if config.train.max_steps > 0 else total
    scaling = loss_scaling(config, cfg)

    workdir_path = pathlib.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    ckpt = checkpointing.TrainCheckpointer(
        workdir_path / "checkpoints", config.train.keep_checkpoints
    )
    shapes = vit.abstract_params(cfg)  # outside the mesh: logical names are not mesh axes
    with jax.set_mesh(mesh), contextlib.ExitStack() as on_exit:
        # a run stopped by an error or Ctrl-C still completes the save in flight (so what it
        # reports saved is on disk)
        on_exit.callback(ckpt.wait)
        abstract_params = sharded_params(shapes, setup.param_sh)
        tx = optim.make_optimizer(ocfg, abstract_params, cfg.depth)
        state_sh, abstract_state = train_state_layout(
            abstract_params, tx, mesh, ema=config.optim.ema_decay > 0, loss_scale=bool(scaling)
        )

        start = ckpt.latest_step()
        videos_done = 0  # training videos used so far (all processes)
        if start is not None:
            change = _accumulation_change(ckpt, start, ocfg, abstract_params, tx, mesh, cfg.depth)
            state, data_state, saved_meta = _restore(ckpt, start, abstract_state, scaling, change)
            videos_done = data_state.get("videos", start * batch)  # older runs: grain's state
            run = saved_meta.get("run", {})
            _log(f"resuming from step {start} in {ckpt.directory}")
        else:
            start, run = 0, {}
            params = place_params(setup, config.seed)
            setup.init_params = None  # the host copy of the warm start is not needed any more
            state = init_state(params, tx, state_sh, scaling)
            del params  # donated
            _log(setup.note)

        train_iter = pipeline.train_dataset(
            config.records_dir,
            config.train_split,
            global_batch_size=micro,
            epoch_batch_size=batch,
            seed=config.seed,
            clip_len=cfg.num_frames,
            sampling_rate=config.data.sampling_rate,
            augment_options=augment.AugmentOptions(
                crop_size=cfg.img_size,
                scale=tuple(config.data.crop_scale),
                flip=config.data.flip,
                rand_augment=config.data.rand_augment or None,
                erase_prob=config.data.reprob,
            ),
            repeated_aug=config.data.repeated_aug,
            num_workers=config.data.num_workers,
            num_threads=config.data.num_threads,
            prefetch=config.data.prefetch,
            # the stream goes on where the run stopped, whatever the worker, process and
            # micro-batch counts were then
            start_batch=videos_done // micro,
        )
        train_iter = iter(train_iter)

        clips = micro * config.data.repeated_aug
        spec = batch_spec(clips, cfg)
        # Several hosts must agree on stopping at SIGTERM or on an input error (saving and
        # every step are collective): each host writes its code into its rows of the batch
        # and the step reduces them.
        multi_host = jax.process_count() > 1
        if multi_host:
            spec["stop"] = ((clips,), jnp.int32)
        batches = _LocalBatches(train_iter, spec)
        step_fn, abstract_batch = jit_train_step(setup, config, tx, state_sh, spec)
        per_device = clips // mesh.size
        with _memory_advice(per_device, setup.model_cfg):
            compiled, done, slow = timed_compile(
                lambda: step_fn.lower(
                    abstract_state, abstract_batch, jax.ShapeDtypeStruct((), jnp.int32)
                ).compile(),
                "train step",
            )
        mem = compiled.memory_analysis()
        _log(
            done
            + (
                f": arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, "
                f"temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB per device"
                if mem is not None
                else ""
            )
            + (
                " (export JAX_COMPILATION_CACHE_DIR=DIR to load it from there on a restart)"
                if slow
                else ""
            )
        )
        # validation and the test, compiled now: not after an epoch of training
        evaluate.compile_eval_steps(setup, config, abstract_params, resident=abstract_state)

        writer = _summary_writer(workdir_path)
        if writer is not None:  # closed (its last scalars written) also when training stops
            on_exit.callback(_close_writer, writer)
        meta = checkpoint_meta(setup, config)
        every_ckpt = config.train.checkpoint_every_steps or per_epoch
        val_every = config.train.val_every_epochs * per_epoch
        _log(
            f"training {_model_name(cfg)} on {len(setup.classes)} "
            f"classes: {num_train} videos, batch {batch}, {per_epoch} steps/epoch, "
            f"steps {start} -> {last_step} of {total}, mesh {dict(mesh.shape)}"
        )
        # model FLOPs utilisation against the devices' bfloat16 (float16) peak, where known
        clip_flops = train_flops(cfg)
        device_peak = peak_flops(mesh.devices.flat[0].device_kind, cfg.dtype)
        peak = device_peak * mesh.size if device_peak else None
        # the best validation top-1 and the curves survive restarts (saved with each step)
        best_val = run.get("best_val_top1")
        loss_log: list[tuple[int, float]] = [tuple(x) for x in run.get("train_loss", [])]
        val_log: list[tuple[int, float]] = [tuple(x) for x in run.get("val_top1", [])]

        def plot_curves():
            if jax.process_index() == 0:
                plot_training_curves(
                    workdir_path / "training_curves.png", loss_log, val_log, per_epoch, total
                )

        t_last, n_last = _clock(), start
        step = start
        # seconds of the last validation: the ETA adds the validations left and the final
        # test (scaled by its views) once one validation has been timed
        val_seconds = None
        splits = setup.info["splits"]
        test_per_val = (
            splits[config.test_split]["num_records"]
            * config.data.test_num_segment
            * config.data.test_num_crop
            / max(1, splits[config.val_split]["num_records"])
            if config.val_split and config.test_split
            else 0.0
        )
        # the loss averaged over the steps since the last log line (of the log_every cadence);
        # a run resumed between two goes on with the saved part, so its curve is the
        # uninterrupted run's
        window = run.get("loss_window", {"since": start, "sum": 0.0})
        loss_since, loss_sum = window["since"], jnp.float32(window["sum"])
        # float16: updates skipped for overflow in the whole run (on the device), and by the
        # last log
        skipped_at_log = run.get("skipped_updates", 0)
        skipped = jnp.int32(skipped_at_log)
        # First step whose update was non-finite (-1: none), kept on the device so no step
        # waits for it; read wherever the loop syncs anyway, and always before a save.
        first_bad = jnp.int32(-1)

        def check_finite():
            if multi_host and metrics is not None:
                batches.raise_if_stopped(int(metrics["stop"]), step, ckpt.directory)
            bad = int(first_bad)
            if bad >= 0:
                raise TrainingError(
                    f"non-finite loss or gradients at step {bad}: the update was skipped "
                    f"and training stopped at step {step}; the last good checkpoint in "
                    f"{ckpt.directory} is intact; lower optim.base_lr or enable "
                    "optim.clip_grad"
                    + (
                        " (in float16 it may also be the forward pass overflowing, values over "
                        "65504, or the gradients overflowing at the smallest loss scale, 1: "
                        "then train in bfloat16 or float32)"
                        if scaling
                        else ""
                    )
                )

        stop_pending = metrics = None
        # on several hosts a Ctrl-C stops them together, in the loop and in the final test
        on_exit.enter_context(AgreedCtrlC(multi_host))
        # a SIGTERM from here to the end of the final test stops the run at the next step or
        # evaluation batch (before, on one host, it ends the process: there is nothing to save
        # yet; on several, main's flag carries it here)
        preempt = on_exit.enter_context(Preemption())

        def run_record() -> dict:
            """The run's curves and counters, saved with each step."""
            run = {"best_val_top1": best_val, "train_loss": loss_log, "val_top1": val_log}
            run["loss_window"] = {"since": loss_since, "sum": loss_sum}  # read when saved
            if scaling:
                run["skipped_updates"] = skipped
            return run

        def validate(step: int, stop: int) -> tuple[dict | None, int]:
            """The validation of ``step``: its metrics, or None and the stop code when a stop
            cut it short (a SIGTERM, an agreed Ctrl-C: every host at the same batch)."""
            nonlocal best_val, val_seconds, t_last
            check_finite()
            t_val = _clock()
            try:
                report = evaluate.evaluate_split(
                    setup, config, _eval_params(state), config.val_split, "val"
                )
            except AgreedInterrupt:
                return None, STOP_INTERRUPTED
            except AgreedPreemption:
                return None, STOP_PREEMPTED
            val_metrics = {"val_top1": report["per_instance"]["top1"]}
            best_val = max(best_val or 0.0, val_metrics["val_top1"])
            val_log.append((step, val_metrics["val_top1"]))
            plot_curves()
            _log(
                f"val step {step}: top-1 {report['per_instance']['top1']:.2%} "
                f"top-5 {report['per_instance']['top5']:.2%} (best {best_val:.2%})"
            )
            _scalars(
                writer,
                step,
                {
                    "val/top1": report["per_instance"]["top1"],
                    "val/top5": report["per_instance"]["top5"],
                },
            )
            val_seconds = _clock() - t_val
            t_last += val_seconds  # throughput counts steps only
            return val_metrics, stop

        def save_step(step: int, val_metrics: dict | None, pending: bool) -> None:
            """Save ``step``, its loss checked finite first; ``pending``: its validation is
            still to run (the resumed run runs it and scores the step in place)."""
            check_finite()
            run = run_record() | ({"val_pending": True} if pending else {})
            _save(ckpt, step, state, step * batch, meta | {"run": run}, val_metrics)

        def keep_unvalidated(step: int) -> None:
            """Save ``step`` unvalidated as its validation fails (a damaged val record, ...),
            rather than lose the steps since the last save; the validation's error stays the
            one the run ends with, even when this save fails too."""
            try:
                save_step(step, None, pending=True)
                ckpt.wait()
            except Exception as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                _log(
                    f"the validation of step {step} failed, and step {step} could not be saved "
                    f"either ({reason}); the same command goes on from the last saved step"
                )
                return
            _log(
                f"the validation of step {step} failed: step {step} is saved unvalidated, and "
                "the same command validates it when it resumes"
            )

        def stopped(step: int, stop: int) -> dict:
            """End the run at a stop whose step is saved: status 130 for Ctrl-C."""
            ckpt.wait()
            if stop == STOP_INTERRUPTED:  # main says what it leaves; status 130
                _log(f"interrupted (Ctrl-C) at step {step}: checkpoint saved")
                raise KeyboardInterrupt
            _log(f"preempted (SIGTERM) at step {step}: checkpoint saved, exiting")
            return {"preempted_at": step}

        # the trace starts after step profile_start, or after this run's first step when it
        # resumed past that (the first step pays for the restore and the input warm-up)
        after = config.train.profile_start if start <= config.train.profile_start else start + 1
        trace = _StepTrace(
            workdir_path / "tensorboard", after, min(config.train.profile_steps, last_step - after)
        )
        if config.train.profile_steps > 0 and after >= last_step:
            _log(
                f"warning: train.profile_steps: no step to trace after step {after} (this run "
                f"ends at step {last_step}); lower train.profile_start"
            )
        # closing the input pipeline stops its workers and frees the batches they prefetched
        with (
            _memory_advice(per_device, setup.model_cfg),
            damaged_records(config.records_dir),
            trace,
            pipeline.released(train_iter, config.data.num_workers),
        ):
            pending = run.get("val_pending") and config.val_split
            scored = ckpt.manager.metrics(step) if pending else None
            if scored:  # scored by a resumed run that stopped before its next save
                val_log.append((step, scored["val_top1"]))
                best_val = max(best_val or 0.0, scored["val_top1"])
            elif pending:
                # the validation a stop skipped; the step gets its score in place, so it can
                # be the best (the curve saves with the next step)
                _log(f"validating step {step}, whose validation the last stop skipped")
                val_metrics, stop = validate(step, 0)
                if val_metrics is None:
                    return stopped(step, stop)
                if not ckpt.score(step, val_metrics):
                    _log(
                        f"warning: step {step}'s validation could not be recorded with its "
                        "checkpoint (this orbax keeps the metrics elsewhere): it cannot be "
                        "picked as the best"
                    )
            while step < last_step:
                trace.before(step)
                for a in range(accum):
                    state, metrics = _step_on_next_batch(
                        compiled, state, batches, mesh, preempt.code, step * accum + a
                    )
                    loss_sum = loss_sum + metrics["loss"] / accum  # any accumulation after a resume
                    if scaling:
                        skipped = skipped + metrics["skipped"]
                    first_bad = _note_bad(first_bad, metrics["ok"], jnp.int32(step + 1))
                step += 1
                trace.done(step, metrics)
                stop = 0
                if multi_host:  # the previous step's agreed code: every host reads the same
                    stop = 0 if stop_pending is None else int(stop_pending)
                    stop_pending = metrics["stop"]
                    if step == last_step:  # no next step carries this one's code: read it now
                        stop = max(stop, int(stop_pending))
                if step % config.train.log_every == 0 or step == last_step:
                    check_finite()
                    n = step - n_last
                    dt = _clock() - t_last
                    loss = float(loss_sum) / (step - loss_since)
                    loss_log.append((step, loss))
                    clips_s = n * batch * config.data.repeated_aug / dt
                    eta = (last_step - step) * dt / n
                    if val_seconds is not None:
                        vals_left = _validations_left(step, last_step, val_every)
                        eta += val_seconds * (vals_left + test_per_val)
                    lr_now = float(schedule[min(step - 1, len(schedule) - 1)])
                    flops_s = clips_s * clip_flops
                    grad_norm = float(metrics["grad_norm"])
                    scale_note, scale_scalars = "", {}
                    if scaling:  # the scale the last update ran with; skips since the last log
                        recent = int(skipped) - skipped_at_log
                        skipped_at_log += recent
                        scale_note = f"loss scale {float(metrics['loss_scale']):g} " + (
                            f"({recent} skipped for overflow) " if recent else ""
                        )
                        scale_scalars = {
                            "train/loss_scale": float(metrics["loss_scale"]),
                            "train/skipped_updates": recent,
                        }
                    _log(
                        f"step {step}/{last_step} epoch {step / per_epoch:.2f} loss {loss:.4f} "
                        f"lr {lr_now:.3g} {scale_note}{clips_s:.1f} clips/s {dt / n:.3f} s/step "
                        + (f"MFU {flops_s / peak:.1%} " if peak else "")
                        + f"ETA {_fmt_time(eta)}"
                    )
                    _scalars(
                        writer,
                        step,
                        {
                            "train/loss": loss,
                            "train/lr": lr_now,
                            "train/clips_per_s": clips_s,
                            "train/step_time_s": dt / n,
                            "train/tflops_per_s": flops_s / 1e12,
                        }
                        # a float16 update skipped for overflow has no finite norm
                        | ({"train/grad_norm": grad_norm} if np.isfinite(grad_norm) else {})
                        | ({"train/mfu": flops_s / peak} if peak else {})
                        | scale_scalars,
                    )
                    t_last, n_last = _clock(), step
                    if step % config.train.log_every == 0:  # not the last step's extra line
                        loss_since, loss_sum = step, jnp.float32(0)
                val_metrics = None
                # a stop (SIGTERM, an agreed Ctrl-C) saves the step without validating it: a
                # preemption's grace period is short, and validation can outlast it; one
                # during the validation cuts it short. The resumed run validates the step.
                validate_now = config.val_split and (step % val_every == 0 or step == last_step)
                stopping = stop if multi_host else preempt.requested
                if validate_now and not stopping:
                    curve = best_val, len(val_log)
                    try:
                        val_metrics, stop = validate(step, stop)
                    except Exception:
                        # not on several hosts (they save together, and the others may not
                        # come), nor a non-finite step (never saved); a failure after the
                        # curve took the point (plotting it) leaves no point to repeat
                        if not multi_host and int(first_bad) < 0:
                            best_val = curve[0]
                            del val_log[curve[1] :]
                            keep_unvalidated(step)
                        raise
                saved = step % every_ckpt == 0 or step == last_step or bool(val_metrics)
                pending = bool(validate_now and val_metrics is None)
                if saved:
                    save_step(step, val_metrics, pending)
                if stop if multi_host else preempt.requested:  # one host: as late as possible
                    if not saved:  # a step is saved once; orbax refuses a second save
                        save_step(step, val_metrics, pending)
                    return stopped(step, stop)
        ckpt.wait()
        check_finite()

        plot_curves()
        final = {
            "steps": step,
            "best_val_top1": best_val,
            "train_loss": loss_log,
            "val_top1": val_log,
        } | ({"skipped_updates": int(skipped)} if scaling else {})
        if config.test_split:
            try:
                report = evaluate.evaluate_split(
                    setup, config, _eval_params(state), config.test_split, "test", workdir_path
                )
            except AgreedPreemption:  # the last step is saved: a restart runs the test again
                _log(
                    f"preempted (SIGTERM) in the final test: step {step} is saved, and the same "
                    "command runs the test again"
                )
                return {"preempted_at": step}
            final["protocol"], final["test"] = evaluate.protocol(config), report
            _log(evaluate.summary_line(report))
            _scalars(writer, step, {"test/top1": report["per_instance"]["top1"]})
        ckpt.close()
        evaluate.write_json(workdir_path / "metrics.json", final)
        return final


def _validations_left(step: int, last_step: int, val_every: int) -> int:
    """Validations still to run after step ``step``'s log line: at each multiple of
    ``val_every`` from ``step`` on, and at ``last_step``."""
    return last_step // val_every - (step - 1) // val_every + bool(last_step % val_every)


# Codes of the stop rows (several hosts), the highest wins: 1 SIGTERM on some host, 2 Ctrl-C
# on some host; STOP_FAILED + i the input of process i failed, STOP_FAILED + process count
# + i it failed after a Ctrl-C there (a Ctrl-C reaches the input workers too, and kills them
# while they start up): no host updates in that step, every host stops as interrupted.
STOP_PREEMPTED, STOP_INTERRUPTED, STOP_FAILED = 1, 2, 3


class _LocalBatches:
    """This host's training batches, with the stop rows on several hosts.

    An error reading this host's input (a damaged record read by this host alone) would
    otherwise leave the other hosts waiting in the step's collectives until JAX's health
    check aborts them all minutes later. Instead the host goes on with zero rows coded
    STOP_FAILED + its index: no host's state changes in that step, every host sees the code
    at its next check (check_finite, at the latest one step later) and stops, this one with
    its own error.
    """

    def __init__(self, it, spec: dict):
        self.it, self.spec, self.error = it, spec, None
        self.multi_host = "stop" in spec

    def next(self, code: int) -> dict:
        if self.error is None:
            try:
                local = next(self.it)
                local = {k: local[k] for k in self.spec if k != "stop"}
            except Exception as e:  # one host alone: raised at once, as before
                if not self.multi_host:
                    raise
                self.error = e
        if self.error is not None:
            rows = self.spec["label"][0][0] // jax.process_count()
            local = {
                k: np.zeros((rows, *shape[1:]), dtype)
                for k, (shape, dtype) in self.spec.items()
                if k != "stop"
            }
        if self.multi_host:
            if self.error:
                after_ctrl_c = jax.process_count() if AgreedCtrlC._requested else 0
                code = STOP_FAILED + after_ctrl_c + jax.process_index()
            local["stop"] = np.full(len(local["label"]), code, np.int32)
        return local

    def raise_if_stopped(self, code: int, step: int, checkpoints) -> None:
        """Raises when the agreed code says an input failed: KeyboardInterrupt when it failed
        after a Ctrl-C, else this host's own error, or a message naming the process whose
        input failed."""
        if code < STOP_FAILED:
            return
        if code >= STOP_FAILED + jax.process_count():  # the step changed nothing
            raise KeyboardInterrupt
        if self.error is not None:
            raise self.error
        raise TrainingError(
            f"process {code - STOP_FAILED} stopped on an error in its input at step {step} "
            f"(its message says what); the checkpoints in {checkpoints} are intact: once it is "
            "fixed, the same command resumes"
        )


def _step_on_next_batch(compiled, state, batches: _LocalBatches, mesh, code, index: int):
    """``compiled(state, batch, index)`` on the next training batch (with the ``stop`` rows
    on several hosts).

    The batch lives only in this frame: with grain worker processes the host arrays are shared
    memory blocks, unlinked when the last reference to them goes, and on the CPU backend the
    device arrays alias them (no copy). So neither may stay in the training loop's frame,
    which can outlive the run: a module that keeps an exception from an import made during
    the run keeps every frame that was on the stack (mediapipe's audio_record keeps
    sounddevice's OSError when PortAudio is missing; ``signnet_jax.hht`` now imports mediapipe
    only for its Tunneller, but any such import inside a run would do). A batch held there is
    never unlinked, and Python's resource tracker reports it at exit as "leaked shared_memory
    objects".
    """
    local = batches.next(code)
    return compiled(state, sharding.global_batch(local, mesh), jnp.int32(index))


# The loop's clock for throughput and ETA (a test replaces it with a fake one).
_clock = time.perf_counter


@jax.jit
def _note_bad(first_bad: jax.Array, ok: jax.Array, step: jax.Array) -> jax.Array:
    return jnp.where((first_bad < 0) & ~ok, step, first_bad)


def _eval_params(state: dict) -> dict:
    return state.get("ema", state["params"])


def _accumulation_change(ckpt, step: int, ocfg, abstract_params, tx, mesh, depth: int):
    """``(saved optimizer-state layout, conversion)`` when a run is resumed with gradient
    accumulation switched on or off (optax.MultiSteps wraps the optimizer state), else None.

    Steps are saved at update boundaries (nothing accumulated), so the state converts exactly:
    Adam's moments and count are the wrapped state, and the accumulator starts at zero.
    """
    saved_accum = checkpointing.load_meta(ckpt.directory, step).get("config", {})
    saved_accum = saved_accum.get("optim", {}).get("grad_accum", 1)
    if (saved_accum > 1) == (ocfg.grad_accum > 1):  # same layout (MultiSteps' k is no state)
        return None
    saved_tx = optim.make_optimizer(
        dataclasses.replace(ocfg, grad_accum=saved_accum), abstract_params, depth
    )
    saved_layout = train_state_layout(abstract_params, saved_tx, mesh, ema=False)[1]["opt_state"]
    if saved_accum > 1:
        return saved_layout, lambda opt_state, params: opt_state.inner_opt_state
    layout = train_state_layout(abstract_params, tx, mesh, ema=False)[0]["opt_state"]

    @functools.partial(jax.jit, out_shardings=layout, donate_argnums=1)
    def wrap(params, inner):  # the accumulator and counters of tx.init; its inner state unused
        return tx.init(params)._replace(inner_opt_state=inner, gradient_step=jnp.int32(step))

    return saved_layout, lambda opt_state, params: wrap(params, opt_state)


def _restore(ckpt, step: int, abstract_state: dict, scaling, accumulation=None):
    """``(state, data state, meta)`` of a run being resumed.

    A run started in another dtype may lack the float16 loss scale: it starts afresh (it finds
    its level again within a few updates). ``accumulation``: ``_accumulation_change``'s, when
    the optimizer state changes layout.
    """
    saved = ckpt.saved_items(step)
    wanted = {k: v for k, v in abstract_state.items() if k in saved or k != "loss_scale"}
    if accumulation is not None:
        wanted["opt_state"] = accumulation[0]
    try:
        state, data_state, meta = ckpt.restore(step, wanted)
    except checkpointing.CheckpointError as e:
        raise TrainingError(str(e)) from e
    if accumulation is not None:
        state["opt_state"] = accumulation[1](state["opt_state"], state["params"])
    if "loss_scale" in abstract_state and "loss_scale" not in state:
        _log(f"the run was not in float16: its loss scale starts at {scaling.init:g}")
        state["loss_scale"] = jax.device_put(
            optim.loss_scale_init(scaling), abstract_state["loss_scale"]["scale"].sharding
        )
    return state, data_state, meta


def _save(ckpt, step, state, videos, meta, metrics):
    # device scalars in the run record (the float16 skip count) are read now, not every step
    meta = jax.tree.map(lambda x: x.item() if isinstance(x, jax.Array) else x, meta)
    ckpt.save(step, state, {"videos": videos}, meta, metrics)


def _summary_writer(workdir: pathlib.Path):
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tensorboard"))


def _close_writer(writer) -> None:
    with files.ctrl_c_after():  # close hands its thread a stop signal as _scalars hand events
        writer.close()


def _scalars(writer, step: int, values: dict[str, float]) -> None:
    if writer is None:
        return
    with files.ctrl_c_after():  # a Ctrl-C inside tensorboardX's queue hung its close()
        for k, v in values.items():
            writer.add_scalar(k, v, step)
        writer.flush()
