"""bench/train.py and bench/model.py run end to end at a tiny size; --trace writes a profile."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


# Runs a script with PyTorch unimportable, as on a JAX-only GPU or TPU machine.
WITHOUT_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _bench(command: str, *extra, python=(), env=None):
    """Runs ``python [PYTHON...] COMMAND EXTRA...`` in the repository (COMMAND split on spaces)."""
    argv = [sys.executable, *python, *command.split(), *map(str, extra)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def test_train_bench_times_kernels_and_traces(tmp_path):
    tiny = "--preset S --frames 4 --size 32 --batch 2"
    r = _bench(
        f"bench/train.py {tiny} --repeats 1 --no-torch --attention cudnn,auto,explicit --trace",
        tmp_path / "trace",
        python=("-c", WITHOUT_TORCH),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ViT-S 4x32")]
    assert len(lines) == 3
    # a kernel this device cannot run gets its line, and the others are timed against the first
    # that ran
    assert lines[0] == (
        "ViT-S 4x32, batch 2, float32, attention cudnn (cudnn): does not run on this device: "
        "RuntimeError: cuDNN is not detected."
    )
    assert re.match(r"ViT-S 4x32, batch 2, float32, attention auto \(explicit\): step ", lines[1])
    assert not lines[1].endswith("x the speed of cudnn")
    assert re.search(r"attention explicit \(explicit\): .*x the speed of auto$", lines[2])
    # a tiny model's FLOPs in a unit that shows them (it was "0.00 TFLOP/step")
    assert re.search(r" \d+\.\d\d GFLOP/step \(\d+\.\d\d GFLOP per clip\)", lines[1]), lines[1]
    assert sorted(p.name for p in (tmp_path / "trace").iterdir()) == ["auto", "explicit"]
    for kernel in ("auto", "explicit"):
        (run,) = (tmp_path / "trace" / kernel / "plugins" / "profile").iterdir()
        assert len(list(run.glob("*.xplane.pb"))) == 1
        assert len(list(run.glob("*perfetto_trace.json.gz"))) == 1
    none = _bench(f"bench/train.py {tiny} --no-torch --attention cudnn")
    assert none.returncode == 1
    assert none.stderr.splitlines()[-1] == (
        "train.py: error: no --attention kernel ran on this device (see above)"
    )
    bad = _bench("bench/train.py --attention auto,flash")
    assert bad.returncode == 2 and "--attention 'flash': choose from" in bad.stderr
    two = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    odd = _bench("bench/train.py --batch 3", env=two)
    assert odd.returncode == 2 and "--batch 3 must be a multiple of the 2 devices" in odd.stderr


# how long the step took to compile, or to load from the tests' JAX compilation cache
COMPILED = r"(compiled|loaded from JAX's compilation cache) in \d+\.\d s$"


def test_train_bench_memory_compiles_only():
    r = _bench(
        "bench/train.py --preset S --frames 4 --size 32 --batch 2 --memory --attention explicit "
        "--eval-batch 4"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ViT-S 4x32")]
    pattern = (
        r"ViT-S 4x32, (2 clips|4 views) per device, float32, attention explicit, "
        r"(remat off|remat full|evaluation): "
        r"arguments (\d+\.\d\d) GiB, temporaries (\d+\.\d\d) GiB per device, " + COMPILED
    )
    matches = [re.match(pattern, line) for line in lines]
    assert len(lines) == 3 and all(matches), lines
    assert [m[2] for m in matches] == ["remat off", "remat full", "evaluation"]
    assert [m[1] for m in matches] == ["2 clips", "2 clips", "4 views"]
    assert float(matches[0][3]) > 0.2  # ViT-S and its AdamW state: 22M parameters, 3 copies
    assert 0.07 < float(matches[2][3]) < 0.1  # evaluation: the float32 parameters alone
    assert "step " not in r.stdout  # nothing was timed
    odd = _bench("bench/train.py --memory --eval-batch 0")
    assert (
        odd.returncode == 2 and "--eval-batch 0 must be a multiple of the 1 devices" in odd.stderr
    )
    # a kernel the device cannot run is reported, and the others are still compiled
    both = _bench(
        "bench/train.py --preset S --frames 4 --size 32 --batch 2 --memory --dtype bfloat16 "
        "--attention cudnn,explicit"
    )
    assert both.returncode == 0, both.stderr[-3000:]
    lines = [line for line in both.stdout.splitlines() if line.startswith("ViT-S 4x32")]
    assert lines[:3] == [
        f"ViT-S 4x32, {what} per device, bfloat16, attention cudnn, {step}: does not "
        "compile for this device: RuntimeError: cuDNN is not detected."
        for what, step in (("2 clips", "remat off"), ("2 clips", "remat full"),
                           ("64 views", "evaluation (4 at a time)"))
    ]  # fmt: skip
    assert len(lines) == 6 and all(" arguments " in line for line in lines[3:])
    # --eval: the evaluation step alone, all of a device's views at once and a few at a time
    r = _bench(
        "bench/train.py --preset S --frames 16 --size 224 --eval --attention explicit "
        "--eval-batch 8 --eval-views 0,8,3"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ViT-S 16x224")]
    pattern = (
        r"ViT-S 16x224, 8 views per device, float32, attention explicit, evaluation(| \(3 at a "
        r"time\)): arguments (\d+\.\d\d) GiB, temporaries (\d+\.\d\d) GiB per device, " + COMPILED
    )
    matches = [re.match(pattern, line) for line in lines]
    assert len(lines) == 3 and all(matches), lines
    assert [m[1] for m in matches] == ["", "", " (3 at a time)"]
    # 0.23 GiB of temporaries for 8 views at once, 0.09 for 3
    assert matches[0][3] == matches[1][3] and float(matches[2][3]) < 0.5 * float(matches[0][3])
    bad = _bench("bench/train.py --eval --eval-views 2,x")
    assert bad.returncode == 2 and "--eval-views 2,x: whole numbers >= 0" in bad.stderr


def test_train_bench_compares_scanned_blocks_with_unrolled_ones():
    # compile times against the unrolled blocks' need both compiled: no compilation cache
    fresh = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    tiny = "bench/train.py --preset S --frames 4 --size 32 --batch 2 --attention explicit"
    r = _bench(f"{tiny} --memory --eval-batch 4 --blocks unrolled,scan", env=fresh)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ViT-S 4x32")]
    pattern = (
        r"ViT-S 4x32, (2 clips|4 views) per device, float32, attention explicit, "
        r"(|scanned blocks, )(remat off|remat full|evaluation): arguments (\d+\.\d\d) GiB, "
        r"temporaries (\d+\.\d\d) GiB per device, compiled in (\d+\.\d) s"
        r"(| \((\d+\.\d\d)x the unrolled blocks' time\))$"
    )
    matches = [re.match(pattern, line) for line in lines]
    assert len(lines) == 6 and all(matches), lines
    assert [m[2] for m in matches] == [""] * 3 + ["scanned blocks, "] * 3
    assert [m[3] for m in matches] == ["remat off", "remat full", "evaluation"] * 2
    # the scan's time is given against its unrolled twin's (from the times before rounding to
    # 0.1 s, so within the range the rounded ones allow)
    for unrolled, scanned in zip(matches[:3], matches[3:], strict=True):
        assert unrolled[7] == ""
        s, u = float(scanned[6]), float(unrolled[6])
        low, high = max(s - 0.05, 0) / (u + 0.05), (s + 0.05) / max(u - 0.05, 1e-9)
        assert low - 0.005 <= float(scanned[8]) <= high + 0.005, (unrolled[0], scanned[0])
        # the same training state; the stack of the blocks' float32 weights (ViT-S: 21M, 0.08
        # GiB) is one more temporary, with their gradients two in training
        assert scanned[4] == unrolled[4]
        extra = float(scanned[5]) - float(unrolled[5])
        assert 0.07 <= extra <= (0.1 if scanned[3] == "evaluation" else 0.2), scanned[0]
    # timed: the scan against the first that ran
    timed = _bench(f"{tiny} --repeats 1 --no-torch --blocks unrolled,scan")
    assert timed.returncode == 0, timed.stderr[-3000:]
    lines = [line for line in timed.stdout.splitlines() if line.startswith("ViT-S 4x32")]
    assert len(lines) == 2
    assert lines[0].startswith("ViT-S 4x32, batch 2, float32, attention explicit (explicit): ")
    assert re.match(
        r"ViT-S 4x32, batch 2, float32, attention explicit \(explicit\), scanned blocks: "
        r"step .*; \d+\.\d\dx the speed of explicit$",
        lines[1],
    )


def test_train_bench_compares_remat_policies(tmp_path):
    tiny = "bench/train.py --preset S --frames 4 --size 32 --batch 2"
    r = _bench(f"{tiny} --repeats 1 --no-torch --remat off,full,save_dots --trace", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ViT-S 4x32")]
    assert len(lines) == 3
    head = "ViT-S 4x32, batch 2, float32, attention auto (explicit)"
    assert lines[0].startswith(f"{head}: step ") and "x the speed of" not in lines[0]
    for line, policy in zip(lines[1:], ("full", "save_dots"), strict=True):
        assert re.match(
            rf"{re.escape(head)}, remat {policy}: step .*; \d+\.\d\dx the speed of auto$", line
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "auto", "auto-remat-full", "auto-remat-save_dots"
    ]  # fmt: skip
    # --remat alone is full; with --memory the policies named replace off,full
    bare = _bench(f"{tiny} --repeats 1 --no-torch --remat --blocks scan")
    assert bare.returncode == 0, bare.stderr[-3000:]
    assert f"{head}, scanned blocks, remat full: step " in bare.stdout
    mem = _bench(f"{tiny} --memory --eval-batch 2 --remat save_dots")
    assert mem.returncode == 0, mem.stderr[-3000:]
    lines = [line for line in mem.stdout.splitlines() if line.startswith("ViT-S 4x32")]
    assert [line.split(": ")[0] for line in lines] == [
        "ViT-S 4x32, 2 clips per device, float32, attention auto (explicit), remat save_dots",
        "ViT-S 4x32, 2 views per device, float32, attention auto (explicit), evaluation",
    ]
    bad = _bench("bench/train.py --remat full,dots")
    assert bad.returncode == 2 and "--remat 'dots': choose from off, full, save_dots" in bad.stderr


def test_train_bench_runs_float16_with_the_trainers_loss_scale():
    r = _bench(
        "bench/train.py --preset S --frames 4 --size 32 --batch 2 --repeats 1 --no-torch "
        "--dtype float16"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"^ViT-S 4x32, batch 2, float16, attention auto \(explicit\): step ", r.stdout,
                     re.M)  # fmt: skip
    bad = _bench("bench/train.py --dtype float64")
    assert bad.returncode == 2 and "argument --dtype: invalid choice: 'float64'" in bad.stderr
    # refused before the TPU compiler is looked for (not installed here)
    tpu = _bench("bench/train.py --topology v5e:2x4 --dtype float16")
    assert tpu.returncode == 2
    assert "--dtype float16: float16 does not run on TPUs" in tpu.stderr
    assert "use --dtype bfloat16" in tpu.stderr


def test_train_bench_fsdp_shards_the_state():
    eight = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    tiny = "bench/train.py --preset S --frames 4 --size 32 --batch 8 --memory --attention explicit"
    args = {}
    for fsdp in (1, 4):
        r = _bench(f"{tiny} --fsdp {fsdp}", env=eight)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.splitlines()[0].endswith(
            "; parameters and optimizer state sharded over 4" if fsdp == 4 else " x cpu"
        )
        args[fsdp] = [float(m[1]) for m in re.finditer(r"arguments (\d+\.\d\d) GiB", r.stdout)]
    # ViT-S with its AdamW state, a quarter of it on each device (the batch is the same); the
    # evaluation's parameters too
    assert len(args[1]) == len(args[4]) == 3
    assert all(0.2 < a < 0.3 for a in args[1][:2]) and 0.07 < args[1][2] < 0.1
    assert all(abs(q - a / 4) <= 0.015 for q, a in zip(args[4], args[1], strict=True))
    # the timed step runs sharded too
    two = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    timed = _bench(
        "bench/train.py --preset S --frames 4 --size 32 --batch 2 --repeats 1 --no-torch "
        "--attention explicit --fsdp 2",
        env=two,
    )
    assert timed.returncode == 0, timed.stderr[-3000:]
    assert re.search(
        r"ViT-S 4x32, batch 2, float32, attention explicit \(explicit\): step ", timed.stdout
    )
    bad = _bench("bench/train.py --fsdp 3", env=two)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == "train.py: error: --fsdp 3 must divide the 2 devices"


# Runs a script as where JAX's TPU compiler (the libtpu package) is not installed.
WITHOUT_LIBTPU = WITHOUT_TORCH.replace("'torch'", "'libtpu'")


def test_train_bench_topology_needs_the_tpu_compiler():
    # without JAX's TPU compiler (libtpu) the flag says how to get it; JAX finds libtpu through
    # TPU_LIBRARY_PATH too, which it sets where libtpu is installed
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    r = _bench("bench/train.py --topology v5e:2x4", python=("-c", WITHOUT_LIBTPU), env=env)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == (
        "train.py: error: --topology v5e:2x4 needs JAX's TPU compiler: pip install 'jax[tpu]' "
        "(it compiles here; nothing runs on a TPU)"
    )


# Runs a script as where no JAX plugin (the CUDA one included) is installed.
WITHOUT_CUDA = WITHOUT_TORCH.replace("'torch'", "'jax_plugins'")


def test_train_bench_gpu_topology_needs_the_cuda_plugin_and_a_known_name():
    r = _bench("bench/train.py --topology h100:8", python=("-c", WITHOUT_CUDA))
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == (
        "train.py: error: --topology h100:8 needs JAX's CUDA compiler: pip install "
        "'jax[cuda12]' (it compiles here; nothing runs on a GPU)"
    )
    bad = _bench("bench/train.py --topology h100:0")
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == (
        "train.py: error: --topology h100:0: after 'h100:' give the GPUs per node, or "
        "NODESxGPUS (e.g. h100:8 or h100:2x8)"
    )
    # a GPU whose name looks like a TPU generation is still a GPU
    v100 = _bench("bench/train.py --topology v100", python=("-c", WITHOUT_CUDA))
    assert v100.returncode == 2
    assert "--topology v100 needs JAX's CUDA compiler" in v100.stderr.splitlines()[-1]
    for name in ("b300:8", "v5e"):  # an unknown GPU; a TPU generation without its slice
        unknown = _bench(f"bench/train.py --topology {name}")
        assert unknown.returncode == 2
        assert unknown.stderr.splitlines()[-1] == (
            f"train.py: error: --topology {name}: not a GPU known here (h100, a100, a100-40gb, "
            "l4, t4, v100) nor a TPU slice (like v5e:2x4, v6e:2x4, v4:2x2x1, v5p:2x2x1)"
        )


def test_gpu_topologies_name_nodes_and_link_to_the_device_tables():
    from bench import topology
    from signnet_jax.models import vit
    from signnet_jax.models.flops import peak_flops

    gpus = topology.GPUS
    # JAX's topology string: slices x hosts x GPUs per host
    assert topology.parse_gpu("h100") == (gpus["h100"], "1x1x1")
    assert topology.parse_gpu("H100:8") == (gpus["h100"], "1x1x8")
    assert topology.parse_gpu("a100-40gb:2x8") == (gpus["a100-40gb"], "1x2x8")
    assert topology.parse_gpu("v5e:2x4") is None
    # the device kinds are the driver's names, which the peak-FLOPs table and the attention
    # choice read: cuDNN flash attention from compute capability 8.0, the explicit kernel below
    expected = {
        "h100": (989e12, "cudnn"),
        "a100": (312e12, "cudnn"),
        "a100-40gb": (312e12, "cudnn"),
        "l4": (121e12, "cudnn"),
        "t4": (None, "explicit"),
        "v100": (None, "explicit"),  # its tensor cores are float16 only
    }
    float16_peaks = dict(h100=989e12, a100=312e12, l4=121e12, t4=65e12, v100=125e12)
    float16_peaks["a100-40gb"] = 312e12
    for name, gpu in gpus.items():
        capability = "{}.{}".format(*gpu.capability)
        got = vit.attention_implementation("auto", "gpu", "bfloat16", capability)
        assert (peak_flops(gpu.device_kind), got) == expected[name], name
        assert peak_flops(gpu.device_kind, "float16") == float16_peaks[name], name
        config = topology.target_config(gpu)
        assert f'device_description_str: "{gpu.device_kind}"' in config
        assert f"device_memory_size: {gpu.memory}\n" in config
        assert "cuda_compute_capability {{ major: {} minor: {} }}".format(*gpu.capability) in (
            config
        )


def test_a_step_that_does_not_fit_says_how_to_size_it():
    import jax

    from bench.train import why_not_timed

    oom = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory allocating 28359347784 bytes."
    )
    assert why_not_timed(oom) == (
        "does not fit in device memory (JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory "
        "allocating 28359347784 bytes.); try a smaller --batch or --remat, or size the step with "
        "--memory"
    )
    pallas = NotImplementedError("Pallas TPU kernels need a TPU\nmore detail")
    assert why_not_timed(pallas) == (
        "does not run on this device: NotImplementedError: Pallas TPU kernels need a TPU"
    )


def test_memory_limit_per_kind_of_device(monkeypatch):
    import types

    import jax

    from bench.topology import memory_limit

    def device(platform, kind, stats=None):
        def memory_stats():
            if stats is None:  # as a topology's compile-only device answers
                raise jax.errors.JaxRuntimeError("MemoryStats is only supported for addressable")
            return stats

        return types.SimpleNamespace(platform=platform, device_kind=kind, memory_stats=memory_stats)

    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert memory_limit(device("cpu", "cpu", {})) is None
    # compiled for, not attached: a GPU's default allocator share, a TPU's HBM
    l4 = int(22.03 * 2**30)  # what CUDA reports of an L4's 24 GB
    assert memory_limit(device("gpu", "NVIDIA L4")) == (
        int(l4 * 0.75),
        "JAX's default 75% of 22.0 GiB",
    )
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")  # as JAX reads it
    assert memory_limit(device("gpu", "NVIDIA L4")) == (
        int(l4 * 0.9),
        "XLA_PYTHON_CLIENT_MEM_FRACTION's 90% of 22.0 GiB",
    )
    assert memory_limit(device("tpu", "TPU v5 lite")) == (16 * 2**30, "HBM")
    assert memory_limit(device("gpu", "NVIDIA RTX 9999")) is None
    # attached: the allocator's own limit
    attached = device("gpu", "NVIDIA L4", {"bytes_limit": 123})
    assert memory_limit(attached) == (123, "the allocator's limit")


def test_model_bench_runs_the_jax_side_in_the_dtype_asked_for():
    r = _bench(
        "bench/model.py --presets S --frames 4 --size 32 --repeats 1 --no-hf --dtype bfloat16"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split()[:6] for line in r.stdout.splitlines() if line.startswith("ViT-")]
    # the dtype column is the built model's config, not the flag echoed
    assert rows == [
        ["ViT-S", "4x32", "b1", "bfloat16", "forward", "reference"],
        ["ViT-S", "4x32", "b1", "bfloat16", "train", "step"],
    ]
    bad = _bench("bench/model.py --presets S,L")
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1] == (
        "model.py: error: argument --presets: preset 'L' has no PyTorch reference "
        "(tests/models/torch_vit.py); choose from S, B, or time it with bench/train.py "
        "--preset L --no-torch"
    )


def test_records_bench_times_the_ablation_with_and_without_kept_landmarks():
    r = _bench("bench/records.py --landmark-cache --videos 2 --repeats 1")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout[: r.stdout.rindex("}") + 1])["landmark_cache"]
    # with and without the cache, the same shard for each composition; every landmark read
    assert result["records_identical"] is True and result["landmarks_read"] == [2]
    assert (result["videos"], result["frames"], result["repeats"]) == (2, 76 + 75, 1)
    speedup = result["ablation_plain_s"] / result["ablation_from_cache_s"]
    assert result["ablation_speedup"] == pytest.approx(speedup)
    assert r.stdout.splitlines()[-1].startswith(
        "| ablation build (quadrants 1011), 2 spans of sign_sample (151 frames), in-process | "
    )


@pytest.mark.parametrize(
    "command, error",
    [
        (
            "bench/hht.py --variants 9",
            "argument --variants: give comma-separated variant numbers from 1 to 6, not '9'",
        ),
        (
            "bench/hht.py --upscale 1280",
            "argument --upscale: give WIDTHxHEIGHT, both even pixel counts, e.g. 1280x720, "
            "not '1280'",
        ),
        ("bench/hht.py --video /nope.mp4", "--video /nope.mp4: no such file"),
        ("bench/hht.py --repeats 0", "argument --repeats: give a whole number >= 1, not '0'"),
        (
            "bench/hht.py --models /nonexistent/models",
            "--models /nonexistent/models: no such folder; give the folder that holds "
            "hand_landmarker.task, pose_landmarker_full.task, blaze_face_short_range.tflite",
        ),
        (
            "bench/train.py --preset X",
            "--preset: unknown model preset 'X'; choose one of: S, B, L, H, g, "
            "vit_small_patch16_224, vit_base_patch16_224, vit_large_patch16_224, "
            "vit_huge_patch16_224, vit_giant_patch14_224",
        ),
        (
            "bench/train.py --frames 5",
            "--frames 5: give a positive multiple of 2 (the model embeds frames in groups of 2), "
            "e.g. --frames 6",
        ),
        (
            "bench/train.py --preset g --size 100",
            "--size 100: give a positive multiple of 14 (the patch size of ViT-g), e.g. --size 98",
        ),
        ("bench/model.py --batch 0", "argument --batch: give a whole number >= 1, not '0'"),
        ("bench/train.py --blocks scan,loop", "--blocks 'loop': choose from unrolled, scan"),
        (
            "bench/records.py --landmark-cache --videos 61",
            "--videos with --landmark-cache: spans of the 76-frame sample, 1..60, got 61",
        ),
    ],
)
def test_bad_bench_options_are_one_line_usage_errors(command, error):
    r = _bench(command)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    script = command.split()[0].split("/")[1]
    assert r.stderr.splitlines()[-1] == f"{script}: error: {error}"


@pytest.mark.parametrize(
    "command, instead",
    [
        ("bench/model.py --presets S", "bench/train.py --no-torch times the JAX model alone"),
        ("bench/train.py --preset S --frames 4 --size 32", "or time JAX alone with --no-torch"),
    ],
)
def test_a_bench_without_pytorch_says_how_to_install_it(command, instead):
    # on a CPU the reference step is timed beside JAX; it used to be a traceback (model.py)
    # or one after the JAX timing (train.py)
    r = _bench(command, python=("-c", WITHOUT_TORCH))
    assert r.returncode == 2, r.stderr[-3000:]
    script = command.split()[0].split("/")[1]
    assert r.stderr.splitlines()[-1] == (
        f"{script}: error: the PyTorch reference needs torch: pip install -e '.[test]' (a CPU "
        f"build); {instead}"
    )
    assert "ViT-S" not in r.stdout  # nothing timed first


def _option_help(text: str) -> dict[str, str]:
    """``--flag: its help text`` from an argparse --help (help on the flag's or next lines)."""
    options = text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + options)
    return {e.split()[0].rstrip(","): " ".join(e.split()[1:]) for e in entries if e.strip()}


@pytest.mark.parametrize(
    "script, flags",
    [
        ("bench/model.py", ["--frames", "--size", "--batch", "--repeats", "--presets"]),
        ("bench/train.py", ["--preset", "--frames", "--size", "--repeats", "--blocks"]),
        ("bench/records.py", ["--shared"]),
    ],
)
def test_bench_options_have_help_and_defaults(script, flags):
    r = _bench(f"{script} --help")
    assert r.returncode == 0, r.stderr[-3000:]
    helps = _option_help(r.stdout)
    for flag in flags:
        assert "(default" in helps[flag], (flag, helps[flag])
