"""Option checks shared by the benchmarks: a bad value is a one-line argparse error (exit 2)."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """argparse type: a whole number >= 1 (repeats, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"give a whole number >= 1, not {text!r}")
    return value


def check_clip(parser: argparse.ArgumentParser, preset: str, frames: int, size: int) -> str:
    """The canonical name of ``preset``, after refusing a preset, ``--frames`` or ``--size``
    that makes no model (``parser.error`` names the option and the fix)."""
    from signnet_jax.models import vit  # not for bench/hht.py, which needs no JAX

    try:
        preset = vit.resolve_preset(preset)
    except ValueError as e:
        parser.error(f"--preset: {e}")
    for problem in vit.clip_problems(preset, frames, size, ("--frames", "--size")):
        parser.error(problem)
    return preset


def require_torch(parser: argparse.ArgumentParser, instead: str) -> None:
    """``parser.error`` when PyTorch, which times the reference, is not installed; ``instead``
    says what runs without it."""
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        parser.error(
            "the PyTorch reference needs torch: pip install -e '.[test]' (a CPU build); " + instead
        )
