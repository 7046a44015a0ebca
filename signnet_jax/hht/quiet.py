"""Keeps MediaPipe's native log lines off stderr unless something goes wrong.

MediaPipe's C++ code (glog / absl, LiteRT, TensorFlow Lite) writes straight to file
descriptor 2: nearly 60 lines when a Tunneller's tasks are created ("INFO: Created
TensorFlow Lite XNNPACK delegate for CPU.", "WARNING: ... Sparsity tensors ..."), a few
"W0000 ..." lines on the first detection and more when the tasks are closed. Neither
GLOG_minloglevel nor TF_CPP_MIN_LOG_LEVEL reaches them, so `quiet_native_logs` points
fd 2 at an anonymous temporary file around the native calls and drops what they wrote,
unless the block raises: then the captured text goes to the real stderr before the
exception propagates, so a native error message is never lost.

Set SIGNNET_MEDIAPIPE_LOGS=1 to let the native logs through.

Limits: fd 2 belongs to the whole process, so while one thread is inside the block,
anything other threads write to stderr is captured (and dropped) too; the Tunneller
keeps the blocks to the native calls themselves for that reason. A native abort inside
the block (a failed CHECK) ends the process before the captured text can be re-emitted:
rerun with SIGNNET_MEDIAPIPE_LOGS=1 to see it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import IO

ENV_VAR = "SIGNNET_MEDIAPIPE_LOGS"
_CHUNK = 1 << 16


def native_logs_wanted() -> bool:
    """Whether SIGNNET_MEDIAPIPE_LOGS asks for the native logs (1, true, yes, on)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass
class _Redirect:
    """fd 2 pointed at `capture`; `saved` is the original fd 2."""

    pid: int
    saved: int
    capture: IO[bytes]
    depth: int = 0
    emitted: int = 0  # bytes of the capture already written to the real stderr


# One redirect per process, shared by nested blocks and by concurrent threads.
_lock = threading.Lock()
_active: _Redirect | None = None


def _flush_python_streams() -> None:
    for stream in (sys.stderr, sys.__stderr__):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.flush()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _emit(state: _Redirect) -> None:
    """Copies what the capture holds beyond `emitted` to the real stderr."""
    fd = state.capture.fileno()
    end = os.fstat(fd).st_size
    while state.emitted < end:
        chunk = os.pread(fd, min(_CHUNK, end - state.emitted), state.emitted)
        if not chunk:
            break
        _write_all(state.saved, chunk)
        state.emitted += len(chunk)


def _start() -> _Redirect | None:
    """Points fd 2 at a fresh temporary file; None if that is impossible (fd 2 closed...)."""
    try:
        capture = tempfile.TemporaryFile(prefix="signnet-mediapipe-log-")
    except OSError:
        return None
    try:
        saved = os.dup(2)
    except OSError:
        capture.close()
        return None
    _flush_python_streams()  # what Python wrote before the block belongs on the terminal
    try:
        os.dup2(capture.fileno(), 2)
    except OSError:
        os.close(saved)
        capture.close()
        return None
    return _Redirect(os.getpid(), saved, capture)


def _stop(state: _Redirect) -> None:
    _flush_python_streams()
    try:
        os.dup2(state.saved, 2)
    finally:
        os.close(state.saved)
        state.capture.close()


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Sends fd 2 to a temporary file for the block; re-emits it if the block raises.

    Python's stderr is flushed before fd 2 is redirected and again before it is
    restored; fd 2 is restored whatever happens in the block. Blocks nest and may
    overlap across threads (they share one redirect, undone when the last one ends).
    A no-op when SIGNNET_MEDIAPIPE_LOGS=1, or when fd 2 cannot be redirected.
    """
    global _active
    if native_logs_wanted():
        yield
        return
    with _lock:
        if _active is None:
            _active = _start()
        state = _active
        if state is not None:
            state.depth += 1
    if state is None:
        yield
        return
    try:
        yield
    except BaseException:
        with _lock:
            if state.pid == os.getpid():
                _emit(state)
        raise
    finally:
        with _lock:
            # A forked child has already undone the redirect (see _after_fork_in_child).
            if state.pid == os.getpid():
                state.depth -= 1
                if state.depth == 0:
                    _active = None
                    _stop(state)


def _after_fork_in_child() -> None:
    """A child forked while another thread had fd 2 redirected starts with it restored."""
    global _lock, _active
    _lock = threading.Lock()  # the parent's may have been held by a thread the child lacks
    state, _active = _active, None
    if state is not None:
        with contextlib.suppress(OSError):
            os.dup2(state.saved, 2)
        with contextlib.suppress(OSError):
            os.close(state.saved)
        with contextlib.suppress(OSError):
            state.capture.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
