"""Training on 8 simulated CPU devices: parallelism parity, resume, preemption, guards."""

import contextlib
import inspect
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import pytest

from configs import smoke
from signnet_jax import checkpointing, evaluate, optim, train
from signnet_jax.data.records import RecordSource
from tests.helpers import interrupt_after_command

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(classes=4, train_per_class=8, val_per_class=2, test_per_class=2, frames=8, size=32)


def tiny_config(records_dir, **over):
    c = smoke.get_config()
    c.records_dir = str(records_dir)
    for k, v in TINY.items():
        c.smoke[k] = v
    c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 2, 2, 64
    c.model.num_frames, c.model.img_size = 4, 32
    c.model.drop_path_rate = 0.1
    c.data.batch_size, c.data.eval_batch_size, c.data.short_side_size = 8, 8, 32
    c.data.reprob = 0.25
    c.loss.mixup, c.loss.cutmix = 0.8, 1.0  # the device-side random parts on
    c.optim.epochs, c.optim.warmup_epochs = 3, 1
    c.train.log_every = 1
    for key, value in over.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = tmp_path_factory.mktemp("records") / "smoke"
    train.ensure_smoke(tiny_config(path))
    return path


def _losses(result):
    return np.array([loss for _, loss in result["train_loss"]])


def test_data_parallel_and_fsdp_follow_the_single_device_trajectory(records, tmp_path):
    kw = {"train.max_steps": 5, "val_split": "", "test_split": ""}
    single = train.train_and_evaluate(
        tiny_config(records, **{"mesh.num_devices": 1}, **kw), tmp_path / "one"
    )
    dp = train.train_and_evaluate(tiny_config(records, **kw), tmp_path / "dp")
    fsdp = train.train_and_evaluate(
        tiny_config(records, **{"mesh.fsdp": 4}, **kw), tmp_path / "fsdp"
    )
    # the blocks as one scan (with remat), with fsdp
    scan = {"mesh.fsdp": 4, "model.scan_layers": True, "model.remat": True}
    fsdp_scan = train.train_and_evaluate(tiny_config(records, **scan, **kw), tmp_path / "scan")
    assert len(_losses(single)) == 5
    np.testing.assert_allclose(_losses(dp), _losses(single), atol=1e-5, rtol=0)
    np.testing.assert_allclose(_losses(fsdp), _losses(single), atol=1e-5, rtol=0)
    np.testing.assert_allclose(_losses(fsdp_scan), _losses(single), atol=1e-5, rtol=0)
    assert not np.allclose(_losses(single)[0], _losses(single)[-1])


def test_fsdp_really_shards_parameters(records):
    from signnet_jax import sharding

    setup = train.prepare(tiny_config(records, **{"mesh.fsdp": 4}))
    assert dict(setup.mesh.shape) == {"data": 2, "fsdp": 4}
    with jax.set_mesh(setup.mesh):
        params = train.place_params(setup, 0)
    kernel = params["blocks"][0]["mlp"]["fc1"]["kernel"]  # (embed 32, mlp 64)
    assert kernel.sharding.spec[0] == "fsdp"
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, 64)}
    sharded, total = sharding.shard_leaf_count(params)
    assert sharded >= 2 * 5  # every block's kernels, patch embedding and head
    dp = train.prepare(tiny_config(records))
    with jax.set_mesh(dp.mesh):
        assert sharding.shard_leaf_count(train.place_params(dp, 0))[0] == 0
    assert setup.warnings == [] and dp.warnings == []
    sizes = train.prepare(tiny_config(records, **{"data.short_side_size": 48}))
    assert sizes.warnings == [
        "data.short_side_size 48 differs from model.img_size 32: test views are 48-pixel "
        "squares while training crops and validation views are 32 (the published recipe uses "
        "the same size for both)"
    ]
    # a width the fsdp axis does not divide stays replicated: said, not silent
    odd = train.prepare(tiny_config(records, **{"mesh.fsdp": 8, "model.embed_dim": 36}))
    assert len(odd.warnings) == 1
    assert (
        "parameters stay replicated because mesh.fsdp=8 does not divide their size (36"
        in (odd.warnings[0])
    )
    assert "pick a mesh.fsdp that divides 36" in odd.warnings[0]


def test_train_eval_cycle_writes_metrics_and_checkpoints(records, tmp_path, monkeypatch):
    result = train.train_and_evaluate(tiny_config(records), tmp_path)
    assert result["steps"] == 12  # 32 videos / 8 per step x 3 epochs
    test = result["test"]
    assert test["num_videos"] == 8 and test["views_per_video"] == 3
    assert set(test["per_class_signnet"]) == {"top1", "top5"}
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test"]["per_instance"] == test["per_instance"]
    assert on_disk["protocol"]["test_num_segment"] == 3 and on_disk["protocol"]["split"] == "test"
    assert (tmp_path / "test_per_class.csv").read_text().count("\n") == 5
    assert (tmp_path / "test_confused_pairs.png").stat().st_size > 1000
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    # one validation (every 5 epochs, and the last step), the loss at every step
    assert on_disk["val_top1"] == [[12, result["best_val_top1"]]]
    assert [s for s, _ in on_disk["train_loss"]] == list(range(1, 13))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    steps = checkpointing.checkpoint_steps(tmp_path / "checkpoints")
    assert 12 in steps and len(steps) <= 3  # latest 2 + best by val top-1
    params, meta = checkpointing.load_model(tmp_path / "checkpoints")
    assert meta["classes"] == json.loads((records / "dataset_info.json").read_text())["classes"]
    assert meta["input"]["test_num_segment"] == 3 and meta["hht"]["size"] == 32

    # eval mode reproduces the test numbers from the checkpoint, in a folder of its own
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    c = tiny_config(records, mode="eval")
    again = evaluate.evaluate(c, str(tmp_path))
    assert again["test"]["per_instance"] == test["per_instance"]
    out = tmp_path / "eval" / "step_12_test_3x1"  # 3 clips x 1 crop per video
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["step"] == 12
    assert saved["protocol"] == {
        "split": "test", "test_num_segment": 3, "test_num_crop": 1, "num_frames": 4,
        "sampling_rate": c.data.sampling_rate, "short_side_size": 32,
    }  # fmt: skip
    assert (out / "test_per_class.csv").is_file() and (out / "test_confused_pairs.png").is_file()
    # the training run's own metrics.json, CSV and PNG are untouched
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    # another view count is another result, beside the first
    one = tiny_config(records, mode="eval", **{"data.test_num_segment": 1})
    evaluate.evaluate(one, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "step_12_test_1x1",
        "step_12_test_3x1",
    ]
    assert json.loads((out / "metrics.json").read_text()) == saved
    # views sampled unlike training (with a warning): another result, beside the others
    evaluate.evaluate(tiny_config(records, mode="eval", **{"data.sampling_rate": 1}), tmp_path)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "step_12_test_1x1",
        "step_12_test_3x1",
        "step_12_test_3x1_rate1",
    ]
    assert json.loads((out / "metrics.json").read_text()) == saved
    # a folder of the same name holding another protocol's result: refused, not overwritten
    old = out.parent / "step_12_test_1x1" / "metrics.json"
    old.write_text(json.dumps(json.loads(old.read_text()) | {"protocol": {"num_frames": 8}}))
    with pytest.raises(train.TrainingError, match=(
        r"eval/step_12_test_1x1 holds the result of checkpoint .*checkpoints step 12 with "
        r"protocol \{'num_frames': 8\}, not of .* move it away, or give another --workdir "
        r"with --config.init_from=.*checkpoints$"
    )):  # fmt: skip
        evaluate.evaluate(one, str(tmp_path))
    assert json.loads(old.read_text())["protocol"] == {"num_frames": 8}
    # the run's own result, its workdir spelled otherwise or the run copied elsewhere: the same
    # step and protocol, tested again in place (the path as written used to be compared)
    monkeypatch.chdir(tmp_path.parent)
    respelled = evaluate.evaluate(c, os.path.join(tmp_path.name, "..", tmp_path.name))
    assert respelled["test"]["per_instance"] == test["per_instance"]
    copy = tmp_path.parent / f"{tmp_path.name}_copy"
    shutil.copytree(tmp_path, copy)
    assert evaluate.evaluate(c, str(copy))["step"] == 12
    assert json.loads((copy / "eval" / "step_12_test_3x1" / "metrics.json").read_text())[
        "checkpoint"
    ] == str(copy / "checkpoints")


def test_checkpoints_give_the_ema_weights_and_eval_picks_the_step(records, tmp_path, capsys):
    import orbax.checkpoint as ocp

    c = tiny_config(records, **{"optim.ema_decay": 0.9, "train.keep_checkpoints": 1})
    result = train.train_and_evaluate(c, tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    handlers = {k: ocp.StandardCheckpointHandler() for k in ("params", "ema")}
    with ocp.CheckpointManager(ckpt_dir, item_handlers=handlers) as mngr:
        saved = mngr.restore(
            12, args=ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in handlers})
        )
    loaded, _ = checkpointing.load_model(ckpt_dir)
    kernel = ("blocks", "0", "mlp", "fc1", "kernel")

    def leaf(tree):
        for k in kernel:
            tree = tree[k if k in tree else int(k)]
        return np.asarray(tree)

    np.testing.assert_array_equal(leaf(loaded), leaf(saved["ema"]))
    assert not np.allclose(leaf(loaded), leaf(saved["params"]))
    # eval mode tests what training tested (the EMA weights of the last step)
    latest = evaluate.evaluate(tiny_config(records, mode="eval"), str(tmp_path))
    assert latest["step"] == 12
    assert latest["test"]["per_instance"] == result["test"]["per_instance"]
    capsys.readouterr()
    best = evaluate.evaluate(tiny_config(records, mode="eval", load_step="best"), str(tmp_path))
    assert best["step"] == checkpointing.select_step(ckpt_dir, "best")
    assert f"evaluating {ckpt_dir} step {best['step']} (load_step best)" in capsys.readouterr().out
    with pytest.raises(train.TrainingError, match=r"has no step 5; it holds steps \["):
        evaluate.evaluate(tiny_config(records, mode="eval", load_step="5"), str(tmp_path))


def _tensorboard_scalars(workdir) -> dict[str, dict[int, float]]:
    from tensorboardX.proto import event_pb2

    from signnet_jax.data.records import read_records

    scalars: dict[str, dict[int, float]] = {}
    for path in (workdir / "tensorboard").glob("events.out.tfevents.*"):
        for data in read_records(path):
            event = event_pb2.Event.FromString(data)
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars


def test_throughput_and_mfu_are_logged_from_the_analytic_flops_and_the_step_erases_then_mixes(
    records, tmp_path, monkeypatch, capsys
):
    from signnet_jax.data import device as device_module
    from signnet_jax.models.flops import forward_flops

    # as the original: random erasing is part of each clip's augmentation (its dataset), and
    # mixup / cutmix mixes the erased clips (its training loop); traced once, so the wrappers
    # see the step's data flow
    calls = []
    erase, mix = device_module.normalize_and_erase, optim.mixup_cutmix

    def erasing(clip, box, key):
        calls.append(("erase", erased := erase(clip, box, key)))
        return erased

    def mixing(key, x, labels, *args):
        calls.append(("mix", x))
        return mix(key, x, labels, *args)

    monkeypatch.setattr(device_module, "normalize_and_erase", erasing)
    monkeypatch.setattr(optim, "mixup_cutmix", mixing)
    peak_per_device = 1e9
    # the peak of the run's compute dtype (the tiny config's float32: bfloat16's by convention)
    monkeypatch.setattr(
        train, "peak_flops", lambda kind, dtype: peak_per_device if dtype == "float32" else None
    )
    c = tiny_config(records, **{"train.max_steps": 3, "val_split": "", "test_split": ""})
    train.train_and_evaluate(c, tmp_path)
    logged = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(logged) == 3 and all(" MFU " in line for line in logged)
    tb = _tensorboard_scalars(tmp_path)
    cfg = train.model_config(c, 4)
    flops_per_clip = 3 * forward_flops(cfg)  # forward and backward: MFU's convention
    for step in (1, 2, 3):
        clips_s = tb["train/clips_per_s"][step]
        tflops = tb["train/tflops_per_s"][step]
        np.testing.assert_allclose(tflops, clips_s * flops_per_clip / 1e12, rtol=1e-5)
        mfu = tb["train/mfu"][step]
        np.testing.assert_allclose(mfu, tflops * 1e12 / (peak_per_device * 8), rtol=1e-5)
        assert f"MFU {mfu:.1%}" in logged[step - 1]
    assert [name for name, _ in calls] == ["erase", "mix"]
    assert calls[1][1] is calls[0][1]  # the mixing takes the erased clips themselves


