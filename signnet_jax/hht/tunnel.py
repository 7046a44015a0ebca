"""The Tunneller: MediaPipe Tasks landmarks -> boxes -> tunnelled frames for one video."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Callable

import cv2
import mediapipe as mp
import numpy as np
from mediapipe.tasks.python import BaseOptions, vision

from signnet_jax.hht.boxes import (
    MAX_FACES,
    PART_NAMES,
    SOURCE_NAMES,
    Landmarks,
    compute_boxes,
    wrist_in_view,
)
from signnet_jax.hht.compose import compose_frames
from signnet_jax.hht.models import MODEL_URLS, ModelFileError, find_models
from signnet_jax.hht.quiet import quiet_native_logs
from signnet_jax.hht.settings import HHTSettings
from signnet_jax.hht.video import decode_video

# The hand landmarker runs where a pose wrist is at least this visible and in the frame;
# looser than the fallback's threshold so partly visible hands still get landmarks.
GATE_VISIBILITY = 0.3
# Frozen, so sharing one instance as a default argument is safe.
DEFAULT_SETTINGS = HHTSettings()


class NoPersonWarning(UserWarning):
    """Neither a head nor a hand was found in any frame of a video."""


@dataclasses.dataclass
class HHTResult:
    """The tunnelled video and the boxes behind it.

    Attributes:
      frames: (N, S, S, 3) uint8 RGB tunnelled frames.
      boxes: (N, 3, 4) float32 head, right hand, left hand (the body's sides),
        normalized xyxy in the source frame, -1 where none.
      box_source: (N, 3) int8: 0 none, 1 landmark, 2 pose fallback, 3 interpolated.
      fps: source frame rate.
      source_size: (height, width) of the (upright) source frames.
      landmarks: the raw detections the boxes came from.
      timings: seconds spent per stage: decode, prepare (the detectors' copy), pose,
        hands, face, boxes, compose.
    """

    frames: np.ndarray
    boxes: np.ndarray
    box_source: np.ndarray
    fps: float
    source_size: tuple[int, int] = (0, 0)
    landmarks: Landmarks | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


def coverage(box_source: np.ndarray) -> dict[str, dict[str, int]]:
    """Frames per part and source, e.g. {'head': {'landmark': 70, ..., 'located': 75}}.

    Args:
      box_source: (N, 3) source codes.

    Returns:
      For each part, the frame count per source name plus 'located' (any source but none).
    """
    out = {}
    for p, part in enumerate(PART_NAMES):
        counts = np.bincount(box_source[:, p], minlength=len(SOURCE_NAMES))
        out[part] = {name: int(c) for name, c in zip(SOURCE_NAMES, counts, strict=True)}
        out[part]["located"] = int(len(box_source) - counts[0])
    return out


def tunnel_landmarks(
    frames: np.ndarray,
    fps: float,
    landmarks: Landmarks,
    settings: HHTSettings,
    name: str = "video",
    timings: dict[str, float] | None = None,
    stacklevel: int = 2,
) -> HHTResult:
    """Tunnels frames from their landmarks (`Tunneller.detect`'s, or ones kept from it): the
    boxes, then the composition; no MediaPipe.

    Args:
      frames: (N, H, W, 3) uint8 RGB upright frames.
      fps: frame rate.
      landmarks: the detections of these N frames.
      settings: H&HT settings (those of `DETECTION_FIELDS` are the detections' business).
      name: what the no-person warning calls the video.
      timings: seconds per stage so far; 'boxes' and 'compose' are added.
      stacklevel: of the no-person warning.

    Returns:
      As `Tunneller.process_frames`.
    """
    if len(landmarks) != len(frames):
        raise ValueError(f"{name}: {len(landmarks)} frames of landmarks for {len(frames)} frames")
    timings = {} if timings is None else timings
    height, width = frames.shape[1:3]
    t0 = time.perf_counter()
    boxes, source = compute_boxes(landmarks, width, height, settings)
    t1 = time.perf_counter()
    out = compose_frames(frames, boxes, source, settings)
    timings["boxes"] = t1 - t0
    timings["compose"] = time.perf_counter() - t1
    if not source.any():
        warnings.warn(
            f"{name}: no head or hand found in any of {len(frames)} frames; the output "
            "holds only the whole-frame cell",
            NoPersonWarning,
            stacklevel=stacklevel,
        )
    return HHTResult(out, boxes, source, fps, (height, width), landmarks, timings)


class Tunneller:
    """Runs H&HT on videos; owns three MediaPipe tasks (pose, hands, face detector).

    Use as a context manager (or call close()): MediaPipe tasks left to the garbage
    collector raise at interpreter exit. One instance serves many videos in sequence, each
    exactly as a new Tunneller would (its tasks are recreated between videos, 50-65 ms;
    loading the model files for the first costs a few hundred milliseconds more).

    MediaPipe's native log lines (fd 2) are dropped unless a MediaPipe call raises;
    SIGNNET_MEDIAPIPE_LOGS=1 lets them through (see `signnet_jax.hht.quiet`).
    """

    def __init__(self, settings: HHTSettings = DEFAULT_SETTINGS, models_dir: str | None = None):
        """Loads the models.

        Args:
          settings: H&HT settings.
          models_dir: folder with the model files (see `find_models`).
        """
        self.settings = settings
        self._directory = find_models(models_dir)
        self._pose = self._hands = self._face = None
        self._open()
        self._used = False

    def _open(self) -> None:
        """Creates the three MediaPipe tasks (about 50 ms)."""
        directory = self._directory
        conf = self.settings.min_confidence
        video = vision.RunningMode.VIDEO

        def base(name: str) -> BaseOptions:
            return BaseOptions(model_asset_path=os.fspath(directory / name))

        def create(task, options_type, name: str, **options):
            try:
                return task.create_from_options(
                    options_type(base_options=base(name), running_mode=video, **options)
                )
            except (RuntimeError, ValueError) as e:  # e.g. "not a valid Flatbuffer buffer"
                raise ModelFileError(
                    f"{directory / name}: MediaPipe cannot load this model ({e}); replace it "
                    f"with the official file ({MODEL_URLS[name]})"
                ) from e

        # Creation logs ~50 native lines (LiteRT, XNNPACK, sparsity warnings).
        with quiet_native_logs(), self._closed_on_error():
            self._pose = create(
                vision.PoseLandmarker,
                vision.PoseLandmarkerOptions,
                "pose_landmarker_full.task",
                min_pose_detection_confidence=conf,
                min_pose_presence_confidence=conf,
                min_tracking_confidence=conf,
            )
            self._hands = create(
                vision.HandLandmarker,
                vision.HandLandmarkerOptions,
                "hand_landmarker.task",
                num_hands=2,
                min_hand_detection_confidence=conf,
                min_hand_presence_confidence=conf,
                min_tracking_confidence=conf,
            )
            self._face = create(
                vision.FaceDetector,
                vision.FaceDetectorOptions,
                "blaze_face_short_range.tflite",
                min_detection_confidence=conf,
            )

    @contextlib.contextmanager
    def _closed_on_error(self):
        """Closes the tasks already created when a later one fails to load.

        Left to the garbage collector, a task's close() can block forever (MediaPipe's
        ``__del__`` waits on its dispatcher), hanging whatever runs when it is collected.
        """
        try:
            yield
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the MediaPipe tasks (idempotent)."""
        with quiet_native_logs():  # each task logs a DestroyAccelerator line
            for name in ("_pose", "_hands", "_face"):
                task = getattr(self, name, None)
                if task is not None:
                    task.close()
                    setattr(self, name, None)

    def __enter__(self) -> Tunneller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def process_video(
        self,
        path: str | os.PathLike,
        start_frame: int = 0,
        end_frame: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> HHTResult:
        """Tunnels source frames [start_frame, end_frame) of a video.

        Args:
          path: video file.
          start_frame: first source frame.
          end_frame: one past the last source frame (None = to the end).
          progress: called as progress(done, total) after each frame's detection.

        Returns:
          The tunnelled frames, boxes and sources. Warns NoPersonWarning when nothing
          was found (the output then holds only the whole-frame cell).

        Raises:
          VideoError: the file is not a usable video (message names the file).
        """
        t0 = time.perf_counter()
        frames, fps, times = decode_video(path, start_frame, end_frame)
        decode = time.perf_counter() - t0
        result = self.process_frames(frames, fps, times, progress=progress, name=str(path))
        result.timings = {"decode": decode, **result.timings}
        return result

    def process_frames(
        self,
        frames: np.ndarray,
        fps: float,
        times: np.ndarray | None = None,
        progress: Callable[[int, int], None] | None = None,
        name: str = "video",
    ) -> HHTResult:
        """Tunnels already decoded frames (consecutive frames of one video).

        Args:
          frames: (N, H, W, 3) uint8 RGB upright frames.
          fps: frame rate.
          times: (N,) frame times in seconds (default: i / fps).
          progress: called as progress(done, total) after each frame's detection.
          name: what the no-person warning calls the video.

        Returns:
          As `process_video`, without the 'decode' timing.
        """
        if times is None:
            times = np.arange(len(frames)) / fps
        timings: dict[str, float] = {}
        landmarks = self.detect(frames, times, progress=progress, timings=timings)
        return tunnel_landmarks(frames, fps, landmarks, self.settings, name, timings, stacklevel=4)

    def detect(
        self,
        frames: np.ndarray,
        times: np.ndarray,
        progress: Callable[[int, int], None] | None = None,
        timings: dict[str, float] | None = None,
    ) -> Landmarks:
        """Runs the MediaPipe tasks on consecutive frames of one video.

        Args:
          frames: (N, H, W, 3) uint8 RGB frames.
          times: (N,) frame times in seconds (non-decreasing).
          progress: called as progress(done, total) after each frame.
          timings: if given, seconds are added under 'prepare' (detection copy), 'pose',
            'hands' and 'face'.

        Returns:
          The raw detections, normalized to the frames.
        """
        if self._pose is None:
            raise RuntimeError("Tunneller is closed")
        timings = {} if timings is None else timings
        for key in ("prepare", "pose", "hands", "face"):
            timings.setdefault(key, 0.0)
        n, height, width = frames.shape[:3]
        if self._used:
            self._reset_trackers()
        self._used = True
        stamps = _timestamps(times)
        small = _detection_size(width, height, self.settings.detect_size)
        lm = Landmarks.empty(n)
        run_all_hands = self.settings.faithful or not self.settings.gate_hands
        last_try, last_found = -n, True
        for t in range(n):
            c0 = time.perf_counter()
            image = frames[t]
            if small != (width, height):
                image = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
            image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))
            ts = int(stamps[t])
            c1 = time.perf_counter()
            timings["prepare"] += c1 - c0
            c0 = c1
            # The first detection logs a few native warnings; every call is wrapped in case
            # a later frame logs too, but only the calls: Python's own stderr output (a
            # warning, the caller's progress bar) written inside the block would be lost.
            with quiet_native_logs():
                pose = self._pose.detect_for_video(image, ts)
                c1 = time.perf_counter()
                faces = self._face.detect_for_video(image, ts)
                c2 = time.perf_counter()
            timings["pose"] += c1 - c0
            timings["face"] += c2 - c1
            if pose.pose_landmarks:
                lm.pose[t] = [(p.x, p.y, p.visibility) for p in pose.pose_landmarks[0]]
            for k, det in enumerate(faces.detections[:MAX_FACES]):
                b = det.bounding_box
                lm.faces[t, k] = (
                    b.origin_x / small[0],
                    b.origin_y / small[1],
                    (b.origin_x + b.width) / small[0],
                    (b.origin_y + b.height) / small[1],
                    det.categories[0].score,
                )
            # Where a try found nothing (painted or blurred hands), wait hand_retry frames
            # before the next: the pose fallback covers the frames in between.
            due = last_found or t - last_try >= self.settings.hand_retry
            if run_all_hands or (due and wrist_in_view(lm.pose[t : t + 1], GATE_VISIBILITY).any()):
                c0 = time.perf_counter()
                with quiet_native_logs():
                    hands = self._hands.detect_for_video(image, ts)
                timings["hands"] += time.perf_counter() - c0
                lm.hands_run[t] = True
                last_try, last_found = t, bool(hands.hand_landmarks)
                for k, (points, handed) in enumerate(
                    zip(hands.hand_landmarks[:2], hands.handedness[:2], strict=False)
                ):
                    lm.hands[t, k] = [(p.x, p.y) for p in points]
                    lm.hand_label[t, k] = 1 if handed[0].category_name == "Right" else -1
            if progress is not None:
                progress(t + 1, n)
        return lm

    def _reset_trackers(self) -> None:
        """Makes the next video start as in a new Tunneller: fresh tasks.

        In VIDEO mode pose and hands track from the previous frame, and the pose landmarks
        pass through smoothing filters that carry over too: an empty frame in between
        ended the tracks but not the filters (a video's pose visibilities then depended on
        the video before it, by up to 0.88).
        """
        self.close()
        with self._closed_on_error():
            self._open()


def _timestamps(times: np.ndarray) -> np.ndarray:
    """A video's integer ms timestamps from 0, strictly increasing (VIDEO mode needs that; each
    video gets fresh tasks), also where a variable-rate file repeats a time."""
    ms = np.rint((times - times[0]) * 1000).astype(np.int64)
    index = np.arange(len(ms))
    return np.maximum.accumulate(ms - index) + index


def _detection_size(width: int, height: int, detect_size: int) -> tuple[int, int]:
    """(w, h) of the copy the detectors see: longest side at most detect_size."""
    longest = max(width, height)
    if detect_size <= 0 or longest <= detect_size:
        return width, height
    scale = detect_size / longest
    return max(1, round(width * scale)), max(1, round(height * scale))
