"""Model checkpoints on disk (the only module that imports orbax).

A model checkpoint is an orbax ``CheckpointManager`` directory whose steps hold
at least two items: ``params`` (the nested parameter dict) and ``meta`` (JSON:
the model config, the class names and where the weights came from). Converted
checkpoints have a single step 0; training adds optimizer and data-iterator
items to its steps. ``load_model`` reads either.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import types
import uuid
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from signnet_jax import files

PARAMS, EMA, META = "params", "ema", "meta"
OPT_STATE, DATA = "opt_state", "data"  # training steps only


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as a model checkpoint."""


# PyTorch and Hugging Face weights files (signnet_jax.convert reads them; no checkpoint)
WEIGHTS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def local_path(path: str | os.PathLike, write: bool = False) -> pathlib.Path:
    """``files.local_path`` for checkpoints: a remote URL raises CheckpointError."""
    try:
        return files.local_path(path, write)
    except files.RemotePathError as e:
        raise CheckpointError(str(e)) from e


def _stringify_keys(tree: Any) -> Any:
    # orbax stores dict keys as strings; make that explicit so a round trip is exact.
    if isinstance(tree, dict):
        return {str(k): _stringify_keys(v) for k, v in tree.items()}
    return tree


def save_model(directory: str | os.PathLike, params: dict, meta: dict[str, Any]) -> None:
    """Write ``params`` and ``meta`` as step 0 of a new checkpoint directory, atomically.

    The checkpoint is built under a temporary name beside ``directory`` and renamed
    into place only when complete, so a failure leaves nothing at ``directory``.

    Args:
      directory: where the checkpoint goes; must not exist yet (or be an empty folder).
      params: nested dict of arrays.
      meta: JSON-able dict (model config, classes, source).
    """
    directory = local_path(directory, write=True)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory} exists and is not empty; choose a new output path or delete it"
        )
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        # a Ctrl-C is held to the end of orbax's save (else its threads went on writing into
        # the folder being removed, which could stay, and it logged their failure): the save
        # completes under its temporary name, which the interrupt then removes
        _hush_abandoned_io()
        with files.ctrl_c_after(), ocp.CheckpointManager(tmp) as mngr, _write_errors(directory):
            mngr.save(
                0,
                args=ocp.args.Composite(
                    **{
                        PARAMS: ocp.args.StandardSave(_stringify_keys(params)),
                        META: ocp.args.JsonSave(json.loads(json.dumps(meta))),
                    }
                ),
            )
            mngr.wait_until_finished()
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """Steps saved in a checkpoint directory (empty when it holds none).

    The step folders orbax has committed (a save in progress is a temporary folder, renamed when
    complete), read from the folder itself: a CheckpointManager would synchronise every
    process, which a host stopping on its own (Ctrl-C) cannot ask of the others.
    """
    directory = local_path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _reason(error: Exception | str) -> str:
    """The first part of a read or write error: tensorstore appends kilobytes of its spec."""
    text = str(error).split(" [tensorstore_spec=")[0].strip()
    return text if len(text) <= 400 else text[:400] + " ..."


# tensorstore's status text, as in "NOT_FOUND: Error reading ..." or "RESOURCE_EXHAUSTED: Error
# writing ..."
_TENSORSTORE_ERROR = re.compile(r"^[A-Z_]+: Error (reading|writing|opening)")


