"""Temporal and spatial sampling rules of the VideoMAEv2 fine-tuning pipeline.

Pure index arithmetic, no image data. The rules follow the published
``VideoClsDataset`` (VideoMAEv2 ``dataset/datasets.py``) for one temporal
segment, including its quirks, because SignNet's numbers were produced with it:

* train: a window of ``clip_len * sampling_rate`` frames ending at a random
  frame; ``clip_len`` frames are taken with ``np.linspace`` over the window (so
  the stride is ``clip_len * sampling_rate / (clip_len - 1)``, not exactly
  ``sampling_rate``). Shorter videos spread ``n // sampling_rate`` frames over
  the whole video and pad with the last frame.
* validation: the same window, centred.
* test: every ``sampling_rate``-th frame, padded with the last frame to
  ``clip_len``, then ``num_segment`` evenly spaced windows of ``clip_len``; for
  spatial crops the short side is resized and ``num_crop`` evenly spaced
  squares are cut along the long side. With one segment (or crop) the
  reference divides by zero; like its later versions we use step 0, i.e. the
  first window (crop).
"""

from __future__ import annotations

import numpy as np


def _check(num_frames: int, clip_len: int, sampling_rate: int) -> None:
    if num_frames < 1:
        raise ValueError(f"video has {num_frames} frames; need at least 1")
    if clip_len < 1 or sampling_rate < 1:
        raise ValueError(
            f"clip_len ({clip_len}) and sampling_rate ({sampling_rate}) must be positive"
        )


def train_window_end_range(num_frames: int, clip_len: int, sampling_rate: int) -> tuple[int, int]:
    """Half-open range [low, high) of the random window end; (0, 0) if the video is short."""
    converted = clip_len * sampling_rate
    if num_frames <= converted:
        return (0, 0)
    return (converted, num_frames)


def window_indices(num_frames: int, clip_len: int, sampling_rate: int, end: int) -> np.ndarray:
    """Frame indices of a window ending at ``end`` (ignored for short videos).

    Args:
      num_frames: frames in the video.
      clip_len: frames in the clip.
      sampling_rate: temporal stride of the reference sampler.
      end: window end, in ``train_window_end_range`` (any value for short videos).

    Returns:
      int64 array of ``clip_len`` frame indices in [0, num_frames).
    """
    _check(num_frames, clip_len, sampling_rate)
    converted = clip_len * sampling_rate
    if num_frames <= converted:
        count = num_frames // sampling_rate
        index = np.linspace(0, num_frames, num=count)
        index = np.concatenate([index, np.full(clip_len - count, float(num_frames))])
        return np.clip(index, 0, num_frames - 1).astype(np.int64)
    if not converted <= end < num_frames:
        raise ValueError(f"window end {end} outside [{converted}, {num_frames})")
    start = end - converted
    index = np.linspace(start, end, num=clip_len)
    return np.clip(index, start, end - 1).astype(np.int64)


def train_indices(
    num_frames: int, clip_len: int, sampling_rate: int, rng: np.random.Generator
) -> np.ndarray:
    """Random training clip (reference ``mode='train'``, one segment)."""
    low, high = train_window_end_range(num_frames, clip_len, sampling_rate)
    end = int(rng.integers(low, high)) if high > low else 0
    return window_indices(num_frames, clip_len, sampling_rate, end)


def val_indices(num_frames: int, clip_len: int, sampling_rate: int) -> np.ndarray:
    """Centred validation clip (reference ``mode='validation'``)."""
    converted = clip_len * sampling_rate
    end = (converted + num_frames) // 2 if num_frames > converted else 0
    return window_indices(num_frames, clip_len, sampling_rate, end)


def test_indices(
    num_frames: int, clip_len: int, sampling_rate: int, num_segment: int, segment: int
) -> np.ndarray:
    """Frame indices of test clip ``segment`` of ``num_segment`` (reference ``mode='test'``).

    Args:
      num_frames: frames in the video.
      clip_len: frames per clip.
      sampling_rate: take every ``sampling_rate``-th frame.
      num_segment: evenly spaced clips per video.
      segment: which clip, in [0, num_segment).

    Returns:
      int64 array of ``clip_len`` frame indices.
    """
    _check(num_frames, clip_len, sampling_rate)
    if not 0 <= segment < num_segment:
        raise ValueError(f"segment {segment} outside [0, {num_segment})")
    strided = np.arange(0, num_frames, sampling_rate, dtype=np.int64)
    if len(strided) < clip_len:
        strided = np.concatenate([strided, np.full(clip_len - len(strided), strided[-1])])
    step = max((len(strided) - clip_len) / (num_segment - 1), 0.0) if num_segment > 1 else 0.0
    start = int(segment * step)
    return strided[start : start + clip_len]


def short_side_resize_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the short side to ``size`` (reference rounding: floor)."""
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def test_crop_offset(
    height: int, width: int, size: int, num_crop: int, crop: int
) -> tuple[int, int]:
    """(top, left) of square crop ``crop`` of ``num_crop`` in a short-side-resized frame.

    Args:
      height, width: frame size after the short side was resized to ``size``.
      size: crop side (the reference's ``short_side_size``).
      num_crop: crops per clip, spread along the long side.
      crop: which crop, in [0, num_crop).

    Returns:
      (top, left) pixel offset.
    """
    if not 0 <= crop < num_crop:
        raise ValueError(f"crop {crop} outside [0, {num_crop})")
    step = (max(height, width) - size) / (num_crop - 1) if num_crop > 1 else 0.0
    start = int(crop * step)
    return (start, 0) if height >= width else (0, start)


def center_crop_offset(height: int, width: int, size: int) -> tuple[int, int]:
    """(top, left) of the reference ``CenterCrop`` (Python round, half to even)."""
    if size > height or size > width:
        raise ValueError(f"crop {size} larger than frame {height}x{width}")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
