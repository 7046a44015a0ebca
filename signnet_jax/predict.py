"""Predict the sign in a raw video: H&HT -> the multi-view test protocol -> top-k glosses.

python -m signnet_jax.predict --checkpoint DIR --video IN [IN ...] [--top-k 5] [--json] \
    [--save-hht OUT.mp4] [--preview OUT.png] [--fps F] [--start-frame N] [--end-frame M] \
    [--models DIR] [--batch N] [--step latest|best|N]

The video goes through exactly what an evaluation of the same video would see:
H&HT with the checkpoint's settings, the tunnelled frames JPEG-encoded as the
record builder stores them, then the input pipeline's own test views
(``pipeline.EvalViews`` + ``pipeline.EvalClip``: every ``sampling_rate``-th
frame, padded with the last, ``test_num_segment`` clips x ``test_num_crop``
crops of the short-side-resized frames). Softmax probabilities are averaged over
the views. ``DIR`` is a model checkpoint (``signnet_jax.convert`` or training)
or a training workdir (its ``checkpoints`` folder); ``--step`` picks the step
(latest by default, or best by validation top-1, or a number).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from signnet_jax import checkpointing, metrics
from signnet_jax.data import device, pipeline
from signnet_jax.files import atomic_write, interrupt_as_usual, interrupted, stamp
from signnet_jax.hht import HHTResult, HHTSettings, NoPersonWarning, Tunneller, coverage
from signnet_jax.hht.models import ModelFileError
from signnet_jax.hht.preview import contact_sheet
from signnet_jax.hht.video import (
    VideoError,
    VideoWarning,
    check_writable,
    decode_video,
    write_video,
)
from signnet_jax.models import vit

# data_prep.build_records' default; used when the checkpoint does not record its records' quality.
DEFAULT_JPEG_QUALITY = 90


class PredictError(ValueError):
    """Nothing can be predicted: a bad checkpoint, video or option (the message says why)."""


@dataclasses.dataclass(frozen=True)
class InputSettings:
    """The test-view rules a checkpoint was evaluated with (meta['input'])."""

    num_frames: int
    sampling_rate: int
    img_size: int
    short_side_size: int
    test_num_segment: int
    test_num_crop: int
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    @property
    def num_views(self) -> int:
        return self.test_num_segment * self.test_num_crop

    @classmethod
    def from_meta(cls, meta_input: dict | None, cfg: vit.ViTConfig) -> InputSettings:
        """Settings from a checkpoint's ``meta['input']``; None -> the published test defaults.

        Args:
          meta_input: the checkpoint's input dict, or None (converted checkpoints).
          cfg: the model config (clip length and frame size when ``meta_input`` is None).

        Returns:
          The settings.
        """
        if meta_input is None:
            return cls(cfg.num_frames, 2, cfg.img_size, cfg.img_size, 3, 1)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(meta_input) - known)
        if unknown:
            raise ValueError(f"unknown input settings {unknown}; known are {sorted(known)}")
        meta_input = dict(meta_input)
        if meta_input.get("jpeg_quality") is None:  # records built without recording it
            meta_input["jpeg_quality"] = DEFAULT_JPEG_QUALITY
        settings = cls(**meta_input)
        for name in known:
            value = getattr(settings, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"input setting {name} must be a positive integer, got {value!r}")
        if settings.num_frames != cfg.num_frames:
            raise ValueError(
                f"input num_frames {settings.num_frames} differs from the model's {cfg.num_frames}"
            )
        return settings


@dataclasses.dataclass
class Prediction:
    """Everything one prediction produced.

    Attributes:
      report: the JSON-able summary (what ``Predictor.predict`` returns).
      probabilities: (num_classes,) float64 softmax averaged over the views.
      hht: the H&HT result (tunnelled frames, boxes, box sources).
      source_frames: (N, H, W, 3) uint8 RGB decoded frames (for a contact sheet).
      views: (num_views, T, S, S, 3) uint8 clips the model saw.
    """

    report: dict[str, Any]
    probabilities: np.ndarray
    hht: HHTResult
    source_frames: np.ndarray
    views: np.ndarray


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """The checkpoint folder behind ``path`` (see ``checkpointing.resolve_checkpoint``).

    Raises:
      PredictError: nothing usable at ``path`` (the message says what was expected).
    """
    try:
        return checkpointing.resolve_checkpoint(path)
    except checkpointing.CheckpointError as e:
        raise PredictError(str(e)) from e


def _read_checkpoint(directory: pathlib.Path, which: int | str) -> tuple[dict, dict, int]:
    try:
        step = checkpointing.select_step(directory, which)
        params, meta = checkpointing.load_model(directory, step)
    except checkpointing.CheckpointError as e:
        raise PredictError(str(e)) from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise PredictError(
            f"{directory}: the checkpoint metadata has no model config; it was not written "
            "by signnet_jax.convert or training"
        )
    return params, meta, step


def _class_names(meta: dict, num_classes: int, directory: pathlib.Path) -> tuple[list[str], bool]:
    """(names, generated): the checkpoint's class names or class_0, class_1, ..."""
    classes = meta.get("classes")
    if classes is None:
        return [f"class_{i}" for i in range(num_classes)], True
    if len(classes) != num_classes:
        raise PredictError(
            f"{directory}: the checkpoint lists {len(classes)} class names but the model "
            f"head has {num_classes} classes"
        )
    return [str(c) for c in classes], False