class _AbandonedIO(logging.Filter):
    """When one array of a step cannot be read or written, orbax gives up on the others: they
    still end, each failing the same way, and asyncio logs each as '... exception was never
    retrieved' (with kilobytes of tensorstore's spec). A full disk also has orbax log each
    failed thread with its traceback. The error the caller gets says it all once."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name == "asyncio":
            return not (
                str(record.msg).split("\n")[0].endswith("exception was never retrieved")
                and bool(_TENSORSTORE_ERROR.match(str(exc)))
            )
        if not ("orbax" in record.pathname and _NO_SPACE in f"{record.getMessage()} {exc}"):
            return True
        if self.told:
            return False
        # the first one stays, as one line: a save in the background fails long before the
        # next save or the run's end reports it
        self.told = True
        text = f"{record.getMessage()} {exc or ''}"
        record.msg = f"checkpoint save failed: {_reason(text)}"
        record.args, record.exc_info = (), None
        return True

    told = False


_NO_SPACE = "No space left on device"
_ABANDONED_IO = _AbandonedIO()


def _orbax_coroutine(obj: object) -> bool:
    # by type alone: isinstance reads __class__ (some objects warn), getattr can run an
    # object's own __getattr__ (orbax's Composite raises KeyError)
    return type(obj) is types.CoroutineType and "orbax" in obj.cr_code.co_filename


def _abandoned_io_hook(previous):
    def hook(unraisable) -> None:
        # the same abandoned reads finish after orbax closed their event loop, or are
        # collected unfinished, failing as the read the caller was told of
        if isinstance(unraisable.exc_value, RuntimeError) and (
            str(unraisable.exc_value) == "Event loop is closed"
        ):
            return
        if _orbax_coroutine(unraisable.object) and _damage(unraisable.exc_value):
            return
        previous(unraisable)

    hook.signnet_quiet = True
    return hook


def _hush_abandoned_io() -> None:
    """Keeps the aftermath of a failed step read or write off the console (where the
    CheckpointError says what is wrong): what orbax abandoned, logged and reported as it ends,
    some before the failure reaches the caller, so this is set up before each read and save."""
    import sys

    if getattr(sys.unraisablehook, "signnet_quiet", False):
        return  # set up already (a warnings filter added each time would reset warnings' once)
    for name in ("asyncio", "absl"):
        logging.getLogger(name).addFilter(_ABANDONED_IO)
    # the writes orbax never started once one failed, collected at exit
    warnings.filterwarnings(
        "ignore", r"coroutine '.*write_fragment' was never awaited", RuntimeWarning
    )
    sys.unraisablehook = _abandoned_io_hook(sys.unraisablehook)


@contextlib.contextmanager
def _write_errors(directory: pathlib.Path, way=lambda: "make room there, or give another path"):
    """orbax's failure to write a checkpoint (a full disk, most often) as a CheckpointError
    naming ``directory``, the first line of the cause and ``way()``, what to do."""
    try:
        yield
    except (OSError, ValueError) as e:
        if not (isinstance(e, OSError) or "Error writing" in str(e)):
            raise
        raise CheckpointError(
            f"cannot write a checkpoint in {directory} ({_reason(e)}); {way()}"
        ) from e


def unreadable_step(directory: pathlib.Path, step: int, error: Exception) -> CheckpointError:
    """A step whose files cannot be read (a copy cut short, a disk error), with the steps
    before it that may still be good."""
    earlier = [s for s in checkpoint_steps(directory) if s < step]
    way = (
        f"move {directory / str(step)} aside to use step {earlier[-1]} (earlier steps: "
        f"{earlier}), or copy the step again"
        if earlier
        else "copy the step again, or write it anew"
    )
    return CheckpointError(
        f"{directory} step {step} is damaged or incomplete ({_reason(error)}): {way}"
    )


def _damage(error: BaseException | None) -> BaseException | None:
    """The error, along ``error``'s causes, that says a step's files are missing or damaged:
    a file not found, JSON cut short, or a tensorstore read error (orbax wraps the last in a
    bare Exception). A tree that differs from the one asked for is not damage."""
    while error is not None:
        if isinstance(error, FileNotFoundError | json.JSONDecodeError) or (
            isinstance(error, ValueError) and _TENSORSTORE_ERROR.match(str(error))
        ):
            return error
        error = error.__cause__
    return None


@contextlib.contextmanager
def _reading(directory: pathlib.Path, step: int):
    """Reads of one step: damaged files become ``unreadable_step``; other errors pass."""
    _hush_abandoned_io()
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        damage = _damage(e)
        if damage is None:
            raise
        if not _close_abandoned_reads.registered:
            _close_abandoned_reads.registered = True
            atexit.register(_close_abandoned_reads)
        raise unreadable_step(directory, step, damage) from e


def _close_abandoned_reads() -> None:
    """At exit after a damaged step: the reads of it orbax abandoned, still held by its event
    loop, are closed while the hook that keeps them quiet is in place (the interpreter's
    teardown would report each with its tensorstore spec)."""
    for obj in gc.get_objects():
        if _orbax_coroutine(obj) and obj.cr_frame is not None:
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - the read failed as the caller was told
                pass


_close_abandoned_reads.registered = False


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """The checkpoint folder behind ``path``: the folder itself or a workdir's ``checkpoints``.

    Args:
      path: a model checkpoint folder or a training workdir.

    Returns:
      Absolute path of a folder holding checkpoint steps.

    Raises:
      CheckpointError: nothing usable at ``path`` (the message says what was expected).
    """
    path = local_path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        if path.suffix.lower() in WEIGHTS_SUFFIXES:
            raise CheckpointError(
                f"checkpoint {path} is a PyTorch weights file; convert it first (python -m "
                f"signnet_jax.convert --input {path} --output DIR --model PRESET --num-frames T "
                "--num-classes N --class-list CLASSES), then pass DIR"
            )
        raise CheckpointError(
            f"checkpoint {path} is a file; pass the folder written by signnet_jax.convert "
            "or a training workdir"
        )
    if checkpoint_steps(path):
        return path
    nested = path / "checkpoints"
    if nested.is_dir():
        if checkpoint_steps(nested):
            return nested
        raise CheckpointError(
            f"{nested} holds no checkpoint steps yet; has training saved one? "
            "(or pass a folder written by signnet_jax.convert)"
        )
    if path.name.isdigit() and int(path.name) in checkpoint_steps(path.parent):
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        raise CheckpointError(
            f"{path} is one step of the checkpoint {path.parent}; pass {run} and choose the "
            f"step with --step {path.name} (config.load_step for training and eval mode)"
        )
    raise CheckpointError(
        f"{path} is not a checkpoint: it holds no checkpoint steps and no 'checkpoints' "
        "folder; pass a folder written by signnet_jax.convert or a training workdir"
    )


def select_step(directory: str | os.PathLike, which: int | str | None = "latest") -> int:
    """The step of a checkpoint directory that ``which`` names.

    Args:
      directory: a checkpoint directory written by ``save_model`` or by training.
      which: 'latest' (or None), 'best' (the highest validation top-1 that training
        recorded with its steps), or a step number (an int or its digits).

    Raises:
      CheckpointError: no steps, no such step, or no step with a validation top-1.
    """
    directory = local_path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    with ocp.CheckpointManager(directory) as mngr:
        steps = list(mngr.all_steps())
        if not steps:
            raise CheckpointError(
                f"{directory} holds no checkpoint steps; point at a folder written by "
                "signnet_jax.convert or by training"
            )
        if which is None or which == "latest":
            return max(steps)
        if which == "best":
            scored = {s: (mngr.metrics(s) or {}).get("val_top1") for s in steps}
            scored = {s: v for s, v in scored.items() if v is not None}
            if not scored:
                raise CheckpointError(
                    f"{directory}: no step records a validation top-1 (a converted checkpoint, "
                    "or training without val_split); ask for 'latest' or a step number"
                )
            # the first step to reach the top, as the original's checkpoint-best
            return max(scored, key=lambda s: (scored[s], -s))
    if isinstance(which, str) and not which.isdigit():
        raise CheckpointError(f"step {which!r}: use 'latest', 'best' or a step number")
    if int(which) not in steps:
        raise CheckpointError(f"{directory} has no step {which}; it holds steps {sorted(steps)}")
    return int(which)


def load_meta(directory: str | os.PathLike, step: int | str | None = "latest") -> dict:
    """The metadata of one step (model config, classes, ...) without reading any array."""
    directory = local_path(directory)
    step = select_step(directory, step)
    handlers = {META: ocp.JsonCheckpointHandler()}
    with (
        ocp.CheckpointManager(directory, item_handlers=handlers) as mngr,
        _reading(directory, step),
    ):
        return _read_meta(mngr, directory, step)


def _read_meta(mngr: ocp.CheckpointManager, directory: pathlib.Path, step: int) -> dict:
    """A step's metadata (inside ``_reading``)."""
    try:
        return mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    except KeyError as e:
        # ours when its other folders or another step's metadata say so; else another
        # program's orbax checkpoint (which may well hold "params" too)
        here = directory / str(step)
        if not (
            (here / DATA).is_dir()
            or (here / EMA).is_dir()
            or any((directory / str(s) / META).is_dir() for s in checkpoint_steps(directory))
        ):
            raise CheckpointError(f"{directory} step {step} is not a model checkpoint: {e}") from e
        # the weights are there, what they are is not
        gone = FileNotFoundError(f"its {META} folder is missing")
        raise unreadable_step(directory, step, gone) from e


