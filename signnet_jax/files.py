"""Writing files whole or not at all."""

from __future__ import annotations

import os
import uuid


def atomic_write(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> None:
    """Writes ``data`` to a temporary name beside ``path`` and renames it into place, so
    ``path`` is never seen half-written; the folder is created if needed.

    Args:
      path: the final file.
      data: its contents.
      fsync: flush the data to disk before the rename (for files that mark a finished job).
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
