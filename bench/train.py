"""Training-step speed of the published model (ViT-B, 32x224) with the trainer's own step.

    python bench/train.py                         # CPU: batch 1, float32, vs PyTorch
    python bench/train.py --batch 32 --dtype bfloat16 --no-torch   # on a GPU / TPU
    python bench/train.py --batch 8 --dtype bfloat16 --no-torch --attention auto,splash  # TPU
    python bench/train.py --batch 32 --dtype bfloat16 --no-torch --trace /tmp/trace  # a profile
    python bench/train.py --batch 16 --dtype bfloat16 --memory --attention auto,splash  # fits?
    python bench/train.py --dtype bfloat16 --eval --eval-views 0,4  # the evaluation step only
    python bench/train.py --topology v5e:2x4 --batch 32 --dtype bfloat16 --attention auto,splash
    python bench/train.py --topology h100 --batch 32 --dtype bfloat16  # one H100: fits?
    python bench/train.py --topology h100:8 --preset L --batch 32 --dtype bfloat16 --fsdp 8
    python bench/train.py --topology t4 --batch 1 --dtype float16  # Colab's T4: float16
    python bench/train.py --topology v5e:2x4 --preset L --dtype bfloat16 --blocks unrolled,scan
    python bench/train.py --batch 32 --dtype bfloat16 --no-torch --remat off,full,save_dots

Times ``train.make_train_step`` (normalise + random erasing, mixup / cutmix, drop path,
forward, backward, AdamW with layer decay) on all local devices, batch split over a
data-parallel mesh; prints step time, clips/s, analytic FLOPs and, on an accelerator,
MFU. ``--attention`` with several kernels (comma-separated) times each on the same
weights and batch and prints their speeds relative to the first that runs (a kernel the
device cannot run, or a batch that does not fit, gets a line saying so; the run fails only if
no kernel ran). On the CPU it also times the PyTorch reference training step on the same
weights (tests/models/torch_vit.py) and prints PyTorch time / JAX time (min of repeats), JAX's
time being that first kernel's.

``--topology`` compiles the step for devices that are not here: a TPU slice (``v5e:2x4``, a
v5e-8) with JAX's TPU compiler (``pip install 'jax[tpu]'``) or a GPU node (``h100:8``) with
JAX's CUDA plugin (``pip install 'jax[cuda12]'``), on any host, no TPU or GPU needed; it prints
the memory as ``--memory`` does: whether a batch fits before the hardware is rented. With
``--memory`` the evaluation step (``--eval-batch`` views, the config's ``data.eval_batch_size``,
each device taking ``--eval-views`` of its share at a time, ``data.eval_views_per_device``) is
compiled too: the training run's validation and test need it to fit as well. ``--eval`` compiles
the evaluation step alone (one line per kernel and ``--eval-views`` value). Each memory line
ends with the compile time; ``--blocks unrolled,scan`` compiles (or times) each step with the
blocks unrolled and as one scan (``model.scan_layers``) and gives the scan's compile time against
the unrolled blocks'. ``--remat off,full,save_dots`` times (or compiles) the step without remat
and under each ``model.remat_policy``; with ``--memory`` the default is ``off,full``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.options import check_clip, positive, require_torch  # noqa: E402
from bench.timing import best_of  # noqa: E402
from bench.topology import (  # noqa: E402
    GPU_EXAMPLES,
    TPU_EXAMPLES,
    is_tpu_slice,
    memory_limit,
    target_devices,
)
from configs import wlasl2000  # noqa: E402
from signnet_jax import evaluate, optim, sharding, train  # noqa: E402
from signnet_jax.models import splash, vit  # noqa: E402
from signnet_jax.models.flops import peak_flops, train_flops  # noqa: E402


def trainer_setup(cfg, config, mesh) -> train.Setup:
    """What the trainer's step needs of its setup: the model, and its parameters laid out on
    ``mesh`` by the config's rules (replicated, or sharded over the ``fsdp`` axis)."""
    graphdef, param_sh, _ = train.parameter_shardings(cfg, config, mesh)
    classes = [str(i) for i in range(cfg.num_classes)]
    return train.Setup(cfg, classes, {}, mesh, graphdef, param_sh, None, "")


