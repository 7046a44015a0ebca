"""Option checks shared by the benchmarks: a bad value is a one-line argparse error (exit 2)."""

from __future__ import annotations

import argparse

from signnet_jax.models import vit


def positive(text: str) -> int:
    """argparse type: a whole number >= 1 (repeats, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"give a whole number >= 1, not {text!r}")
    return value


def _nearest(value: int, multiple: int) -> int:
    return max(multiple, (value + multiple // 2) // multiple * multiple)


def check_clip(parser: argparse.ArgumentParser, preset: str, frames: int, size: int) -> str:
    """The canonical name of ``preset``, after refusing a preset, ``--frames`` or ``--size``
    that makes no model (``parser.error`` names the option and the fix)."""
    try:
        preset = vit.resolve_preset(preset)
    except ValueError as e:
        parser.error(f"--preset: {e}")
    tubelet, patch = vit.ViTConfig.tubelet_size, vit.PRESETS[preset]["patch_size"]
    if frames < 1 or frames % tubelet:
        parser.error(
            f"--frames {frames}: give a positive multiple of {tubelet} (the model embeds frames "
            f"in groups of {tubelet}), e.g. --frames {_nearest(frames, tubelet)}"
        )
    if size < 1 or size % patch:
        parser.error(
            f"--size {size}: give a positive multiple of {patch} (the patch size of ViT-{preset}), "
            f"e.g. --size {_nearest(size, patch)}"
        )
    return preset
