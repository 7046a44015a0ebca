"""python -m signnet_jax.main: a Ctrl-C is one line saying what the run leaves, exit 130;
--help."""

import pathlib
import subprocess
import sys

import pytest

from tests.helpers import interrupt_after

REPO = pathlib.Path(__file__).resolve().parents[1]

TINY = [
    "--config", "configs/smoke.py",
    "--config.smoke.classes=4", "--config.smoke.train_per_class=8",
    "--config.smoke.val_per_class=2", "--config.smoke.test_per_class=2",
    "--config.smoke.frames=8", "--config.smoke.size=32",
    "--config.model.embed_dim=32", "--config.model.depth=1", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.model.num_frames=4", "--config.model.img_size=32",
    "--config.data.batch_size=8", "--config.data.eval_batch_size=8",
    "--config.data.short_side_size=32", "--config.train.max_steps=4",
    "--config.train.checkpoint_every_steps=2", "--config.val_split=",
]  # fmt: skip


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return tmp_path_factory.mktemp("records") / "smoke"  # made by the first run


def _main(target, records, workdir, *extra, group=False):
    args = [*TINY, f"--config.records_dir={records}", "--workdir", workdir, *extra]
    return interrupt_after(target, "signnet_jax.main", *args, group=group)


def test_ctrl_c_in_training_names_the_checkpoint_to_resume_from(records, tmp_path):
    workdir = tmp_path / "w"
    ckpt = workdir / "checkpoints"
    # before the first checkpoint
    r = _main("signnet_jax.train:_step_on_next_batch", records, workdir)
    assert (r.returncode, r.stderr) == (
        130,
        f"interrupted: no checkpoint saved yet in {ckpt}; the same command starts the run again\n",
    )
    # once step 2 is being saved, with the input pipeline's worker processes, the whole
    # process group signalled as by a terminal: they print nothing either
    r = _main(
        "signnet_jax.checkpointing:TrainCheckpointer.save", records, workdir,
        "--config.data.num_workers=2", group=True,
    )  # fmt: skip
    assert (r.returncode, r.stderr) == (
        130,
        f"interrupted: checkpoints saved up to step 2 in {ckpt}; the same command resumes "
        "from the latest\n",
    )
    # an evaluation stopped before it writes its results
    r = _main("signnet_jax.evaluate:evaluate_split", records, workdir, "--config.mode=eval")
    assert (r.returncode, r.stderr) == (
        130,
        "interrupted: the evaluation did not finish (no metrics.json written); run it again\n",
    )
    assert not list((workdir / "eval").glob("*/metrics.json"))


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_flags_the_configs_and_where_the_keys_are(flag):
    # absl's help exited 1 and listed no config; -h was an unknown flag
    r = subprocess.run(
        [sys.executable, "-m", "signnet_jax.main", flag],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0] == (
        "python -m signnet_jax.main --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]"
    )
    listed = [line.split()[0] for line in lines if line.startswith("  configs/")]
    assert listed == [f"configs/{p.name}" for p in sorted((REPO / "configs").glob("[!_]*.py"))]
    assert "  configs/wlasl2000.py      SignNet on WLASL2000" in lines
    assert any(line.startswith("  --config.KEY=VALUE ") for line in lines)
    assert lines[-1].startswith("Every key, its default and what it does: configs/wlasl2000.py")


def test_run_from_another_folder_the_checkout_s_configs_are_shown_by_their_whole_path(tmp_path):
    # `configs/NAME.py` names the checkout's configs only when run from the checkout: the
    # message used to suggest that same failing path, and --help listed relative ones
    def main(*args):
        return subprocess.run(
            [sys.executable, "-m", "signnet_jax.main", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    r = main("--config", "configs/smoke.py", "--workdir", "w")
    assert r.returncode == 2 and not (tmp_path / "w").exists()
    assert r.stderr.startswith("error: --config configs/smoke.py: cannot load it as a config file")
    assert r.stderr.endswith(f"; did you mean --config {REPO / 'configs' / 'smoke.py'}?\n")
    give = (
        f"; give a file from {REPO / 'configs'}/, e.g. --config {REPO / 'configs' / 'smoke.py'}\n"
    )
    r = main("--config", "mine.py", "--workdir", "w")
    assert r.stderr.endswith(give)
    # a broken file of a config's name is that file, not the checkout's
    (tmp_path / "smoke.py").write_text("def get_config(:\n")
    r = main("--config", "smoke.py", "--workdir", "w")
    assert "SyntaxError" in r.stderr and r.stderr.endswith(give)
    r = main("--config", str(REPO / "configs" / "smoke.py"), "--workdir", "w", "--config.nope=1")
    assert r.stderr == (
        "error: unknown config key nope (in --config.nope) (every key is in "
        f"{REPO / 'configs' / 'wlasl2000.py'})\n"
    )
    lines = main("--help").stdout.splitlines()
    assert f"  {REPO / 'configs' / 'smoke.py'} " in "\n".join(lines)
    assert lines[-1].startswith(
        f"Every key, its default and what it does: {REPO / 'configs' / 'wlasl2000.py'} "
    )