def state_layout(setup, tx, mesh):
    """``(shardings, abstract state)`` of the training state as the trainer lays it out.

    Made outside the mesh: a topology's devices cannot hold the arrays it is traced with.
    """
    abstract = train.sharded_params(vit.abstract_params(setup.model_cfg), setup.param_sh)
    scaled = setup.model_cfg.dtype == "float16"  # the trainer's loss scale (train.loss_scaling)
    return train.train_state_layout(abstract, tx, mesh, ema=False, loss_scale=scaled)


def time_step(setup, config, tx, params, clip, labels, mesh, repeats, trace_dir=None) -> float:
    """Best-of-``repeats`` seconds of one training step (compiled before timing).

    With ``trace_dir``, two more steps run afterwards under a jax.profiler trace written there.
    """
    state_sh, _ = state_layout(setup, tx, mesh)
    with jax.set_mesh(mesh):
        batch = sharding.global_batch(
            {"clip": clip, "erase_box": np.zeros((len(clip), 4), np.int32), "label": labels},
            mesh,
        )
        scaling = train.loss_scaling(config, setup.model_cfg)
        state = train.init_state(params, tx, state_sh, scaling, donate=False)
        step_fn, _ = train.jit_train_step(
            setup, config, tx, state_sh, train.batch_spec(len(clip), setup.model_cfg)
        )
        box = {"state": state, "i": 0}

        def run():
            box["state"], m = step_fn(box["state"], batch, jnp.int32(box["i"]))
            box["i"] += 1
            m["loss"].block_until_ready()

        best = best_of(run, repeats)
        if trace_dir is not None:
            with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
                run()
                run()
        return best  # the state is freed on return


def step_memory(setup, config, tx, batch: int, mesh) -> Compiled:
    """The step compiled (nothing runs): XLA's memory analysis, or why there is none (the
    compiler says it does not fit the device, or cannot compile it for the device)."""
    cfg = setup.model_cfg
    _prepare_splash(cfg, mesh)
    state_sh, state = state_layout(setup, tx, mesh)
    with jax.set_mesh(mesh):
        step_fn, abstract = train.jit_train_step(
            setup, config, tx, state_sh, train.batch_spec(batch, cfg)
        )
        return _memory_of(
            lambda: step_fn.lower(state, abstract, jax.ShapeDtypeStruct((), jnp.int32))
        )


def _prepare_splash(cfg, mesh) -> None:
    """The splash kernel built outside the mesh (a TPU topology's mesh cannot make arrays)."""
    platform = mesh.devices.flat[0].platform
    if vit.attention_implementation(cfg.attention, platform, cfg.dtype) == "splash":
        splash.prepare(cfg.num_heads, cfg.num_patches, platform)


def eval_memory(setup, views: int, mesh, at_once: int) -> Compiled:
    """The evaluation step on ``views`` views (``data.eval_batch_size``: the training run's
    validation and test) compiled, each device taking ``at_once`` of its share at a time
    (``data.eval_views_per_device``), as ``step_memory``."""
    cfg = setup.model_cfg
    _prepare_splash(cfg, mesh)
    params = train.sharded_params(vit.abstract_params(cfg), setup.param_sh)
    clips = jax.ShapeDtypeStruct(
        (views, cfg.num_frames, cfg.img_size, cfg.img_size, 3),
        jnp.uint8,
        sharding=sharding.batch_sharding(mesh, 5),
    )
    with jax.set_mesh(mesh):
        return _memory_of(lambda: evaluate.eval_step(setup, at_once).lower(params, clips))