def load_model(
    directory: str | os.PathLike, step: int | str | None = "latest"
) -> tuple[dict, dict]:
    """Read the parameters and metadata of a model checkpoint.

    A training step saved with an EMA of the weights gives the EMA weights: they are
    what training validated and tested.

    Args:
      directory: a checkpoint directory written by ``save_model`` or by training.
      step: 'latest' (default), 'best' or a step number (see ``select_step``).

    Returns:
      ``(params, meta)``: params as a nested dict of numpy arrays (string keys),
      meta as saved.
    """
    directory = local_path(directory)
    step = select_step(directory, step)
    # Every item a step may hold has a handler (only metadata is read for the others),
    # else orbax warns about each item it could not restore.
    handlers = {
        PARAMS: ocp.StandardCheckpointHandler(),
        EMA: ocp.StandardCheckpointHandler(),
        OPT_STATE: ocp.StandardCheckpointHandler(),
        DATA: ocp.JsonCheckpointHandler(),
        META: ocp.JsonCheckpointHandler(),
    }
    with (
        ocp.CheckpointManager(directory, item_handlers=handlers) as mngr,
        _reading(directory, step),
    ):
        meta = _read_meta(mngr, directory, step)
        # Restore as host numpy arrays whatever mesh wrote them: a checkpoint from
        # an 8-device run must load in a 1-device process (predict on a laptop).
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        stored = mngr.item_metadata(step)
        # a run that kept an EMA saved it beside the raw weights; one without it would
        # quietly give the weights training did not validate
        kept_ema = ((meta.get("config") or {}).get("optim") or {}).get("ema_decay", 0) > 0
        item = EMA if kept_ema or stored.get(EMA) is not None else PARAMS
        if stored.get(item) is None:  # the metadata is there, the weights are not
            gone = FileNotFoundError(f"its {item} folder is missing")
            raise unreadable_step(directory, step, gone)
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), stored[item]
        )
        params = mngr.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)})
        )[item]
    params = jax.tree.map(np.asarray, params)
    return params, meta


