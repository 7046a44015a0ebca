"""Model speed: the Flax ViT against the PyTorch reference with the same weights, side by side.

    python bench/model.py                       # ViT-S and ViT-B, 16x224, batch 1, CPU
    python bench/model.py --presets B --frames 32 --repeats 5
    python bench/model.py --presets B --batch 8 --dtype bfloat16 --no-hf   # GPU / TPU: MFU

Prints, per preset, the best of ``--repeats`` timings of a forward pass and of a
training step (forward, backward, AdamW) for PyTorch (the reference VideoMAEv2
architecture in tests/models/torch_vit.py, and Hugging Face's VideoMAE with
SDPA attention for the forward) and for JAX, and the ratio PyTorch time / JAX
time (above 1 means JAX is faster). Also prints analytic FLOPs per clip and,
on an accelerator, MFU.

``--dtype`` is the JAX model's compute dtype (parameters stay float32, as in training);
MFU divides by the device's dense peak in that dtype (float16 on a T4 or V100) and float32 by
the bfloat16 peak, so measure it with ``--dtype bfloat16`` (float16 on a T4 or V100).
PyTorch always runs float32 on the CPU, so with bfloat16 the ratio compares unlike runs.
``--presets`` takes only presets the PyTorch reference has (S, B); any other is an argparse
error (exit 2): the comparison is the point of this benchmark, and bench/train.py times any
preset without PyTorch (--no-torch).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from bench.options import check_clip, positive, require_torch  # noqa: E402
from bench.timing import best_of  # noqa: E402
from signnet_jax.models import vit  # noqa: E402
from signnet_jax.models.flops import forward_flops, peak_flops  # noqa: E402

try:
    import torch

    from tests.models import torch_vit
    from tests.models.helpers import flax_twin
except ModuleNotFoundError as e:  # main says how to install it
    if e.name != "torch":
        raise
    torch = torch_vit = flax_twin = None


def torch_train_step(model, clip, labels):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(clip), labels)
        loss.backward()
        opt.step()

    return step


def jax_train_step(model, clip, labels):
    tx = optax.adamw(1e-4, weight_decay=0.05)
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    def loss_fn(p, x, y):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    state = {"p": params, "s": opt_state}

    def run():
        state["p"], state["s"], loss = step(state["p"], state["s"], clip, labels)
        loss.block_until_ready()

    return run


def hf_model(preset: str, frames: int, size: int):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    dim, depth, heads, mlp = torch_vit.PRESETS[preset]
    cfg = VideoMAEConfig(
        image_size=size,
        num_frames=frames,
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        use_mean_pooling=True,
        num_labels=400,
    )
    return VideoMAEForVideoClassification(cfg).eval()


def bench_preset(preset: str, args: argparse.Namespace) -> list[tuple]:
    """Timing rows (name, pass, reference, torch s, jax s, FLOPs) for one preset."""
    tmodel = torch_vit.make(preset, 400, num_frames=args.frames, img_size=args.size)
    model = flax_twin(tmodel, preset, 400, args.frames, args.size, dtype=args.dtype)
    flops = forward_flops(model.cfg, args.frames, args.size) * args.batch
    x = (
        np.random.default_rng(0)
        .standard_normal((args.batch, args.frames, args.size, args.size, 3))
        .astype(np.float32)
    )
    xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous()
    xj = jax.device_put(x)
    name = f"ViT-{preset} {args.frames}x{args.size} b{args.batch} {model.cfg.dtype}"
    rows = []

    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    t_jax = best_of(lambda: fwd(params, xj).block_until_ready(), args.repeats)
    with torch.inference_mode():
        t_torch = best_of(lambda: tmodel(xt), args.repeats)
    rows.append((name, "forward", "reference", t_torch, t_jax, flops))
    if not args.no_hf:
        hf = hf_model(preset, args.frames, args.size)
        xh = xt.permute(0, 2, 1, 3, 4).contiguous()
        with torch.inference_mode():
            t_hf = best_of(lambda: hf(pixel_values=xh), args.repeats)
        rows.append((name, "forward", "HF VideoMAE", t_hf, t_jax, flops))
    if not args.no_train:
        labels = np.zeros((args.batch,), np.int32)
        tmodel.train()
        t_torch = best_of(
            torch_train_step(tmodel, xt, torch.from_numpy(labels).long()), args.repeats
        )
        t_jax = best_of(jax_train_step(model, xj, jnp.asarray(labels)), args.repeats)
        rows.append((name, "train step", "reference", t_torch, t_jax, 3 * flops))
    return rows


def _presets(text: str) -> list[str]:
    names = text.split(",")
    if torch_vit is None:  # main stops first
        return names
    for name in names:
        if name not in torch_vit.PRESETS:
            raise argparse.ArgumentTypeError(
                f"preset {name!r} has no PyTorch reference (tests/models/torch_vit.py); choose "
                f"from {', '.join(torch_vit.PRESETS)}, or time it with bench/train.py --preset "
                f"{name} --no-torch"
            )
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--presets", type=_presets, default="S,B", help="comma-separated: S, B (default S,B)"
    )
    p.add_argument(
        "--dtype", choices=vit.DTYPES, default="float32",
        help="JAX compute dtype (MFU is against its peak; float32 against bfloat16's)",
    )  # fmt: skip
    p.add_argument(
        "--frames", type=int, metavar="N", default=16,
        help="frames per clip, a multiple of 2 (default 16)",
    )  # fmt: skip
    p.add_argument(
        "--size", type=int, metavar="PX", default=224,
        help="frame size in pixels, a multiple of 16 (default 224)",
    )  # fmt: skip
    p.add_argument(
        "--batch", type=positive, metavar="N", default=1, help="clips per pass (default 1)"
    )
    p.add_argument(
        "--repeats", type=positive, metavar="N", default=5,
        help="timed runs, the fastest kept (default 5)",
    )  # fmt: skip
    p.add_argument("--no-train", action="store_true", help="forward passes only")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face model")
    args = p.parse_args()
    require_torch(p, "bench/train.py --no-torch times the JAX model alone")
    for preset in args.presets:
        check_clip(p, preset, args.frames, args.size)

    device = jax.devices()[0]
    peak = peak_flops(device.device_kind, args.dtype)
    print(
        f"jax {jax.__version__} on {device.device_kind} ({jax.device_count()} devices), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    rows = []
    for preset in args.presets:
        rows += bench_preset(preset, args)

    print(
        f"\n{'model':<26} {'pass':<11} {'PyTorch':<12} {'torch s':>8} {'jax s':>8} "
        f"{'ratio':>6} {'GFLOP':>8}" + ("  MFU" if peak else "")
    )
    for name, kind, ref, t_torch, t_jax, fl in rows:
        line = (
            f"{name:<26} {kind:<11} {ref:<12} {t_torch:8.3f} {t_jax:8.3f} "
            f"{t_torch / t_jax:6.2f} {fl / 1e9:8.1f}"
        )
        if peak:
            line += f"  {fl / t_jax / peak:5.1%}"
        print(line)


if __name__ == "__main__":
    main()