def _shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    """{'blocks/0/attn/qkv/kernel': shape, ...}; keys as strings (orbax stores them so)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
        for path, leaf in flat
    }


def _check_params(params: dict, cfg: vit.ViTConfig, where: pathlib.Path) -> None:
    """Raises PredictError naming the parameters that do not fit ``cfg``."""
    have, want = _shapes(params), _shapes(vit.abstract_params(cfg))
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [
        f"{k} has shape {have[k]}, the config needs {want[k]}"
        for k in sorted(set(have) & set(want))
        if have[k] != want[k]
    ]
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise PredictError(
            f"{where}: the parameters do not fit the model config in its metadata "
            f"({len(problems)} problems: {shown})"
        )


def _jpeg_round_trip(frames: np.ndarray, quality: int) -> list[bytes]:
    # The records hold frames exactly as data_prep.build_records.encode_jpeg writes them
    # (OpenCV, BGR order, this quality); EvalClip decodes them again, so predict sees
    # the same pixels an evaluation of this video does.
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    out = []
    for frame in frames:
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., ::-1]), params)
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for a frame of shape {frame.shape}")
        out.append(buf.tobytes())
    return out


# Without the training videos' frame rate in the checkpoint, a rate above HIGH_FPS or below
# LOW_FPS gets a warning (the published models saw 25-30 fps videos: 25 / FPS_TOLERANCE).
HIGH_FPS = 40
LOW_FPS = 16
# With it, a rate more than this factor above or below it gets a warning.
FPS_TOLERANCE = 1.5


def frame_rate_warning(name: str, rate: float, train_fps: float | None) -> str | None:
    """A warning when a video's frame rate is far from the training videos' (None if not).

    Args:
      name: what the message calls the video.
      rate: the frame rate the model will see.
      train_fps: the training videos' median frame rate (checkpoint ``train_fps``), or None.
    """
    if train_fps is None:
        if rate > HIGH_FPS:
            return (
                f"{name} runs at {rate:g} fps; the published models were trained on videos of "
                "about 25-30 fps, so each clip covers a shorter stretch of the sign than in "
                "training; try --fps 30"
            )
        if rate < LOW_FPS:
            return (
                f"{name} runs at {rate:g} fps; the published models were trained on videos of "
                "about 25-30 fps, so each clip covers a longer stretch of the sign than in "
                "training; try --fps 25 (repeats frames)"
            )
        return None
    trained = f"this model was trained on videos of {train_fps:g} fps (median)"
    if rate > train_fps * FPS_TOLERANCE:
        return (
            f"{name} runs at {rate:g} fps; {trained}, so each clip covers a shorter stretch "
            f"of the sign than in training; try --fps {train_fps:g}"
        )
    if rate * FPS_TOLERANCE < train_fps:
        return (
            f"{name} runs at {rate:g} fps; {trained}, so each clip covers a longer stretch "
            f"of the sign than in training; try --fps {train_fps:g} (repeats frames)"
        )
    return None


def resample(frames: np.ndarray, times: np.ndarray, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """The frames at another frame rate: at each time ``times[0] + k / fps`` up to the last
    frame's time, the latest frame shown at that time (exact for variable frame rates too;
    a higher rate repeats frames).

    Args:
      frames: (N, ...) frames in order.
      times: (N,) their non-decreasing presentation times in seconds.
      fps: the new frame rate (> 0).

    Returns:
      (frames, times) at the new rate.
    """
    ticks = times[0] + np.arange(int(np.floor((times[-1] - times[0]) * fps + 1e-9)) + 1) / fps
    index = np.searchsorted(times, ticks + 1e-9, side="right") - 1
    return frames[index], ticks


# A video longer than this (isolated signs last a few seconds) whose views cover less than
# half of its frames gets a warning.
LONG_VIDEO_SECONDS = 10


def make_views(frames: np.ndarray, settings: InputSettings, name: str = "video") -> np.ndarray:
    """The test views of one tunnelled video, built by the input pipeline's own transforms.

    Args:
      frames: (N, H, W, 3) uint8 RGB H&HT frames.
      settings: the checkpoint's test-view rules.
      name: what error messages call the video.

    Returns:
      (num_views, num_frames, S, S, 3) uint8 clips, S = short_side_size, in the
      pipeline's view order (segment-major, then crop).
    """
    jpegs = _jpeg_round_trip(frames, settings.jpeg_quality)
    record = {"frames": jpegs, "num_frames": np.array([len(jpegs)]), "label": np.array([-1])}
    views = pipeline.EvalViews(
        [record], settings.test_num_segment, settings.test_num_crop, settings.num_views
    )
    clip_of = pipeline.EvalClip(
        lambda index, element=None: name,
        "test",
        settings.num_frames,
        settings.sampling_rate,
        settings.test_num_segment,
        settings.test_num_crop,
        settings.short_side_size,
        settings.img_size,
    )
    return np.stack([clip_of.map(views[g])["clip"] for g in range(settings.num_views)])


def rank_classes(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The k most probable classes, most probable first (ties: lower class index first).

    Args:
      probabilities: (num_classes,) probabilities.
      classes: class names.
      k: how many (capped at the number of classes).

    Returns:
      [{'rank': 1, 'label': index, 'gloss': name, 'probability': p}, ...].
    """
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {
            "rank": r + 1,
            "label": int(i),
            "gloss": classes[i],
            "probability": float(probabilities[i]),
        }
        for r, i in enumerate(order)
    ]


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def model_for_platform(cfg: vit.ViTConfig, platform: str) -> tuple[vit.ViTConfig, str | None]:
    """A checkpoint's model as this machine runs it, and a note where that differs: a model
    trained in float16 (on a T4 or V100) computes in bfloat16 where float16 does not run
    (TPUs)."""
    if vit.unsupported_dtype(cfg.dtype, platform):
        note = f"the checkpoint computes in {cfg.dtype}, which does not run here: bfloat16 instead"
        return dataclasses.replace(cfg, dtype="bfloat16"), note
    return cfg, None


