"""Files: written whole or not at all; local paths only; what an interrupted command leaves."""

from __future__ import annotations

import contextlib
import functools
import multiprocessing.util
import os
import pathlib
import re
import signal
import sys
import tempfile
import threading
import uuid

# Name prefix of creation_problem's probe files: a folder listed while another process probes
# it may briefly hold one (its owner removes it).
PROBE_PREFIX = ".probe-"


def creation_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` (a file or folder, with any missing parent folders) cannot be created, or
    an existing folder ``path`` cannot be written into, or None: checked with a probe file
    (named ``PROBE_PREFIX...``) in ``path`` when it is a folder, else in its nearest existing
    folder, before long work."""
    ancestor = pathlib.Path(os.path.abspath(path))
    if not ancestor.is_dir():
        ancestor = ancestor.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=ancestor)
    except OSError as e:
        return f"{ancestor}: {e.strerror or e}"
    os.close(fd)
    os.unlink(probe)
    return None


class RemotePathError(ValueError):
    """A ``scheme://`` URL where a local (or mounted) path is needed."""


# `scheme://...`, also as pathlib leaves it (`gs:/bucket/...`); one letter is a Windows drive
_REMOTE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")


def local_path(path: str | os.PathLike, write: bool = False) -> pathlib.Path:
    """The absolute local path of ``path``; refuses remote URLs (gs://, s3://, ...).

    Data and checkpoints go through local paths, so a bucket is reached by copying (or
    mounting), which the message spells out.

    Args:
      path: the path given by the user.
      write: whether it is an output (the message then says to copy it up afterwards).

    Raises:
      RemotePathError: ``path`` is a ``scheme://`` URL.
    """
    m = _REMOTE.match(os.fspath(path))
    if m:
        url = f"{m[1]}://{m[2]}"
        args = f"-r LOCAL_DIR {url}" if write else f"-r {url} LOCAL_DIR"
        copy = (
            f" with `gsutil -m cp {args}` (or `gcloud storage cp {args}`)" if m[1] == "gs" else ""
        )
        if write:
            fix = f"write a local folder, then copy it{copy}"
        else:
            fix = f"copy it to a local folder{copy} and read that"
        raise RemotePathError(f"{url}: {m[1]}:// paths are not supported; {fix}")
    return pathlib.Path(path).expanduser().absolute()


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


def stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    """The identity of the file or folder at ``path`` (None: nothing there); it changes when
    one is written there, e.g. renamed into place. Tells what an interrupted run wrote."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def interrupted(left: str) -> int:
    """Reports a Ctrl-C in one line on stderr, instead of a KeyboardInterrupt traceback.

    A command line's entry catches ``KeyboardInterrupt`` and returns this.

    Args:
      left: what the interrupted command leaves behind, e.g. ``nothing written at OUT``.

    Returns:
      130, the exit status of a command ended by SIGINT (128 + 2).
    """
    # in a terminal the line holds the echoed ^C (or a progress bar): start a new one
    start = "\n" if sys.stderr.isatty() else ""
    print(f"{start}interrupted: {left}", file=sys.stderr, flush=True)
    return 130


# The command lines run with `python -m` (their modules import JAX, MediaPipe: seconds).
_COMMANDS = ("signnet_jax.", "data_prep.")
# Set by a command for its worker processes (inherited): grain's input workers and the
# dataset builder's start with `spawn`, which imports the command's module again first.
_WORKER_OF = "SIGNNET_WORKER_OF"


def quiet_interrupt_while_starting(argv: list[str] | None = None) -> bool:
    """Makes a Ctrl-C during a command line's imports exit at once with one line (status 130).

    Called by the package ``__init__`` files, which ``python -m signnet_jax.X`` and
    ``python -m data_prep.X`` import first: the imports take seconds, and a
    ``KeyboardInterrupt`` raised inside them prints a traceback. Each command's ``main``
    calls ``interrupt_as_usual`` first; nothing has been done before it.

    Args:
      argv: the interpreter's command line (default ``sys.orig_argv``).

    A worker process of a command (started with ``spawn``: it imports the command's module
    again, for seconds) ignores SIGINT and SIGTERM: a Ctrl-C or a preemption reaches the
    whole process group, and the command stops its workers itself (a worker stopped while
    starting printed a traceback, or failed the batch the command waited for instead of
    letting it save). The command starts them with both signals blocked (as Python's
    resource tracker is started), so one sent before the worker has come this far waits,
    and is dropped here. Its own start-up may set them otherwise.

    Returns:
      Whether the handler was installed: only for ``python -m`` of one of our modules,
      never when the package is imported as a library.
    """
    global _starting
    if _starting is not None:  # once per process: a package imported later, once the
        return False  # command runs (data_prep from train or convert), must not install it
    _starting = False
    argv = sys.orig_argv if argv is None else argv
    # the command's own workers only: not a worker's workers, nor another program's it started
    if argv[-1:] == ["--multiprocessing-fork"] and _WORKER_OF in os.environ:
        if os.environ[_WORKER_OF].endswith(f":{os.getppid()}"):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # drops one that waits
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SHIELDED)
        return False
    module = _run_module(argv)
    if not module.startswith(_COMMANDS):
        return False
    os.environ[_WORKER_OF] = f"{module}:{os.getpid()}"
    multiprocessing.util.spawnv_passfds = _shielded(multiprocessing.util.spawnv_passfds)
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False  # ignored (a background job), or somebody else's handler
    signal.signal(signal.SIGINT, _exit_quietly)
    _starting = True
    return True


# What a command's worker processes ignore; blocked from their start until they do.
_SHIELDED = (signal.SIGINT, signal.SIGTERM)


def _shielded(spawn):
    """``multiprocessing.util.spawnv_passfds`` (which starts every ``spawn`` process), starting
    the new process with SIGINT and SIGTERM blocked: the blocked mask survives ``exec``."""

    @functools.wraps(spawn)
    def spawnv_passfds(path, args, passfds):
        # this thread's mask only (grain starts its workers from its own threads): a signal
        # for the command itself goes to another thread meanwhile, or waits microseconds
        before = signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELDED)
        try:
            return spawn(path, args, passfds)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    return spawnv_passfds


# None until the first call of quiet_interrupt_while_starting; then whether it installed
# the start-up handler (interrupt_as_usual sets it back to False).
_starting: bool | None = None


def _exit_quietly(signum, frame) -> None:
    start = "\n" if sys.stderr.isatty() else ""
    sys.stderr.write(f"{start}interrupted while starting: nothing done\n")
    sys.stderr.flush()
    os._exit(130)


def _run_module(argv: list[str]) -> str:
    """The module of ``python [options] -m MODULE ...`` ("" for a script, -c or a prompt)."""
    args = iter(argv[1:])
    for a in args:
        if a.startswith("-m"):
            return a[2:] or next(args, "")
        if a in ("-X", "-W"):  # options with a separate value
            next(args, None)
        elif not a.startswith("-") or a in ("-", "-c") or a.startswith("-c"):
            return ""
    return ""


def interrupt_as_usual() -> None:
    """Ctrl-C raises KeyboardInterrupt again (each command's ``main`` reports it itself);
    a SIGINT the process inherited as ignored (``cmd &`` in a script) stays ignored."""
    global _starting
    if signal.getsignal(signal.SIGINT) is _exit_quietly:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _starting = False


@contextlib.contextmanager
def ctrl_c_after():
    """Holds a Ctrl-C back to the end of the block: its KeyboardInterrupt is raised there.

    For calls into code that wakes its own threads. A KeyboardInterrupt raised inside
    ``threading.Condition.notify`` after it woke a waiting thread and before it took that
    thread's waiter off its list leaves the waiter there, acquired again by the thread; the
    next notify releases that one, and the thread it was meant for sleeps on (CPython 3.11 to
    3.13). tensorboardX's writer passes events to its thread that way: a Ctrl-C while scalars
    were written left the thread asleep, and ``close()``, which waits for it, never returned.

    A second Ctrl-C in the block raises at once (a call that hangs can still be left). An
    error of the block's own ends it as usual, before a Ctrl-C held back. A handler the block
    installs stays. Off the main thread, or where SIGINT is ignored or has another handler,
    nothing changes.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    held = []

    def hold(signum, frame):
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt
