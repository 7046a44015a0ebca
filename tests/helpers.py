"""Helpers shared by the command-line tests."""

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs ENTRY(argv) (MODULE:FUNCTION; a bare MODULE runs as `python -m MODULE ARGV`) in a fresh
# process that gets SIGINT, as Ctrl-C in a terminal sends it, right after TARGET
# (MODULE:ATTRIBUTE.PATH, or ...#N: its N-th call) returns: a known point of the run, with no
# timing involved. With SIGINT_GROUP set the whole process group gets it, as from a terminal;
# SIGNAL_AFTER names another signal (SIGTERM: a preemption at that point).
_DRIVER = """
import functools, importlib, os, runpy, signal, sys


def resolve(spec):
    module, _, path = spec.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


target, _, nth = sys.argv[1].partition("#")
owner, name = resolve(target)
real, calls = getattr(owner, name), []


@functools.wraps(real)
def then_ctrl_c(*args, **kwargs):
    out = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == int(nth or 1):
        sig = getattr(signal, os.environ.get("SIGNAL_AFTER", "SIGINT"))
        if os.environ.get("SIGINT_GROUP"):
            os.killpg(0, sig)
        else:
            os.kill(os.getpid(), sig)
    return out


setattr(owner, name, then_ctrl_c)
if ":" in sys.argv[2]:
    entry, function = resolve(sys.argv[2])
    sys.exit(getattr(entry, function)(sys.argv[3:]))
sys.argv = [sys.argv[2], *sys.argv[3:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def interrupt_after_command(target: str, entry: str, *args) -> list[str]:
    """The command line of ``entry`` with ``args`` getting SIGINT (or the signal named by
    $SIGNAL_AFTER) once ``target`` has returned (see ``interrupt_after``), to run from the
    repository."""
    return [sys.executable, "-c", _DRIVER, target, entry, *map(str, args)]


def interrupt_after(
    target: str, entry: str, *args, group: bool = False
) -> subprocess.CompletedProcess:
    """``entry`` with ``args`` run from the repository in a subprocess that gets SIGINT once
    ``target`` has returned (``target#N``: its N-th call); with ``group``, its whole process
    group (worker processes too) gets it, in a session of its own."""
    env = {k: v for k, v in os.environ.items() if k != "SIGINT_GROUP"}
    return subprocess.run(
        interrupt_after_command(target, entry, *args),
        cwd=REPO,
        env=env | ({"SIGINT_GROUP": "1"} if group else {}),
        start_new_session=group,
        capture_output=True,
        text=True,
        timeout=300,
    )
