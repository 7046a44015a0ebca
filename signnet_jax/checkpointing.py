"""Model checkpoints on disk (the only module that imports orbax).

A model checkpoint is an orbax ``CheckpointManager`` directory whose steps hold
at least two items: ``params`` (the nested parameter dict) and ``meta`` (JSON:
the model config, the class names and where the weights came from). Converted
checkpoints have a single step 0; training adds optimizer and data-iterator
items to its steps. ``load_model`` reads either.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PARAMS, META = "params", "meta"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as a model checkpoint."""


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
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory} exists and is not empty; choose a new output path or delete it"
        )
    tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with ocp.CheckpointManager(tmp) as mngr:
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
    """Steps saved in a checkpoint directory (empty when it holds none)."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return []
    with ocp.CheckpointManager(directory.absolute()) as mngr:
        return list(mngr.all_steps())


def load_model(directory: str | os.PathLike, step: int | None = None) -> tuple[dict, dict]:
    """Read the parameters and metadata of a model checkpoint.

    Args:
      directory: a checkpoint directory written by ``save_model`` or by training.
      step: which step; default the latest.

    Returns:
      ``(params, meta)``: params as a nested dict of numpy arrays (string keys),
      meta as saved.
    """
    directory = pathlib.Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    steps = checkpoint_steps(directory)
    if not steps:
        raise CheckpointError(
            f"{directory} holds no checkpoint steps; point at a folder written by "
            "signnet_jax.convert or by training"
        )
    step = max(steps) if step is None else step
    with ocp.CheckpointManager(directory) as mngr:
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[
                META
            ]
            params = mngr.restore(
                step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardRestore()})
            )[PARAMS]
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise CheckpointError(f"{directory} step {step} is not a model checkpoint: {e}") from e
    params = jax.tree.map(np.asarray, params)
    return params, meta