def _best_rank(metrics: dict[str, float]) -> tuple[float, int]:
    """Rank of a step's metrics: higher val top-1, then the earlier step, wins.

    The original keeps the first epoch to reach the best validation top-1 as
    checkpoint-best (it saves only when ``max_accuracy < acc1``). Steps saved before their
    metrics carried the step count as step 0, so a tie among them goes by save order (the
    later one).
    """
    return metrics["val_top1"], -metrics.get("step", 0)


class _NoMissingMetricWarning(logging.Filter):
    """Steps saved between validations carry no metrics by design; orbax warns at each."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Requested `tracked_metric`")


_MISSING_METRIC_FILTER = _NoMissingMetricWarning()


class TrainCheckpointer:
    """Training checkpoints: params, optimizer state, the data position and metadata.

    Keeps the latest ``keep`` steps plus the best by validation top-1. Saves are
    asynchronous; a half-written step (process killed mid-save) is never restored.
    """

    def __init__(self, directory: str | os.PathLike, keep: int):
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

        self.directory = local_path(directory, write=True)
        policy = pp.AnyPreservationPolicy(
            [
                pp.LatestN(n=keep),
                pp.BestN(
                    get_metric_fn=_best_rank,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # best_fn makes orbax write each step's metrics beside it: the best step
            # survives a restart, and select_step(..., 'best') can read it.
            best_fn=_best_rank,
            best_mode="max",
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        logging.getLogger("absl").addFilter(_MISSING_METRIC_FILTER)  # once: a set of filters

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: dict[str, Any],
        data_state: dict,
        meta: dict,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Start saving ``state`` (a dict of array trees: params, opt_state, ...) at ``step``."""
        items = {k: ocp.args.StandardSave(v) for k, v in state.items()}
        items[DATA] = ocp.args.JsonSave(data_state)
        items[META] = ocp.args.JsonSave(json.loads(json.dumps(meta)))
        if metrics is not None:  # the step breaks ties between equal val top-1 (_best_rank)
            metrics = {**metrics, "step": step}
        # a Ctrl-C inside orbax's hand-over to its threads lost the step, with asyncio's
        # warnings of never-awaited coroutines; held back, it lets the save start, and the
        # trainer's exit waits for it (wait)
        with files.ctrl_c_after(), self._writing():  # (it also waits for the previous save)
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    @contextlib.contextmanager
    def _writing(self):
        """A save that fails to write (a full disk, most often) ends with what to do and the
        step a rerun resumes from, not orbax's traceback from its threads."""
        _hush_abandoned_io()  # the writes orbax abandons end as its reads do

        def way() -> str:  # the steps as they are once it failed (a save waits for the last)
            steps = checkpoint_steps(self.directory)
            resume = f"it resumes from step {steps[-1]}" if steps else "no step was saved"
            return f"make room there (or fix the folder), then run the same command again: {resume}"

        with _write_errors(self.directory, way):
            yield

    def score(self, step: int, metrics: dict[str, float]) -> bool:
        """Give a saved step the metrics it was saved without (its validation was cut short),
        so it can be the best; on every process at once.

        Nothing is deleted or saved again: process 0 writes the metrics item where orbax
        keeps it (``STEP/metrics/metrics``, synced and replaced atomically, as a half-written
        one would stop orbax opening the folder) and every process reloads. Returns whether
        orbax reads them back; False on every process when process 0 could not write them
        (an orbax that keeps them elsewhere, a disk error): the step stays unscored.
        """
        from jax.experimental import multihost_utils

        metrics = {**metrics, "step": step}
        written = True
        if jax.process_index() == 0:
            folder = self.directory / str(step)
            try:
                if not folder.is_dir():  # not orbax 0.12's layout: write no folder of a step
                    raise FileNotFoundError(f"no folder {folder}")
                files.atomic_write(
                    folder / "metrics" / "metrics", json.dumps(metrics).encode(), fsync=True
                )
            except OSError as e:
                logging.getLogger(__name__).warning("could not score step %d: %s", step, e)
                written = False
        if jax.process_count() > 1:  # every process learns the outcome (and waits for it)
            written = bool(multihost_utils.broadcast_one_to_all(np.int32(written)))
        if not written:
            return False
        self.manager.reload()
        return self.manager.metrics(step) == metrics

    def saved_items(self, step: int) -> set[str]:
        """Names of the state trees saved at ``step`` (params, opt_state, ...)."""
        return self._folders(step) - {DATA, META}

    def _folders(self, step: int) -> set[str]:
        return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}

    def restore(self, step: int, abstract_state: dict[str, Any]) -> tuple[dict, dict, dict]:
        """Restore ``(state, data_state, meta)``; arrays land with the abstract tree's shardings."""
        items = {k: ocp.args.StandardRestore(v) for k, v in abstract_state.items()}
        items[DATA] = ocp.args.JsonRestore()
        items[META] = ocp.args.JsonRestore()
        folder = self.directory / str(step)
        if not folder.is_dir():  # removed since the steps were listed
            raise unreadable_step(self.directory, step, FileNotFoundError(f"{folder} is gone"))
        gone = sorted({*abstract_state, DATA, META} - self._folders(step))
        if gone:  # the run's settings are checked before: the step lacks what it saved
            folders = " and ".join(gone) + (" folders are" if len(gone) > 1 else " folder is")
            raise unreadable_step(self.directory, step, FileNotFoundError(f"its {folders} missing"))
        # a tree that differs is not damage: the run's own checks name those
        with _reading(self.directory, step):
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = {k: out[k] for k in abstract_state}
        return state, out[DATA], out[META]

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