@pytest.mark.parametrize("repeats", [1, 2])
def test_throughput_leaves_validation_time_out_and_the_eta_counts_it(
    repeats, records, tmp_path, monkeypatch, capsys
):
    from signnet_jax import sharding

    # a fake clock: each step takes 1 s, each validation 10 s
    now = [0.0]
    monkeypatch.setattr(train, "_clock", lambda: now[0])
    real_batch, real_val = sharding.global_batch, evaluate.evaluate_split

    def batch(*args, **kwargs):
        now[0] += 1.0
        return real_batch(*args, **kwargs)

    def validate(*args, **kwargs):
        now[0] += 10.0
        return real_val(*args, **kwargs)

    monkeypatch.setattr(sharding, "global_batch", batch)
    monkeypatch.setattr(evaluate, "evaluate_split", validate)
    # 4 steps per epoch, validation at step 4, log lines at 3 and 6: the window 4..6
    # holds a validation that its step time must not absorb nor hide
    c = tiny_config(
        records,
        **{"train.max_steps": 6, "train.log_every": 3, "train.val_every_epochs": 1},
        **{"data.test_num_segment": 3, "data.test_num_crop": 2, "data.repeated_aug": repeats},
    )
    train.train_and_evaluate(c, tmp_path)
    tb = _tensorboard_scalars(tmp_path)
    step_time = tb["train/step_time_s"]
    assert step_time[3] == pytest.approx(1.0) and step_time[6] == pytest.approx(1.0)
    # 8 videos a step, each seen `repeats` times (repeated augmentation): clips, not videos
    assert tb["train/clips_per_s"][3] == pytest.approx(8.0 * repeats)
    assert tb["train/clips_per_s"][6] == pytest.approx(8.0 * repeats)
    # ETA at step 3: 3 steps of 1 s (no validation timed yet); at step 6: no steps left, the
    # validation at step 6 and the test, 8 videos x 6 views against 8 validation views; a
    # validation took 11 s (10, and 1 for its one batch through the clocked global_batch)
    etas = [line.rsplit("ETA ", 1)[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("step ")]  # fmt: skip
    assert etas == ["0:03", f"{11 * (1 + 6) // 60}:{11 * (1 + 6) % 60:02d}"]


def test_validations_left_are_counted_from_the_logged_step():
    # (step, last_step, val_every) -> validations still to come: multiples of val_every
    # from step on (the logged step's own validation runs after its log line), and the last
    for args, left in [
        ((3, 6, 4), 2),  # 4 and 6
        ((4, 6, 4), 2),  # 4 (after this line) and 6
        ((5, 6, 4), 1),  # 6
        ((6, 8, 4), 1),  # 8 (a multiple: counted once)
        ((1, 12, 4), 3),  # 4, 8, 12
        ((9, 12, 4), 1),
        ((1, 1, 1), 1),
    ]:
        assert train._validations_left(*args) == left, args


def test_no_mfu_where_the_device_peak_is_unknown(records, tmp_path, capsys):
    c = tiny_config(records, **{"train.max_steps": 1, "val_split": "", "test_split": ""})
    train.train_and_evaluate(c, tmp_path)  # CPU devices: no known peak
    assert "MFU" not in capsys.readouterr().out
    tb = _tensorboard_scalars(tmp_path)
    assert "train/mfu" not in tb and tb["train/tflops_per_s"][1] > 0


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(records, tmp_path, monkeypatch):
    c = tiny_config(records, **{"train.max_steps": 4, "val_split": "", "test_split": ""})
    train.train_and_evaluate(c, tmp_path)
    good, _ = checkpointing.load_model(tmp_path / "checkpoints")
    original = optim.soft_target_cross_entropy
    monkeypatch.setattr(
        optim, "soft_target_cross_entropy", lambda logits, t: original(logits, t) * np.inf
    )
    c = tiny_config(records, **{"train.max_steps": 8, "val_split": "", "test_split": ""})
    with pytest.raises(train.TrainingError, match="non-finite loss or gradients at step 5"):
        train.train_and_evaluate(c, tmp_path)
    assert checkpointing.checkpoint_steps(tmp_path / "checkpoints") == [4]
    after, _ = checkpointing.load_model(tmp_path / "checkpoints")
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_run_stopped_by_an_error_keeps_its_tensorboard_scalars(records, tmp_path, monkeypatch):
    real = train.make_train_step

    def non_finite_from_step_3(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def step(state, batch, micro_step):
            new, metrics = step_fn(state, batch, micro_step)
            metrics["ok"] = metrics["ok"] & (micro_step < 2)
            return new, metrics

        return step

    monkeypatch.setattr(train, "make_train_step", non_finite_from_step_3)
    c = tiny_config(records, **{"train.max_steps": 6, "val_split": "", "test_split": ""})
    with pytest.raises(train.TrainingError, match="non-finite loss or gradients at step 3"):
        train.train_and_evaluate(c, tmp_path)
    # the event file was closed on the way out: the steps logged before the stop are in it
    assert sorted(_tensorboard_scalars(tmp_path)["train/loss"]) == [1, 2]


def test_a_non_finite_step_between_logs_is_caught_before_the_next_save(
    records, tmp_path, monkeypatch
):
    import jax.numpy as jnp

    real = train.make_train_step

    def with_bad_step_2(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def step(state, batch, micro_step):  # step 2 (micro-step 1) comes out non-finite
            new, metrics = step_fn(state, batch, micro_step)
            bad = micro_step == 1
            metrics["ok"] = metrics["ok"] & ~bad
            return jax.tree.map(lambda n, o: jnp.where(bad, o, n), new, state), metrics

        return step

    monkeypatch.setattr(train, "make_train_step", with_bad_step_2)
    c = tiny_config(
        records,
        **{"train.max_steps": 6, "train.log_every": 100, "train.checkpoint_every_steps": 3},
        **{"val_split": "", "test_split": ""},
    )
    with pytest.raises(
        train.TrainingError, match="non-finite loss or gradients at step 2: .* stopped at step 3"
    ):
        train.train_and_evaluate(c, tmp_path)
    assert checkpointing.checkpoint_steps(tmp_path / "checkpoints") == []  # step 3 not saved


# --- the command line: resume after kill -9, SIGTERM, bad input ---------------------


def _main_args(records, workdir, *extra):
    over = {
        "records_dir": records,
        "model.embed_dim": 32,
        "model.depth": 2,
        "model.num_heads": 2,
        "model.mlp_dim": 64,
        "model.num_frames": 4,
        "model.img_size": 32,
        "data.batch_size": 8,
        "data.eval_batch_size": 8,
        "data.short_side_size": 32,
        "optim.epochs": 6,
        "optim.warmup_epochs": 1,
        "train.log_every": 1,
        "train.checkpoint_every_steps": 2,
        "loss.mixup": 0.8,
        "loss.cutmix": 1.0,
        "val_split": "",
        "test_split": "",
        **{f"smoke.{k}": v for k, v in TINY.items()},
    }
    return [
        sys.executable,
        "-m",
        "signnet_jax.main",
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(workdir),
        *[f"--config.{k}={v}" for k, v in over.items()],
        *extra,
    ]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["PYTHONFAULTHANDLER"] = "1"  # an aborted child prints its threads' stacks
    return env


def _exit_or_stacks(proc, timeout):
    """``proc.communicate(timeout=timeout)``; a child still running then is aborted and the test
    fails with its output and where its threads waited."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"still running {timeout} s on; stdout:\n{out[-3000:]}\nstderr:\n{err[-8000:]}")


def _run(args, **env):
    """``args`` run from the repository; ``env``: variables added to the environment."""
    return subprocess.run(
        args, cwd=REPO, capture_output=True, text=True, env=_env() | env, timeout=600
    )


def _final_params(workdir):
    params, _ = checkpointing.load_model(pathlib.Path(workdir) / "checkpoints")
    return params


def _wait_for(proc, pattern, timeout=300):
    """Read the child's stdout until a line contains ``pattern``."""
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if pattern in line:
            return lines
    raise AssertionError(f"never saw {pattern!r}; output:\n{''.join(lines)}")


VAL = ("--config.val_split=val", "--config.train.val_every_epochs=1")  # every 4 steps


@pytest.mark.heavy
def test_resume_after_kill_9_is_exact_and_sigterm_saves(records, tmp_path):
    ref = _run(_main_args(records, tmp_path / "ref", *VAL))
    assert ref.returncode == 0, ref.stderr[-2000:]
    expected = _final_params(tmp_path / "ref")

    # kill -9 in the middle of step 9 (a checkpoint was started at step 8)
    proc = subprocess.Popen(
        _main_args(records, tmp_path / "run", *VAL),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    _wait_for(proc, "step 9/24")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 24 not in checkpointing.checkpoint_steps(tmp_path / "run" / "checkpoints")

    # SIGTERM: save where it stands and exit cleanly
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(
            _main_args(records, tmp_path / "run", *VAL),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        lines = _wait_for(proc, "step 15/24")
        assert any("resuming from step" in line for line in lines)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    stop = int(out.split("preempted (SIGTERM) at step ")[1].split(":")[0])
    assert stop >= 15 and stop in checkpointing.checkpoint_steps(tmp_path / "run" / "checkpoints")

    done = _run(_main_args(records, tmp_path / "run", *VAL))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from step {stop}" in done.stdout
    for a, b in zip(
        jax.tree.leaves(expected), jax.tree.leaves(_final_params(tmp_path / "run")), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # the run's record survives the restarts: the whole loss curve and the best val top-1
    ref_metrics, run_metrics = (
        json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("ref", "run")
    )
    assert [s for s, _ in run_metrics["train_loss"]] == list(range(1, 25))
    assert run_metrics["train_loss"] == ref_metrics["train_loss"]
    assert run_metrics["best_val_top1"] == ref_metrics["best_val_top1"] is not None
    assert [s for s, _ in run_metrics["val_top1"]] == [4, 8, 12, 16, 20, 24]
    assert run_metrics["val_top1"] == ref_metrics["val_top1"]


def test_unknown_config_key_is_named(records, tmp_path):
    for key, near in (
        (
            "optim.epoch",
            "--config.optim.epochs or --config.optim.warmup_epochs or --config.optim.eps",
        ),
        ("data.test_split", "--config.test_split"),  # a top-level key given in a group
        ("optim.lr", "--config.optim.base_lr or --config.optim.min_lr or --config.optim.warmup_lr"),
    ):
        r = _run(_main_args(records, tmp_path / "w", f"--config.{key}=1"))
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr == (
            f"error: unknown config key {key} (in --config.{key}); did you mean {near}? "
            "(every key is in configs/wlasl2000.py)\n"
        )
    r = _run(_main_args(records, tmp_path / "w", "--config.nothing_like_it=1"))
    assert r.stderr == (
        "error: unknown config key nothing_like_it (in --config.nothing_like_it) "
        "(every key is in configs/wlasl2000.py)\n"
    )
    assert not (tmp_path / "w").exists()
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "buggy.py").write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    c = ml_collections.ConfigDict()\n    c.lock()\n    c.foo.bar = 1\n"
    )
    for config, message in [
        ("configs/nosuch.py", "No such file or directory"),
        ("README.md", "SyntaxError"),
        (str(tmp_path / "empty.py"), "has no attribute 'get_config'"),
        (str(tmp_path / "buggy.py"), "foo"),
    ]:
        argv = _main_args(records, tmp_path / "w")
        argv[argv.index("--config") + 1] = config
        r = _run(argv)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.startswith(f"error: --config {config}: cannot load it as a config file")
        assert message in r.stderr
        assert not (tmp_path / "w").exists()


def test_a_mode_other_than_train_or_eval_is_refused_before_anything_is_written(tmp_path):
    r = _run(_main_args(tmp_path / "records", tmp_path / "w", "--config.mode=test"))
    assert (r.returncode, r.stderr) == (
        1,
        "error: config.mode must be 'train' or 'eval', got 'test'\n",
    )
    assert list(tmp_path.iterdir()) == []  # no workdir, no smoke dataset


def test_an_empty_records_dir_is_named_before_anything_is_written(tmp_path):
    empty = ("--config.records_dir=", "--config.smoke.enabled=False")  # the last value counts
    r = _run(_main_args(tmp_path / "records", tmp_path / "w", *empty))
    assert (r.returncode, r.stderr) == (
        1,
        "error: config.records_dir is empty: set --config.records_dir to a folder written by "
        "python -m data_prep.build_records\n",
    )
    assert list(tmp_path.iterdir()) == []
    # the smoke config makes its dataset there: named too (it was a FileNotFoundError
    # traceback), in both modes
    for mode in ("train", "eval"):
        r = _run(_main_args(tmp_path / "r", tmp_path / "w", "--config.records_dir=",
                            f"--config.mode={mode}"))  # fmt: skip
        assert (r.returncode, r.stderr) == (
            1,
            "error: config.records_dir is empty: set --config.records_dir to the folder the "
            "smoke dataset is made in (configs/smoke.py: runs/smoke_records)\n",
        )
        assert list(tmp_path.iterdir()) == []


def test_a_stray_argument_is_one_usage_line(tmp_path):
    r = _run([*_main_args(tmp_path / "r", tmp_path / "w"), "data.batch_size=4"])
    assert (r.returncode, r.stdout, r.stderr) == (
        2, "", "error: unexpected arguments data.batch_size=4: every setting is a flag "
        "(--config.KEY=VALUE)\n"
    )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        (  # the published recipe
            {},
            optim.MixupConfig(mixup=0.8, cutmix=1.0, prob=1.0, switch_prob=0.5,
                              label_smoothing=0.1, group_size=0),
        ),
        (  # a distinct value per key: each reaches its own field
            dict(mixup=0.3, cutmix=0.6, mixup_prob=0.7, switch_prob=0.2, label_smoothing=0.05,
                 mixup_group_size=2),
            optim.MixupConfig(mixup=0.3, cutmix=0.6, prob=0.7, switch_prob=0.2,
                              label_smoothing=0.05, group_size=2),
        ),
    ],
)  # fmt: skip
def test_the_train_step_mixes_with_the_configs_loss_settings(monkeypatch, loss, expected):
    import jax.numpy as jnp

    from configs import wlasl2000

    c = wlasl2000.get_config()
    c.loss.update(loss)
    seen = []

    class Mixed(Exception):
        pass

    def spy(key, clips, labels, num_classes, cfg):
        seen.append((num_classes, cfg))
        raise Mixed  # nothing after the mixing is needed

    monkeypatch.setattr(optim, "mixup_cutmix", spy)
    setup = train.Setup(train.model_config(c, 5), [], {}, None, None, None, None, "")
    step = train.make_train_step(setup, c, None, 5)
    batch = {
        "clip": jnp.zeros((2, 2, 8, 8, 3), jnp.uint8),
        "erase_box": jnp.zeros((2, 4), jnp.int32),
        "label": jnp.zeros(2, jnp.int32),
    }
    with pytest.raises(Mixed):
        step({}, batch, jnp.int32(0))
    assert seen == [(5, expected)]


def test_step_keys_never_repeat_when_a_run_changes_its_accumulation():
    # the key was fold_in(key(seed), step * accum + a): steps 100-199 with accum 1 after steps
    # 0-99 with accum 2 drew every key of micro-steps 100-199 a second time
    import jax.numpy as jnp

    key = jax.jit(train.step_key, static_argnums=(0, 2))
    data = jax.random.key_data

    def keys(steps, accum):
        return [
            tuple(np.asarray(data(key(7, jnp.int32(s * accum + a), accum))))
            for s in steps
            for a in range(accum)
        ]

    drawn = keys(range(100), 2) + keys(range(100, 150), 1) + keys(range(150, 200), 4)
    assert len(set(drawn)) == len(drawn) == 200 + 50 + 200
    # without accumulation (and for a step's first micro-step) the key is what it was, so
    # runs keep their trajectories
    assert keys(range(5), 1) == [tuple(np.asarray(data(jax.random.fold_in(jax.random.key(7), s))))
                                 for s in range(5)]  # fmt: skip
    assert keys([3], 2)[0] == keys([3], 1)[0] == keys([3], 4)[0]
    assert keys([3], 2)[1] == keys([3], 4)[1] != keys([3], 4)[2]


def test_gradient_accumulation_moves_params_and_ema_like_one_big_batch():
    """Two micro-batches of two clips = one step of four: parameters, EMA and gradient norm."""
    import jax.numpy as jnp
    from flax import nnx

    from signnet_jax import sharding
    from signnet_jax.models import vit

    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=4, num_frames=4, img_size=32, embed_dim=32, depth=1, num_heads=2,
        mlp_dim=64,
    )  # fmt: skip
    graphdef, params = nnx.split(vit.create_model(cfg), nnx.Param)
    params = nnx.to_pure_dict(params)
    setup = train.Setup(cfg, list("abcd"), {}, sharding.make_mesh(1, jax.devices()[:1]),
                        graphdef, None, None, "")  # fmt: skip
    rng = np.random.default_rng(0)
    batch = {
        "clip": jnp.asarray(rng.integers(0, 256, (4, 4, 32, 32, 3), dtype=np.uint8)),
        "erase_box": jnp.zeros((4, 4), jnp.int32),
        "label": jnp.arange(4, dtype=jnp.int32),
    }

    def run(accum, steps=3):
        c = smoke.get_config()
        c.loss.mixup = c.loss.cutmix = 0.0
        c.optim.ema_decay, c.optim.grad_accum = 0.9, accum
        ocfg = optim.OptimConfig(
            base_lr=1e-2, min_lr=1e-3, warmup_lr=1e-2, total_steps=10, warmup_steps=0,
            weight_decay=0.0, layer_decay=1.0, grad_accum=accum,
        )  # fmt: skip
        tx = optim.make_optimizer(ocfg, params, cfg.depth)
        state = {"params": params, "opt_state": tx.init(params), "ema": params}
        step = jax.jit(train.make_train_step(setup, c, tx, 4))
        norms = []
        for _ in range(steps):
            for a in range(accum):  # micro-batch a of the four clips, the same key
                rows = slice(a * 4 // accum, (a + 1) * 4 // accum)
                micro = {k: v[rows] for k, v in batch.items()}
                state, metrics = step(state, micro, jnp.int32(0))
            norms.append(float(metrics["grad_norm"]))
        return state, norms

    (one, one_norms), (two, two_norms) = run(1), run(2)
    # the logged norm is that of the gradient the update used, not of the last micro-batch's
    np.testing.assert_allclose(two_norms, one_norms, rtol=1e-5)
    for key in ("params", "ema"):
        for a, b in zip(jax.tree.leaves(one[key]), jax.tree.leaves(two[key]), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # the EMA really lags the parameters (the comparison above is not trivial)
    head = one["ema"]["head"]["kernel"] - one["params"]["head"]["kernel"]
    assert float(jnp.abs(head).max()) > 1e-3


def _tiny_setup(dtype="float32"):
    """A one-block ViT on one device and its parameters, for driving the step directly."""
    from flax import nnx

    from signnet_jax import sharding
    from signnet_jax.models import vit

    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=4, num_frames=4, img_size=32, embed_dim=32, depth=1, num_heads=2,
        mlp_dim=64, dtype=dtype,
    )  # fmt: skip
    graphdef, params = nnx.split(vit.create_model(cfg), nnx.Param)
    setup = train.Setup(cfg, list("abcd"), {}, sharding.make_mesh(1, jax.devices()[:1]),
                        graphdef, None, None, "")  # fmt: skip
    return setup, nnx.to_pure_dict(params)


def _tiny_batch(n=4):
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    return {
        "clip": jnp.asarray(rng.integers(0, 256, (n, 4, 32, 32, 3), dtype=np.uint8)),
        "erase_box": jnp.zeros((n, 4), jnp.int32),
        "label": jnp.arange(n, dtype=jnp.int32) % 4,
    }


def _float16_steps(accum):
    """A float16 step and a float32 one of the tiny ViT on the same optimizer, and the float16
    state at step 0 with a loss scale of 2**40 (every update overflows) and EMA weights at
    half the parameters (so an EMA step shows)."""
    import jax.numpy as jnp

    c = smoke.get_config()
    c.loss.mixup = c.loss.cutmix = 0.0
    c.optim.ema_decay, c.optim.grad_accum = 0.9, accum
    c.optim.loss_scale, c.optim.loss_scale_hysteresis = 2.0**40, 2
    ocfg = optim.OptimConfig(
        base_lr=1e-2, min_lr=1e-3, warmup_lr=1e-2, total_steps=10, warmup_steps=0,
        weight_decay=0.05, layer_decay=1.0, grad_accum=accum,
    )  # fmt: skip
    setup16, params = _tiny_setup("float16")
    setup32, _ = _tiny_setup("float32")
    tx = optim.make_optimizer(ocfg, params, 1)
    step16 = jax.jit(train.make_train_step(setup16, c, tx, 4))
    step32 = jax.jit(train.make_train_step(setup32, c, tx, 4))
    scaling = train.loss_scaling(c, setup16.model_cfg)
    assert train.loss_scaling(c, setup32.model_cfg) is None
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "ema": jax.tree.map(lambda p: p * 0.5, params),
        "loss_scale": optim.loss_scale_init(scaling),
    }

    def micro_batch(a):
        return {k: v[a * 4 // accum : (a + 1) * 4 // accum] for k, v in _tiny_batch().items()}

    def run(step, state, a):
        return step(state, micro_batch(a), jnp.int32(0))

    return state, step16, step32, run


def _assert_tree_equal(x, y):
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("accum", [1, 2])
def test_float16_overflow_skips_the_update_and_lowers_the_scale(accum):
    """An overflowing float16 update leaves parameters and Adam as they were, moves the
    schedule on, lets the EMA take its step toward the unchanged parameters (as VideoMAEv2's
    does) and lowers the scale (DeepSpeed's hysteresis first); a scale that fits gives the
    float32 update."""
    import jax.numpy as jnp

    start, step16, step32, run = _float16_steps(accum)
    state, params = start, start["params"]

    def update(step, state):  # one optimizer update: accum micro-batches of the four clips
        for a in range(accum):
            state, metrics = run(step, state, a)
        return state, metrics

    def schedule_count(opt_state):
        inner = opt_state.inner_opt_state if accum > 1 else opt_state
        return int(inner[-1].count)  # scale_by_schedule, last in the chain

    scales = []
    for expected_count, ema_share in ((1, 0.55), (2, 0.595)):  # 0.9 x ema + 0.1 x params
        state, metrics = update(step16, state)
        assert bool(metrics["skipped"]) and bool(metrics["ok"])
        _assert_tree_equal(state["params"], params)
        for e, p in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(params), strict=True):
            np.testing.assert_allclose(e, p * ema_share, rtol=1e-5, atol=1e-7)
        assert schedule_count(state["opt_state"]) == expected_count
        adam = state["opt_state"].inner_opt_state[0] if accum > 1 else state["opt_state"][0]
        assert int(adam.count) == 0
        for leaf in jax.tree.leaves(adam.mu):
            np.testing.assert_array_equal(leaf, 0.0)
        scales.append((float(state["loss_scale"]["scale"]), int(state["loss_scale"]["hysteresis"])))
    assert scales == [(2.0**40, 1), (2.0**39, 1)]  # the allowance, then a halving

    # a scale that fits: the float32 update of the same state (schedule two steps on)
    state["loss_scale"]["scale"] = jnp.float32(2.0**10)
    new16, m16 = update(step16, state)
    new32, m32 = update(step32, {k: v for k, v in state.items() if k != "loss_scale"})
    assert not bool(m16["skipped"])
    assert schedule_count(new16["opt_state"]) == schedule_count(new32["opt_state"]) == 3
    # the unscaled gradient, and the update Adam makes of it (about lr x its sign, which
    # float16 rounding flips for a few near-zero entries)
    np.testing.assert_allclose(float(m16["grad_norm"]), float(m32["grad_norm"]), rtol=2e-3)
    leaves = [jax.tree.leaves(t) for t in (new16["params"], new32["params"], params)]
    d16 = np.concatenate([np.ravel(a - p) for a, _, p in zip(*leaves, strict=True)])
    d32 = np.concatenate([np.ravel(b - p) for _, b, p in zip(*leaves, strict=True)])
    assert np.linalg.norm(d16 - d32) <= 2e-2 * np.linalg.norm(d32)
    assert np.abs(d32).max() > 5e-3  # a real update (lr 1e-2)


def test_float16_overflow_in_an_early_micro_batch_skips_the_whole_update():
    """With gradient accumulation, an overflow in the first micro-batch spoils the mean: the
    update on the last (clean) micro-batch is skipped, nothing non-finite stays behind, and the
    scale moves once, at the update."""
    import jax.numpy as jnp

    start, step16, _, run = _float16_steps(accum=2)
    first, m = run(step16, start, 0)  # overflows at 2**40
    assert not bool(m["skipped"]) and bool(m["ok"])  # not the update's micro-step yet
    _assert_tree_equal(first["loss_scale"], start["loss_scale"])
    _assert_tree_equal(first["params"], start["params"])
    first["loss_scale"]["scale"] = jnp.float32(2.0**4)  # the last micro-batch would fit
    last, m = run(step16, first, 1)
    assert bool(m["skipped"]) and bool(m["ok"])
    _assert_tree_equal(last["params"], start["params"])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(last))
    assert int(last["opt_state"].mini_step) == 0
    for leaf in jax.tree.leaves(last["opt_state"].acc_grads):
        np.testing.assert_array_equal(leaf, 0.0)
    adam = last["opt_state"].inner_opt_state[0]
    assert int(adam.count) == 0
    assert (float(last["loss_scale"]["scale"]), int(last["loss_scale"]["hysteresis"])) == (16.0, 1)


def test_float16_training_follows_float32_and_resumes_exactly(records, tmp_path):
    kw = {"train.max_steps": 6, "val_split": "", "test_split": ""}
    f32 = train.train_and_evaluate(tiny_config(records, **kw), tmp_path / "f32")
    f16 = train.train_and_evaluate(
        tiny_config(records, **{"model.dtype": "float16"}, **kw), tmp_path / "f16"
    )
    np.testing.assert_allclose(_losses(f16), _losses(f32), atol=2e-3, rtol=0)
    assert f16["skipped_updates"] == 0 and "skipped_updates" not in f32

    # a scale far too large: the first updates overflow; stopped after 3 and resumed, the run
    # ends where an uninterrupted one does, loss scale included
    big = {"model.dtype": "float16", "optim.loss_scale": 2.0**30}
    straight = train.train_and_evaluate(tiny_config(records, **big, **kw), tmp_path / "straight")
    assert straight["skipped_updates"] > 3
    train.train_and_evaluate(
        tiny_config(records, **big, **(kw | {"train.max_steps": 3})), tmp_path / "resumed"
    )
    resumed = train.train_and_evaluate(tiny_config(records, **big, **kw), tmp_path / "resumed")
    assert resumed["skipped_updates"] == straight["skipped_updates"]
    a = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    b = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert a["train_loss"] == b["train_loss"]
    for name in ("straight", "resumed"):
        assert json.loads((tmp_path / name / "metrics.json").read_text())["skipped_updates"] > 3
    import orbax.checkpoint as ocp

    saved = {}
    for name in ("straight", "resumed"):
        with ocp.CheckpointManager(tmp_path / name / "checkpoints") as mgr:
            items = {k: ocp.args.StandardRestore() for k in ("params", "opt_state", "loss_scale")}
            saved[name] = dict(mgr.restore(6, args=ocp.args.Composite(**items)))
    assert saved["resumed"]["loss_scale"]["scale"] < 2.0**30  # it came down
    for x, y in zip(jax.tree.leaves(saved["straight"]), jax.tree.leaves(saved["resumed"]),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(x, y)


def test_resume_with_other_workers_and_accumulation_follows_the_run(records, tmp_path):
    # a preempted run resumed on a smaller machine: another worker count (grain's iterator
    # state differs in structure), accumulation switched on (optax.MultiSteps wraps the
    # optimizer state) and off again, then the blocks run as a scan, rematerialised keeping
    # their matmuls' outputs. Without random device-side parts (mixup, erasing, drop path) two
    # micro-batches are one batch, so the run follows the uninterrupted one.
    kw = {
        "val_split": "", "test_split": "", "mesh.num_devices": 4, "train.checkpoint_every_steps": 2,
        "loss.mixup": 0.0, "loss.cutmix": 0.0, "data.reprob": 0.0, "model.drop_path_rate": 0.0,
    }  # fmt: skip
    ref = train.train_and_evaluate(tiny_config(records, **kw, **{"train.max_steps": 6}), tmp_path)
    run = tmp_path / "run"
    scan = {"model.scan_layers": True, "model.remat": True, "model.remat_policy": "save_dots"}
    for over in (
        {"train.max_steps": 2},
        {"train.max_steps": 4, "data.num_workers": 2, "optim.grad_accum": 2},
        {"train.max_steps": 6, **scan},  # the same numbers, compiled once
    ):
        done = train.train_and_evaluate(tiny_config(records, **kw, **over), run)
    np.testing.assert_allclose(_losses(done), _losses(ref), rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(_final_params(tmp_path)), jax.tree.leaves(_final_params(run)),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_a_run_resumed_between_log_lines_logs_the_uninterrupted_loss_curve(records, tmp_path):
    kw = {"val_split": "", "test_split": "", "train.log_every": 3, "mesh.num_devices": 4}
    straight = train.train_and_evaluate(
        tiny_config(records, **kw, **{"train.max_steps": 6}), tmp_path / "straight"
    )
    train.train_and_evaluate(tiny_config(records, **kw, **{"train.max_steps": 2}), tmp_path / "r")
    resumed = train.train_and_evaluate(
        tiny_config(records, **kw, **{"train.max_steps": 6}), tmp_path / "r"
    )
    # step 2 ended the first run (a log line there too); the line at step 3 averages steps
    # 1-3 as the uninterrupted run's does, not step 3 alone
    assert [s for s, _ in straight["train_loss"]] == [3, 6]
    assert [s for s, _ in resumed["train_loss"]] == [2, 3, 6]
    assert resumed["train_loss"][1:] == straight["train_loss"]
    # resumed with accumulation 2 (the micro-batch losses are halves of a step's)
    train.train_and_evaluate(tiny_config(records, **kw, **{"train.max_steps": 2}), tmp_path / "a")
    accumulated = train.train_and_evaluate(
        tiny_config(records, **kw, **{"train.max_steps": 6, "optim.grad_accum": 2}),
        tmp_path / "a",
    )
    np.testing.assert_allclose(_losses(accumulated)[1:], _losses(straight), rtol=0.05)


def test_resume_with_settings_that_shape_the_run_is_refused(records, tmp_path):
    kw = {"val_split": "", "test_split": "", "train.max_steps": 2}
    train.train_and_evaluate(tiny_config(records, **kw), tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    over = {
        "data.batch_size": 16, "seed": 3, "optim.base_lr": 0.002, "train.max_steps": 4,
        "model.drop_path_rate": 0.5, "data.short_side_size": 48, "data.num_workers": 2,
    }  # fmt: skip
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(tiny_config(records, **kw | over), tmp_path)
    assert str(e.value).startswith(  # the test views' size and the workers may change
        f"the run in {tmp_path} was started with other settings: seed=0 (config: 3), "
        "model.drop_path_rate=0.1 (config: 0.5), data.batch_size=8 (config: 16), "
        "optim.base_lr=0.016 (config: 0.002); resume it"
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before
    # records of other classes (a forgotten --config.records_dir): both folders' counts
    other = tmp_path / "three"
    train.ensure_smoke(tiny_config(other, **{"smoke.classes": 3}))
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(tiny_config(other, **kw, **{"smoke.classes": 3}), tmp_path)
    assert str(e.value) == (
        f"the run in {tmp_path} was trained on 4 classes, but the records in {other} have 3; "
        "give the records it was trained on (--config.records_dir), or a new --workdir"
    )


def test_float16_with_fsdp_follows_the_single_device_run(records, tmp_path):
    """The replicated loss scale and the overflow check over sharded gradients."""
    kw = {"train.max_steps": 5, "val_split": "", "test_split": "", "model.dtype": "float16"}
    runs = {}
    for name, over in {
        "one": {"mesh.num_devices": 1},
        "fsdp": {"mesh.fsdp": 4},
        "one_big": {"mesh.num_devices": 1, "optim.loss_scale": 2.0**30},
        "fsdp_big": {"mesh.fsdp": 4, "optim.loss_scale": 2.0**30},
    }.items():
        runs[name] = train.train_and_evaluate(tiny_config(records, **over, **kw), tmp_path / name)
    np.testing.assert_allclose(_losses(runs["fsdp"]), _losses(runs["one"]), atol=1e-3, rtol=0)
    assert runs["one"]["skipped_updates"] == runs["fsdp"]["skipped_updates"] == 0
    # every update overflows at 2**30 (halving from the second on): 5 skipped, on both meshes
    assert runs["one_big"]["skipped_updates"] == runs["fsdp_big"]["skipped_updates"] == 5
    np.testing.assert_allclose(_losses(runs["fsdp_big"]), _losses(runs["one_big"]), atol=1e-3)


def test_float16_on_a_tpu_is_refused_before_anything_is_written(records, tmp_path, monkeypatch):
    import types

    tpus = [types.SimpleNamespace(platform="tpu", id=i) for i in range(8)]
    monkeypatch.setattr(train.jax, "devices", lambda: tpus)
    c = tiny_config(records, **{"model.dtype": "float16"})
    with pytest.raises(
        train.TrainingError,
        match=r"config.model.dtype: float16 does not run on TPUs .*--config.model.dtype=bfloat16",
    ):
        train.train_and_evaluate(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_float16_overflow_at_the_smallest_scale_stops(records, tmp_path, monkeypatch):
    original = optim.soft_target_cross_entropy
    # gradients of about 1e8 / clips at the logits: float16 cannot hold them at any scale; the
    # loss stays finite
    monkeypatch.setattr(
        optim, "soft_target_cross_entropy", lambda logits, t: original(logits * 1e8, t)
    )
    c = tiny_config(
        records, **{"train.max_steps": 4, "val_split": "", "test_split": "",
                    "model.dtype": "float16", "optim.loss_scale": 2.0},
    )  # fmt: skip
    # 2: allowance spent (skipped), 1: halved (skipped), then nothing left: stop at step 3
    with pytest.raises(
        train.TrainingError,
        match=r"non-finite loss or gradients at step 3: .* overflowing at the smallest loss scale",
    ):
        train.train_and_evaluate(c, tmp_path)


def test_resume_in_float16_starts_the_scale_and_refuses_other_settings(records, tmp_path, capsys):
    kw = {"train.max_steps": 2, "val_split": "", "test_split": ""}
    train.train_and_evaluate(tiny_config(records, **kw), tmp_path)
    more = kw | {"train.max_steps": 4}
    with pytest.raises(train.TrainingError) as e:  # EMA weights the run did not keep
        train.train_and_evaluate(tiny_config(records, **{"optim.ema_decay": 0.9}, **more), tmp_path)
    assert str(e.value) == (
        f"the run in {tmp_path} was started with other settings: optim.ema_decay=0.0 "
        "(config: 0.9); resume it with the settings it was started with, or give a new "
        f"--workdir (--config.init_from={tmp_path} starts from its weights)"
    )
    r = train.train_and_evaluate(
        tiny_config(records, **{"model.dtype": "float16"}, **more), tmp_path
    )
    assert r["skipped_updates"] == 0 and len(r["train_loss"]) == 4
    assert "its loss scale starts at 128" in capsys.readouterr().out
    # and back: a float16 run's loss scale is left in its checkpoint
    r = train.train_and_evaluate(tiny_config(records, **(kw | {"train.max_steps": 5})), tmp_path)
    assert len(r["train_loss"]) == 5 and "skipped_updates" not in r


def test_bad_model_and_mesh_values_are_named(records, tmp_path):
    r = _run(_main_args(records, tmp_path / "w", "--config.model.attention=flash"))
    assert r.returncode == 1
    assert "error: config.model: attention must be one of" in r.stderr
    assert "splash" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "w").exists()
    for key, value, message in [
        ("model.dtype", "float64", r"config.model: dtype must be one of \('float32', "),
        ("optim.loss_scale", 0.5, "optim.loss_scale must be a finite number >= 1, got 0.5"),
        ("mesh.fsdp", 3, "mesh.fsdp=3 must divide the number of devices .8.; set --config"),
    ]:
        with pytest.raises(train.TrainingError, match=message):
            train.train_and_evaluate(tiny_config(records, **{key: value}), tmp_path / "w")
        assert not (tmp_path / "w").exists()


def test_splash_attention_trains_like_the_default(records, tmp_path):
    kw = {"train.max_steps": 3, "val_split": "", "test_split": ""}
    default = train.train_and_evaluate(tiny_config(records, **kw), tmp_path / "auto")
    with pytest.warns(UserWarning, match="Pallas' interpreter"):
        splash = train.train_and_evaluate(
            tiny_config(records, **{"model.attention": "splash"}, **kw), tmp_path / "splash"
        )
    np.testing.assert_allclose(_losses(splash), _losses(default), atol=1e-5, rtol=0)
    _, meta = checkpointing.load_model(tmp_path / "splash" / "checkpoints")
    assert meta["model"]["attention"] == "splash"
    # its shard_map inside the scanned blocks, rematerialised (the interpreter was named once)
    scan = {"model.attention": "splash", "model.scan_layers": True, "model.remat": True}
    scanned = train.train_and_evaluate(tiny_config(records, **scan, **kw), tmp_path / "scan")
    np.testing.assert_allclose(_losses(scanned), _losses(default), atol=1e-5, rtol=0)


def test_hht_flip_on_strip_records(records, tmp_path):
    import shutil

    strip = tmp_path / "strip"
    shutil.copytree(records, strip)
    info = json.loads((strip / "dataset_info.json").read_text())
    info["hht_settings"]["layout"] = "strip"
    (strip / "dataset_info.json").write_text(json.dumps(info))
    c = tiny_config(strip, **{"data.flip": "hht"})
    with pytest.raises(train.TrainingError, match="holds layout 'strip'.*--config.data.flip=plain"):
        train.train_and_evaluate(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_batch_and_schedule_mistakes_stop_before_training(records, tmp_path):
    for over, message in [
        ({"data.eval_batch_size": 12}, "data.eval_batch_size 12 does not split over the 8"),
        ({"data.batch_size": 64}, "batch_size 64 exceeds the 32 training videos"),
        ({"optim.warmup_epochs": 3}, "the schedule has 12 steps but 12 warmup steps"),
    ]:
        with pytest.raises(train.TrainingError, match=message):
            train.train_and_evaluate(tiny_config(records, **over), tmp_path / "w")
        assert not (tmp_path / "w").exists()
    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    init = _converted(tmp_path, DIMS, names)
    c = tiny_config(records, mode="eval", init_from=str(init), **{"data.eval_batch_size": 12})
    evaluate_mode = evaluate.evaluate
    with pytest.raises(train.TrainingError, match="data.eval_batch_size 12 does not split"):
        evaluate_mode(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_batch_and_mesh_mistakes_stop_before_the_smoke_dataset_is_generated(tmp_path):
    fresh = tmp_path / "smoke"  # not generated yet: each mistake is named before it would be
    for over, message in [
        ({"data.batch_size": 12}, "a micro-batch of 12 clips does not split over 8 devices"),
        ({"data.eval_batch_size": 12}, "data.eval_batch_size 12 does not split over the 8"),
        ({"data.eval_views_per_device": -1}, "data.eval_views_per_device -1 must be >= 0"),
        ({"mesh.fsdp": 3}, "mesh.fsdp=3 must divide the number of devices (8)"),
        ({"loss.mixup_group_size": 3}, "loss.mixup_group_size 3 must divide the 8 clips"),
        ({"data.repeated_aug": 0}, "data.repeated_aug (0) must be >= 1"),
        ({"optim.grad_accum": 3}, "data.batch_size 8 must split into optim.grad_accum=3"),
    ]:
        with pytest.raises(train.TrainingError, match=re.escape(message)):
            train.train_and_evaluate(tiny_config(fresh, **over), tmp_path / "w")
        assert not fresh.exists() and not (tmp_path / "w").exists()
    c = tiny_config(fresh, mode="eval", init_from=str(tmp_path), **{"data.eval_batch_size": 12})
    with pytest.raises(train.TrainingError, match="data.eval_batch_size 12 does not split"):
        evaluate.evaluate(c, tmp_path / "w")
    assert not fresh.exists() and not (tmp_path / "w").exists()


def test_view_size_and_split_mistakes_stop_before_training(records, tmp_path):
    # each of these used to train (an epoch, or the whole run) and then crash in the
    # validation or the final test, or select checkpoints on the test split
    for over, message in [
        (
            {"data.short_side_size": 24},
            "data.short_side_size 24 is smaller than model.img_size 32: validation views",
        ),
        (
            {"data.short_side_size": 40},
            "test views are 40-pixel squares, which the model's 16-pixel patches do not divide",
        ),
        ({"val_split": "test"}, "would be selected on the test split"),
        ({"data.batch_size": 0}, r"data.batch_size \(0\), optim.grad_accum \(1\)"),
        ({"optim.grad_accum": 0}, r"optim.grad_accum \(0\) .* must be >= 1"),
        (
            {"loss.mixup_group_size": 3},
            r"loss.mixup_group_size 3 must divide the 8 clips of a micro-batch .*; 1 a device",
        ),
    ]:
        with pytest.raises(train.TrainingError, match=message):
            train.train_and_evaluate(tiny_config(records, **over), tmp_path / "w")
        assert not (tmp_path / "w").exists()
    # eval mode checks the test views too, before reading any record
    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    init = _converted(tmp_path, DIMS, names)
    c = tiny_config(records, mode="eval", init_from=str(init), **{"data.short_side_size": 40})
    evaluate_mode = evaluate.evaluate
    with pytest.raises(train.TrainingError, match="test views are 40-pixel squares"):
        evaluate_mode(c, tmp_path / "w")
    # a larger short side that the patches divide is allowed, with a warning that says what
    # the views are
    setup = train.prepare(tiny_config(records, **{"data.short_side_size": 48}))
    assert any(
        "test views are 48-pixel squares while training crops and validation views are 32" in w
        for w in setup.warnings
    )


def test_eval_of_warm_start_checkpoints_keeps_each_result(records, tmp_path):
    evaluate_mode = evaluate.evaluate
    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    for name in ("a", "b"):  # two converted checkpoints, both step 0
        init = _converted(tmp_path / name, DIMS, names)
        init.rename(tmp_path / name / f"ckpt_{name}")
        c = tiny_config(records, mode="eval", init_from=str(tmp_path / name / f"ckpt_{name}"))
        evaluate_mode(c, tmp_path / "w")
    # a training run's checkpoints/ folder is named after its run
    run = tmp_path / "run_c" / "checkpoints"
    _converted(tmp_path / "c", DIMS, names).rename(tmp_path / "c" / "checkpoints")
    (tmp_path / "c").rename(tmp_path / "run_c")
    evaluate_mode(tiny_config(records, mode="eval", init_from=str(run)), tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w" / "eval").iterdir()) == [
        "ckpt_a_step_0_test_3x1",
        "ckpt_b_step_0_test_3x1",
        "run_c_step_0_test_3x1",
    ]


def test_eval_mode_tests_a_converted_checkpoint_at_its_own_clip_size(records, tmp_path):
    # a converted checkpoint records its frames and size with its model (4 x 32 px here)
    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    init = _converted(tmp_path, DIMS, names)
    c = tiny_config(records, mode="eval", init_from=str(init), **{"model.num_frames": 2})
    with pytest.raises(train.TrainingError, match=(
        r"eval mode: .*init step 0 was trained with model.num_frames=4 \(config: 2\); add "
        r"--config.model.num_frames=4 to test it as trained"
    )):  # fmt: skip
        evaluate.evaluate(c, tmp_path / "w")
    assert not (tmp_path / "w" / "eval").exists()


def _damage_first_record(shard: pathlib.Path) -> None:
    """Flips a byte inside the first record's data: its CRC no longer matches."""
    damaged = bytearray(shard.read_bytes())
    damaged[100] ^= 0xFF
    shard.write_bytes(bytes(damaged))


def _damaged_copy(records, tmp_path, split: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A copy of the records whose split's first record is damaged: (copy, its shard)."""
    copy = tmp_path / "records"
    shutil.copytree(records, copy)
    shard = copy / f"{split}-00000-of-00001.tfrecord"
    _damage_first_record(shard)
    return copy, shard


def test_damaged_records_and_non_finite_outputs_stop_with_the_way_out(
    records, tmp_path, monkeypatch
):
    import jax.numpy as jnp

    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    init = _converted(tmp_path, DIMS, names)
    copy, shard = _damaged_copy(records, tmp_path, "test")
    c = tiny_config(copy, mode="eval", init_from=str(init), **{"data.num_workers": 2})
    with pytest.raises(train.TrainingError) as e:
        evaluate.evaluate(c, tmp_path / "w")
    assert str(e.value) == (
        f"{shard}: record 0: data CRC mismatch (corrupted record): the records in {copy} are "
        "damaged; restore the file from a good copy, or build the records again "
        "(python -m data_prep.build_records)"
    )
    assert not (tmp_path / "w" / "eval").exists()  # no empty result folder
    # training reads a damaged training shard the same way
    shard = copy / "train-00000-of-00001.tfrecord"
    _damage_first_record(shard)
    with pytest.raises(train.TrainingError, match=r"data CRC mismatch .* are damaged; restore"):
        train.train_and_evaluate(tiny_config(copy, val_split="", test_split=""), tmp_path / "t")

    # a forward pass that overflows (float16) or weights gone bad: named, no traceback
    real = evaluate.eval_step
    monkeypatch.setattr(
        evaluate, "eval_step", lambda setup, v: lambda p, x: real(setup, v)(p, x) * jnp.nan
    )
    first_test_video = RecordSource(records, "test")[0]["video_id"][0].decode()
    assert re.fullmatch(r"test-\d{3}-\d{3}", first_test_video)
    for dtype, why in (
        ("float16", "in float16 the forward pass overflowed: evaluate with "
                    "--config.model.dtype=float32 (or bfloat16)"),
        ("float32", "the weights may hold non-finite values"),
    ):  # fmt: skip
        c = tiny_config(records, mode="eval", init_from=str(init), **{"model.dtype": dtype})
        with pytest.raises(train.TrainingError, match=(
            rf"^the model gave non-finite probabilities for video 0 of the test split "
            rf"\({re.escape(str(records))}/test-00000-of-00001\.tfrecord: record 0 "
            rf"\(video {first_test_video}\)\); "
            rf"{re.escape(why)}$"
        )):  # fmt: skip
            evaluate.evaluate(c, tmp_path / dtype)
        assert not (tmp_path / dtype / "eval").exists()


def test_eval_mode_refuses_ambiguous_or_unnamed_checkpoints(records, tmp_path, capsys):
    evaluate_mode = evaluate.evaluate
    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    init = _converted(tmp_path / "named", DIMS, names)
    _converted(tmp_path / "w", DIMS, names).rename(tmp_path / "w" / "checkpoints")  # a run's
    before = sorted(p for p in (tmp_path / "w").rglob("*"))
    with pytest.raises(train.TrainingError, match=(
        r"eval mode: both .*w/checkpoints and config.init_from=.*named/init hold a checkpoint; "
        r"drop --config.init_from to evaluate the run in the workdir, or give another --workdir"
    )):  # fmt: skip
        evaluate_mode(tiny_config(records, mode="eval", init_from=str(init)), tmp_path / "w")
    with pytest.raises(train.TrainingError, match="eval mode tests config.test_split, which is"):
        evaluate_mode(tiny_config(records, mode="eval", test_split=""), tmp_path / "w")
    assert sorted(p for p in (tmp_path / "w").rglob("*")) == before

    # a checkpoint without class names: its head rows cannot be matched to the records'
    from signnet_jax.models import vit

    cfg = vit.ViTConfig.from_preset("S", num_classes=len(names), num_frames=4, img_size=32,
                                    **DIMS)  # fmt: skip
    params = vit.params_of(vit.create_model(cfg))
    checkpointing.save_model(tmp_path / "unnamed", params, {"model": cfg.to_dict()})
    unnamed = dict(init_from=str(tmp_path / "unnamed"))
    with pytest.raises(train.TrainingError, match=(
        r"init checkpoint .*unnamed has no class names, so its 4 head rows cannot be matched "
        r"to the records' classes; convert it again with --class-list"
    )):  # fmt: skip
        evaluate_mode(tiny_config(records, mode="eval", **unnamed), tmp_path / "e")
    assert not (tmp_path / "e").exists()
    # training from it keeps the rows in the records' order and says so at the start
    kw = {"train.max_steps": 1, "val_split": "", "test_split": "", "init_reset_head": False}
    train.train_and_evaluate(tiny_config(records, **kw, **unnamed), tmp_path / "t")
    out = capsys.readouterr().out
    assert "warning: init checkpoint" in out and "taken in the records' order" in out


def test_eval_mode_names_settings_the_run_was_trained_with(records, tmp_path, capsys):
    evaluate_mode = evaluate.evaluate
    kw = {"train.max_steps": 1, "val_split": "", "test_split": ""}
    train.train_and_evaluate(tiny_config(records, **kw), tmp_path / "w")
    # the run's own config, less two overrides of its model: the message gives them back
    c = tiny_config(records, mode="eval", **{"model.num_frames": 8, "model.img_size": 64})
    message = (
        r"eval mode: .*w/checkpoints step 1 was trained with model.num_frames=4 \(config: 8\), "
        r"model.img_size=32 \(config: 64\); add --config.model.num_frames=4 "
        r"--config.model.img_size=32 to test it as trained$"
    )
    with pytest.raises(train.TrainingError, match=message):
        evaluate_mode(c, tmp_path / "w")
    # another model: the preset and the dimensions that differ from it
    c = tiny_config(records, mode="eval", **{"model.preset": "B", "model.depth": 3})
    with pytest.raises(train.TrainingError, match=(
        r"trained with model.preset='S' \(config: 'B'\), model.depth=2 \(config: 3\); add "
        r"--config.model.preset=S --config.model.depth=2 to"
    )):  # fmt: skip
        evaluate_mode(c, tmp_path / "w")
    assert not (tmp_path / "w" / "eval").exists()
    # other views may be the test's choice: tested, with a warning for the sampling and size
    capsys.readouterr()
    c = tiny_config(records, mode="eval", **{"data.sampling_rate": 1, "data.test_num_segment": 2})
    evaluate_mode(c, tmp_path / "w")
    assert [p.name for p in (tmp_path / "w" / "eval").iterdir()] == ["step_1_test_2x1_rate1"]
    assert (
        "checkpoints step 1 was trained with data.sampling_rate=2 (config: 1): testing the "
        "config's views; --config.data.sampling_rate=2 tests it as trained"
    ) in capsys.readouterr().out


def test_missing_records_folder(tmp_path):
    c = tiny_config(tmp_path / "nowhere", **{"smoke.enabled": False})
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(c, tmp_path / "w")
    assert str(e.value) == (
        f"records folder {tmp_path / 'nowhere'} does not exist; build it with python -m "
        "data_prep.build_records, or fix --config.records_dir"
    )
    (tmp_path / "empty").mkdir()
    c = tiny_config(tmp_path / "empty", **{"smoke.enabled": False})
    with pytest.raises(train.TrainingError, match="has no dataset_info.json.*build_records"):
        train.train_and_evaluate(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_records_whose_build_failed_for_some_videos_and_a_random_init_are_warned_about(
    records, tmp_path, capsys
):
    # a build that could not make most videos still writes dataset_info.json (it says so and
    # exits 1); training on it used to say nothing, nor on a published config without init_from
    copy = tmp_path / "records"
    shutil.copytree(records, copy)
    info = json.loads((copy / "dataset_info.json").read_text())
    info["splits"]["train"]["num_failures"] = 3
    info["splits"]["train"]["num_entries"] += 3
    info["splits"]["test"]["num_failures"] = 1
    info["splits"]["test"]["num_entries"] += 1
    (copy / "dataset_info.json").write_text(json.dumps(info))
    kw = {"smoke.enabled": False, "train.max_steps": 1, "val_split": "", "test_split": "test"}
    train.train_and_evaluate(tiny_config(copy, **kw), tmp_path / "w")
    out = capsys.readouterr().out
    splits = info["splits"]
    assert (
        f"warning: {copy} lacks videos its build could not make (train 3 of "
        f"{splits['train']['num_entries']}, test 1 of {splits['test']['num_entries']}; "
        "failures.jsonl there says why): accuracies are over the videos it holds, not the whole "
        "split"
    ) in out
    assert (
        "warning: training from a random init: the published recipe and its accuracies start "
        "from a warm start, the --config.init_from in the command atop the config file (a "
        "converted VideoMAEv2 checkpoint for ASL-Citizen, the ASL-Citizen run for WLASL)"
    ) in out
    # neither when the run resumes on a complete folder
    info["splits"]["train"]["num_failures"] = info["splits"]["test"]["num_failures"] = 0
    (copy / "dataset_info.json").write_text(json.dumps(info))
    train.train_and_evaluate(tiny_config(copy, **(kw | {"train.max_steps": 2})), tmp_path / "w")
    out = capsys.readouterr().out
    assert "resuming from step 1" in out and "warning" not in out


def test_a_file_for_a_folder_and_a_bucket_without_its_package_are_named(
    records, tmp_path, monkeypatch
):
    shard = next(records.glob("train-*.tfrecord"))
    c = tiny_config(shard, **{"smoke.enabled": False})
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(c, tmp_path / "w")
    assert str(e.value) == (
        f"config.records_dir: {shard} is a file, not a records folder: give the folder that "
        "`python -m data_prep.build_records` wrote"
    )
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(tiny_config(records), tmp_path / "metrics.json")
    assert str(e.value) == (
        f"--workdir {tmp_path / 'metrics.json'} is a file; give a folder (new or a run's)"
    )

    def no_gcsfs(*args, **kwargs):  # fsspec without gcsfs (no bucket is reached in tests)
        raise ImportError("Please install gcsfs to access Google Storage")

    monkeypatch.setattr("signnet_jax.data.records.fsspec.open", no_gcsfs)
    c = tiny_config("gs://bucket/records", **{"smoke.enabled": False})
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(c, tmp_path / "w")
    assert str(e.value) == (
        "config.records_dir: reading gs://bucket/records: Please install gcsfs to access Google "
        "Storage (pip install -e '.[gcs]')"
    )
    assert not (tmp_path / "w").exists()


def test_a_split_without_records_is_named_with_the_counts(records, tmp_path):
    c = tiny_config(records, val_split="dev")
    message = (
        r"has no records in split 'dev' \(records per split: \{'test': 8, 'train': 32, "
        r"'val': 8\}\); rebuild it, or set --config.train_split"
    )
    with pytest.raises(train.TrainingError, match=message):
        train.train_and_evaluate(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_eval_mode_needs_the_test_split_alone(records, tmp_path):
    # records built from test.csv alone, or a copy of the test shards alone: eval mode used to
    # demand the train and val splits it never reads
    classes = json.loads((records / "dataset_info.json").read_text())["classes"]
    only_test = tmp_path / "only_test"
    shutil.copytree(records, only_test)
    info = json.loads((only_test / "dataset_info.json").read_text())
    for split in ("train", "val"):
        for shard in info["splits"].pop(split)["shards"]:
            (only_test / shard["file"]).unlink()
    (only_test / "dataset_info.json").write_text(json.dumps(info))
    init = _converted(tmp_path, DIMS, classes)
    c = tiny_config(only_test, mode="eval", init_from=str(init), **{"smoke.enabled": False})
    result = evaluate.evaluate(c, str(tmp_path / "w"))
    assert result["test"]["num_videos"] == 8 and result["checkpoint"] == str(init)
    c = tiny_config(only_test, **{"smoke.enabled": False})
    with pytest.raises(train.TrainingError, match=(
        r"has no records in split 'train' \(records per split: \{'test': 8\}\)"
    )):  # fmt: skip
        train.train_and_evaluate(c, str(tmp_path / "t"))
    assert not (tmp_path / "t").exists()


def _converted(tmp_path, preset_dims, classes):
    from signnet_jax.models import vit

    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=len(classes), num_frames=4, img_size=32, **preset_dims
    )
    checkpointing.save_model(
        tmp_path / "init",
        vit.params_of(vit.create_model(cfg)),
        {"model": cfg.to_dict(), "classes": classes},
    )
    return tmp_path / "init"


DIMS = dict(embed_dim=32, depth=2, num_heads=2, mlp_dim=64)


def test_resume_needs_neither_the_init_checkpoint_nor_a_second_read_of_it(records, tmp_path):
    import shutil

    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    init = _converted(tmp_path, DIMS, names)
    kw = {"val_split": "", "test_split": "", "init_from": str(init)}
    train.train_and_evaluate(tiny_config(records, **kw, **{"train.max_steps": 2}), tmp_path / "w")
    shutil.rmtree(init)  # moved or deleted after the start: the run carries on without it
    done = train.train_and_evaluate(
        tiny_config(records, **kw, **{"train.max_steps": 4}), tmp_path / "w"
    )
    assert done["steps"] == 4
    # a config that no longer fits the run is named, not a shape error deep in orbax
    with pytest.raises(train.TrainingError, match=r"num_frames 4 \(config: 2\); resume it"):
        train.train_and_evaluate(
            tiny_config(records, **kw, **{"model.num_frames": 2}), tmp_path / "w"
        )


def test_init_checkpoint_of_another_preset(records, tmp_path):
    init = _converted(tmp_path, dict(DIMS, embed_dim=64), ["a", "b", "c", "d"])
    c = tiny_config(records, init_from=str(init))
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(c, tmp_path / "w")
    assert str(e.value) == (  # the overrides that build it, not the preset it already has
        f"init checkpoint {init} is a ViT-S (embed_dim=64) but the config asks for ViT-S "
        "(embed_dim=32); set --config.model.embed_dim=64 to match, or convert a checkpoint of "
        "the config's model"
    )
    # a checkpoint of the preset's own size, for a config with smaller dimensions
    full = _converted(tmp_path / "full", {}, ["a", "b", "c", "d"])
    with pytest.raises(train.TrainingError, match=(
        r"set --config.model.embed_dim=0 --config.model.depth=0 --config.model.num_heads=0 "
        r"--config.model.mlp_dim=0 to match"
    )):  # fmt: skip
        train.train_and_evaluate(tiny_config(records, init_from=str(full)), tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_bad_settings_stop_before_the_smoke_dataset_is_generated(tmp_path):
    # generating the smoke dataset takes a while: a typo is named first, nothing is written
    new = tmp_path / "records"
    for over, message in (
        ({"model.dtype": "fp16"}, "config.model: "),
        ({"train.log_every": 0}, "train.log_every=0 (least 1)"),
    ):
        with pytest.raises(train.TrainingError, match=re.escape(message)):
            train.train_and_evaluate(tiny_config(new, **over), tmp_path / "w")
    with pytest.raises(train.TrainingError, match="config.model: "):
        evaluate.evaluate(tiny_config(new, mode="eval", **{"model.dtype": "fp16"}), tmp_path / "w")
    assert not new.exists() and not (tmp_path / "w").exists()


def test_smoke_records_of_other_options_are_named_with_the_way_out(records, tmp_path):
    c = tiny_config(records, **{"smoke.frames": 16})
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(c, tmp_path / "w")
    assert str(e.value).startswith(f"config.smoke: {records} holds a smoke dataset built with ")
    assert str(e.value).endswith(
        "(the smoke config makes its synthetic records in config.records_dir; for records of "
        "your own add --config.smoke.enabled=False)"
    )
    assert not (tmp_path / "w").exists()


def test_classes_not_matching_the_head(records, tmp_path):
    init = _converted(tmp_path, DIMS, ["x", "y", "z"])
    c = tiny_config(records, init_from=str(init), init_reset_head=False)
    with pytest.raises(
        train.TrainingError,
        match="3-class head but the records have 4 classes.*init_reset_head=True",
    ):
        train.train_and_evaluate(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    # the fix works, and the same classes in another order are permuted, not reset
    setup = train.prepare(tiny_config(records, init_from=str(init), init_reset_head=True))
    assert "new 4-class head" in setup.note
    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    init2 = _converted(tmp_path / "two", DIMS, names[::-1])
    setup = train.prepare(tiny_config(records, init_from=str(init2), init_reset_head=False))
    assert "reordered" in setup.note
    src, _ = checkpointing.load_model(init2)
    np.testing.assert_array_equal(
        setup.init_params["head"]["kernel"], src["head"]["kernel"][:, ::-1]
    )


def test_eval_mode_names_bad_model_values_as_training_does(records, tmp_path):
    # the trained-settings check builds the config's model before prepare does: the same
    # one-line error, not a ValueError from the model config
    evaluate_mode = evaluate.evaluate
    init = _converted(tmp_path, DIMS, ["x", "y", "z", "w"])
    for key, value, message in [
        ("model.dtype", "float64", r"config.model: dtype must be one of \('float32', "),
        ("model.preset", "XL", "config.model: unknown model preset 'XL'"),
    ]:
        c = tiny_config(records, mode="eval", init_from=str(init), **{key: value})
        with pytest.raises(train.TrainingError, match=message):
            evaluate_mode(c, tmp_path / "w")
    assert not (tmp_path / "w" / "eval").exists()


def test_eval_mode_names_records_of_other_classes_without_the_training_advice(records, tmp_path):
    # init_reset_head=True would only start an untrained head; eval mode ignores it anyway
    evaluate_mode = evaluate.evaluate
    init = _converted(tmp_path, DIMS, ["x", "y", "z"])
    with pytest.raises(train.TrainingError) as e:
        evaluate_mode(tiny_config(records, mode="eval", init_from=str(init)), tmp_path / "w")
    assert str(e.value) == (
        f"eval mode: checkpoint {init} has a 3-class head but the records in {records} have "
        "4 classes; test it on records of the classes it was trained on (--config.records_dir)"
    )
    assert not (tmp_path / "w" / "eval").exists()


def test_init_from_a_training_workdir_reads_its_checkpoints(records, tmp_path, monkeypatch):
    """As predict and convert --to-pytorch: a run's workdir stands for its checkpoints/."""
    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    _converted(tmp_path / "run", DIMS, names[::-1]).rename(tmp_path / "run" / "checkpoints")
    setup = train.prepare(tiny_config(records, init_from=str(tmp_path / "run")))
    assert (
        setup.note
        == f"warm start from {tmp_path / 'run'} (head rows reordered to the records' class order)"
    )
    src, _ = checkpointing.load_model(tmp_path / "run" / "checkpoints")
    np.testing.assert_array_equal(
        setup.init_params["head"]["kernel"], src["head"]["kernel"][:, ::-1]
    )
    evaluate_mode = evaluate.evaluate
    result = evaluate_mode(
        tiny_config(records, mode="eval", init_from=str(tmp_path / "run")), tmp_path / "w"
    )
    assert result["checkpoint"] == str(tmp_path / "run" / "checkpoints")
    assert [p.name for p in (tmp_path / "w" / "eval").iterdir()] == ["run_step_0_test_3x1"]
    # the same init_from spelled otherwise is the same checkpoint; another of that name is not
    respelled = os.path.join(tmp_path, "run", "..", "run")
    evaluate_mode(tiny_config(records, mode="eval", init_from=respelled), tmp_path / "w")
    other = tmp_path / "elsewhere" / "run"
    shutil.copytree(tmp_path / "run", other)
    with pytest.raises(train.TrainingError, match=(
        rf"holds the result of checkpoint {re.escape(str(tmp_path / 'run' / 'checkpoints'))} "
        rf"step 0 .*, not of {re.escape(str(other / 'checkpoints'))} step 0"
    )):  # fmt: skip
        evaluate_mode(tiny_config(records, mode="eval", init_from=str(other)), tmp_path / "w")
    # a checkpoint given by a relative path is kept whole, so that a run from another folder
    # can tell it from one of the same relative name there
    monkeypatch.chdir(tmp_path)
    evaluate_mode(tiny_config(records, mode="eval", init_from="run"), "w4")
    stored = json.loads(
        (tmp_path / "w4" / "eval" / "run_step_0_test_3x1" / "metrics.json").read_text()
    )
    assert stored["checkpoint"] == str(tmp_path / "run" / "checkpoints")


def test_device_out_of_memory_says_what_helps(records, tmp_path, monkeypatch):
    def too_big(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 48.00GiB."
        )

    monkeypatch.setattr(jax.stages.Lowered, "compile", too_big)
    c = tiny_config(records, **{"val_split": "", "test_split": ""})
    message = (
        r"needs more device memory than there is \(RESOURCE_EXHAUSTED: Out of memory while "
        r"trying to allocate 48.00GiB.\); with 1 clip per device, try "
        r"--config.optim.grad_accum=2 or more .* --config.model.remat=True, or on TPUs "
        r"--config.model.attention=splash"
    )
    with pytest.raises(train.TrainingError, match=message):
        train.train_and_evaluate(c, tmp_path)
    # scanned blocks without remat: remat, or the blocks unrolled
    scanned = tiny_config(records, **{"val_split": "", "test_split": "", "model.scan_layers": True})
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(scanned, tmp_path / "scan")
    assert "--config.model.remat=True or --config.model.scan_layers=False, or on TPUs" in str(
        e.value
    )
    # remat on: the policy that keeps the least, or nothing more of remat; scanned blocks
    # with remat: unrolled ones too
    for policy, scan, advice in (
        ("save_dots", False, "2 or more (smaller micro-batches, the same update), "
         "--config.model.remat_policy=full (blocks that keep nothing but their input), or on "
         "TPUs --config.model.attention=splash"),
        ("full", False, "2 or more (smaller micro-batches, the same update), or on TPUs "
         "--config.model.attention=splash"),
        ("full", True, "2 or more (smaller micro-batches, the same update), "
         "--config.model.scan_layers=False, or on TPUs --config.model.attention=splash"),
    ):  # fmt: skip
        over = {"val_split": "", "test_split": "", "model.remat": True}
        c = tiny_config(
            records, **over, **{"model.remat_policy": policy, "model.scan_layers": scan}
        )
        with pytest.raises(train.TrainingError) as e:
            train.train_and_evaluate(c, tmp_path / f"{policy}{scan}")
        assert str(e.value).endswith(advice), str(e.value)
    # other runtime errors pass through unchanged
    monkeypatch.setattr(
        jax.stages.Lowered,
        "compile",
        lambda self: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: boom")),
    )
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: boom"):
        train.train_and_evaluate(c, tmp_path)


def test_evaluation_out_of_memory_names_the_eval_batch(records, tmp_path, monkeypatch):
    real = evaluate.eval_step

    def too_big(setup, views):
        step = real(setup, views)

        def fn(params, clip):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 43GiB")

        fn.lower = step.lower  # compiled at start-up as the real one; running it runs out
        return fn

    monkeypatch.setattr(evaluate, "eval_step", too_big)
    # validation during training: the eval step's advice, not the training step's
    c = tiny_config(records, **{"train.max_steps": 1, "test_split": ""})
    message = (
        r"evaluating the val split needs more device memory than there is \(RESOURCE_EXHAUSTED: "
        r"Out of memory allocating 43GiB\); with 1 view per device at a time, on TPUs try "
        r"--config.model.attention=splash$"
    )
    with pytest.raises(train.TrainingError, match=message):
        train.train_and_evaluate(c, tmp_path / "w")


def test_evaluation_memory_advice_names_the_views_a_device_takes_at_once():
    mesh = types.SimpleNamespace(size=8)
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 43GiB")
    for batch, views, advice in [
        (64, 4, "with 4 views per device at a time, try a smaller "
                "--config.data.eval_views_per_device (now 4; 1 needs the least memory)"),
        (64, 3, "with 3 views per device at a time, try a smaller "
                "--config.data.eval_views_per_device (now 3; 1 needs the least memory)"),
        (16, 4, "with 2 views per device at a time, try a smaller "
                "--config.data.eval_views_per_device (now 4; 1 needs the least memory)"),
        (64, 0, "with 8 views per device at a time, try a smaller "
                "--config.data.eval_views_per_device (now 0: all 8 at once; 1 needs the least "
                "memory)"),
        (64, 1, "with 1 view per device at a time, on TPUs try --config.model.attention=splash"),
    ]:  # fmt: skip
        c = tiny_config("unused", **{"data.eval_batch_size": batch})
        c.data.eval_views_per_device = views
        with pytest.raises(train.TrainingError) as e:
            with evaluate.eval_memory_advice(types.SimpleNamespace(mesh=mesh), c, "test"):
                raise oom
        assert str(e.value) == (
            "evaluating the test split needs more device memory than there is "
            f"(RESOURCE_EXHAUSTED: Out of memory allocating 43GiB); {advice}"
        )


def _record_compiles_and_steps(monkeypatch, eval_error=None):
    """Records ``train``, ``eval`` (each compile of that step) and ``step`` (each training
    step) in order; ``eval_error`` is raised by the eval step's compile."""
    events = []
    compile_, step = jax.stages.Lowered.compile, train._step_on_next_batch

    def compiling(self, *a, **k):
        which = "eval" if self.as_text().startswith("module @jit_probs") else "train"
        events.append(which)
        if which == "eval" and eval_error is not None:
            raise eval_error
        return compile_(self, *a, **k)

    def stepping(*a, **k):
        events.append("step")
        return step(*a, **k)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compiling)
    monkeypatch.setattr(train, "_step_on_next_batch", stepping)
    return events


def test_the_eval_step_is_compiled_before_training(records, tmp_path, monkeypatch, caplog, capsys):
    """Validation's and the test's views (48-pixel test views: two shapes), compiled once each
    at start-up, after the training step and before its first step; validation and the test
    run those executables, compiled nowhere else."""
    events = _record_compiles_and_steps(monkeypatch)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("WARNING"):
            train.train_and_evaluate(
                tiny_config(records, **{"train.max_steps": 2, "data.short_side_size": 48}),
                tmp_path / "w",
            )
    finally:
        jax.config.update("jax_log_compiles", False)
    assert events == ["train", "eval", "eval", "step", "step"]
    compiled = [r.getMessage() for r in caplog.records if "jit(probs)" in r.getMessage()]
    assert len([m for m in compiled if m.startswith("Finished XLA compilation")]) == 2, compiled
    # the start-up log: each step, how long it took and its memory
    how = r"(compiled|loaded from JAX's compilation cache) in \d+\.\d s: "
    lines = [x for x in capsys.readouterr().out.splitlines() if " step " in x and " in " in x]
    assert len(lines) == 3, lines
    assert re.fullmatch(
        rf"train step {how}arguments \d+\.\d MiB, temporaries \d+\.\d MiB per device", lines[0]
    )
    for line, (size, split) in zip(lines[1:], ((32, "val"), (48, "test")), strict=True):
        views = rf"eval step \({size}x{size} views of the {split} split\) "
        assert re.fullmatch(rf"{views}{how}temporaries \d+\.\d MiB per device", line), line


def test_an_eval_step_that_does_not_fit_stops_before_training(records, tmp_path, monkeypatch):
    oom = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 88.00GiB")
    events = _record_compiles_and_steps(monkeypatch, oom)
    c = tiny_config(records, **{"train.max_steps": 2, "data.eval_batch_size": 32})
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(c, tmp_path / "w")
    assert str(e.value) == (
        "evaluating the val split needs more device memory than there is (RESOURCE_EXHAUSTED: "
        "Out of memory allocating 88.00GiB); with 4 views per device at a time, try a smaller "
        "--config.data.eval_views_per_device (now 4; 1 needs the least memory)"
    )
    assert events == ["train", "eval"]  # no training step
    assert not checkpointing.checkpoint_steps(tmp_path / "w" / "checkpoints")
    # a run without validation and test compiles no eval step
    events.clear()
    c = tiny_config(records, **{"train.max_steps": 1, "val_split": "", "test_split": ""})
    train.train_and_evaluate(c, tmp_path / "none")
    assert events == ["train", "step"]


def test_an_eval_step_that_does_not_fit_beside_the_training_state_stops_training(
    records, tmp_path, monkeypatch
):
    # it compiles alone, but while it runs the training state stays on the device: on an
    # accelerator that says its memory, that sum is checked at start-up, not after an epoch
    from signnet_jax import sharding
    from signnet_jax.models import vit

    events = _record_compiles_and_steps(monkeypatch)
    asked = []
    monkeypatch.setattr(sharding, "device_memory_limit", lambda d: asked.append(d) or 2**19)
    c = tiny_config(records, **{"train.max_steps": 2})
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(c, tmp_path / "w")
    size = r"([\d.]+ [KMG]iB)"
    m = re.fullmatch(
        rf"evaluating the val split needs more device memory than there is beside the training "
        rf"state: {size} per device \({size} of training state, {size} of views, {size} of "
        r"temporaries\), of 512\.0 KiB; with 1 view per device at a time, on TPUs try "
        r"--config.model.attention=splash",
        str(e.value),
    )
    assert m, str(e.value)

    def kib(text):
        number, unit = text.split()
        return float(number) * {"KiB": 1, "MiB": 2**10, "GiB": 2**20}[unit]

    need, state, views, temps = map(kib, m.groups())
    # the parameters and Adam's two moments, float32, replicated (fsdp 1); a few counters
    classes = len(json.loads((records / "dataset_info.json").read_text())["classes"])
    n = sum(x.size for x in jax.tree.leaves(vit.abstract_params(train.model_config(c, classes))))
    assert 3 * 4 * n / 2**10 - 0.05 <= state <= (3 * 4 * n + 1024) / 2**10 + 0.05
    per_device = c.data.eval_batch_size // jax.device_count()
    assert views == per_device * 4 * 32 * 32 * 3 / 2**10  # uint8 clips
    assert temps > 0 and abs(need - (state + views + temps)) <= 0.15
    assert asked and asked[0] in jax.devices()
    assert events == ["train", "eval"]  # no training step
    assert not checkpointing.checkpoint_steps(tmp_path / "w" / "checkpoints")
    # where it fits (or on the CPU, which says nothing), training goes on
    monkeypatch.setattr(sharding, "device_memory_limit", lambda d: 2**40)
    c = tiny_config(records, **{"train.max_steps": 1, "test_split": ""})
    assert train.train_and_evaluate(c, tmp_path / "fits")["steps"] == 1


def test_on_several_hosts_an_eval_step_one_host_cannot_fit_stops_them_all(monkeypatch):
    from jax.experimental import multihost_utils

    from signnet_jax import sharding

    mesh = sharding.make_mesh()
    setup = types.SimpleNamespace(mesh=mesh)
    config = tiny_config("unused")
    state = jax.ShapeDtypeStruct((2**18,), np.float32, sharding=sharding.replicated(mesh))
    views = jax.ShapeDtypeStruct(
        (8, 4, 32, 32, 3), np.uint8, sharding=sharding.batch_sharding(mesh, 5)
    )
    asked, gathered = [], []
    monkeypatch.setattr(sharding, "device_memory_limit", lambda d: asked.append(d) or 2**21)
    monkeypatch.setattr(jax, "process_count", lambda: 2)

    def others(flags):
        def allgather(x):
            gathered.append(int(x))
            return np.array(flags(int(x)))

        monkeypatch.setattr(multihost_utils, "process_allgather", allgather)

    fix = "with 1 view per device at a time, on TPUs try --config.model.attention=splash"
    # this host fits (1 MiB + 12 KiB + 1 KiB of 2 MiB); process 1 does not
    others(lambda mine: [mine, 1])
    with pytest.raises(train.TrainingError) as e:
        evaluate._check_fits_beside(setup, config, "val", state, views, 1024)
    assert str(e.value) == (
        "evaluating the val split needs more device memory than process 1 has beside the "
        f"training state (its message gives the sizes); {fix}"
    )
    assert gathered == [0] and asked[0] in jax.local_devices()
    # this host does not: its own sizes
    others(lambda mine: [mine, 0])
    with pytest.raises(train.TrainingError) as e:
        evaluate._check_fits_beside(setup, config, "val", state, views, 2**21)
    assert str(e.value) == (
        "evaluating the val split needs more device memory than there is beside the training "
        "state: 3.0 MiB per device (1.0 MiB of training state, 12.0 KiB of views, 2.0 MiB of "
        f"temporaries), of 2.0 MiB; {fix}"
    )
    assert gathered == [0, 1]
    # every host fits
    others(lambda mine: [mine, 0])
    evaluate._check_fits_beside(setup, config, "val", state, views, 1024)
    assert gathered == [0, 1, 0]


def test_bytes_per_device_and_the_memory_a_device_says_it_has():
    from jax.sharding import NamedSharding, PartitionSpec

    from signnet_jax import sharding

    mesh = sharding.make_mesh(fsdp=2)  # data 4 x fsdp 2
    tree = {
        "split": jax.ShapeDtypeStruct(
            (16, 6), np.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp"))
        ),
        "both": jax.ShapeDtypeStruct(
            (16, 6), np.float32, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        ),
        "whole": jax.ShapeDtypeStruct((5,), jax.numpy.bfloat16, sharding=sharding.replicated(mesh)),
    }
    assert sharding.bytes_per_device(tree) == 8 * 6 * 4 + 2 * 6 * 4 + 5 * 2

    def device(platform, stats):
        def memory_stats():
            if isinstance(stats, Exception):
                raise stats
            return stats

        return types.SimpleNamespace(platform=platform, memory_stats=memory_stats)

    limit = {"bytes_in_use": 5, "bytes_limit": 15_032_385_536}
    assert sharding.device_memory_limit(device("tpu", limit)) == 15_032_385_536
    assert sharding.device_memory_limit(device("cpu", limit)) is None
    assert sharding.device_memory_limit(device("gpu", None)) is None
    assert sharding.device_memory_limit(device("gpu", {"bytes_in_use": 5})) is None
    no_stats = jax.errors.JaxRuntimeError("UNIMPLEMENTED: compile-only device")
    assert sharding.device_memory_limit(device("tpu", no_stats)) is None
    assert sharding.device_memory_limit(jax.devices()[0]) is None  # this machine's CPU


def test_the_start_up_log_says_how_long_a_step_compiled_and_when_the_cache_held_it(monkeypatch):
    import jax.numpy as jnp

    stamp = float(time.time_ns() % 10**9)  # a program no other run compiled
    step = jax.jit(lambda x: jnp.sin(x) * stamp)
    x = jax.ShapeDtypeStruct((64,), jnp.float32)
    # the tests' run-wide cache (conftest) keeps programs from 0.1 s; this one is faster
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        first = train.timed_compile(lambda: step.lower(x).compile(), "the step")
        jax.clear_caches()  # as a new process: nothing compiled in memory
        again = train.timed_compile(lambda: step.lower(x).compile(), "the step")
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before)
    assert re.fullmatch(r"the step compiled in \d+\.\d s", first[1]) and not first[2]
    assert re.fullmatch(r"the step loaded from JAX's compilation cache in \d+\.\d s", again[1])
    assert not again[2]
    ones = np.ones(64, np.float32)
    np.testing.assert_array_equal(np.asarray(again[0](ones)), np.asarray(first[0](ones)))
    # a slow compile without a cache says how to keep it for a restart; with one it does not
    monkeypatch.setattr(train, "SLOW_COMPILE_S", 0.0)
    other = jax.jit(lambda x: jnp.cos(x) * stamp)
    assert train.timed_compile(lambda: other.lower(x).compile(), "it")[2] is False
    cache_dir = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        third = jax.jit(lambda x: jnp.tan(x) * stamp)
        slow = train.timed_compile(lambda: third.lower(x).compile(), "it")
    finally:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    assert slow[2] is True


def test_step_compiles_once(records, tmp_path, monkeypatch):
    compiles = []
    real = jax.stages.Lowered.compile

    def counting(self, *a, **k):
        compiles.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(jax.stages.Lowered, "compile", counting)
    c = tiny_config(records, **{"train.max_steps": 6, "val_split": "", "test_split": ""})
    train.train_and_evaluate(c, tmp_path)
    assert len(compiles) == 1


@pytest.mark.heavy
def test_two_processes_follow_the_one_process_trajectory(records, tmp_path):
    import portpicker

    # the device-side random parts on: they follow a clip's row in the global batch
    common = ["--config.train.max_steps=5", "--config.optim.epochs=3"]
    common += ["--config.model.drop_path_rate=0.2", "--config.data.reprob=0.5"]

    def env(devices):
        e = _env()
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        return e

    one = subprocess.run(
        _main_args(records, tmp_path / "one", *common),
        cwd=REPO,
        env=env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    def two_processes(*args):
        """Runs main in two processes of 4 devices each; their (stdout, stderr)."""
        port = portpicker.pick_unused_port()
        procs = [
            subprocess.Popen(
                _main_args(
                    records,
                    tmp_path / "two",
                    *args,
                    "--config.distributed.initialize=True",
                    f"--config.distributed.coordinator_address=localhost:{port}",
                    "--config.distributed.num_processes=2",
                    f"--config.distributed.process_id={i}",
                ),
                cwd=REPO,
                env=env(4),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-3000:]
        return outs

    outs = two_processes(*common)
    assert "mesh {'data': 8, 'fsdp': 1}" in outs[0][0]

    def losses(workdir):
        return np.array(
            [x for _, x in json.loads((workdir / "metrics.json").read_text())["train_loss"]]
        )

    assert len(losses(tmp_path / "one")) == 5
    np.testing.assert_allclose(
        losses(tmp_path / "two"), losses(tmp_path / "one"), atol=1e-5, rtol=0
    )
    # eval mode on two processes: the numbers of one process, reported by process 0 only
    test = [*common, "--config.mode=eval", "--config.test_split=test"]
    one = subprocess.run(_main_args(records, tmp_path / "one", *test), cwd=REPO, env=env(8),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    outs = two_processes(*test)

    def evaluated(workdir):
        (path,) = (workdir / "eval").glob("*/metrics.json")
        return json.loads(path.read_text())["test"]

    assert evaluated(tmp_path / "two") == evaluated(tmp_path / "one")
    summary = [
        line
        for line in one.stdout.splitlines()
        if line.startswith("test split (3 views per video, ")
    ]
    assert len(summary) == 1 and summary[0] in outs[0][0]
    assert "test split (3 views per video, " not in outs[1][0] and "evaluating " not in outs[1][0]

    # float16 with overflows: the skip count, a device value, is read and saved on two hosts
    f16 = ["--config.train.max_steps=3", "--config.optim.epochs=3", "--config.model.dtype=float16"]
    f16 += ["--config.optim.loss_scale=1073741824"]  # 2**30: every update overflows
    one = subprocess.run(_main_args(records, tmp_path / "one16", *f16), cwd=REPO, env=env(8),
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    shutil.rmtree(tmp_path / "two")
    two_processes(*f16)
    for name in ("one16", "two"):
        assert json.loads((tmp_path / name / "metrics.json").read_text())["skipped_updates"] == 3
    np.testing.assert_allclose(
        losses(tmp_path / "two"), losses(tmp_path / "one16"), atol=1e-3, rtol=0
    )


def _start_two_processes(
    records, workdirs, *extra, stderr=subprocess.PIPE, ctrl_c_in_1=None, sigterm_in_1=None
):
    """``main`` started as two processes of 4 CPU devices on localhost (process i in
    workdirs[i]), stdout piped; with ``ctrl_c_in_1`` (a target of
    ``helpers.interrupt_after``), process 1 gets SIGINT once that target has returned, with
    ``sigterm_in_1`` SIGTERM."""
    import portpicker

    port = portpicker.pick_unused_port()
    env = _env() | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    if sigterm_in_1:
        ctrl_c_in_1, env["SIGNAL_AFTER"] = sigterm_in_1, "SIGTERM"

    def command(i):
        args = _main_args(
            records,
            workdirs[i],
            "--config.distributed.initialize=True",
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
            *extra,
        )
        assert args[:3] == [sys.executable, "-m", "signnet_jax.main"]
        if i == 1 and ctrl_c_in_1:
            return interrupt_after_command(ctrl_c_in_1, "signnet_jax.main", *args[3:])
        return args

    return [
        subprocess.Popen(
            command(i),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def _run_two_processes(
    records, workdirs, *extra, ctrl_c_in_1=None, sigterm_in_1=None
) -> list[tuple[int, str, str]]:
    """``_start_two_processes`` to the end: (exit status, stdout, stderr) of each, killed
    after 300 s."""
    procs = _start_two_processes(
        records, workdirs, *extra, ctrl_c_in_1=ctrl_c_in_1, sigterm_in_1=sigterm_in_1
    )
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()  # a hung pair must not outlive the test
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs, strict=True)]


@pytest.mark.heavy
def test_a_workdir_the_hosts_do_not_share_is_named_on_every_host(records, tmp_path):
    # each process its own folder, as with a local path on each host of a pod: the first
    # checkpoint used to hang (orbax waits for files process 0 made), without a time limit
    runs = _run_two_processes(records, [tmp_path / "w0", tmp_path / "w1"])
    for i, (code, _, err) in enumerate(runs):
        assert code == 1, err[-3000:]
        assert err.splitlines()[-1] == (
            f"error: --workdir {tmp_path / f'w{i}'} is not one folder for all 2 processes: "
            "process 1 does not see what process 0 writes there (all of them write each "
            "checkpoint together); give a folder every host shares: a shared filesystem, or a "
            "bucket mounted with gcsfuse"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the check leaves nothing


def test_a_workdir_process_0_cannot_write_stops_every_process(tmp_path, monkeypatch):
    from jax.experimental import multihost_utils

    from signnet_jax import files

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    gathered = []

    def allgather(x):  # process 1 has nothing to write: only process 0's flag counts
        gathered.append(int(x))
        return np.array([int(x), 0])

    def read_only(path, data, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    monkeypatch.setattr(files, "atomic_write", read_only)
    with pytest.raises(train.TrainingError) as e:
        train.check_shared_workdir(tmp_path / "w")
    assert str(e.value) == (
        f"cannot write in --workdir {tmp_path / 'w'}: Permission denied; give a folder every "
        "host can write to"
    )
    assert gathered == [1]  # the others learn it in the first agreement, before any barrier


@pytest.mark.heavy
def test_a_damaged_record_on_one_host_stops_both_with_their_messages(records, tmp_path):
    # each record is read by one host only: that host used to raise alone while the other
    # waited in the step's collectives until JAX's health check aborted both, minutes later
    copy, shard = _damaged_copy(records, tmp_path, "train")
    runs = _run_two_processes(copy, [tmp_path / "w"] * 2, "--config.val_split=")
    assert [code for code, _, _ in runs] == [1, 1], [err[-2000:] for _, _, err in runs]
    last = [err.splitlines()[-1] for _, _, err in runs]
    reader = next(i for i, line in enumerate(last) if "data CRC mismatch" in line)
    assert last[reader] == (
        f"error: {shard}: record 0: data CRC mismatch (corrupted record): the records in "
        f"{copy} are damaged; restore the file from a good copy, or build the records again "
        "(python -m data_prep.build_records)"
    )
    assert re.fullmatch(
        rf"error: process {reader} stopped on an error in its input at step \d+ \(its message "
        rf"says what\); the checkpoints in {re.escape(str(tmp_path / 'w' / 'checkpoints'))} "
        r"are intact: once it is fixed, the same command resumes",
        last[1 - reader],
    ), last


@pytest.mark.heavy
def test_a_damaged_record_on_one_host_stops_both_in_evaluation_too(records, tmp_path):
    copy, shard = _damaged_copy(records, tmp_path, "test")
    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    init = _converted(tmp_path, DIMS, names)
    # one view per video: each video's record is read by one process only
    runs = _run_two_processes(copy, [tmp_path / "w"] * 2, "--config.mode=eval",
                              "--config.test_split=test", "--config.data.test_num_segment=1",
                              f"--config.init_from={init}")  # fmt: skip
    assert [code for code, _, _ in runs] == [1, 1], [err[-2000:] for _, _, err in runs]
    last = [err.splitlines()[-1] for _, _, err in runs]
    reader = next(i for i, line in enumerate(last) if "data CRC mismatch" in line)
    assert last[reader].startswith(f"error: {shard}: record 0: data CRC mismatch")
    assert last[1 - reader] == (
        f"error: process {reader} stopped on an error in its input while evaluating the test "
        "split (its message says what)"
    )
    assert not (tmp_path / "w" / "eval").exists()


def test_work_done_by_process_0_first_stops_every_process_when_it_fails(monkeypatch):
    from jax.experimental import multihost_utils

    calls = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    # process 1's view: process 0 failed in the first turn, so it never runs the work itself
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.array([1, int(x)]))
    with pytest.raises(train.TrainingError) as e:
        train.first_on_process_0(lambda: calls.append("ran"), "make the smoke dataset")
    assert str(e.value) == "process 0 failed to make the smoke dataset; see its message"
    assert calls == []
    # process 1 failing in its own turn raises its own error, after the agreement
    gathered = []
    monkeypatch.setattr(
        multihost_utils,
        "process_allgather",
        lambda x: gathered.append(int(x)) or np.array([0, int(x)]),
    )

    def fails():
        raise train.TrainingError("config.smoke: other options")

    with pytest.raises(train.TrainingError, match="^config.smoke: other options$"):
        train.first_on_process_0(fails, "make the smoke dataset")
    assert gathered == [0, 1]  # it took part in both agreements


@pytest.mark.heavy
def test_sigterm_to_one_of_two_processes_in_a_validation_stops_both_and_resumes(records, tmp_path):
    # only the second host is told, as hosts of a slice see the notice at different moments;
    # it comes as its first validation starts (eval_step's first call compiled it at
    # start-up): both stop at the same validation batch and save step 4 unvalidated
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    # the training split's 32 videos: 4 validation batches (a SIGTERM in the last one lets the
    # finished validation stand)
    flags = ("--config.optim.epochs=100", *VAL, "--config.val_split=train")
    runs = _run_two_processes(
        records, [run, run], *flags, sigterm_in_1="signnet_jax.evaluate:eval_step#2"
    )
    assert [code for code, _, _ in runs] == [0, 0], [err[-2000:] for _, _, err in runs]
    assert "preempted (SIGTERM) at step 4: checkpoint saved, exiting" in runs[0][1]
    assert not [line for line in runs[0][1].splitlines() if line.startswith("val step")]
    assert checkpointing.checkpoint_steps(ckpts) == [2, 4]
    assert checkpointing.load_meta(ckpts, 4)["run"]["val_pending"] is True
    # the run goes on from there, both hosts together, first validating step 4 and giving it
    # its score
    runs = _run_two_processes(records, [run, run], *flags, "--config.train.max_steps=6")
    assert [code for code, _, _ in runs] == [0, 0], [err[-2000:] for _, _, err in runs]
    out = runs[0][1]
    assert "resuming from step 4" in out
    assert "validating step 4, whose validation the last stop skipped" in out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("val step")] == [
        "val step 4",
        "val step 6",
    ]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6 and [s for s, _ in metrics["val_top1"]] == [4, 6]
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(ckpts) as mngr:  # process 0 scored it, every host reads it
        assert mngr.metrics(4) == {"val_top1": metrics["val_top1"][0][1], "step": 4}


@pytest.mark.heavy
def test_ctrl_c_on_one_of_two_processes_saves_and_stops_both(records, tmp_path):
    # the host that raised KeyboardInterrupt alone used to leave the other waiting in the
    # step's collectives until JAX's health check ended it, with nothing saved
    run = tmp_path / "run"
    procs = _start_two_processes(
        records, [run, run], "--config.optim.epochs=100",
        "--config.train.checkpoint_every_steps=1000",
    )  # fmt: skip
    try:
        _wait_for(procs[0], "step 3/")
        procs[1].send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()  # a hung pair must not outlive the test
    assert [p.returncode for p in procs] == [130, 130], [err[-2000:] for _, err in outs]
    stop = int(outs[0][0].split("interrupted (Ctrl-C) at step ")[1].split(":")[0])
    assert checkpointing.checkpoint_steps(run / "checkpoints") == [stop]
    for _, err in outs:
        assert err.splitlines()[-1] == (
            f"interrupted: checkpoints saved up to step {stop} in {run / 'checkpoints'}; the "
            "same command resumes from the latest"
        )
    assert CTRL_C_NOTICE in outs[1][1]
    assert "Ctrl-C on process" not in outs[0][1]


CTRL_C_NOTICE = (
    "Ctrl-C on process 1: every process stops at the same point (training saves its step "
    "first); Ctrl-C again stops this one at once"
)


@pytest.mark.heavy
def test_ctrl_c_on_one_of_two_processes_in_a_validation_saves_the_step(records, tmp_path):
    # process 1 gets SIGINT as its first validation starts (eval_step's first call compiled
    # it at start-up): both stop at the same validation batch and save step 4 unvalidated
    run = tmp_path / "run"
    runs = _run_two_processes(
        records, [run, run], "--config.optim.epochs=100", *VAL,
        "--config.train.checkpoint_every_steps=1000",
        ctrl_c_in_1="signnet_jax.evaluate:eval_step#2",
    )  # fmt: skip
    assert [code for code, _, _ in runs] == [130, 130], [err[-2000:] for _, _, err in runs]
    assert "interrupted (Ctrl-C) at step 4: checkpoint saved" in runs[0][1]
    assert not [line for line in runs[0][1].splitlines() if line.startswith("val step")]
    assert checkpointing.checkpoint_steps(run / "checkpoints") == [4]
    for _, _, err in runs:
        assert err.splitlines()[-1] == (
            f"interrupted: checkpoints saved up to step 4 in {run / 'checkpoints'}; the same "
            "command resumes from the latest"
        )
    assert CTRL_C_NOTICE in runs[1][2]


@pytest.mark.heavy
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_to_one_of_two_processes_while_they_set_up_saves_an_early_step(
    records, tmp_path, sig
):
    # process 1 is signalled once its setup has read the records. A Ctrl-C used to stop it
    # alone and leave the other waiting in setup's collectives (checkpoint, compile checks,
    # first step); jax.distributed's own SIGTERM handler, which nothing reads, used to take a
    # SIGTERM: the hosts trained on until killed
    run = tmp_path / "run"
    target = "signnet_jax.train:prepare"
    runs = _run_two_processes(
        records, [run, run], "--config.optim.epochs=100",
        "--config.train.checkpoint_every_steps=1000",
        **({"ctrl_c_in_1": target} if sig == "SIGINT" else {"sigterm_in_1": target}),
    )  # fmt: skip
    codes = [code for code, _, _ in runs]
    assert codes == ([130, 130] if sig == "SIGINT" else [0, 0]), [e[-2000:] for *_, e in runs]
    # the stop code travels with step 1's batch and is read after step 2 (no wait per step)
    assert (
        "interrupted (Ctrl-C) at step 2: checkpoint saved"
        if sig == "SIGINT"
        else "preempted (SIGTERM) at step 2: checkpoint saved, exiting"
    ) in runs[0][1]
    assert checkpointing.checkpoint_steps(run / "checkpoints") == [2]
    if sig == "SIGINT":
        assert CTRL_C_NOTICE in runs[1][2]


def _evaluate_on_two_processes(records, tmp_path, **signal_in_1):
    """Eval mode of a converted checkpoint as two processes in ``tmp_path / "w"``, process 1
    signalled as ``_start_two_processes`` says: (runs, workdir)."""
    names = json.loads((records / "dataset_info.json").read_text())["classes"]
    init = _converted(tmp_path, DIMS, names)
    w = tmp_path / "w"
    runs = _run_two_processes(
        records, [w, w], "--config.mode=eval", "--config.test_split=test",
        f"--config.init_from={init}", **signal_in_1,
    )  # fmt: skip
    return runs, w


@pytest.mark.heavy
@pytest.mark.parametrize(
    "target",
    [
        "signnet_jax.sharding:global_batch",  # its first test batch is put together
        "signnet_jax.train:prepare",  # while setting up
    ],
)
def test_ctrl_c_on_one_of_two_processes_in_evaluation_stops_both(records, tmp_path, target):
    runs, w = _evaluate_on_two_processes(records, tmp_path, ctrl_c_in_1=target)
    assert [code for code, _, _ in runs] == [130, 130], [err[-2000:] for _, _, err in runs]
    for _, _, err in runs:
        assert err.splitlines()[-1] == (
            "interrupted: the evaluation did not finish (no metrics.json written); run it again"
        )
    assert CTRL_C_NOTICE in runs[1][2]
    assert not (w / "eval").exists()


@pytest.mark.heavy
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_to_one_of_two_processes_in_the_final_test_stops_both(records, tmp_path, sig):
    # the batches of steps 1 and 2, then the test's: process 1 is signalled in its first
    run = tmp_path / "run"
    target = "signnet_jax.sharding:global_batch#3"
    runs = _run_two_processes(
        records, [run, run], "--config.train.max_steps=2", "--config.test_split=test",
        "--config.data.num_workers=0",
        **({"ctrl_c_in_1": target} if sig == "SIGINT" else {"sigterm_in_1": target}),
    )  # fmt: skip
    codes = [code for code, _, _ in runs]
    assert codes == ([130, 130] if sig == "SIGINT" else [0, 0]), [e[-2000:] for *_, e in runs]
    out = runs[0][1]  # process 0 logs
    assert "test split (3 views per video" not in out
    if sig == "SIGTERM":
        assert "preempted (SIGTERM) in the final test: step 2 is saved, and the same command " \
            "runs the test again" in out  # fmt: skip
    for _, _, err in runs if sig == "SIGINT" else []:
        assert err.splitlines()[-1] == (
            f"interrupted: checkpoints saved up to step 2 in {run / 'checkpoints'}; the same "
            "command resumes from the latest"
        )
    assert not (run / "metrics.json").exists()
    assert checkpointing.checkpoint_steps(run / "checkpoints") == [2]


@pytest.mark.heavy
@pytest.mark.parametrize("batch", [1, 3])  # the test split's 24 views: 3 batches of 8
def test_sigterm_to_one_of_two_processes_in_evaluation_stops_both(records, tmp_path, batch):
    target = f"signnet_jax.sharding:global_batch#{batch}"
    runs, w = _evaluate_on_two_processes(records, tmp_path, sigterm_in_1=target)
    if batch == 3:  # in the last batch: the finished evaluation stands
        assert [code for code, _, _ in runs] == [0, 0], [err[-2000:] for _, _, err in runs]
        assert len(list(w.glob("eval/*/metrics.json"))) == 1
        return
    assert [code for code, _, _ in runs] == [143, 143], [err[-2000:] for _, _, err in runs]
    for _, _, err in runs:
        assert err.splitlines()[-1] == (
            "preempted (SIGTERM): the evaluation did not finish (no metrics.json written); run "
            "it again"
        )
    assert not (w / "eval").exists()


def _soon(condition, timeout=10.0) -> bool:
    """Whether ``condition()`` holds within ``timeout`` seconds (polled)."""
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


def test_on_several_hosts_the_first_ctrl_c_is_a_stop_code_the_runs_share():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with train.AgreedCtrlC(True) as outer, train.Preemption() as stop:
            assert stop.code == 0
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.code == train.STOP_PREEMPTED
            # a validation inside training: its own use installs nothing, sees the same flag
            with train.AgreedCtrlC(True) as inner:
                # counted; nothing is raised; a second SIGINT at once (a launcher forwarding
                # the terminal's too) is the same press, not the one that ends the process
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
                assert _soon(lambda: inner.interrupted) and outer.interrupted
                time.sleep(0.2)  # the process is still here
            assert stop.code == train.STOP_INTERRUPTED  # Ctrl-C outranks SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd was given back
        with train.AgreedCtrlC(True) as fresh:  # the next run starts clear
            assert not fresh.interrupted
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        # one host: Ctrl-C raises as usual, at once
        with train.AgreedCtrlC(False) as one, pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert not one.interrupted
        # inherited as ignored (`cmd &`): stays ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with train.AgreedCtrlC(True) as ignored:
            os.kill(os.getpid(), signal.SIGINT)
            assert not _soon(lambda: ignored.interrupted, timeout=0.5)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# process 0 waits in a collective for process 1, which is stuck; process 0 gets two Ctrl-Cs
_STUCK_PEER = """
import os, signal, sys, threading, time
import jax, numpy as np
from jax.experimental import multihost_utils
from signnet_jax import train
pid, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
multihost_utils.process_allgather(np.int32(0))
if pid == 1:
    time.sleep(120)  # stuck
    sys.exit(0)
def ctrl_c_twice():
    for _ in range(2):
        time.sleep(3)
        print("sending SIGINT", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
threading.Thread(target=ctrl_c_twice, daemon=True).start()
with train.AgreedCtrlC(True):
    t = time.time()
    multihost_utils.process_allgather(np.int32(0))
print(f"the collective returned after {time.time() - t:.0f} s", flush=True)
"""


@pytest.mark.heavy
def test_a_second_ctrl_c_stops_a_host_waiting_in_a_collective_for_a_stuck_one():
    # a Python signal handler runs only when the main thread is back in Python, which it is
    # not while it waits in a collective: both Ctrl-Cs used to wait for the stuck host
    import portpicker

    port = str(portpicker.pick_unused_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _STUCK_PEER, str(i), port],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 130, err[-3000:]
    # no "the collective returned" line: it ended at the second Ctrl-C, inside the wait
    assert [line for line in out.splitlines() if not line.startswith("[Gloo]")] == [
        "sending SIGINT",
        "sending SIGINT",
    ]
    assert CTRL_C_NOTICE.replace("process 1", "process 0") in err  # at the first, not after
    assert err.splitlines()[-1] == (
        "interrupted again: process 0 stopped at once; a checkpoint it was writing is left "
        "unfinished, which is never restored"
    )


def test_an_input_that_fails_after_a_ctrl_c_stops_every_host_as_interrupted():
    # a Ctrl-C reaches the input workers too and kills them while they start up: on the host
    # that got it, the failed input used to be an input error on every host (exit 1, no save)
    spec = {"label": ((8,), np.int32), "stop": ((8,), np.int32)}

    def failing():
        raise RuntimeError("Worker process was terminated unexpectedly")
        yield

    for ctrl_c in (False, True):
        train.AgreedCtrlC._requested = ctrl_c
        try:
            batches = train._LocalBatches(failing(), spec)
            local = batches.next(0)
        finally:
            train.AgreedCtrlC._requested = False
        assert (local["label"] == 0).all()  # zero rows: no host updates in this step
        code = int(local["stop"][0])
        assert code == (train.STOP_FAILED + 1 if ctrl_c else train.STOP_FAILED)
        other = train._LocalBatches(iter([]), spec)  # a host whose input is fine
        if ctrl_c:
            for host in (batches, other):
                with pytest.raises(KeyboardInterrupt):
                    host.raise_if_stopped(code, 5, "ckpts")
        else:
            with pytest.raises(RuntimeError, match="terminated unexpectedly"):
                batches.raise_if_stopped(code, 5, "ckpts")
            with pytest.raises(train.TrainingError, match="^process 0 stopped on an error"):
                other.raise_if_stopped(code, 5, "ckpts")
    # below the input codes nothing is raised
    other.raise_if_stopped(train.STOP_INTERRUPTED, 5, "ckpts")


@pytest.mark.heavy
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("when", ["workers starting", "workers running"])
def test_a_signal_to_the_process_group_is_left_to_the_trainer(records, tmp_path, sig, when):
    # a terminal's Ctrl-C and a scheduler's SIGTERM reach the input workers too. Started
    # with `spawn`, they import the command's module again for seconds, and died there: with
    # a traceback each (Ctrl-C), or failing the batch the trainer waited for ("Worker process
    # was terminated unexpectedly") instead of letting it save (SIGTERM). Once running, a
    # Ctrl-C left their prefetched batches to Python's resource tracker, which warned of
    # "leaked shared_memory objects".
    w = tmp_path / "w"
    proc = subprocess.Popen(
        _main_args(records, w, "--config.data.num_workers=2"),
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job
    )  # fmt: skip
    try:
        if when == "workers starting":  # the loop's first batch starts them right after
            _wait_for(proc, "training a ViT")
            time.sleep(0.3)
        else:
            _wait_for(proc, "step 3/")  # not a checkpoint step
        os.killpg(proc.pid, getattr(signal, sig))
        out, err = _exit_or_stacks(proc, 120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the input workers too
            os.killpg(proc.pid, signal.SIGKILL)
    steps = checkpointing.checkpoint_steps(w / "checkpoints")
    for bad in ("Traceback", "leaked shared_memory", "terminated unexpectedly"):
        assert bad not in err, err[-3000:]
    if sig == "SIGTERM":
        assert proc.returncode == 0, err[-3000:]
        assert f"preempted (SIGTERM) at step {steps[-1]}: checkpoint saved, exiting" in out
    else:
        assert proc.returncode == 130, err[-3000:]
        assert err.splitlines()[-1:] == [
            f"interrupted: checkpoints saved up to step {steps[-1]} in {w / 'checkpoints'}; "
            "the same command resumes from the latest"
            if steps
            else f"interrupted: no checkpoint saved yet in {w / 'checkpoints'}; the same "
            "command starts the run again"
        ]


def _sigint_inside_condition_notify():
    """A tracer for ``sys.settrace`` that sends SIGINT once ``threading.Condition.notify`` has
    woken a waiting thread and not yet taken its waiter off the list (whether it came there
    by chance is the trace's list)."""
    lines, start = inspect.getsourcelines(threading.Condition.notify)
    (at,) = [start + i for i, line in enumerate(lines) if "waiters.remove(waiter)" in line]
    sent = []

    def in_notify(frame, event, arg):
        if event == "line" and frame.f_lineno == at and not sent:
            sent.append(signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return in_notify

    def tracer(frame, event, arg):
        return in_notify if frame.f_code is threading.Condition.notify.__code__ else None

    return tracer, sent


def test_ctrl_c_while_scalars_are_written_leaves_tensorboard_closable(tmp_path):
    # a Ctrl-C inside Condition.notify, as tensorboardX's queue woke its feeder thread, left
    # that thread asleep: the writer's close() then waited forever (once in some 10 Ctrl-Cs
    # to a training run under load, logging every step). Now it is raised after the write.
    writer = train._summary_writer(tmp_path)
    train._scalars(writer, 1, {"train/loss": 1.0})  # starts the feeder; it then waits
    waiting = writer.file_writer.event_writer._event_queue._notempty._waiters
    deadline = time.monotonic() + 10
    while not waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert waiting, "tensorboardX's feeder thread never waited"
    tracer, sent = _sigint_inside_condition_notify()
    sys.settrace(tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            train._scalars(writer, 2, {"train/loss": 0.5})
    finally:
        sys.settrace(None)
    assert sent == [signal.SIGINT]
    closing = threading.Thread(target=writer.close, daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive(), "the TensorBoard writer's close() hangs"
    assert _tensorboard_scalars(tmp_path) == {"train/loss": {1: 1.0, 2: 0.5}}


def test_sigterm_is_the_process_flag_while_a_preemption_is_entered():
    previous = signal.getsignal(signal.SIGTERM)
    with train.Preemption() as outer:  # main's, on several hosts
        assert not outer.requested and outer.code == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert outer.requested and outer.code == train.STOP_PREEMPTED
        with train.Preemption() as inner:  # the training loop's inside it: the same flag
            assert inner.requested
        assert signal.getsignal(signal.SIGTERM) is train._note_sigterm  # main's stays
    assert signal.getsignal(signal.SIGTERM) is previous
    with train.Preemption(active=False) as fresh:  # the next use starts clear
        assert not fresh.requested
        assert signal.getsignal(signal.SIGTERM) is previous  # installs nothing


def test_sigterm_on_a_checkpoint_step_saves_it_once(records, tmp_path, monkeypatch):
    from signnet_jax import sharding

    calls = []
    real = sharding.global_batch

    def batch_then_signal(local, mesh):
        calls.append(1)
        if len(calls) == 4:  # during step 4, itself a checkpoint step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(local, mesh)

    monkeypatch.setattr(sharding, "global_batch", batch_then_signal)
    c = tiny_config(
        records, **{"train.checkpoint_every_steps": 2, "val_split": "", "test_split": ""}
    )
    assert train.train_and_evaluate(c, tmp_path) == {"preempted_at": 4}
    assert checkpointing.checkpoint_steps(tmp_path / "checkpoints") == [2, 4]


def test_sigterm_before_a_validation_saves_the_step_without_validating(
    records, tmp_path, monkeypatch, capsys
):
    # a preemption's grace period is short: the validation due at step 4 used to run first
    from signnet_jax import sharding

    calls = []
    real = sharding.global_batch

    def batch_then_signal(local, mesh):
        calls.append(1)
        if len(calls) == 4:  # during step 4, the end of the first epoch
            os.kill(os.getpid(), signal.SIGTERM)
        return real(local, mesh)

    monkeypatch.setattr(sharding, "global_batch", batch_then_signal)
    c = tiny_config(records, **{"test_split": "", "train.val_every_epochs": 1})
    assert train.train_and_evaluate(c, tmp_path) == {"preempted_at": 4}
    out = capsys.readouterr().out
    assert "preempted (SIGTERM) at step 4: checkpoint saved, exiting" in out
    assert not [line for line in out.splitlines() if line.startswith("val step")]
    assert checkpointing.checkpoint_steps(tmp_path / "checkpoints") == [4]


def test_sigterm_in_a_validation_cuts_it_short_and_the_resumed_run_validates_that_step(
    records, tmp_path, monkeypatch, capsys
):
    # a validation can outlast a preemption's grace period: it used to run to its end first
    import orbax.checkpoint as ocp

    from signnet_jax import sharding

    kw = {
        "test_split": "",
        "train.val_every_epochs": 1,  # validations at steps 4, 8 and 12
        "train.checkpoint_every_steps": 2,
        "mesh.num_devices": 4,
        "data.eval_batch_size": 4,  # 2 batches per validation
    }
    whole = train.train_and_evaluate(tiny_config(records, **kw), tmp_path / "whole")
    assert [s for s, _ in whole["val_top1"]] == [4, 8, 12]
    capsys.readouterr()
    real, eval_batches = sharding.global_batch, []

    def signal_in_the_second_validation(local, mesh):
        if "valid" in local:  # an evaluation batch
            eval_batches.append(1)
            if len(eval_batches) == 3:  # the first batch of step 8's validation
                os.kill(os.getpid(), signal.SIGTERM)
        return real(local, mesh)

    monkeypatch.setattr(sharding, "global_batch", signal_in_the_second_validation)
    c = tiny_config(records, **kw)
    w = tmp_path / "w"
    assert train.train_and_evaluate(c, w) == {"preempted_at": 8}
    assert len(eval_batches) == 3  # stopped before the validation's second batch
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("val step")] == [
        "val step 4"
    ]
    assert "preempted (SIGTERM) at step 8: checkpoint saved, exiting" in out
    ckpts = w / "checkpoints"
    assert checkpointing.checkpoint_steps(ckpts) == [4, 6, 8]
    assert checkpointing.load_meta(ckpts, 8)["run"]["val_pending"] is True
    with ocp.CheckpointManager(ckpts) as mngr:
        assert mngr.metrics(8) is None

    monkeypatch.setattr(sharding, "global_batch", real)
    c.train.max_steps = 8  # first only the skipped validation (later steps would drop step 8)
    train.train_and_evaluate(c, w)
    out = capsys.readouterr().out
    assert "validating step 8, whose validation the last stop skipped" in out
    assert checkpointing.checkpoint_steps(ckpts) == [4, 6, 8]
    with ocp.CheckpointManager(ckpts) as mngr:  # scored in place: it can be the best
        assert mngr.metrics(8) == {"val_top1": whole["val_top1"][1][1], "step": 8}
    c.train.max_steps = 0
    resumed = train.train_and_evaluate(c, w)
    assert "validating step" not in capsys.readouterr().out  # scored: its point from there
    assert resumed["val_top1"] == whole["val_top1"]  # step 8's too, and nothing twice
    assert resumed["best_val_top1"] == whole["best_val_top1"]
    jax.tree.map(np.testing.assert_array_equal, _final_params(w), _final_params(tmp_path / "whole"))


def test_a_skipped_validation_scores_even_the_only_checkpoint_and_runs_once(
    records, tmp_path, monkeypatch, capsys
):
    # nothing is deleted or saved again: the score is written into the step in place
    from signnet_jax import sharding

    real, calls = sharding.global_batch, []

    def batch_then_signal(local, mesh):
        calls.append(1)
        if len(calls) == 4:  # during step 4, the first checkpoint and validation
            os.kill(os.getpid(), signal.SIGTERM)
        return real(local, mesh)

    monkeypatch.setattr(sharding, "global_batch", batch_then_signal)
    c = tiny_config(records, **{"test_split": "", "train.val_every_epochs": 1})
    assert train.train_and_evaluate(c, tmp_path) == {"preempted_at": 4}
    monkeypatch.setattr(sharding, "global_batch", real)
    ckpts = tmp_path / "checkpoints"
    c.train.max_steps = 4
    first = train.train_and_evaluate(c, tmp_path)
    assert "validating step 4, whose validation the last stop skipped" in capsys.readouterr().out
    assert checkpointing.checkpoint_steps(ckpts) == [4]
    assert checkpointing.select_step(ckpts, "best") == 4
    c.train.max_steps = 5
    resumed = train.train_and_evaluate(c, tmp_path)
    assert "validating step" not in capsys.readouterr().out
    assert [s for s, _ in resumed["val_top1"]] == [4, 5]
    assert resumed["val_top1"][0] == tuple(first["val_top1"][0])
    assert checkpointing.checkpoint_steps(ckpts) == [4, 5]


def _failing_call(real, n: int, error: Exception):
    """``real``, but its ``n``-th call raises ``error``."""
    calls = []

    def call(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    return call


def test_a_failed_validation_saves_its_step_unvalidated_and_the_resumed_run_validates_it(
    records, tmp_path, monkeypatch, capsys
):
    # steps 5-8 were trained and lost when step 8's validation met a damaged val record: the
    # step was saved only after its validation
    from signnet_jax import evaluate

    kw = {"test_split": "", "train.val_every_epochs": 1, "train.checkpoint_every_steps": 100}
    whole = train.train_and_evaluate(tiny_config(records, **kw), tmp_path / "whole")
    assert [s for s, _ in whole["val_top1"]] == [4, 8, 12]
    capsys.readouterr()
    real = evaluate.evaluate_split
    damaged = train.TrainingError("shard val-00000: record 3 fails its checksum")
    monkeypatch.setattr(evaluate, "evaluate_split", _failing_call(real, 2, damaged))
    c = tiny_config(records, **kw)

    def ends_with_the_damaged_record(workdir) -> str:
        """The run's output; it ends with the validation's error."""
        with pytest.raises(train.TrainingError, match=f"^{re.escape(str(damaged))}$"):
            train.train_and_evaluate(c, workdir)
        return capsys.readouterr().out

    w = tmp_path / "w"
    assert (
        "the validation of step 8 failed: step 8 is saved unvalidated, and the same command "
        "validates it when it resumes"
    ) in ends_with_the_damaged_record(w)
    ckpts = w / "checkpoints"
    assert checkpointing.checkpoint_steps(ckpts) == [4, 8]
    assert checkpointing.load_meta(ckpts, 8)["run"]["val_pending"] is True

    monkeypatch.setattr(evaluate, "evaluate_split", real)  # the record mended
    resumed = train.train_and_evaluate(c, w)
    out = capsys.readouterr().out
    assert "resuming from step 8" in out
    assert "validating step 8, whose validation the last stop skipped" in out
    assert resumed["val_top1"] == whole["val_top1"]
    jax.tree.map(np.testing.assert_array_equal, _final_params(w), _final_params(tmp_path / "whole"))

    # a failure after the curve took step 8's point (drawing it): saved without the point, so
    # the resumed run, which validates step 8, does not count it twice
    real_plot = train.plot_training_curves
    full = OSError("No space left on device")  # the first plot is step 4's validation's
    monkeypatch.setattr(train, "plot_training_curves", _failing_call(real_plot, 2, full))
    w2 = tmp_path / "w2"
    with pytest.raises(OSError, match="No space left on device"):
        train.train_and_evaluate(c, w2)
    assert checkpointing.checkpoint_steps(w2 / "checkpoints") == [4, 8]
    run = checkpointing.load_meta(w2 / "checkpoints", 8)["run"]
    assert run["val_pending"] is True and [s for s, _ in run["val_top1"]] == [4]
    monkeypatch.setattr(train, "plot_training_curves", real_plot)
    assert train.train_and_evaluate(c, w2)["val_top1"] == whole["val_top1"]
    capsys.readouterr()

    # the save failing too: the validation's error is the one the run ends with
    monkeypatch.setattr(evaluate, "evaluate_split", _failing_call(real, 2, damaged))
    real_save = train._save

    def save_fails_at_8(ckpt, step, *args):
        if step == 8:
            raise OSError("Read-only file system")
        return real_save(ckpt, step, *args)

    monkeypatch.setattr(train, "_save", save_fails_at_8)
    w3 = tmp_path / "w3"
    assert (
        "the validation of step 8 failed, and step 8 could not be saved either (Read-only file "
        "system); the same command goes on from the last saved step"
    ) in ends_with_the_damaged_record(w3)
    assert checkpointing.checkpoint_steps(w3 / "checkpoints") == [4]


def test_sigterm_in_the_final_test_stops_it_and_the_same_command_runs_it_again(
    records, tmp_path, monkeypatch, capsys
):
    from signnet_jax import sharding

    real, test_batches = sharding.global_batch, []

    def signal_in_the_test(local, mesh):
        if "valid" in local:  # a test batch (no validation split here)
            test_batches.append(1)
            if len(test_batches) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(local, mesh)

    monkeypatch.setattr(sharding, "global_batch", signal_in_the_test)
    kw = {"val_split": "", "train.max_steps": 2, "mesh.num_devices": 4}
    c = tiny_config(records, **kw, **{"data.eval_batch_size": 4})  # 6 test batches
    assert train.train_and_evaluate(c, tmp_path) == {"preempted_at": 2}
    assert test_batches == [1]  # stopped before the second
    assert "preempted (SIGTERM) in the final test: step 2 is saved, and the same command " \
        "runs the test again" in capsys.readouterr().out  # fmt: skip
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.setattr(sharding, "global_batch", real)
    again = train.train_and_evaluate(c, tmp_path)
    assert "resuming from step 2" in capsys.readouterr().out
    assert again["steps"] == 2 and (tmp_path / "metrics.json").exists()
    assert again["test"]["num_videos"] == 8


def test_profile_traces_the_configured_steps(records, tmp_path, capsys):
    import gzip

    kw = {"train.max_steps": 4, "val_split": "", "test_split": ""}
    c = tiny_config(records, **kw, **{"train.profile_steps": 2, "train.profile_start": 1})
    traced = train.train_and_evaluate(c, tmp_path / "w")
    out = capsys.readouterr().out
    logdir = tmp_path / "w" / "tensorboard"
    assert f"profile of steps 2-3 written to {logdir}/plugins/profile" in out
    (run,) = (logdir / "plugins" / "profile").iterdir()
    assert len(list(run.glob("*.xplane.pb"))) == 1
    (perfetto,) = run.glob("*perfetto_trace.json.gz")
    events = json.loads(gzip.decompress(perfetto.read_bytes()))
    names = {e.get("name", "") for e in events["traceEvents"]}
    assert sum("train_step" in n for n in names) >= 1  # the compiled step ran inside the trace
    # tracing changes nothing that is computed
    plain = train.train_and_evaluate(tiny_config(records, **kw), tmp_path / "plain")
    np.testing.assert_array_equal(_losses(traced), _losses(plain))
    assert not (tmp_path / "plain" / "tensorboard" / "plugins").exists()
    # resumed past profile_start: the trace starts after this run's first step
    more = {**kw, "train.max_steps": 8, "train.profile_steps": 2, "train.profile_start": 1}
    train.train_and_evaluate(tiny_config(records, **more), tmp_path / "w")
    assert f"profile of steps 6-7 written to {logdir}/plugins/profile" in capsys.readouterr().out
    # a window that cannot start is said so
    late = {**kw, "train.profile_steps": 2, "train.profile_start": 10}
    train.train_and_evaluate(tiny_config(records, **late), tmp_path / "late")
    assert (
        "warning: train.profile_steps: no step to trace after step 10 (this run ends at step 4)"
        in capsys.readouterr().out
    )
    with pytest.raises(train.TrainingError, match=r"^train.profile_steps=-1 \(least 0\): set it"):
        train.train_and_evaluate(
            tiny_config(records, **kw, **{"train.profile_steps": -1}), tmp_path / "bad"
        )
    assert not (tmp_path / "bad").exists()


def test_counts_below_their_least_value_are_refused_before_anything_is_written(records, tmp_path):
    # keep_checkpoints=0 would delete every checkpoint it saved (a preemption's included);
    # log_every=0 failed with a ZeroDivisionError after the first step
    # val_every_epochs=0 validated every epoch as 1 does
    bad = {"train.log_every": 0, "train.keep_checkpoints": 0, "train.checkpoint_every_steps": -2}
    bad["train.val_every_epochs"] = 0
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(tiny_config(records, **bad), tmp_path / "w")
    assert str(e.value) == (
        "train.log_every=0 (least 1), train.keep_checkpoints=0 (least 1), "
        "train.checkpoint_every_steps=-2 (least 0), train.val_every_epochs=0 (least 1): set "
        "them higher"
    )
    assert not (tmp_path / "w").exists()


def test_values_out_of_range_are_refused_together_before_anything_is_written(records, tmp_path):
    # test_num_segment=0 used to fail in the final test, after the whole training; flip,
    # rand_augment and sampling_rate with a traceback from the input pipeline; reprob=2 and
    # label_smoothing=1.5 trained without a word
    bad = {
        "data.flip": "mirror",
        "data.rand_augment": "rand-zz",
        "data.sampling_rate": 0,
        "data.test_num_segment": 0,
        "data.reprob": 2.0,
        "loss.label_smoothing": 1.5,
        "optim.layer_decay": 0.0,
    }
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(tiny_config(records, **bad), tmp_path / "w")
    assert str(e.value) == (
        "data.sampling_rate=0 (a whole number >= 1), data.test_num_segment=0 (a whole number "
        ">= 1), data.reprob=2.0 (0 to 1), loss.label_smoothing=1.5 (at least 0 and below 1), "
        "optim.layer_decay=0.0 (above 0 and at most 1; 1: no decay), data.flip='mirror' (plain as "
        "published, hht or none), data.rand_augment='rand-zz' (unknown part 'zz' (known: m, n, "
        "mstd, inc); the recipe's is 'rand-m7-n4-mstd0.5-inc1', '' turns it off): change them"
    )
    assert not (tmp_path / "w").exists()
    # the edges of the ranges are values
    edges = {
        "data.reprob": 1.0,
        "loss.label_smoothing": 0.0,
        "loss.mixup_prob": 0.0,
        "optim.layer_decay": 1.0,
        "data.rand_augment": "",
        "data.num_workers": 0,
    }
    train.check_value_ranges(tiny_config(records, **edges))
    # eval mode reads the views' settings only, through main
    r = _run(
        _main_args(
            records, tmp_path / "e", "--config.mode=eval", "--config.data.test_num_crop=0",
            "--config.data.flip=mirror",
        )
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.splitlines()[-1] == (
        "error: data.test_num_crop=0 (a whole number >= 1): change it"
    )
    assert not (tmp_path / "e").exists()


def test_bucket_workdir_is_refused_before_anything_is_written(records):
    for mode in ("train", "eval"):
        r = _run(_main_args(records, "gs://bucket/runs/x", f"--config.mode={mode}"))
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.startswith(
            "error: --workdir gs://bucket/runs/x: gs:// paths are not supported; write a local "
            "folder, then copy it with `gsutil -m cp -r LOCAL_DIR gs://bucket/runs/x`"
        ), r.stderr
    assert not (REPO / "gs:").exists()  # no local 'gs:' folder where the command ran


def test_distributed_passes_only_the_values_given():
    from configs import wlasl2000
    from signnet_jax.main import distributed_kwargs

    d = wlasl2000.get_config().distributed
    assert distributed_kwargs(d) == {}  # all detected by JAX (TPU pods, SLURM)
    d.coordinator_address = "10.0.0.1:1234"
    assert distributed_kwargs(d) == {"coordinator_address": "10.0.0.1:1234"}
    d.num_processes, d.process_id = 4, 0
    assert distributed_kwargs(d) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 0,
    }  # fmt: skip


def test_local_device_ids_are_passed_as_a_list():
    from configs import wlasl2000
    from signnet_jax.main import distributed_kwargs

    d = wlasl2000.get_config().distributed
    d.local_device_ids = "0,1"
    assert distributed_kwargs(d) == {"local_device_ids": [0, 1]}
    d.local_device_ids = "gpu0"
    with pytest.raises(ValueError) as e:
        distributed_kwargs(d)
    assert str(e.value) == (
        "--config.distributed.local_device_ids: give device numbers like 0 or 0,1, not 'gpu0'"
    )


def test_a_process_launched_as_one_of_several_needs_distributed(tmp_path):
    from signnet_jax.main import launched_together

    assert launched_together({}) == ""
    assert launched_together({"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"}) == ""
    assert launched_together({"SLURM_STEP_NUM_TASKS": "4"}) == "4 (SLURM_STEP_NUM_TASKS=4)"
    assert launched_together({"OMPI_COMM_WORLD_SIZE": "2"}) == "2 (OMPI_COMM_WORLD_SIZE=2)"
    assert launched_together({"PMI_SIZE": "8"}) == "8 (PMI_SIZE=8)"
    # the whole command: refused before anything is written (it trained alone on each host,
    # all of them writing one workdir)
    r = _run(_main_args(tmp_path / "r", tmp_path / "w"), OMPI_COMM_WORLD_SIZE="2")
    assert (r.returncode, r.stderr) == (1, (
        "error: this process is one of 2 (OMPI_COMM_WORLD_SIZE=2) started together, but "
        "config.distributed.initialize is False: each would train on its own devices alone, "
        "writing into the same workdir; add --config.distributed.initialize=True\n"
    ))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_mesh_num_devices_is_refused_on_several_processes(monkeypatch):
    from signnet_jax import sharding

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    c = tiny_config("unused", **{"mesh.num_devices": 4, "data.batch_size": 8})
    message = (
        "mesh.num_devices=4 takes the first devices, which on 2 processes would leave hosts "
        "without any; leave it at 0 (every device)"
    )
    # training's checks and the eval mode's (both take their devices from mesh_devices)
    for check in (train.check_batch_settings, train.check_eval_batch, train.mesh_devices):
        with pytest.raises(train.TrainingError) as e:
            check(c)
        assert str(e.value) == message
    # a mesh over one process's devices when there are two: refused, not built
    with pytest.raises(ValueError) as e:
        sharding.make_mesh(1, jax.devices()[:4])
    assert str(e.value) == (
        "the mesh's devices belong to 1 of the 2 processes; every process needs devices in it "
        "(use every device)"
    )


def test_training_closes_its_input_pipeline(records, tmp_path, monkeypatch):
    # closing stops the input workers and frees the batches they prefetched (left open, each
    # run ended with grain's shared-memory buffers reported as leaked)
    from signnet_jax.data import pipeline

    closed = []

    class Tracked:
        def __init__(self, it):
            self._it = it

        def __iter__(self):
            return self

        def __next__(self):
            return next(self._it)

        def __getattr__(self, name):
            return getattr(self._it, name)

        def close(self):
            closed.append(True)
            self._it.close()

    real = pipeline.train_dataset
    monkeypatch.setattr(pipeline, "train_dataset", lambda *a, **k: Tracked(iter(real(*a, **k))))
    config = tiny_config(records, **{"train.max_steps": 2, "val_split": "", "test_split": ""})
    train.train_and_evaluate(config, tmp_path / "w")
    assert closed == [True]


def test_grain_worker_batches_leave_no_shared_memory_at_exit(records, tmp_path):
    # With grain worker processes every batch comes in shared memory blocks that the training
    # loop and the eval passes must release; Python's resource tracker names any still there
    # when the process exits ("There appear to be N leaked shared_memory objects").
    tiny = [f"--config.smoke.{k}={v}" for k, v in TINY.items()]
    argv = [
        sys.executable, "-m", "signnet_jax.main", "--config", "configs/smoke.py",
        "--workdir", str(tmp_path / "w"), f"--config.records_dir={records}", *tiny,
        "--config.model.embed_dim=32", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.model.mlp_dim=64", "--config.model.num_frames=4", "--config.model.img_size=32",
        "--config.data.batch_size=8", "--config.data.eval_batch_size=8",
        "--config.data.short_side_size=32", "--config.data.num_workers=2",
        "--config.train.max_steps=2",
    ]  # fmt: skip
    # train: the training stream, one validation pass, the test pass; eval: a test pass alone
    leaks = {}
    for mode in ("train", "eval"):
        r = subprocess.run(
            [*argv, f"--config.mode={mode}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        leaks[mode] = [line for line in r.stderr.splitlines() if "leaked shared_memory" in line]
    assert leaks == {"train": [], "eval": []}


def test_records_lacking_a_listed_file_or_with_a_broken_dataset_info_are_refused_up_front(
    records, tmp_path, monkeypatch
):
    # a missing test shard used to surface after the whole training, a missing index at the
    # first batch, a broken dataset_info.json as a traceback
    copy = tmp_path / "records"
    shutil.copytree(records, copy)
    info_file = copy / "dataset_info.json"
    info = json.loads(info_file.read_text())

    def refused(**over):
        kw = {"smoke.enabled": False, "train.max_steps": 1} | over
        with pytest.raises(train.TrainingError) as e:
            train.train_and_evaluate(tiny_config(copy, **kw), tmp_path / "w")
        assert not (tmp_path / "w").exists()
        return str(e.value)

    test_shard = copy / info["splits"]["test"]["shards"][0]["file"]
    test_shard.rename(tmp_path / "aside")
    assert refused() == (
        f"records folder {copy} lacks 1 of the files its dataset_info.json lists ({test_shard}): "
        "copy the whole folder again, or build the records again (python -m "
        "data_prep.build_records)"
    )
    (tmp_path / "aside").rename(test_shard)
    # eval mode reads the test split alone: a folder kept for it without the training shards
    train_shard = copy / info["splits"]["train"]["shards"][0]["file"]
    train_shard.rename(tmp_path / "aside")
    eval_mode = tiny_config(copy, **{"smoke.enabled": False, "mode": "eval"})
    assert train.dataset_classes(eval_mode)[0] == info["classes"]
    assert refused().startswith(f"records folder {copy} lacks 1 of the files")
    (tmp_path / "aside").rename(train_shard)
    indexes = [
        copy / (s["file"] + ".index")
        for split in ("train", "val")
        for s in info["splits"][split]["shards"]
    ]
    for index in indexes:
        index.rename(tmp_path / index.name)
    shown = ", ".join(map(str, indexes[:3])) + (
        f" and {len(indexes) - 3} more" if len(indexes) > 3 else ""
    )
    assert refused() == (
        f"records folder {copy} lacks {len(indexes)} of the files its dataset_info.json lists "
        f"({shown}): copy the whole folder again, or build the records again (python -m "
        "data_prep.build_records)"
    )
    for index in indexes:
        (tmp_path / index.name).rename(index)
    with monkeypatch.context() as m:  # a bucket that refuses this machine's account

        def denied(*args):
            raise OSError("Forbidden: bucket/records\n{'error': {'code': 403, 'message': ''}}")

        m.setattr(train.records, "missing_files", denied)
        assert refused() == (
            f"cannot look for the files of records folder {copy} (Forbidden: bucket/records); "
            "check that this machine may read it"
        )

    fix = (
        ": restore it from a good copy, or build the records again (python -m "
        "data_prep.build_records)"
    )
    info_file.write_text(json.dumps(info) + "\n}")
    assert refused() == (
        f"{info_file} is not valid JSON (Extra data: line 2 column 1 (char "
        f"{len(json.dumps(info)) + 1})){fix}"
    )
    broken = json.loads(json.dumps(info))
    del broken["splits"]["val"]["shards"]
    info_file.write_text(json.dumps(broken))
    assert (
        refused()
        == f"{info_file}: split 'val' has no 'shards' list of {{'file', 'num_records'}}{fix}"
    )
    broken = json.loads(json.dumps(info))
    broken["splits"]["train"]["num_records"] += 1
    info_file.write_text(json.dumps(broken))
    n = info["splits"]["train"]["num_records"]
    assert refused() == (
        f"{info_file}: split 'train' says num_records {n + 1}, its shards hold {n}{fix}"
    )
    broken = json.loads(json.dumps(info))
    broken["classes"] = "abc"
    info_file.write_text(json.dumps(broken))
    assert refused() == f"{info_file}: 'classes' is not a list of class names{fix}"

    # a class list shorter than the labels (an edited or mixed-up dataset_info.json): the
    # first record past it stops training, named, instead of a traceback after an epoch
    broken = json.loads(json.dumps(info))
    broken["classes"] = info["classes"][:3]
    info_file.write_text(json.dumps(broken))
    with pytest.raises(train.TrainingError) as e:
        train.train_and_evaluate(
            tiny_config(copy, **{"smoke.enabled": False, "train.max_steps": 4}), tmp_path / "l"
        )
    assert re.fullmatch(
        rf"{re.escape(str(copy))}/train-\S+\.tfrecord: record \d+ \(video \S+\): label 3 is out "
        rf"of range for the 3 classes of its dataset_info.json: the records in "
        rf"{re.escape(str(copy))} are damaged; restore the file from a good copy, or build the "
        r"records again \(python -m data_prep.build_records\)",
        str(e.value),
    ), str(e.value)


def test_a_workdir_that_cannot_hold_the_run_s_folders_is_refused_before_the_work(records, tmp_path):
    # each used to surface at the first checkpoint, or after the evaluation, as a traceback
    (tmp_path / "file").write_text("")
    run = tmp_path / "file" / "run"
    for mode in ("train", "eval"):
        with pytest.raises(train.TrainingError) as e:
            train.check_workdir(run, mode)
        assert str(e.value) == (
            f"cannot write in --workdir {run} ({tmp_path / 'file'} is a file, not a folder); "
            "give a folder you can write to"
        )
    for mode, name in (("train", "checkpoints"), ("train", "tensorboard"), ("eval", "eval")):
        workdir = tmp_path / f"{mode}_{name}"
        workdir.mkdir()
        (workdir / name).write_text("")
        run_mode = train.train_and_evaluate if mode == "train" else evaluate.evaluate
        with pytest.raises(train.TrainingError) as e:
            run_mode(tiny_config(records, mode=mode), workdir)
        assert str(e.value) == (
            f"{workdir / name} is a file where the run keeps its {name} folder; move it away or "
            "give another --workdir"
        )
        assert sorted(p.name for p in workdir.iterdir()) == [name]
    train.check_workdir(tmp_path / "train_checkpoints", "eval")  # eval mode writes in eval/


def test_a_damaged_checkpoint_step_is_named_with_the_steps_before_it(records, tmp_path, capsys):
    kw = {"val_split": "", "test_split": "", "train.checkpoint_every_steps": 1}
    kw |= {"train.keep_checkpoints": 3}
    train.train_and_evaluate(tiny_config(records, **kw, **{"train.max_steps": 2}), tmp_path)
    ckpt = tmp_path / "checkpoints"
    assert checkpointing.checkpoint_steps(ckpt) == [1, 2]
    shutil.rmtree(ckpt / "2" / "params" / "d")  # a copy cut short
    way = f": move {ckpt / '2'} aside to use step 1 (earlier steps: [1]), or copy the step again"
    pattern = re.escape(f"{ckpt} step 2 is damaged or incomplete (") + r".+\)" + re.escape(way)
    with pytest.raises(train.TrainingError) as e:  # resuming
        train.train_and_evaluate(tiny_config(records, **kw, **{"train.max_steps": 3}), tmp_path)
    assert re.fullmatch(pattern, str(e.value)), str(e.value)
    assert "tensorstore_spec" not in str(e.value) and len(str(e.value)) < 800
    with pytest.raises(train.TrainingError) as e:  # eval mode: no config.init_from to blame
        evaluate.evaluate(tiny_config(records, mode="eval", test_split="test"), tmp_path)
    assert re.fullmatch(pattern, str(e.value)), str(e.value)
    with pytest.raises(checkpointing.CheckpointError) as e:  # predict and convert read here
        checkpointing.load_model(ckpt)
    assert re.fullmatch(pattern, str(e.value)), str(e.value)
    # the way out works: the run resumes from step 1
    (ckpt / "2").rename(tmp_path / "step2")
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(records, **kw, **{"train.max_steps": 3}), tmp_path)
    assert "resuming from step 1" in capsys.readouterr().out
    assert checkpointing.checkpoint_steps(ckpt) == [1, 2, 3]


def test_bad_smoke_settings_and_input_settings_are_named(records, tmp_path):
    with pytest.raises(train.TrainingError) as e:
        train.check_value_ranges(
            tiny_config(records, **{"data.crop_scale": (0.5,), "data.prefetch": -1})
        )
    give = (
        "the least and most of the area a crop takes, 0 < least <= most <= 1, as "
        "--config.data.crop_scale='(0.08,1.0)'"
    )
    assert str(e.value) == (
        f"data.prefetch=-1 (a whole number >= 1), data.crop_scale=(0.5,) ({give}): change them"
    )
    for bad in ((1.0, 0.0), (0.0, 1.0), (0.5, 1.5), ("a", 1.0)):
        with pytest.raises(train.TrainingError, match=re.escape(f"data.crop_scale={bad!r}")):
            train.check_value_ranges(tiny_config(records, **{"data.crop_scale": bad}))
    for good in ((0.08, 1.0), (1, 1)):
        train.check_value_ranges(tiny_config(records, **{"data.crop_scale": good}))
    assert train._area_range([0.5, 1.0])  # as a run's saved config (JSON) holds it
    # the smoke dataset's own options, and a folder for it that cannot be made
    with pytest.raises(train.TrainingError) as e:
        train.ensure_smoke(tiny_config(tmp_path / "s", **{"smoke.classes": 1}))
    assert str(e.value).startswith(
        "config.smoke: invalid smoke dataset options: classes must be in 2.."
    )
    (tmp_path / "file").write_text("")
    with pytest.raises(train.TrainingError) as e:
        train.ensure_smoke(tiny_config(tmp_path / "file" / "smoke"))
    assert str(e.value).startswith(
        f"config.smoke: cannot write the smoke dataset in {tmp_path / 'file' / 'smoke'}: "
        f"{tmp_path / 'file'} is a file, not a folder; give a folder you can write to"
    )
    with pytest.raises(train.TrainingError) as e:
        train.ensure_smoke(tiny_config(tmp_path / "file"))
    assert str(e.value).startswith(
        f"config.smoke: {tmp_path / 'file'} is a file; give a folder for the smoke dataset"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