# --blocks: model.scan_layers of each way to run the blocks
BLOCKS = {"unrolled": False, "scan": True}
# --remat: off, or a model.remat_policy
REMAT = ("off", *vit.REMAT_POLICIES)


def with_remat(cfg: vit.ViTConfig, remat: str) -> vit.ViTConfig:
    """``cfg`` without remat (``off``) or rematerialised by the policy ``remat``."""
    if remat == "off":
        return dataclasses.replace(cfg, remat=False, remat_policy="full")
    return dataclasses.replace(cfg, remat=True, remat_policy=remat)


# What a kernel the device cannot run raises: XLA's compile error (JaxRuntimeError, a
# RuntimeError), or cuDNN's or Pallas' own.
CANNOT_RUN = (RuntimeError, ValueError, NotImplementedError)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A step compiled for its memory: XLA's analysis, or a line saying why there is none; how
    long the compiler took, and whether JAX's compilation cache held the step instead."""

    memory: Any
    seconds: float
    cached: bool

    def took(self, unrolled: Compiled | None = None) -> str:
        """', compiled in 41.2 s', and the time against ``unrolled``'s where both compiled."""
        against = ""
        if (
            not self.cached
            and unrolled is not None
            and not unrolled.cached
            and not isinstance(unrolled.memory, str)
        ):
            against = f" ({self.seconds / unrolled.seconds:.2f}x the unrolled blocks' time)"
        return f", {train.compile_words(self.seconds, self.cached)}{against}"


def _memory_of(lower) -> Compiled:
    """``lower()`` compiled: its memory analysis, or a line saying why there is none."""

    def compile_():
        try:
            return lower().compile().memory_analysis()
        except CANNOT_RUN as e:
            if _out_of_memory(e):
                return "does not fit (the compiler ran out of device memory)"
            return f"does not compile for this device: {_first_line(e)}"

    return Compiled(*train.compile_seconds(compile_))


def _out_of_memory(e: Exception) -> bool:
    return isinstance(e, jax.errors.JaxRuntimeError) and train.is_out_of_memory(e)


def _first_line(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}".rstrip(": ")


def why_not_timed(e: Exception) -> str:
    """Why a kernel's step could not be timed, for its line in place of the time."""
    if _out_of_memory(e):
        return (
            f"does not fit in device memory ({_first_line(e)}); try a smaller --batch or "
            "--remat, or size the step with --memory"
        )
    return f"does not run on this device: {_first_line(e)}"


def print_memory(args, cfg, config, tx, mesh, kernels, scans, remats) -> None:
    """--memory: per-device memory of the step for each kernel, way to run the blocks and
    remat, and how long each took to compile."""
    device = mesh.devices.flat[0]
    limit, limit_name = memory_limit(device) or (None, None)
    per_device = args.batch // mesh.size
    gib = 2**30
    views = args.eval_batch // mesh.size

    def report(head, compiled, unrolled=None):
        mem = compiled.memory
        if isinstance(mem, str):
            print(head + mem, flush=True)
            return
        total = mem.argument_size_in_bytes + mem.temp_size_in_bytes
        share = (
            f" ({total / limit:.0%} of {limit / gib:.1f} GiB, {limit_name}"
            + ("; does not fit)" if total > limit else ")")
            if limit
            else ""
        )
        print(
            head + f"arguments {mem.argument_size_in_bytes / gib:.2f} GiB, temporaries "
            f"{mem.temp_size_in_bytes / gib:.2f} GiB per device" + share + compiled.took(unrolled),
            flush=True,
        )

    for kernel in kernels:
        ran = vit.attention_implementation(
            kernel, device.platform, args.dtype, getattr(device, "compute_capability", None)
        )
        unrolled = {}  # each step's compile with the blocks unrolled, to time the scan against
        for scan in sorted(scans):  # unrolled first
            model = (
                f"ViT-{args.preset} {args.frames}x{args.size}, {{}} per device, {args.dtype}, "
                f"attention {kernel}{f' ({ran})' if ran != kernel else ''}, "
                + ("scanned blocks, " if scan else "")
            )
            clips = f"{per_device} clip{'s' * (per_device != 1)}"
            kcfg = dataclasses.replace(cfg, attention=kernel, scan_layers=scan)
            for remat in () if args.eval else remats:
                setup = trainer_setup(with_remat(kcfg, remat), config, mesh)
                compiled = step_memory(setup, config, tx, args.batch, mesh)
                if not scan:
                    unrolled[remat] = compiled
                head = model.format(clips) + f"remat {remat}: "
                report(head, compiled, unrolled.get(remat) if scan else None)
            setup = trainer_setup(kcfg, config, mesh)  # the evaluation: no remat
            for at_once in args.eval_views:
                compiled = eval_memory(setup, args.eval_batch, mesh, at_once)
                if not scan:
                    unrolled[at_once, "eval"] = compiled
                size = evaluate.eval_chunks(views, at_once)[1]
                chunks = f" ({size} at a time)" if size < views else ""
                head = model.format(f"{views} view{'s' * (views != 1)}") + f"evaluation{chunks}: "
                report(head, compiled, unrolled.get((at_once, "eval")) if scan else None)


