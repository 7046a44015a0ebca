"""python -m signnet_jax.main --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]

Flags only: config.mode 'train' runs train_and_evaluate, 'eval' tests the
checkpoint in the workdir (or config.init_from).
"""

import ast
import os
import pathlib
import re
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from signnet_jax import checkpointing, evaluate, files, train
from signnet_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file from configs/")
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, TensorBoard logs and metrics")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    files.interrupt_as_usual()
    if len(argv) > 1:  # one line, as the other command-line mistakes
        _exit_usage(
            f"unexpected arguments {' '.join(argv[1:])}: every setting is a flag "
            "(--config.KEY=VALUE)"
        )
    try:
        config = _CONFIG.value
        config.mode  # noqa: B018 - a file that failed to load raises on first use
    except OSError as e:
        _config_file_error(e)
    # Library INFO logs (orbax, grain) would drown the progress lines.
    logging.set_verbosity(logging.WARNING)
    if not config.distributed.initialize:
        launched = launched_together(os.environ)
        if launched:
            print(
                f"error: this process is one of {launched} started together, but "
                "config.distributed.initialize is False: each would train on its own devices "
                "alone, writing into the same workdir; add --config.distributed.initialize=True",
                file=sys.stderr,
            )
            sys.exit(1)
    else:
        try:
            kwargs = distributed_kwargs(config.distributed)
        except ValueError as e:
            _exit_usage(str(e))
        # CPU processes need a collectives backend (multi-process tests on one machine);
        # TPU and GPU clients ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kwargs)
    try:
        # on several hosts a Ctrl-C or a SIGTERM from here on stops them all at the same
        # point: one that stopped alone while setting up would leave the others waiting in a
        # collective (and JAX's own SIGTERM handler, installed by jax.distributed, would
        # swallow the signal: nothing here reads it)
        multi_host = jax.process_count() > 1
        with train.AgreedCtrlC(multi_host), train.Preemption(multi_host):
            if config.mode == "train":
                train.train_and_evaluate(config, _WORKDIR.value)
            elif config.mode == "eval":
                evaluate.evaluate(config, _WORKDIR.value)
            else:
                raise train.TrainingError(
                    f"config.mode must be 'train' or 'eval', got {config.mode!r}"
                )
    except (train.TrainingError, checkpointing.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except train.AgreedPreemption:  # several hosts, eval mode: every host at the same batch
        print(
            "preempted (SIGTERM): the evaluation did not finish (no metrics.json written); run "
            "it again",
            file=sys.stderr,
        )
        sys.exit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        status = files.interrupted(_left_by_interrupted(config, _WORKDIR.value))
    else:
        return
    # outside the handler the interrupt's traceback, and the batches its frames held, are gone
    pipeline.unlink_freed()
    sys.exit(status)


def _left_by_interrupted(config, workdir: str) -> str:
    """What a Ctrl-C leaves: a training run its checkpoints (a half-written one is never
    restored), an evaluation nothing under its final name."""
    if config.mode != "train":
        return "the evaluation did not finish (no metrics.json written); run it again"
    ckpt = pathlib.Path(workdir) / "checkpoints"
    steps = checkpointing.checkpoint_steps(ckpt)
    if not steps:
        return f"no checkpoint saved yet in {ckpt}; the same command starts the run again"
    return (
        f"checkpoints saved up to step {max(steps)} in {ckpt}; the same command resumes from "
        "the latest"
    )


def distributed_kwargs(cfg) -> dict:
    """``jax.distributed.initialize`` arguments from ``config.distributed``: only the values
    given, so JAX detects the rest from the cluster (TPU pods, SLURM, ...)."""
    kwargs = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    if cfg.get("local_device_ids", ""):
        try:
            kwargs["local_device_ids"] = [int(i) for i in str(cfg.local_device_ids).split(",")]
        except ValueError:
            raise ValueError(
                f"--config.distributed.local_device_ids: give device numbers like 0 or 0,1, not "
                f"{cfg.local_device_ids!r}"
            ) from None
    return kwargs


# Process counts that launchers set in each process they start: SLURM's srun (a step's tasks;
# SLURM_NTASKS is also set for a single process in a batch script), Open MPI, MPICH / Intel MPI.
_LAUNCHER_COUNTS = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched_together(environ) -> str:
    """'N (VAR=N)' when a launcher started this process as one of N > 1, else ''."""
    for name in _LAUNCHER_COUNTS:
        value = environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return f"{value} ({name}={value})"
    return ""


def _usage() -> str:
    """``--help``: the command, its modes, the configs and where their keys are explained."""
    lines = [__doc__.strip(), "", "flags:"]
    lines += [
        "  --config FILE          a config file: one of configs/ below, or your own",
        "  --workdir DIR          checkpoints, TensorBoard logs, metrics.json (same command "
        "resumes)",
        "  --config.KEY=VALUE     any key of the config, e.g. --config.data.batch_size=32 "
        "--config.mode=eval",
    ]
    if CONFIGS.is_dir():
        lines += ["", "configs:"]
        for path in sorted(CONFIGS.glob("[!_]*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            # the paragraph after the command line, to its first break
            paragraph = " ".join((doc.split("\n\n") + ["", ""])[1].split())
            what = re.split(r"[.;:] | \(", paragraph)[0]
            lines.append(f"  {_shown(path):<25} {what}")
    lines += [
        "",
        f"Every key, its default and what it does: {_shown(CONFIGS / 'wlasl2000.py')} (groups "
        "model, data, optim, loss, mesh, train, distributed, smoke). README: Training and "
        "evaluation.",
    ]
    return "\n".join(lines)


# the checkout's configs (an editable install runs from it)
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _shown(path: pathlib.Path) -> str:
    """``path`` as a command run here gives it: relative inside this folder, else absolute."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config mistakes reported in one line instead of a traceback."""
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[1:]):
        print(_usage())
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # absl's own errors (bad values, unknown flags)
        _exit_usage(str(e))
    except (AttributeError, KeyError) as e:
        inner = e.args[0] if isinstance(e, AttributeError) and e.args else e
        text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
        key = text.strip().splitlines()[0].strip("'\"") if text.strip() else ""
        given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        keys = _config_keys()
        named = [g for g in given if key in g.split(".")[1:] and g[len("--config.") :] not in keys]
        if not named:  # raised while loading the file itself (no get_config, a bug in it)
            _config_file_error(e)
        # --config.KEY=... naming a key the config does not have
        key = named[0].removeprefix("--config.")
        near = _near_keys(key, keys)
        _exit_usage(
            f"unknown config key {key} (in {', '.join(named)})"
            + (f"; did you mean {' or '.join(f'--config.{k}' for k in near)}?" if near else "")
            + f" (every key is in {_shown(CONFIGS / 'wlasl2000.py')})"
        )
    except Exception as e:  # --config not a loadable config file (ImportError, a bug, ...)
        _config_file_error(e)


def _config_keys() -> list[str]:
    """The dotted keys of the --config file (none if it cannot be loaded again)."""
    import runpy

    try:
        config = runpy.run_path(_config_arg())["get_config"]()
    except Exception:  # noqa: BLE001 - only for suggestions
        return []
    return list(train._flat(config.to_dict()))


def _near_keys(key: str, keys: list[str]) -> list[str]:
    """Keys a mistyped or misplaced ``key`` may mean: the same name elsewhere (data.test_split
    -> test_split), a name in the same group containing it (optim.lr -> optim.base_lr, ...),
    or a close spelling (optim.epoch -> optim.epochs)."""
    import difflib

    group, _, name = key.rpartition(".")
    same_name = [k for k in keys if k.rpartition(".")[2] == name]
    group_keys = [k for k in keys if k.rpartition(".")[0] == group]
    containing = [k for k in group_keys if name in k.rpartition(".")[2]]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.8)
    return list(dict.fromkeys(same_name + containing + close))[:4]


def _config_file_error(error: Exception) -> None:
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = str(cause).strip().splitlines()
    given = _config_arg()
    # run from elsewhere, configs/NAME.py is the checkout's (its absolute path works anywhere)
    ours = CONFIGS / pathlib.Path(given).name
    if ours.is_file() and not os.path.isfile(given):  # not a broken file of the same name
        fix = f"did you mean --config {_shown(ours)}?"
    else:
        example = _shown(CONFIGS / "smoke.py")
        fix = f"give a file from {_shown(CONFIGS)}{os.sep}, e.g. --config {example}"
    _exit_usage(
        f"--config {given}: cannot load it as a config file ({type(cause).__name__}: "
        f"{lines[-1].strip() if lines else ''}); {fix}"
    )


def _config_arg() -> str:
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return ""


def _exit_usage(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
