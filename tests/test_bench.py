"""bench/train.py and bench/model.py run end to end at a tiny size; --trace writes a profile."""

import os
import pathlib
import re
import subprocess
import sys

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
        f"bench/train.py {tiny} --repeats 1 --no-torch --attention auto,explicit --trace",
        tmp_path / "trace",
        python=("-c", WITHOUT_TORCH),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ViT-S 4x32")]
    assert len(lines) == 2
    assert re.match(r"ViT-S 4x32, batch 2, float32, attention auto \(explicit\): step ", lines[0])
    assert re.search(r"attention explicit \(explicit\): .*x the speed of auto$", lines[1])
    for kernel in ("auto", "explicit"):
        (run,) = (tmp_path / "trace" / kernel / "plugins" / "profile").iterdir()
        assert len(list(run.glob("*.xplane.pb"))) == 1
        assert len(list(run.glob("*perfetto_trace.json.gz"))) == 1
    bad = _bench("bench/train.py --attention auto,flash")
    assert bad.returncode == 2 and "--attention 'flash': choose from" in bad.stderr
    two = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    odd = _bench("bench/train.py --batch 3", env=two)
    assert odd.returncode == 2 and "--batch 3 must be a multiple of the 2 devices" in odd.stderr


def test_train_bench_memory_compiles_only():
    r = _bench(
        "bench/train.py --preset S --frames 4 --size 32 --batch 2 --memory --attention explicit"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("ViT-S 4x32")]
    pattern = (
        r"ViT-S 4x32, 2 clips per device, float32, attention explicit, remat (off|on): "
        r"arguments (\d+\.\d\d) GiB, temporaries (\d+\.\d\d) GiB per device$"
    )
    matches = [re.match(pattern, line) for line in lines]
    assert len(lines) == 2 and all(matches), lines
    assert [m[1] for m in matches] == ["off", "on"]
    assert float(matches[0][2]) > 0.2  # ViT-S and its AdamW state: 22M parameters, 3 copies
    assert "step " not in r.stdout  # nothing was timed


# Runs a script as where JAX's TPU compiler (the libtpu package) is not installed.
WITHOUT_LIBTPU = WITHOUT_TORCH.replace("'torch'", "'libtpu'")


def test_train_bench_topology_needs_the_tpu_compiler():
    # without JAX's TPU compiler (libtpu) the flag says how to get it
    r = _bench("bench/train.py --topology v5e:2x4", python=("-c", WITHOUT_LIBTPU))
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == (
        "train.py: error: --topology v5e:2x4 needs JAX's TPU compiler: pip install 'jax[tpu]' "
        "(it compiles here; nothing runs on a TPU)"
    )


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