def _flop(n: float) -> str:
    """A FLOP count in the unit that shows it: TFLOP, GFLOP for a small model, or MFLOP."""
    for unit, scale in (("T", 1e12), ("G", 1e9)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}FLOP"
    return f"{n / 1e6:.2f} MFLOP"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--preset", default="B", help="model preset: S, B, L, H, g (default B, the published one)"
    )
    p.add_argument(
        "--frames", type=int, metavar="N", default=32,
        help="frames per clip, a multiple of 2 (default 32)",
    )  # fmt: skip
    p.add_argument(
        "--size", type=int, metavar="PX", default=224,
        help="frame size in pixels, a multiple of the patch size (default 224)",
    )  # fmt: skip
    p.add_argument(
        "--batch", type=positive, metavar="N",
        help="global batch (clips per step; default: one per device)",
    )  # fmt: skip
    p.add_argument(
        "--dtype", default="float32", choices=vit.DTYPES, help="compute dtype (default float32)"
    )
    p.add_argument(
        "--remat", nargs="?", const="full", metavar="WHAT[,WHAT...]",
        help="model.remat: recompute each block in the backward pass (less memory): off, full "
        "(the block keeps its input; the default of a bare --remat) or save_dots (it also keeps "
        "its matmuls' outputs, model.remat_policy); several comma-separated to compare their "
        "speed, or with --memory their memory (default off; with --memory off,full)",
    )  # fmt: skip
    p.add_argument(
        "--blocks", default="unrolled", metavar="HOW[,HOW...]",
        help="how the blocks run: unrolled (default unrolled) or scan (model.scan_layers: one "
        "scan, so XLA compiles one block); both, comma-separated, to compare their speed, or "
        "with --memory their memory and compile times",
    )  # fmt: skip
    p.add_argument(
        "--fsdp", type=int, default=1, metavar="N",
        help="shard parameters and optimizer state over N devices, as --config.mesh.fsdp=N "
        "(default 1: data parallel)",
    )  # fmt: skip
    p.add_argument(
        "--repeats", type=positive, metavar="N", default=3,
        help="timed steps, the fastest kept (default 3)",
    )  # fmt: skip
    p.add_argument(
        "--no-torch", action="store_true",
        help="do not time the PyTorch reference step (it runs on a CPU only)",
    )  # fmt: skip
    p.add_argument(
        "--attention", default="auto",
        help=f"model.attention, or several comma-separated to compare ({', '.join(vit.ATTENTION)})",
    )  # fmt: skip
    p.add_argument(
        "--memory", action="store_true",
        help="compile only and print each kernel's per-device memory under each --remat "
        "(default off,full; XLA's memory analysis: nothing runs, so settings that do not fit "
        "are safe to try)",
    )  # fmt: skip
    p.add_argument(
        "--eval-batch", type=int, metavar="N",
        help="views per evaluation step over all devices, as --config.data.eval_batch_size "
        "(default: the recipe's 64), whose memory --memory also prints",
    )  # fmt: skip
    p.add_argument(
        "--eval-views", metavar="N[,N...]",
        help="views each device takes through the model at once in the evaluation step, as "
        "--config.data.eval_views_per_device (default: the recipe's 4; 0: all of its share); "
        "several comma-separated compile one step each",
    )  # fmt: skip
    p.add_argument(
        "--eval", action="store_true",
        help="compile the evaluation step only and print its memory (implies --memory)",
    )  # fmt: skip
    p.add_argument(
        "--topology", metavar="NAME",
        help="compile for this TPU slice or GPU node instead of this host's devices and print "
        "the memory (implies --memory; needs pip install 'jax[tpu]' or 'jax[cuda12]', not the "
        f"device): TPU slices {TPU_EXAMPLES} (v5e:2x4 is a v5e-8); GPUs {GPU_EXAMPLES} "
        "(h100:8 is one node of 8 H100s, h100:2x8 two)",
    )  # fmt: skip
    p.add_argument(
        "--trace", type=pathlib.Path, metavar="DIR",
        help="after timing, trace two steps of each kernel with jax.profiler into DIR/KERNEL "
        "(view with: xprof --logdir DIR/KERNEL)",
    )  # fmt: skip
    args = p.parse_args()
    args.preset = check_clip(p, args.preset, args.frames, args.size)

    def check_dtype(platform: str) -> None:
        why = vit.unsupported_dtype(args.dtype, platform)
        if why:
            p.error(f"--dtype {args.dtype}: {why}; use --dtype bfloat16")

    if args.topology and is_tpu_slice(args.topology):
        check_dtype("tpu")  # before the TPU compiler is looked for
    try:
        devices = target_devices(args.topology)
    except ValueError as e:
        p.error(str(e))
    check_dtype(devices[0].platform)
    args.memory = args.memory or args.eval or args.topology is not None
    args.batch = args.batch or len(devices)
    if args.batch % len(devices):
        p.error(f"--batch {args.batch} must be a multiple of the {len(devices)} devices")
    if args.eval_batch is None:
        args.eval_batch = wlasl2000.get_config().data.eval_batch_size
    if args.eval_batch < 1 or args.eval_batch % len(devices):
        p.error(f"--eval-batch {args.eval_batch} must be a multiple of the {len(devices)} devices")
    raw = args.eval_views or str(wlasl2000.get_config().data.eval_views_per_device)
    try:
        args.eval_views = [int(n) for n in raw.split(",")]
    except ValueError:
        args.eval_views = [-1]
    if min(args.eval_views) < 0:
        p.error(f"--eval-views {raw}: whole numbers >= 0, comma-separated")
    if args.fsdp < 1 or len(devices) % args.fsdp:
        p.error(f"--fsdp {args.fsdp} must divide the {len(devices)} devices")
    kernels = args.attention.split(",")
    for name in kernels:
        if name not in vit.ATTENTION:
            p.error(f"--attention {name!r}: choose from {', '.join(vit.ATTENTION)}")
    blocks = args.blocks.split(",")
    for name in blocks:
        if name not in BLOCKS:
            p.error(f"--blocks {name!r}: choose from {', '.join(BLOCKS)}")
    scans = [BLOCKS[name] for name in blocks]
    remats = (args.remat or ("off,full" if args.memory else "off")).split(",")
    for name in remats:
        if name not in REMAT:
            p.error(f"--remat {name!r}: choose from {', '.join(REMAT)}")
    if not (args.no_torch or args.memory) and devices[0].platform == "cpu":
        require_torch(p, "or time JAX alone with --no-torch")

    config = wlasl2000.get_config()
    classes = 2000
    cfg = vit.ViTConfig.from_preset(
        args.preset, num_classes=classes, num_frames=args.frames, img_size=args.size,
        drop_path_rate=config.model.drop_path_rate, dtype=args.dtype,
    )  # fmt: skip
    config.mesh.fsdp = args.fsdp
    mesh = sharding.make_mesh(args.fsdp, devices)
    params = vit.params_of(vit.create_model(cfg))
    ocfg = optim.OptimConfig(
        base_lr=1e-3, min_lr=1e-6, warmup_lr=1e-8, total_steps=1000, warmup_steps=100,
        weight_decay=0.1, layer_decay=0.75,
    )  # fmt: skip
    tx = optim.make_optimizer(ocfg, params, cfg.depth)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (args.batch, args.frames, args.size, args.size, 3), np.uint8)
    labels = rng.integers(0, classes, args.batch).astype(np.int32)
    flops = train_flops(cfg) * args.batch
    device = devices[0]
    peak = peak_flops(device.device_kind, args.dtype)
    print(
        f"jax {jax.__version__} on {len(devices)} x {device.device_kind}"
        + (f" (topology {args.topology}: compiled here, nothing runs)" if args.topology else "")
        + (f"; parameters and optimizer state sharded over {args.fsdp}" if args.fsdp > 1 else "")
    )
    if args.memory:
        print_memory(args, cfg, config, tx, mesh, kernels, scans, remats)
        return
    times = {}  # the kernels that ran; the first is the others' reference
    for kernel in kernels:
        ran = vit.attention_implementation(
            kernel, device.platform, args.dtype, getattr(device, "compute_capability", None)
        )
        for scan, remat in itertools.product(scans, remats):
            how = ["scanned blocks"] * scan + [f"remat {remat}"] * (remat != "off")
            name = kernel + (" with " + " and ".join(how) if how else "")
            kcfg = dataclasses.replace(cfg, attention=kernel, scan_layers=scan)
            setup = trainer_setup(with_remat(kcfg, remat), config, mesh)
            traced = kernel + "-scan" * scan + ("" if remat == "off" else f"-remat-{remat}")
            trace = args.trace / traced if args.trace else None
            head = (
                f"ViT-{args.preset} {args.frames}x{args.size}, batch {args.batch}, {args.dtype}, "
                f"attention {kernel} ({ran}){''.join(', ' + h for h in how)}: "
            )
            try:
                t = time_step(setup, config, tx, params, clip, labels, mesh, args.repeats, trace)
            except CANNOT_RUN as e:
                print(head + why_not_timed(e), flush=True)
                continue
            first = next(iter(times), name)
            times[name] = t
            print(
                head + f"step {t:.3f} s, {args.batch / t:.2f} clips/s, "
                f"{_flop(flops)}/step ({_flop(flops / args.batch)} per clip)"
                + (f", MFU {flops / t / (peak * jax.device_count()):.1%}" if peak else "")
                + (f"; {times[first] / t:.2f}x the speed of {first}" if first != name else ""),
                flush=True,
            )
    if not times:
        sys.exit("train.py: error: no --attention kernel ran on this device (see above)")
    t_jax = next(iter(times.values()))
    if not args.no_torch and device.platform == "cpu":
        import torch

        from bench.model import torch_train_step
        from tests.models import torch_vit

        tmodel = torch_vit.make(args.preset, classes, num_frames=args.frames, img_size=args.size)
        xt = torch.from_numpy(clip).permute(0, 4, 1, 2, 3).float().contiguous()
        t_torch = best_of(
            torch_train_step(tmodel.train(), xt, torch.from_numpy(labels).long()), args.repeats
        )
        print(f"PyTorch reference step {t_torch:.3f} s; ratio PyTorch / JAX {t_torch / t_jax:.2f}")


if __name__ == "__main__":
    main()