class Predictor:
    """A loaded, compiled model plus an H&HT tunneller, ready to predict many videos.

    Use as a context manager (or call close()) so the MediaPipe tasks are released.

    Attributes:
      checkpoint: the resolved checkpoint folder.
      step: the checkpoint step that was loaded.
      classes: class names (``class_0``... when the checkpoint has none).
      model_cfg, hht_settings, input_settings: what the checkpoint prescribes.
      notes: remarks about defaults that were applied (no class names, no H&HT settings...).
      startup_ms: time spent loading ('load') and compiling ('compile').
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        models_dir: str | os.PathLike | None = None,
        batch_size: int | None = None,
        step: int | str = "latest",
    ):
        """Loads the checkpoint, compiles the model and starts the H&HT tunneller.

        Args:
          checkpoint_dir: a model checkpoint folder or a training workdir.
          models_dir: MediaPipe model folder (default: $SIGNNET_MEDIAPIPE_MODELS, else
            the download cache).
          batch_size: views per forward pass (default: 1 on a CPU, else all views of a
            video at once); smaller batches need less memory.
          step: 'latest', 'best' (highest validation top-1 of a training run) or a step
            number.

        Raises:
          PredictError: the checkpoint cannot be used, or bad batch_size.
          FileNotFoundError: MediaPipe model files missing.
        """
        t0 = time.perf_counter()
        self.checkpoint = resolve_checkpoint(checkpoint_dir)
        params, meta, self.step = _read_checkpoint(self.checkpoint, step)
        where = self.checkpoint
        self.notes: list[str] = []
        try:
            # the attention kernel and the scan over the blocks are this machine's choices,
            # not the training machine's
            self.model_cfg, note = model_for_platform(
                vit.ViTConfig.from_dict(
                    {**meta["model"], "attention": "auto", "scan_layers": False}
                ),
                jax.devices()[0].platform,
            )
            self.notes += [note] if note else []
            self.input_settings = InputSettings.from_meta(meta.get("input"), self.model_cfg)
            hht = meta.get("hht")
            self.hht_settings = HHTSettings() if hht is None else HHTSettings.from_dict(hht)
        except (TypeError, ValueError) as e:
            raise PredictError(f"{where}: unusable checkpoint metadata: {e}") from e
        train_fps = meta.get("train_fps")
        # the training videos' median frame rate (None: not recorded, e.g. converted checkpoints)
        self.train_fps = (
            float(train_fps) if isinstance(train_fps, int | float) and train_fps > 0 else None
        )
        self.classes, generated = _class_names(meta, self.model_cfg.num_classes, where)
        if generated:
            self.notes.append(
                f"the checkpoint has no class names; reporting class_0..class_"
                f"{self.model_cfg.num_classes - 1} (convert with --class-list to name them)"
            )
        if hht is None:
            self.notes.append(
                "the checkpoint records no H&HT settings; using the defaults (convert "
                "published SignNet weights with --hht faithful to get the original's)"
            )
        if meta.get("input") is None:
            s = self.input_settings
            self.notes.append(
                f"the checkpoint records no test-view settings; using sampling rate "
                f"{s.sampling_rate}, {_count(s.test_num_segment, 'clip')} x "
                f"{_count(s.test_num_crop, 'crop')} of {s.short_side_size} px"
            )
        views = self.input_settings.num_views
        if batch_size is None:
            # On a CPU one view at a time is faster and needs less than half the memory of
            # all views at once (ViT-B 32x224, 3 views: 54 s / 3.4 GB vs 64 s / 7.2 GB).
            batch_size = 1 if jax.default_backend() == "cpu" else views
        self.batch_size = batch_size
        if self.batch_size < 1:
            raise PredictError(f"batch size must be >= 1, got {self.batch_size}")
        self.batch_size = min(self.batch_size, views)
        _check_params(params, self.model_cfg, where)
        model = vit.model_from_params(self.model_cfg, params)
        self._graphdef, self._state = nnx.split(model)
        t1 = time.perf_counter()
        self._forward = self._compile()
        t2 = time.perf_counter()
        # Last, so a failure above leaves no MediaPipe tasks open.
        self._tunneller = Tunneller(self.hht_settings, models_dir)
        load = (t1 - t0) + (time.perf_counter() - t2)
        self.startup_ms = {"load": _ms(load), "compile": _ms(t2 - t1)}

    def _compile(self):
        """Ahead-of-time compiled softmax of a (batch, T, S, S, 3) uint8 batch of views."""
        graphdef, dtype = self._graphdef, jnp.dtype(self.model_cfg.dtype)

        def probs(state, clip):
            logits = nnx.merge(graphdef, state)(device.normalize(clip, dtype))
            return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

        s = self.input_settings
        shape = (self.batch_size, s.num_frames, s.short_side_size, s.short_side_size, 3)
        try:
            return (
                jax.jit(probs).lower(self._state, jax.ShapeDtypeStruct(shape, jnp.uint8)).compile()
            )
        except ValueError as e:
            raise PredictError(
                f"{self.checkpoint}: the model cannot take {shape} clips: {e}"
            ) from e

    def close(self) -> None:
        """Releases the MediaPipe tasks (idempotent)."""
        self._tunneller.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(
        self,
        video_path: str | os.PathLike,
        top_k: int = 5,
        save_hht: str | os.PathLike | None = None,
        start_frame: int = 0,
        end_frame: int | None = None,
        fps: float | None = None,
    ) -> Prediction:
        """Predicts one video and keeps the intermediate arrays.

        Args:
          video_path: a raw video file (anything FFmpeg decodes).
          top_k: how many classes to report (capped at the number of classes).
          save_hht: if given, the tunnelled video is also written there (H.264 MP4).
          start_frame: first source frame used.
          end_frame: one past the last source frame used (None: to the end).
          fps: a frame rate to resample the video to first (``resample``), e.g. 30 for a
            60 fps phone recording (a higher rate repeats frames); None keeps the video's
            own frames.

        Returns:
          The prediction (``report`` as described in ``predict``).

        Raises:
          PredictError: bad top_k, unreadable video, or a video in which nothing can be
            seen (no person and the H&HT layout draws no whole-frame cell).
        """
        if top_k < 1:
            raise PredictError(f"top_k must be >= 1, got {top_k}")
        if fps is not None and not fps > 0:
            raise PredictError(f"fps must be > 0, got {fps}")
        if save_hht is not None:
            check_output("--save-hht", save_hht, video_path)
        timings: dict[str, float] = {}
        t_start = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as decode_warnings:
                warnings.simplefilter("always", VideoWarning)
                frames, source_fps, times = decode_video(video_path, start_frame, end_frame)
        except VideoError as e:
            raise PredictError(str(e)) from e
        decoded = len(frames)
        rate = source_fps
        if fps is not None and fps != source_fps:
            frames, times = resample(frames, times, fps)
            rate = fps
        timings["decode"] = _ms(time.perf_counter() - t_start)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NoPersonWarning)
            hht = self._tunneller.process_frames(frames, rate, times, name=str(video_path))
        timings["hht"] = _ms(time.perf_counter() - t0)
        notes = list(self.notes)
        if fps is not None and fps > source_fps:
            notes.append(
                f"--fps {fps:g} is above the video's {source_fps:g} fps: frames are repeated "
                f"({len(frames)} from {decoded})"
            )
        messages = []
        if len(frames) < 2:
            messages.append(
                f"{video_path} has a single frame (a still image?); the model was trained on "
                "clips of a moving signer, so this prediction means little"
            )
        rate_warning = frame_rate_warning(str(video_path), rate, self.train_fps)
        if rate_warning and fps is None:
            messages.append(rate_warning)
        s = self.input_settings
        span = s.num_frames * s.sampling_rate  # source frames one clip covers
        seen = min(s.test_num_segment * span, len(frames))
        if len(frames) / rate > LONG_VIDEO_SECONDS and seen < len(frames) / 2:
            messages.append(
                f"{video_path}: {len(frames)} frames ({len(frames) / rate:.0f} s), but each of "
                f"the {_count(s.test_num_segment, 'clip')} the model sees covers {span} frames, "
                "so most of the video is not seen; trim it to one sign (--start-frame and "
                "--end-frame)"
            )
        no_person = False
        for w in [*decode_warnings, *caught]:
            if issubclass(w.category, (NoPersonWarning, VideoWarning)):
                messages.append(str(w.message))
                no_person |= issubclass(w.category, NoPersonWarning)
            else:  # not ours to handle: pass it on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if no_person and not self.hht_settings.quadrants[0]:
            raise PredictError(
                f"{video_path}: no head or hand found in any frame, and the checkpoint's H&HT "
                "layout has no whole-frame cell, so every tunnelled frame is black; use a "
                "video where the signer is visible"
            )
        t0 = time.perf_counter()
        views = make_views(hht.frames, self.input_settings, str(video_path))
        timings["views"] = _ms(time.perf_counter() - t0)
        t0 = time.perf_counter()
        probabilities = self._average_probabilities(views)
        timings["inference"] = _ms(time.perf_counter() - t0)
        if save_hht is not None:
            t0 = time.perf_counter()
            try:
                write_video(save_hht, hht.frames, hht.fps)
            except OSError as e:  # e.g. the disk filled up while encoding
                raise PredictError(f"cannot write --save-hht {save_hht}: {e}") from e
            timings["save_hht"] = _ms(time.perf_counter() - t0)
        timings["total"] = _ms(time.perf_counter() - t_start)
        report = {
            "video": str(video_path),
            "source": {
                "frames": decoded,  # decoded in [start_frame, end_frame), before resampling
                "fps": float(source_fps),
                "start_frame": start_frame,
                "end_frame": end_frame,
                "resampled_to_fps": None if rate == source_fps else float(rate),
            },
            "checkpoint": str(self.checkpoint),
            "step": self.step,
            "top_k": rank_classes(probabilities, self.classes, top_k),
            "views": {
                "count": s.num_views,
                "clips": s.test_num_segment,
                "crops": s.test_num_crop,
                "frames_per_clip": s.num_frames,
                "sampling_rate": s.sampling_rate,
                "size": s.short_side_size,
                "train_fps": self.train_fps,  # the training videos' median frame rate
            },
            "hht": {
                "frames": int(len(hht.frames)),
                "fps": float(hht.fps),
                "source_size": [int(v) for v in hht.source_size],
                "coverage": coverage(hht.box_source),
            },
            "timings_ms": timings,
            "warnings": messages,
            "notes": notes,
        }
        return Prediction(report, probabilities, hht, frames, views)

    def predict(
        self,
        video_path: str | os.PathLike,
        top_k: int = 5,
        save_hht: str | os.PathLike | None = None,
        start_frame: int = 0,
        end_frame: int | None = None,
        fps: float | None = None,
    ) -> dict[str, Any]:
        """Predicts the sign in one raw video.

        Args:
          video_path: a raw video file.
          top_k: how many classes to report (capped at the number of classes).
          save_hht: if given, the tunnelled video is also written there.
          start_frame: first source frame used.
          end_frame: one past the last source frame used (None: to the end).
          fps: a frame rate to resample the video to first (see ``run``).

        Returns:
          JSON-able dict: ``video``, ``source`` (frames decoded, fps, start_frame,
          end_frame, resampled_to_fps), ``checkpoint``, ``step``, ``top_k`` (list of
          ``{rank, label, gloss, probability}``, most probable first), ``views``
          (count, clips, crops, frames_per_clip, sampling_rate, size), ``hht``
          (frames, fps, source_size, coverage per part), ``timings_ms`` (decode, hht,
          views, inference[, save_hht], total; start-up costs are in
          ``Predictor.startup_ms``), ``warnings`` (e.g. no person found) and ``notes``
          (defaults applied).
        """
        return self.run(video_path, top_k, save_hht, start_frame, end_frame, fps).report

    def _average_probabilities(self, views: np.ndarray) -> np.ndarray:
        """Softmax of every view, averaged (float64) over the views."""
        b = self.batch_size
        out = []
        for i in range(0, len(views), b):
            chunk = views[i : i + b]
            n = len(chunk)
            if n < b:  # pad to the compiled batch; the padding's output is dropped
                chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], np.uint8)])
            out.append(np.asarray(self._forward(self._state, chunk))[:n])
        return np.concatenate(out).astype(np.float64).mean(axis=0)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_report(report: dict[str, Any]) -> str:
    """Human-readable summary of a prediction (what the CLI prints without --json)."""
    h, src = report["hht"], report["source"]
    v = report["views"]
    # the file as read (its span), then what --fps made of it
    resampled = (
        f" (resampled to {src['resampled_to_fps']:g} fps: {h['frames']} frames)"
        if src.get("resampled_to_fps") is not None
        else ""
    )
    lines = [
        f"{report['video']}: {src['frames']} frames, {src['fps']:g} fps, "
        f"{h['source_size'][1]}x{h['source_size'][0]}{resampled}",
        f"checkpoint {report['checkpoint']} (step {report['step']})",
        "H&HT: "
        + ", ".join(
            f"{part.replace('_', ' ')} {c['located']}/{h['frames']} frames"
            for part, c in h["coverage"].items()
        ),
        f"views: {_count(v['clips'], 'clip')} x {_count(v['crops'], 'crop')} of "
        f"{v['frames_per_clip']} frames (every {v['sampling_rate']}), {v['size']} px",
    ]
    width = max(len(t["gloss"]) for t in report["top_k"])
    for t in report["top_k"]:
        lines.append(f"{t['rank']:>3}. {t['gloss']:<{width}}  {t['probability']:.4f}")
    return "\n".join(lines)


def preview_figure(prediction: Prediction, top: int = 5):
    """A picture of one prediction: the H&HT contact sheet (source frames with the head and
    hand boxes beside the tunnelled frames) above the top glosses' probabilities, and the
    warnings below them.

    Args:
      prediction: what ``Predictor.run`` returned.
      top: glosses shown (at most the report's top_k).

    Returns:
      A matplotlib Figure with an Agg canvas (``fig.savefig`` writes it; no pyplot state).
    """
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    report = prediction.report
    h, src, v = prediction.hht, report["source"], report["views"]
    resampled = src["resampled_to_fps"] is not None
    sheet = contact_sheet(
        prediction.source_frames,
        h.frames,
        h.boxes,
        h.box_source,
        first_frame=0 if resampled else src["start_frame"],
    )
    ranked = report["top_k"][:top]
    notes = [f"warning: {w}" for w in report["warnings"]]
    wrapped = [line for n in notes for line in textwrap.wrap(n, 110, subsequent_indent="  ")]
    width = 10.0
    heights = [width * sheet.shape[0] / sheet.shape[1], 0.38 * len(ranked) + 0.9]
    if wrapped:
        heights.append(0.2 * len(wrapped) + 0.2)
    # One subfigure a part, each laid out on its own: the gloss labels do not push the
    # contact sheet aside.
    fig = Figure(figsize=(width, sum(heights) + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    parts = fig.subfigures(len(heights), 1, height_ratios=heights)
    ax = parts[0].subplots()
    ax.imshow(sheet)
    ax.axis("off")
    frames = f"{h.fps:g} fps after resampling" if resampled else f"{h.fps:g} fps"
    ax.set_title(
        f"{pathlib.Path(report['video']).name}: {len(h.frames)} frames ({frames}); H&HT boxes "
        "(landmark / pose fallback / interpolated) and the tunnelled frames",
        fontsize=10,
        parse_math=False,  # file names and glosses are text: '$5_$6' is no formula
    )
    ax = parts[1].subplots()
    names = [metrics.short_name(t["gloss"]) for t in ranked]
    probs = [t["probability"] for t in ranked]
    y = np.arange(len(ranked))
    ax.barh(y, probs, height=0.7, color=["#2ca02c"] + ["#7f7f7f"] * (len(ranked) - 1))
    ax.set_yticks(y, names, fontsize=10, parse_math=False)
    ax.set_ylim(len(ranked) - 0.4, -0.6)  # rank 1 on top
    for yi, p in zip(y, probs, strict=True):
        ax.text(p, yi, f" {p:.3f}", va="center", fontsize=9)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(
        f"probability (softmax averaged over {_count(v['count'], 'view')}: "
        f"{_count(v['clips'], 'clip')} x {_count(v['crops'], 'crop')})",
        fontsize=9,
    )
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(
        f"top {len(ranked)} of {len(prediction.probabilities)} glosses, checkpoint step "
        f"{report['step']}",
        fontsize=10,
    )
    if wrapped:
        ax = parts[2].subplots()
        ax.axis("off")
        ax.text(0, 1, "\n".join(wrapped), va="top", fontsize=8.5, color="#b03020", parse_math=False)
    return fig


def write_preview(path: str | os.PathLike, prediction: Prediction, top: int = 5) -> None:
    """Writes ``preview_figure`` as a PNG, whole or not at all."""
    import io

    buf = io.BytesIO()
    preview_figure(prediction, top).savefig(buf, format="png")
    atomic_write(path, buf.getvalue())


def with_startup(startup_ms: dict[str, float], video_ms: dict[str, float]) -> dict[str, float]:
    """A video's timings after the predictor's start-up ones, its total counting both."""
    video_ms = dict(video_ms)
    total = video_ms.pop("total") + sum(startup_ms.values())
    return {**startup_ms, **video_ms, "total": round(total, 1)}


def format_timings(timings_ms: dict[str, float]) -> str:
    """One line: 'load 812 ms | compile 1503 ms | ...'."""
    return " | ".join(f"{k} {v:.0f} ms" for k, v in timings_ms.items())


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m signnet_jax.predict",
        description="Predict the sign in a raw video: H&HT with the checkpoint's settings, "
        "the multi-view test protocol, top-k glosses with probabilities.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="model checkpoint folder (signnet_jax.convert or training) or a training workdir",
    )
    p.add_argument(
        "--video",
        required=True,
        nargs="+",
        action="extend",
        metavar="IN",
        help="raw video file(s), or folders of them; several videos share one model load and "
        "print one report each (JSON Lines with --json)",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes to report (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--save-hht", metavar="OUT.mp4", help="also write the tunnelled video")
    p.add_argument(
        "--preview",
        metavar="OUT.png",
        help="also write a picture: the H&HT contact sheet above the top glosses",
    )
    p.add_argument(
        "--fps", type=float,
        help="resample to this frame rate first, e.g. 30 for a 60 fps phone video; a rate "
        "above the video's repeats frames (default: the video's own frames)",
    )  # fmt: skip
    p.add_argument("--start-frame", type=int, default=0, help="first frame used (default 0)")
    p.add_argument(
        "--end-frame", type=int, help="one past the last frame used (default: to the end)"
    )
    p.add_argument(
        "--models",
        help="MediaPipe model folder (default: $SIGNNET_MEDIAPIPE_MODELS, else the download "
        "cache ~/.cache/signnet_jax/mediapipe)",
    )
    p.add_argument(
        "--batch", type=int, help="views per forward pass (default: 1 on a CPU, else all views)"
    )
    p.add_argument(
        "--step",
        default="latest",
        help="checkpoint step: latest (default), best (highest validation top-1 of a "
        "training run) or a step number",
    )
    args = p.parse_args(None if argv is None else list(argv))
    if args.top_k < 1:
        p.error(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.fps is not None and not args.fps > 0:
        p.error(f"--fps must be > 0, got {args.fps}")
    if args.start_frame < 0 or (args.end_frame is not None and args.end_frame <= args.start_frame):
        p.error(
            f"--start-frame {args.start_frame} and --end-frame {args.end_frame}: the first frame "
            "must be >= 0 and before the end"
        )
    return args


# What a --video folder is searched for (by file suffix, case-insensitive).
VIDEO_SUFFIXES = (
    ".mp4", ".mov", ".m4v", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".flv", ".wmv", ".3gp", ".ogv",
)  # fmt: skip


def find_videos(paths: Sequence[str | os.PathLike], skipped: list[str] | None = None) -> list[str]:
    """The videos behind ``--video``: files as given, folders as their video files (by
    ``VIDEO_SUFFIXES``, sorted, not recursive); a file named twice is kept once. Paths are
    spelled as given (reports name the video as the user typed it). ``skipped``, when given,
    receives what the folders hold besides (other files, and subfolders with a trailing /).

    Raises:
      PredictError: a path that does not exist, or a folder without video files.
    """
    found: list[str] = []
    passed: list[str] = []
    for given in map(os.fspath, paths):
        path = pathlib.Path(given)
        if path.is_dir():
            entries = sorted(path.iterdir())
            inside = [p.name for p in entries if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES]
            passed += [
                os.path.join(given, p.name) + ("/" if p.is_dir() else "")
                for p in entries
                if p.name not in inside and not p.name.startswith(".")
            ]
            if not inside:
                raise PredictError(
                    f"video folder {path} holds no video files ({' '.join(VIDEO_SUFFIXES)})"
                )
            found += [os.path.join(given, name) for name in inside]
        elif path.is_file():
            found.append(given)
        else:
            raise PredictError(f"video {path} does not exist")
    seen: set[pathlib.Path] = set()
    unique = []
    for video in found:
        resolved = pathlib.Path(video).resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(video)
    if skipped is not None:  # those also given as files are not skipped; each named once
        for p in passed:
            resolved = pathlib.Path(p).resolve()
            if resolved not in seen:
                seen.add(resolved)
                skipped.append(p)
    return unique


# What each output flag writes: its file suffix and what the file is.
OUTPUTS = {"--save-hht": (".mp4", "H.264 MP4"), "--preview": (".png", "a PNG picture")}


def check_output(flag: str, path: str | os.PathLike, video: str | os.PathLike) -> None:
    """Refuses an output file of ``flag`` (see ``OUTPUTS``) that has the wrong suffix, is a
    folder or the input video, or cannot be written.

    Raises:
      PredictError: naming the flag, the path and the fix.
    """
    suffix, kind = OUTPUTS[flag]
    if pathlib.Path(path).suffix.lower() != suffix:
        raise PredictError(f"{flag} {path} must end in {suffix} (it is {kind})")
    try:
        check_writable(path, flag, source=video)
    except VideoError as e:
        raise PredictError(str(e)) from e


def _output_paths(flag: str, target: str | None, videos: list[str], tag: str) -> list[str | None]:
    """Where ``--save-hht``/``--preview`` write for each video: the file given (one video), or
    ``STEM_TAG.SUFFIX`` inside the folder given; all checked before any work.

    Raises:
      PredictError: a file name for several videos, a wrong suffix, two videos with one
        output name, an output that is one of the input videos, or a place that cannot be
        written.
    """
    if target is None:
        return [None] * len(videos)
    if target.endswith(("/", os.sep)) and not pathlib.Path(target).is_dir():
        raise PredictError(f"{flag} {target}: folder does not exist; create it first")
    if pathlib.Path(target).is_dir():
        paths = [
            os.path.join(target, f"{pathlib.Path(v).stem}_{tag}{OUTPUTS[flag][0]}") for v in videos
        ]
        by_name: dict[str, list[str]] = {}
        for v, path in zip(videos, paths, strict=True):
            by_name.setdefault(path, []).append(v)
        for path, same in by_name.items():
            if len(same) > 1:
                raise PredictError(
                    f"{flag} {target}: videos {' and '.join(map(str, same))} would both write "
                    f"{os.path.basename(path)}; predict them in separate runs or rename one"
                )
    elif len(videos) > 1:
        raise PredictError(
            f"{flag} {target} is a file name, but {len(videos)} videos are given; give an "
            "existing folder (each video writes its own file there)"
        )
    else:
        paths = [target]
    # An output onto another video of the run would replace it before it is read (e.g. the
    # STEM_hht.mp4 files of an earlier run in a --video folder that is also the --save-hht one).
    inputs = {pathlib.Path(v).resolve(): v for v in videos}
    for own, path in zip(videos, paths, strict=True):
        video = inputs.get(pathlib.Path(path).resolve())
        if video is not None and video != own:  # its own video: check_output says so
            raise PredictError(
                f"{flag} {path} would replace the input video {video}; write the outputs to "
                "another folder (or move earlier outputs out of the videos' folder)"
            )
    for video, path in zip(videos, paths, strict=True):
        check_output(flag, path, video)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 bad options, 130 Ctrl-C)."""
    interrupt_as_usual()
    args = _parse(argv)
    progress = {"videos": 0, "done": 0}  # for the message of a Ctrl-C
    try:
        return _run(args, progress)
    except KeyboardInterrupt:
        given = [f for f, v in (("--save-hht", args.save_hht), ("--preview", args.preview)) if v]
        outputs = f"; no {'/'.join(given)} file written" if given else ""
        if progress["done"]:
            left = f"{progress['done']} of {progress['videos']} videos predicted (reported above)"
            left += f"{outputs} for the others" if given else ""
        else:
            left = "no video predicted" + outputs
        return interrupted(left)


def _run(args: argparse.Namespace, progress: dict[str, int]) -> int:
    """``main`` after the options are parsed; ``progress`` counts the videos and those done."""
    try:
        # Everything that can be checked without the checkpoint is, before seconds are spent
        # loading and compiling it.
        skipped: list[str] = []
        videos = find_videos(args.video, skipped)
        if skipped:
            shown = ", ".join(skipped[:5]) + (
                f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
            )
            print(
                f"note: skipping {len(skipped)} entries of the --video folders that are not "
                f"video files by their names ({shown}); give a file itself to predict it",
                file=sys.stderr,
            )
        if len(videos) > 1 and (args.start_frame != 0 or args.end_frame is not None):
            raise PredictError(
                f"--start-frame/--end-frame cut one video, but {len(videos)} videos are given; "
                "predict each video that needs a cut on its own"
            )
        save_hht = _output_paths("--save-hht", args.save_hht, videos, "hht")
        previews = _output_paths("--preview", args.preview, videos, "preview")
        progress["videos"] = len(videos)
        predictor = Predictor(args.checkpoint, args.models, args.batch, args.step)
    except (PredictError, FileNotFoundError, ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # a folder's videos always get one line each, however many it holds
    many = len(videos) > 1 or any(os.path.isdir(v) for v in args.video)
    failed: list[str] = []
    with predictor:
        for i, video in enumerate(videos):
            if many:
                print(f"[{i + 1}/{len(videos)}] {video}", file=sys.stderr)
            outputs = {p: stamp(p) for p in (save_hht[i], previews[i]) if p is not None}
            try:
                prediction = predictor.run(
                    video, args.top_k, save_hht[i], args.start_frame, args.end_frame, args.fps
                )
                if previews[i] is not None:
                    try:
                        write_preview(previews[i], prediction)
                    except OSError as e:
                        # a failed video leaves no outputs: a rerun redoes both
                        if save_hht[i] is not None:
                            pathlib.Path(save_hht[i]).unlink(missing_ok=True)
                        raise PredictError(f"cannot write --preview {previews[i]}: {e}") from e
                progress["done"] = i + 1 - len(failed)
            except PredictError as e:
                print(f"error: {e}", file=sys.stderr)
                failed.append(video)
                if many and args.json:  # every video has its line
                    print(json.dumps({"video": str(video), "error": str(e)}), flush=True)
                continue
            except KeyboardInterrupt:  # nor does an interrupted one
                progress["done"] = i - len(failed)
                for path, before in outputs.items():
                    if stamp(path) != before:  # written by this run
                        pathlib.Path(path).unlink(missing_ok=True)
                raise
            _print_prediction(
                prediction.report,
                predictor.startup_ms if i == 0 else None,
                [p for p in (save_hht[i], previews[i]) if p is not None],
                args.json,
                many,
            )
    if many:
        print(
            f"predicted {len(videos) - len(failed)} of {len(videos)} videos"
            + (f"; failed: {', '.join(map(str, failed))}" if failed else ""),
            file=sys.stderr,
        )
    return 1 if failed else 0


def _print_prediction(
    report: dict[str, Any],
    startup_ms: dict[str, float] | None,
    written: list[str],
    as_json: bool,
    many: bool,
) -> None:
    """One video's notes, warnings and timings on stderr, its report on stdout."""
    if startup_ms is not None:
        report["timings_ms"] = with_startup(startup_ms, report["timings_ms"])
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"timings: {format_timings(report['timings_ms'])}", file=sys.stderr)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    if as_json:  # several videos: JSON Lines, one object a video
        print(json.dumps(report) if many else json.dumps(report, indent=1), flush=True)
    else:
        print(("\n" if many else "") + format_report(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
