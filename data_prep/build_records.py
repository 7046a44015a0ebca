"""Builds H&HT TFRecord shards from raw videos and a split manifest.

python -m data_prep.build_records --dataset wlasl --split-file nslt_2000.json \
    --videos WLASL/videos --output records/wlasl2000

Every manifest entry becomes one record (tf.train.Example, see signnet_jax.data.records and
the record table in README) or one line of failures.jsonl. Finished videos are cached under
OUTPUT/work (one file each, written atomically), so a re-run skips them; shards are then
written from the cache in manifest order, which makes them byte-identical whatever the number
of workers or interruptions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import faulthandler
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import multiprocessing
import multiprocessing.connection
import os
import pathlib
import re
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from data_prep import manifests
from signnet_jax.data import records
from signnet_jax.files import (
    PROBE_PREFIX,
    RemotePathError,
    atomic_write,
    creation_problem,
    interrupt_as_usual,
    interrupted,
    local_path,
)
from signnet_jax.progress import progress_bar

TOOL = "data_prep.build_records"
# Bump when the bytes written for the same inputs change; it is part of every cache key.
# 2: non-square pixels shown in their display shape; H.264 cut short called truncated.
FORMAT_VERSION = 2
FAILURES = records.FAILURES
WORK = "work"
IDENTITY = "dataset.json"  # in WORK: what a build is building, for check_output

# Failure reasons (the `reason` field of failures.jsonl).
MISSING = "missing_file"
UNDECODABLE = "undecodable"
EMPTY_SPAN = "empty_span"
TRUNCATED = "truncated"
ERROR = "error"  # unexpected exception: not cached, retried by the next run
CRASHED = "crashed"  # the worker process died on the video (native crash, killed): retried too
RETRIED = (ERROR, CRASHED)
# Not cached either, and not reported as errors: a missing video is looked for again on every
# run (it costs nothing), so its detail (a name differing in case) is always today's.
UNCACHED = (*RETRIED, MISSING)
# Workers lost in a row (no record made in between) before the build gives up: one
# broken video costs one worker, a broken setup would cost one per video forever.
MAX_DEATHS_IN_A_ROW = 16

TunnellerFactory = Callable[[], Any]


class BuildError(RuntimeError):
    """The build cannot go on (the message says why and what to do)."""


class SetupError(BuildError):
    """H&HT cannot start (e.g. model files missing), or the cache cannot be written (a full
    disk): the build stops instead of failing every video."""


def _cache_write(
    path: str, data: bytes, elsewhere: str = "build into another --output", work: str = ""
) -> None:
    """Writes a cache file; a full disk stops the build at once (else every video would be
    tunnelled and then fail to be kept, for hours).

    Args:
      path: a file in OUTPUT/work, or in a `LandmarkCache`.
      data: its bytes.
      elsewhere: the other way out than freeing space.
      work: OUTPUT/work, where the finished videos are (default: ``path``'s folder).
    """
    try:
        atomic_write(path, data)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise SetupError(
            f"cannot write {path}: {e.strerror}; free space there (or {elsewhere}), then run "
            "the same command again: the videos finished so far are cached in "
            f"{work or os.path.dirname(path)}"
        ) from e


@functools.cache
def tool_version() -> str:
    """Version of signnet_jax (installed metadata, else pyproject.toml, else 'unknown')."""
    try:
        return importlib.metadata.version("signnet_jax")
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib

        return tomllib.loads(pyproject.read_text())["project"]["version"]
    except (OSError, KeyError, ValueError):
        return "unknown"


# --------------------------------------------------------------------------------------------
# One video -> one record
# --------------------------------------------------------------------------------------------


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """JPEG-encodes one RGB uint8 frame (libjpeg-turbo through OpenCV)."""
    import cv2

    ok, buf = cv2.imencode(
        ".jpg", np.ascontiguousarray(frame[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for a frame of shape {frame.shape}")
    return buf.tobytes()


def make_example(entry: manifests.Entry, result: Any, jpeg_quality: int) -> bytes:
    """Serializes one H&HT result as the record of README's table.

    Args:
      entry: the manifest entry (id, label, gloss).
      result: HHTResult-like: frames (N,H,W,3) uint8 RGB, boxes (N,3,4), box_source (N,3), fps.
      jpeg_quality: 1-100.

    Returns:
      tf.train.Example bytes.
    """
    frames = np.asarray(result.frames)
    n, h, w, _ = frames.shape
    return records.encode_example(
        {
            "video_id": entry.video_id,
            "label": entry.label,
            "gloss": entry.gloss,
            "frames": [encode_jpeg(f, jpeg_quality) for f in frames],
            "height": h,
            "width": w,
            "num_frames": n,
            "fps": float(result.fps),
            "boxes": np.asarray(result.boxes, np.float32).reshape(n, 3, 4),
            "box_source": np.asarray(result.box_source, np.int64).reshape(n, 3),
        }
    )


@dataclasses.dataclass(frozen=True)
class Task:
    """One manifest entry to process, with its cache key."""

    index: int
    entry: manifests.Entry
    video_path: str
    key: str


@dataclasses.dataclass
class Outcome:
    """What processing one entry gave (returned from the workers)."""

    index: int
    ok: bool
    reason: str = ""
    detail: str = ""
    num_frames: int = 0
    hht_seconds: float = 0.0
    setup_seconds: float = 0.0
    seconds: float = 0.0
    landmarks_read: bool = False  # from a LandmarkCache (MediaPipe did not run)


@functools.lru_cache(maxsize=64)
def _names_by_case(folder: str) -> dict[str, list[str]]:
    """A folder's file names by their lower-case form (read once per folder)."""
    by_case: dict[str, list[str]] = {}
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(folder)):
            by_case.setdefault(name.lower(), []).append(name)
    return by_case


def _missing(path: str) -> str:
    """Why ``path``, not a file, gives no video: 'no such file' and a hint, or what is there."""
    if os.path.lexists(path):
        return "not a file (a folder, or a link to nothing)"
    hint = _case_hint(path)
    return f"no such file ({hint})" if hint else "no such file"


def _missing_outcome(task: Task) -> Outcome | None:
    """The failure of a task whose video is not a file, else None."""
    if os.path.isfile(task.video_path):
        return None
    detail = f"{task.video_path}: {_missing(task.video_path)}"
    return Outcome(task.index, ok=False, reason=MISSING, detail=detail)


def _case_hint(path: str) -> str:
    """For a missing file, the file beside it whose name differs only in case, if any."""
    folder, name = os.path.split(path)
    near = [n for n in _names_by_case(folder or ".").get(name.lower(), []) if n != name]
    if not near:
        return ""
    return (
        f"{os.path.join(folder, near[0])} is there: the names differ in case; rename the file "
        "to the name in the split file"
    )


def process(task: Task, factory: TunnellerFactory, work_dir: str, jpeg_quality: int) -> Outcome:
    """Runs H&HT on one entry and caches its record (or its failure) under work_dir.

    Every video gets a fresh Tunneller: MediaPipe's VIDEO-mode trackers carry state from one
    video to the next, so reusing one would make a record depend on which videos the same
    worker saw before (and the shards on the worker count). A fresh one also gives exactly
    what `predict` sees for the video alone.

    Args:
      task: the entry and its cache key.
      factory: returns a Tunneller context manager (`process_video(path, start, end)`).
      work_dir: cache folder.
      jpeg_quality: JPEG quality of the frames.

    Returns:
      The outcome; deterministic failures are cached too, unexpected errors are not.
    """
    from signnet_jax.hht.video import TruncatedVideoError, VideoError, VideoTooLargeError

    t0 = time.perf_counter()
    out = Outcome(task.index, ok=False)
    try:
        if (missing := _missing_outcome(task)) is not None:  # gone since the build started
            out = missing
        else:
            start, end = task.entry.source_span()
            if end is not None and end <= start:
                out.reason = EMPTY_SPAN
                out.detail = f"{task.video_path}: manifest span is empty: frames [{start}, {end})"
            else:
                t1 = time.perf_counter()
                with warnings.catch_warnings():
                    # "no person found" still gives a usable record; the summary counts them
                    warnings.simplefilter("ignore")
                    try:
                        context = factory()
                    except Exception as e:
                        raise SetupError(f"H&HT could not start: {type(e).__name__}: {e}") from e
                    with context as tunneller:
                        t2 = time.perf_counter()
                        result = tunneller.process_video(task.video_path, start, end)
                        t3 = time.perf_counter()
                # a LandmarkCache's Tunneller is made inside process_video, when needed
                timings = getattr(result, "timings", {})
                inside = timings.get("setup", 0.0)
                out.hht_seconds = t3 - t2 - inside
                out.setup_seconds = (t2 - t1) + inside + (time.perf_counter() - t3)
                out.landmarks_read = "landmark_cache" in timings
                if len(result.frames) == 0:
                    out.reason = EMPTY_SPAN
                    out.detail = f"{task.video_path}: no frames in [{start}, {end})"
                else:
                    record = make_example(task.entry, result, jpeg_quality)
                    _cache_write(os.path.join(work_dir, task.key + ".rec"), record)
                    out.ok, out.num_frames = True, len(result.frames)
    except TruncatedVideoError as e:
        out.reason, out.detail = TRUNCATED, str(e)
    except VideoTooLargeError as e:  # depends on the memory free now: retried on the next run
        out.reason = ERROR
        out.detail = f"{e}; or build with fewer --workers, which leaves each more memory"
    except VideoError as e:
        msg = str(e)
        # A span past the end of the clip decodes fine but yields no frame.
        empty = "zero decodable video frames in" in msg or "empty frame span" in msg
        out.reason = EMPTY_SPAN if empty else UNDECODABLE
        out.detail = msg
    except SetupError:
        raise  # nothing will work: stop the build instead of failing every video
    except Exception as e:  # a bug or resource problem: report it, retry on the next run
        out.reason = ERROR
        out.detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"
    if not out.ok and out.reason not in UNCACHED:
        info = {"reason": out.reason, "detail": out.detail}
        _cache_write(os.path.join(work_dir, task.key + ".fail"), json.dumps(info).encode())
    out.seconds = time.perf_counter() - t0
    return out


# Worker-process state, set once by the pool initializer.
_WORKER: dict[str, Any] = {}


def _init_worker(factory: TunnellerFactory, work_dir: str, jpeg_quality: int) -> None:
    import cv2

    cv2.setNumThreads(1)  # one video per core; OpenCV threads would only contend
    # The Tunneller keeps MediaPipe's native logs off fd 2 (signnet_jax.hht.quiet) by
    # pointing fd 2 at a temporary file around its MediaPipe calls; a crash report written
    # to fd 2 then would be lost, so faulthandler gets its own copy of the real stderr.
    crash_stream = os.fdopen(os.dup(2), "w", buffering=1)
    faulthandler.enable(crash_stream)
    _WORKER.update(
        factory=factory, work_dir=work_dir, jpeg_quality=jpeg_quality, crash_stream=crash_stream
    )


def _work(task: Task) -> Outcome:
    return process(task, _WORKER["factory"], _WORKER["work_dir"], _WORKER["jpeg_quality"])


def _worker_main(conn, factory: TunnellerFactory, work_dir: str, jpeg_quality: int) -> None:
    """A worker process: takes one task at a time from ``conn`` and sends its outcome back."""
    # Ctrl-C in a terminal reaches the whole process group; the parent stops the build and
    # ends its workers, so they leave it to the parent instead of each printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM ends a worker as it ends the build (ignored only while the worker imported)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(factory, work_dir, jpeg_quality)
    try:
        while (task := conn.recv()) is not None:
            try:
                conn.send(_work(task))
            except SetupError as e:  # H&HT cannot start anywhere: the parent stops the build
                conn.send(e)
    except (EOFError, BrokenPipeError):
        pass  # the parent is gone (killed); the video just finished is cached all the same


def _death(process) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _pool_outcomes(
    tasks: list[Task], factory: TunnellerFactory, workers: int, work: str, jpeg_quality: int
) -> Iterable[Outcome]:
    """Outcomes from worker processes, one task each at a time, as videos finish.

    The parent hands out the tasks itself, so it always knows which video a worker is on:
    a worker that dies (a native crash in the decoder or MediaPipe, the OOM killer) costs
    only that video, which becomes a ``crashed`` failure, and a new worker takes its place.
    """
    # spawn: MediaPipe and OpenCV hold threads and GL/XNNPACK state that fork would corrupt.
    ctx = multiprocessing.get_context("spawn")
    pending = collections.deque(tasks)
    live: dict[Any, list] = {}  # parent end of the pipe -> [process, task or None]
    deaths = [0]  # workers lost since the last video that gave a record

    def lost(proc, where: str) -> None:
        deaths[0] += 1
        if deaths[0] >= MAX_DEATHS_IN_A_ROW:
            raise BuildError(
                f"{deaths[0]} worker processes in a row died without making a record (the "
                f"last {_death(proc)} {where}); something breaks every worker: run with "
                "--workers 0 to see the error in this process"
            )

    def hand_out(conn) -> None:
        task = pending.popleft() if pending else None
        live[conn][1] = task
        try:
            conn.send(task)  # None: no more work, the worker exits
        except OSError:  # the worker died after its last answer: the task goes back
            if task is not None:
                pending.appendleft(task)
            proc = live.pop(conn)[0]
            proc.join()
            conn.close()
            lost(proc, "between videos")
            if pending:
                start()

    def start() -> None:
        conn, child = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_main, args=(child, factory, work, jpeg_quality), daemon=True
        )
        proc.start()
        child.close()
        live[conn] = [proc, None]
        hand_out(conn)

    try:
        for _ in range(min(workers, len(tasks))):
            start()
        left = len(tasks)
        while left:
            busy = [c for c, (_, task) in live.items() if task is not None]
            ready = multiprocessing.connection.wait(busy + [live[c][0].sentinel for c in busy])
            for conn in busy:
                proc, task = live[conn]
                if conn in ready:
                    try:
                        out = conn.recv()
                    except (EOFError, OSError):
                        out = None  # died while answering: the sentinel case below
                    if isinstance(out, SetupError):
                        raise out
                    if out is not None:
                        left -= 1
                        if out.ok:
                            deaths[0] = 0
                        hand_out(conn)
                        yield out
                        continue
                if proc.sentinel in ready or (conn in ready and not proc.is_alive()):
                    proc.join()
                    del live[conn]
                    conn.close()
                    left -= 1
                    lost(proc, f"on {task.video_path}")
                    yield Outcome(
                        task.index,
                        ok=False,
                        reason=CRASHED,
                        detail=f"{task.video_path}: the worker process {_death(proc)} while "
                        "processing this video (retried by the next run)",
                    )
                    if pending:
                        start()
        for proc, _ in live.values():
            proc.join(timeout=10)
    finally:
        for conn, (proc, _) in live.items():
            if proc.is_alive():  # SIGKILL: a worker still importing ignores SIGTERM
                proc.kill()
            conn.close()


@dataclasses.dataclass(frozen=True)
class _HHTFactory:
    """Picklable factory of real Tunnellers for the worker processes."""

    settings: dict
    models_dir: str | None

    def __call__(self) -> Any:
        from signnet_jax.hht import HHTSettings, Tunneller

        return Tunneller(HHTSettings.from_dict(self.settings), models_dir=self.models_dir)


# --------------------------------------------------------------------------------------------
# Landmarks kept between builds
# --------------------------------------------------------------------------------------------

# Bump when the landmarks detected for the same video and settings change in a way the key
# below does not see (it holds the detection code's source and the decoders' versions).
LANDMARKS_FORMAT = 1
LANDMARKS_SUFFIX = ".landmarks.npz"
# The modules that decode the frames and detect the landmarks: any edit to them starts the
# landmark caches afresh.
_DETECTION_CODE = ("signnet_jax.hht.tunnel", "signnet_jax.hht.video")


@dataclasses.dataclass(frozen=True)
class LandmarkCache:
    """MediaPipe's landmarks per video, kept in a folder that several builds share.

    MediaPipe takes nearly all of H&HT's time, and its landmarks depend only on the video,
    the span, the settings of `DETECTION_FIELDS`, the model files, the code that decodes and
    detects, and the versions of MediaPipe, PyAV and OpenCV.
    A build that changes only the composition (quadrants, layout, size, margins, smoothing,
    JPEG quality: the paper's ablations) reads them here and skips MediaPipe; its records are
    byte-identical to those of a build without the cache. A file is named by the hash of all
    of the above (the video by its contents, so renamed or copied videos are found too).

    Attributes:
      folder: where the files go (FOLDER/ab/abcd...landmarks.npz).
      detection: the settings of `DETECTION_FIELDS` the landmarks are detected with (a build
        with other values of them needs another `create`).
      prefix: hash of what the landmarks depend on besides the video and its span.
    """

    folder: str
    detection: dict
    prefix: str

    @classmethod
    def create(cls, folder: str | os.PathLike, settings: dict, models_dir: str) -> LandmarkCache:
        """The cache in ``folder`` for builds with these settings (HHTSettings.to_dict(); only
        those of `DETECTION_FIELDS` matter) and model files."""
        from signnet_jax.hht.models import MODEL_URLS

        models = {}
        for name in sorted(MODEL_URLS):
            with open(os.path.join(models_dir, name), "rb") as f:
                models[name] = hashlib.file_digest(f, "sha256").hexdigest()
        import av
        import cv2

        code = hashlib.sha256()
        for module in _DETECTION_CODE:  # read, not imported: that would load MediaPipe here
            with open(importlib.util.find_spec(module).origin, "rb") as f:
                code.update(f.read())
        detection = _detection(settings)
        depends = {
            "detection": detection,
            "models": models,
            "code": code.hexdigest(),
            # the frames come from FFmpeg (PyAV), resized by OpenCV with detect_size
            "versions": {
                "mediapipe": importlib.metadata.version("mediapipe"),
                "av": av.__version__,
                "opencv": cv2.__version__,
            },
            "format": LANDMARKS_FORMAT,
        }
        prefix = hashlib.sha256(json.dumps(depends, sort_keys=True).encode()).hexdigest()
        return cls(os.path.abspath(folder), detection, prefix)

    def path(self, video_path: str, start: int, end: int | None) -> str:
        """The file of one video's span (the video is read to hash its contents)."""
        with open(video_path, "rb") as f:
            video = hashlib.file_digest(f, "sha256").hexdigest()
        key = hashlib.sha256(f"{self.prefix} {video} {start} {end}".encode()).hexdigest()[:32]
        return os.path.join(self.folder, key[:2], key + LANDMARKS_SUFFIX)


def _detection(settings: dict) -> dict:
    """The settings of `DETECTION_FIELDS` among HHTSettings.to_dict()'s."""
    from signnet_jax.hht.settings import DETECTION_FIELDS

    return {k: settings[k] for k in DETECTION_FIELDS}


@dataclasses.dataclass(frozen=True)
class _CachingFactory:
    """Wraps a factory of real Tunnellers with a `LandmarkCache` (picklable); ``settings``
    (HHTSettings.to_dict()) are the build's, those the inner Tunnellers have; ``work`` is
    OUTPUT/work (for messages)."""

    inner: TunnellerFactory
    cache: LandmarkCache
    settings: dict
    work: str

    def __call__(self) -> _CachingTunneller:
        return _CachingTunneller(self)


class _CachingTunneller:
    """`process_video` of a Tunneller that reads the landmarks from the cache when they are
    there, and else runs MediaPipe (a fresh Tunneller, made only then) and keeps them."""

    def __init__(self, factory: _CachingFactory):
        self._factory = factory
        self._context = self._tunneller = None

    def __enter__(self) -> _CachingTunneller:
        return self

    def __exit__(self, *exc) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)

    def process_video(self, path: str, start_frame: int = 0, end_frame: int | None = None):
        from signnet_jax.hht import HHTSettings
        from signnet_jax.hht.boxes import Landmarks
        from signnet_jax.hht.tunnel import tunnel_landmarks
        from signnet_jax.hht.video import decode_video

        file = self._factory.cache.path(path, start_frame, end_frame)
        t0 = time.perf_counter()
        frames, fps, times = decode_video(path, start_frame, end_frame)
        t1 = time.perf_counter()
        try:
            with open(file, "rb") as f:
                landmarks = Landmarks.from_bytes(f.read())
        except (OSError, ValueError):  # not there yet, or damaged: detected (again) below
            landmarks = None
        if landmarks is not None and len(landmarks) == len(frames):
            timings = {"decode": t1 - t0, "landmark_cache": time.perf_counter() - t1}
            settings = HHTSettings.from_dict(self._factory.settings)
            return tunnel_landmarks(frames, fps, landmarks, settings, path, timings)
        if self._tunneller is None:  # MediaPipe's tasks are made only for a video not cached
            try:
                self._context = self._factory.inner()
                self._tunneller = self._context.__enter__()
            except Exception as e:
                raise SetupError(f"H&HT could not start: {type(e).__name__}: {e}") from e
        t2 = time.perf_counter()
        result = self._tunneller.process_frames(frames, fps, times, name=path)
        result.timings = {"decode": t1 - t0, "setup": t2 - t1, **result.timings}
        work = self._factory.work
        try:
            _cache_write(file, result.landmarks.to_bytes(), "leave out --landmark-cache", work)
        except OSError as e:  # not a full disk (a SetupError already): a folder made read-only
            raise SetupError(
                f"cannot keep the landmarks in {file}: {e.strerror or e}; fix that or leave out "
                "--landmark-cache, then run the same command again: the videos finished so far "
                f"are cached in {work}"
            ) from e
        return result


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BuildResult:
    """Summary of a build."""

    num_entries: int
    num_records: int
    failures: list[dict]
    per_split: dict[str, dict[str, int]]
    cached: int
    processed: int
    seconds: float
    hht_seconds: float
    setup_seconds: float
    video_seconds: float
    shard_seconds: float
    failure_fraction: float
    exceeded: bool
    # per split, the videos whose records hold no head or hand in any frame (kept: the frame
    # cell is still there, but many of them point at the detector setup)
    no_person: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    missing: int = 0  # videos not found (neither processed nor cached: looked for every run)
    landmark_cache: str | None = None  # its folder, when the build had one
    landmarks_read: int = 0  # processed videos whose landmarks came from it
    landmarks_kept: int = 0  # processed videos whose landmarks were detected and kept there


def cache_key(
    entry: manifests.Entry, video_path: str, hht_settings: dict, jpeg_quality: int
) -> str:
    """Content key of one entry's result: changes whenever anything that shapes it changes."""
    try:
        st = os.stat(video_path)
        video = [st.st_size, st.st_mtime_ns]
    except OSError:
        video = None
    # Entries of earlier versions also had span_fps, None but for WLASL_v0.3 spans: keeping
    # it in the key keeps the caches of whole-file entries (nslt, CSV) valid.
    blob = json.dumps(
        {
            "entry": {**dataclasses.asdict(entry), "span_fps": None},
            "video": video,
            "hht": hht_settings,
            "jpeg_quality": jpeg_quality,
            "format": FORMAT_VERSION,
            "version": tool_version(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _assign_shards(sizes: Sequence[int], shard_bytes: int) -> list[list[int]]:
    """Splits record positions into consecutive shards of about shard_bytes each."""
    shards: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        framed = size + 16  # TFRecord adds 16 bytes of length and CRCs per record
        if current and total + framed > shard_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(i)
        total += framed
    if current:
        shards.append(current)
    return shards


_SHARD_RE = r"-\d{5}-of-\d{5}\.tfrecord"


def _clean_stale(output: str, work: str) -> None:
    """Removes temporaries an interrupted run left (never files under final names)."""
    finals = rf".*{_SHARD_RE}(\.index)?|{re.escape(FAILURES)}|{re.escape(records.DATASET_INFO)}"
    ours = re.compile(rf"({finals})\.tmp-.*")
    for name in os.listdir(output):
        if ours.fullmatch(name):
            os.remove(os.path.join(output, name))
    for name in os.listdir(work):
        if ".tmp-" in name:
            os.remove(os.path.join(work, name))


def fps_summary(rates: Sequence[float]) -> dict[str, float] | None:
    """The source frame rates of a split: min, median and max (None for no records)."""
    if not rates:
        return None
    rates = sorted(rates)
    return {
        "min": round(rates[0], 3),
        "median": round(float(np.median(rates)), 3),
        "max": round(rates[-1], 3),
    }


def _write_split(
    output: str, split: str, rec_paths: list[str], shard_bytes: int
) -> tuple[list[dict[str, Any]], dict[str, float] | None, list[str]]:
    """Writes a split's shards; returns them, the split's frame-rate summary and the videos
    in which no head or hand was located in any frame (their records hold only the frame)."""
    sizes = [os.path.getsize(p) for p in rec_paths]
    groups = _assign_shards(sizes, shard_bytes)
    shards = []
    rates, no_person = [], []
    for i, group in enumerate(groups):
        name = records.shard_name(split, i, len(groups))
        with records.TFRecordWriter(os.path.join(output, name)) as w:
            for j in group:
                with open(rec_paths[j], "rb") as f:
                    data = f.read()
                example = records.decode_example(data)
                rates.append(float(example["fps"][0]))
                if not np.any(example["box_source"]):
                    no_person.append(example["video_id"][0].decode("utf-8", "replace"))
                w.write(data)
        shards.append(
            {
                "file": name,
                "num_records": len(group),
                "num_bytes": os.path.getsize(os.path.join(output, name)),
            }
        )
    keep = {s["file"] for s in shards}
    keep |= {f + records.INDEX_SUFFIX for f in keep}
    pattern = re.compile(re.escape(split) + _SHARD_RE + r"(\.index)?")
    for name in os.listdir(output):
        if pattern.fullmatch(name) and name not in keep:
            os.remove(os.path.join(output, name))  # from an earlier build with other sizes
    return shards, fps_summary(rates), no_person


def _describe(dataset: Any, split_files: Sequence[str] | None, num_classes: int) -> str:
    """'wlasl from nslt_100.json, 100 classes': what a records folder holds, for messages."""
    what = str(dataset or "an unnamed dataset")
    if split_files:
        what += f" from {', '.join(sorted(split_files))}"
    return f"{what}, {num_classes} class{'' if num_classes == 1 else 'es'}"


def check_output(output: str, classes: Sequence[str], info: dict | None) -> dict | None:
    """Refuses an output folder that holds another dataset's records (it is left untouched).

    The same dataset is the same format (`dataset`), the same split file names and the same
    classes in the same order: building it again, with any H&HT settings, JPEG quality or
    shard size, resumes or replaces its own records. A folder without dataset_info.json is new
    or an unfinished build, which is compared by the identity it wrote when it started.

    Args:
      output: the records folder.
      classes: the class list of the build.
      info: the build's extra dataset_info.json fields (`dataset`, `split_files`).

    Returns:
      What the folder says of the records there (its dataset_info.json, or the identity an
      unfinished build wrote), or None for a new folder.

    Raises:
      BuildError: the folder holds a synthetic smoke dataset or another dataset's records.
    """
    from data_prep.synthetic import LOCK

    fix = f"give another --output, or delete {output} to build this dataset there"
    if os.path.exists(os.path.join(output, LOCK)):
        raise BuildError(
            f"--output {output} holds a synthetic smoke dataset (made by data_prep.synthetic: "
            f"{LOCK}); {fix}"
        )
    there = None
    # dataset_info.json, or while a build is unfinished (a first one, or a rebuild that
    # removed it) the identity the build wrote when it started
    for name in (records.DATASET_INFO, os.path.join(WORK, IDENTITY)):
        try:
            with open(os.path.join(output, name)) as f:
                there = json.load(f)
            break
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise BuildError(f"--output {output}: cannot read {name} ({e}); {fix}") from e
    if there is None:
        return None
    info = info or {}
    old = _describe(there.get("dataset"), there.get("split_files"), len(there.get("classes", [])))
    tool = there.get("tool", {}).get("name")
    if tool != TOOL:
        raise BuildError(
            f"--output {output} holds records written by {tool or 'an unknown tool'} ({old}); {fix}"
        )
    new = _describe(info.get("dataset"), info.get("split_files"), len(classes))
    same = (
        there.get("dataset") == info.get("dataset")
        and sorted(there.get("split_files") or []) == sorted(info.get("split_files") or [])
        and there.get("classes") == list(classes)
    )
    if not same:
        if old == new:  # as many classes, other names or order: name the first that differs
            i, a, b = next(
                (i, a, b)
                for i, (a, b) in enumerate(zip(there["classes"], classes, strict=True))
                if a != b
            )
            new += f", but label {i} is {a!r} there and {b!r} here"
        raise BuildError(
            f"--output {output} holds another dataset ({old}; this build: {new}); {fix}"
        )
    return there


def _changed_settings(there: dict, hht_settings: dict, jpeg_quality: int) -> dict[str, tuple]:
    """The settings the records in a folder were built with that this build changes, as
    ``{name: (old, new)}`` (empty when none, or not recorded)."""
    old = there.get("hht_settings")
    if not isinstance(old, dict):
        return {}
    pairs = [(k, old.get(k), v) for k, v in hht_settings.items()]
    pairs.append(("jpeg_quality", there.get("jpeg_quality"), jpeg_quality))
    return {k: (a, b) for k, a, b in pairs if a != b}


def _shown_changes(changed: dict[str, tuple]) -> str:
    """``"size 256 -> 224, jpeg_quality 90 -> 80"``."""
    return ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in changed.items())


def _landmark_cache_hint(changed: dict[str, tuple], cache: LandmarkCache | None) -> str:
    """When only settings that the landmarks do not depend on changed, and MediaPipe is run
    again for want of a landmark cache, the sentence saying how to skip it next time."""
    from signnet_jax.hht.settings import DETECTION_FIELDS

    if cache is not None or set(changed) & set(DETECTION_FIELDS):
        return ""
    return (
        "; MediaPipe's landmarks do not depend on these settings: give every build the same "
        "--landmark-cache DIR, and a build that changes only such settings skips MediaPipe"
    )


def _shown(value: Any) -> str:
    """A setting as its flag takes it (quadrants as 1011)."""
    return "".join(str(int(v)) for v in value) if isinstance(value, list | tuple) else str(value)


def build(
    manifest: manifests.Manifest,
    videos_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    hht_settings: dict,
    tunneller_factory: TunnellerFactory,
    workers: int = 1,
    jpeg_quality: int = 90,
    shard_bytes: int = 256 * 2**20,
    max_failure_fraction: float = 0.05,
    info: dict | None = None,
    progress: bool = True,
    landmark_cache: LandmarkCache | None = None,
) -> BuildResult:
    """Processes every entry (reusing cached results) and writes shards and metadata.

    Args:
      manifest: entries and class list.
      videos_dir: folder the entry paths are relative to.
      output_dir: records folder; created if needed; OUTPUT/work holds the cache.
      hht_settings: HHTSettings.to_dict() of the tunneller (recorded and part of cache keys).
      tunneller_factory: picklable callable returning a Tunneller context manager; called
        once per video (see `process`).
      workers: worker processes; 0 runs everything in this process.
      jpeg_quality: JPEG quality of the stored frames.
      shard_bytes: target shard size.
      max_failure_fraction: the result's `exceeded` is set above this fraction.
      info: extra fields for dataset_info.json (dataset name, split files).
      progress: show a progress bar and the summary on stderr.
      landmark_cache: read MediaPipe's landmarks from there when they are, keep them there
        when not (``tunneller_factory`` must then make real Tunnellers); made for
        ``hht_settings``' detection settings.

    Returns:
      Counts, failures and timings.
    """
    t_start = time.perf_counter()
    if landmark_cache is not None and landmark_cache.detection != _detection(hht_settings):
        raise ValueError(
            f"the landmark cache was made for the detection settings {landmark_cache.detection}, "
            f"not for those of hht_settings: LandmarkCache.create it with hht_settings"
        )
    output = os.fspath(output_dir)
    there = check_output(output, manifest.classes, info)
    work = os.path.join(output, WORK)
    os.makedirs(work, exist_ok=True)
    lock = open(os.path.join(work, ".lock"), "w")  # noqa: SIM115 - held for the whole build
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        raise BuildError(f"{output}: another build_records is writing here") from e
    try:
        _clean_stale(output, work)
        identity = {"tool": {"name": TOOL}, "classes": list(manifest.classes)} | {
            k: v for k, v in (info or {}).items() if k in ("dataset", "split_files")
        }
        # and the settings, which a rerun with others names before it tunnels again
        identity |= {"hht_settings": hht_settings, "jpeg_quality": jpeg_quality}
        atomic_write(os.path.join(work, IDENTITY), json.dumps(identity).encode())
        tasks = []
        for i, entry in enumerate(manifest.entries):
            path = os.path.join(os.fspath(videos_dir), entry.path)
            tasks.append(Task(i, entry, path, cache_key(entry, path, hht_settings, jpeg_quality)))
        # missing videos are looked for on every run, here (see UNCACHED); the others are
        # done unless cached
        _names_by_case.cache_clear()  # the folders as they are now
        errors: dict[int, Outcome] = {
            t.index: out for t in tasks if (out := _missing_outcome(t)) is not None
        }
        todo = [
            t
            for t in tasks
            if t.index not in errors
            and not os.path.exists(os.path.join(work, t.key + ".rec"))
            and not os.path.exists(os.path.join(work, t.key + ".fail"))
        ]
        missing = len(errors)
        cached = len(tasks) - missing - len(todo)
        hht_seconds = setup_seconds = video_seconds = 0.0
        landmarks_read = landmarks_kept = 0
        changed = _changed_settings(there or {}, hht_settings, jpeg_quality)
        if progress and changed and todo:  # else a rebuild would start over without a word
            print(
                f"{output} was built with other settings ({_shown_changes(changed)}): its "
                "videos are tunnelled again (the results of the earlier settings stay cached in "
                f"{work})" + _landmark_cache_hint(changed, landmark_cache),
                file=sys.stderr,
            )
        if landmark_cache is not None:
            tunneller_factory = _CachingFactory(
                tunneller_factory, landmark_cache, hht_settings, work
            )
        if progress and cached:
            print(
                f"{cached} of {len(tasks)} videos already done (cached in {work})",
                file=sys.stderr,
            )
        # all cached: the line above says so
        bar = progress_bar(len(todo), "H&HT", "video", disable=not progress or not todo)
        with bar, _outcomes(todo, tunneller_factory, workers, work, jpeg_quality) as outcomes:
            for out in outcomes:
                hht_seconds += out.hht_seconds
                setup_seconds += out.setup_seconds
                video_seconds += out.seconds
                landmarks_read += out.landmarks_read
                landmarks_kept += out.ok and not out.landmarks_read
                if out.reason in UNCACHED:
                    errors[out.index] = out
                if out.reason in RETRIED:
                    first = out.detail.splitlines()[0]
                    bar.write(f"error on {tasks[out.index].video_path}: {first}", file=sys.stderr)
                if bar.n + 1 < bar.total:
                    bar.update(1)
                else:  # the last video: closing the bar draws its final line, update() would too
                    bar.n += 1

        t_shards = time.perf_counter()
        # The shards about to be written may disagree with an earlier build's description
        # (other classes, labels or shard counts): until the new one is written, the folder
        # must read as unfinished, not as the old dataset.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output, records.DATASET_INFO))
        per_split: dict[str, dict[str, int]] = {}
        rec_paths: dict[str, list[str]] = {}
        failures = []
        for t in tasks:
            split = t.entry.split
            counts = per_split.setdefault(
                split, {"num_entries": 0, "num_records": 0, "num_failures": 0}
            )
            counts["num_entries"] += 1
            rec = os.path.join(work, t.key + ".rec")
            if t.index not in errors and os.path.exists(rec):
                counts["num_records"] += 1
                rec_paths.setdefault(split, []).append(rec)
                continue
            counts["num_failures"] += 1
            if t.index in errors:
                reason = {"reason": errors[t.index].reason, "detail": errors[t.index].detail}
            else:
                with open(os.path.join(work, t.key + ".fail")) as f:
                    reason = json.load(f)
            failures.append(
                {
                    "split": split,
                    "video_id": t.entry.video_id,
                    "path": t.entry.path,
                    "label": t.entry.label,
                    "gloss": t.entry.gloss,
                    **reason,
                }
            )
        splits_info = {}
        for split, counts in per_split.items():
            shards, fps, no_person = _write_split(
                output, split, rec_paths.get(split, []), shard_bytes
            )
            splits_info[split] = {**counts, "fps": fps, "shards": shards}
            splits_info[split]["no_person"] = no_person
        atomic_write(
            os.path.join(output, FAILURES),
            "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures).encode(),
        )
        num_records = sum(c["num_records"] for c in per_split.values())
        dataset_info = {
            "tool": {"name": TOOL, "version": tool_version(), "format_version": FORMAT_VERSION},
            **(info or {}),
            "classes": list(manifest.classes),
            "num_classes": len(manifest.classes),
            "splits": splits_info,
            "num_records": num_records,
            "num_failures": len(failures),
            "hht_settings": hht_settings,
            "jpeg_quality": jpeg_quality,
            "features": RECORD_FEATURES,
            "index": "NAME.tfrecord.index beside each shard: one 'offset length' line per record",
        }
        atomic_write(
            os.path.join(output, records.DATASET_INFO),
            (json.dumps(dataset_info, indent=1) + "\n").encode(),
        )
        shard_seconds = time.perf_counter() - t_shards
    finally:
        lock.close()
    fraction = len(failures) / max(1, len(tasks))
    # videos gone while the build ran: not found either
    vanished = sum(o.reason == MISSING for o in errors.values()) - missing
    no_person = {k: v["no_person"] for k, v in splits_info.items() if v["no_person"]}
    return BuildResult(
        num_entries=len(tasks),
        num_records=num_records,
        failures=failures,
        per_split=per_split,
        cached=cached,
        missing=missing + vanished,
        processed=len(todo) - vanished,
        seconds=time.perf_counter() - t_start,
        hht_seconds=hht_seconds,
        setup_seconds=setup_seconds,
        video_seconds=video_seconds,
        shard_seconds=shard_seconds,
        failure_fraction=fraction,
        exceeded=fraction > max_failure_fraction,
        no_person=no_person,
        landmark_cache=None if landmark_cache is None else landmark_cache.folder,
        landmarks_read=landmarks_read,
        landmarks_kept=landmarks_kept if landmark_cache is not None else 0,
    )


RECORD_FEATURES = {
    "video_id": "bytes: id from the manifest",
    "label": "int64: class index into classes",
    "gloss": "bytes: class name",
    "frames": "bytes list: JPEG RGB H&HT frames in order, all height x width",
    "height": "int64",
    "width": "int64",
    "num_frames": "int64",
    "fps": "float: source frame rate",
    "boxes": "float list: num_frames x 3 x 4, head / right hand / left hand, normalized xyxy "
    "in the source frame, -1 where none",
    "box_source": "int64 list: num_frames x 3, 0 none 1 landmark 2 pose fallback 3 interpolated",
}


@contextlib.contextmanager
def _outcomes(
    tasks: list[Task], factory: TunnellerFactory, workers: int, work: str, jpeg_quality: int
) -> Iterable[Outcome]:
    """Yields outcomes as videos finish, in this process or in a pool of workers."""
    if not tasks:
        yield iter(())
        return
    if workers <= 0:
        yield (process(t, factory, work, jpeg_quality) for t in tasks)
        return
    outcomes = _pool_outcomes(tasks, factory, workers, work, jpeg_quality)
    try:
        yield outcomes
    finally:
        outcomes.close()  # stops the workers if the build ends early


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'256MB', '1.5GB', '4096' (bytes) -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 256MB, 1GB)")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    value = float(m.group(1)) * 1024 ** " KMGT".index(unit or " ")
    if value < 1:
        raise argparse.ArgumentTypeError(f"shard size must be positive, got {text!r}")
    return int(value)


def parse_workers(text: str) -> int:
    """--workers: a number of worker processes, >= 0."""
    try:
        workers = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if workers < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 runs in this process), got {workers}")
    return workers


def _hht_settings_fields() -> list[dataclasses.Field]:
    from signnet_jax.hht import HHTSettings

    return list(dataclasses.fields(HHTSettings))


def make_parser() -> argparse.ArgumentParser:
    """The command-line interface (H&HT options come from HHTSettings' fields)."""
    p = argparse.ArgumentParser(
        prog="python -m data_prep.build_records",
        description="Turn raw videos plus a split manifest into H&HT TFRecord shards.",
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=manifests.DATASETS,
        help="format of the split files: wlasl (WLASL_v0.3.json or nslt_K.json), csv (the "
        "published SignNet splits) or asl_citizen (ASL-Citizen CSVs) (required)",
    )
    p.add_argument(
        "--split-file",
        required=True,
        nargs="+",
        help="wlasl: WLASL_v0.3.json or nslt_K.json; csv / asl_citizen: one or more CSVs, "
        "the split named by the file stem (train.csv -> train) (required)",
    )
    p.add_argument(
        "--videos", required=True, help="folder the manifest's video paths are in (required)"
    )
    p.add_argument("--output", required=True, help="records folder, created (required)")
    p.add_argument(
        "--class-list",
        help="class names, line i = label i ('i gloss' lines as wlasl_class_list.txt, or one "
        "gloss a line); required for csv (default: for nslt files the wlasl_class_list.txt "
        "beside them, for asl_citizen the sorted glosses of train.csv)",
    )
    p.add_argument(
        "--num-glosses",
        type=int,
        metavar="K",
        help="WLASL-K from WLASL_v0.3.json: keep its first K glosses and their videos (e.g. "
        "100 for WLASL100; nslt_K.json files hold their K already) (default: all of them)",
    )
    cores = os.cpu_count() or 1
    p.add_argument(
        "--workers", type=parse_workers, default=cores,
        help=f"worker processes (default: every core, {cores} here; 0 runs in-process, for "
        "debugging)",
    )  # fmt: skip
    p.add_argument(
        "--max-failure-fraction", type=float, default=0.05,
        help="exit 1 when more than this fraction of the videos failed (default 0.05)",
    )  # fmt: skip
    p.add_argument(
        "--jpeg-quality", type=int, default=90, help="JPEG quality of the frames (default 90)"
    )
    p.add_argument(
        "--shard-size", type=parse_size, default="256MB", help="target shard size (default 256MB)"
    )
    p.add_argument(
        "--models",
        help="MediaPipe model folder (default: $SIGNNET_MEDIAPIPE_MODELS, else the download "
        "cache ~/.cache/signnet_jax/mediapipe)",
    )
    p.add_argument(
        "--landmark-cache",
        metavar="DIR",
        help="keep MediaPipe's landmarks in DIR, shared by builds: a build that changes only "
        "the composition (quadrants, layout, size, margins, smoothing, JPEG quality...) reads "
        "them and skips MediaPipe, nearly all of H&HT's time; its records are the same bytes. "
        "--faithful, --detect-size, --min-confidence, --gate-hands and --hand-retry change the "
        "landmarks themselves (default: none)",
    )
    group = p.add_argument_group("H&HT settings (see signnet_jax.hht.HHTSettings)")
    from signnet_jax.hht.settings import LAYOUTS, field_help

    # each setting's meaning: the first sentence of its HHTSettings docstring entry
    meaning = {k: re.split(r"(?<=\.) ", v)[0].rstrip(".") for k, v in field_help().items()}
    for field in _hht_settings_fields():
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        what = meaning.get(field.name, field.name.replace("_", " "))  # python -OO: no docstrings
        if isinstance(default, bool):
            group.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                dest=field.name,
                help=f"{what} (default {'on' if default else 'off'})",
            )
        elif field.name == "quadrants":  # parsed in main by parse_quadrants, as data_prep.hht
            shown = _shown(default)
            group.add_argument(
                flag,
                default=shown,
                dest=field.name,
                help=f"{what}: four 0/1 flags, e.g. 1011 or 1,0,1,1 (default {shown})",
            )
        else:
            group.add_argument(
                flag,
                type=type(default),
                default=default,
                dest=field.name,
                choices=LAYOUTS if field.name == "layout" else None,
                help=f"{what} (default {default})",
            )
    return p


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _summary(result: BuildResult, output: str) -> str:
    lines = [
        f"{_count(result.num_records, 'record')}, {_count(len(result.failures), 'failure')} "
        f"({result.failure_fraction:.1%}) from {result.num_entries} entries in "
        f"{result.seconds:.1f} s ({result.processed} processed, {result.cached} cached"
        + (f", {result.missing} not found)" if result.missing else ")"),
    ]
    for split, c in result.per_split.items():
        lines.append(
            f"  {split}: {_count(c['num_records'], 'record')}, "
            f"{_count(c['num_failures'], 'failure')} "
            f"of {c['num_entries']}"
        )
    reasons: dict[str, int] = {}
    for f in result.failures:
        reasons[f["reason"]] = reasons.get(f["reason"], 0) + 1
    if reasons:
        lines.append(
            "  failures by reason: "
            + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
            + f" (details in {os.path.join(output, FAILURES)})"
        )
    if result.no_person:
        ids = [v for videos in result.no_person.values() for v in videos]
        shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
        lines.append(
            f"  no head or hand found in {_count(len(ids), 'video')} ({shown}): recorded with "
            "the frame cell only; listed under splits.SPLIT.no_person in "
            f"{os.path.join(output, records.DATASET_INFO)}"
        )
    if result.processed:
        lines.append(
            f"  {result.processed / max(result.seconds, 1e-9):.2f} videos/s; "
            f"worker time {result.video_seconds:.1f} s: H&HT {result.hht_seconds:.1f} s, "
            f"its setup {result.setup_seconds:.1f} s"
        )
    if result.landmark_cache is not None and result.processed:
        lines.append(
            f"  landmark cache {result.landmark_cache}: {_count(result.landmarks_read, 'video')} "
            f"read from it (MediaPipe skipped), {result.landmarks_kept} detected and kept there"
        )
    lines.append(f"  cache: {os.path.join(output, WORK)} (delete it once the build is final)")
    return "\n".join(lines)


def main(
    argv: Sequence[str] | None = None, tunneller_factory: TunnellerFactory | None = None
) -> int:
    """Runs the CLI.

    Args:
      argv: arguments (default sys.argv[1:]).
      tunneller_factory: replaces the real Tunneller (tests); default builds one from the
        H&HT options.

    Returns:
      Exit status: 0, 1 when failures pass --max-failure-fraction, 2 on bad input.
    """
    interrupt_as_usual()
    from signnet_jax.hht import HHTSettings
    from signnet_jax.hht.settings import HHTSettingsError, parse_quadrants

    parser = make_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.jpeg_quality <= 100:
        parser.error(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    if not 0 <= args.max_failure_fraction <= 1:
        parser.error("--max-failure-fraction must be in [0, 1]")
    outputs = {"--output": args.output, "--landmark-cache": args.landmark_cache}
    for flag, path in (("--videos", args.videos), *outputs.items()):
        # Shards are written and videos read through local paths: a URL would otherwise
        # become a local folder named 'gs:' (and the bucket would never see the records).
        try:
            if path is not None:
                local_path(path, write=flag in outputs)
        except RemotePathError as e:
            parser.error(f"{flag} {e} (or use a mounted bucket's folder)")
    if not os.path.isdir(args.videos):
        parser.error(f"--videos {args.videos}: not a folder")
    if os.path.exists(args.output):
        if not os.path.isdir(args.output):
            parser.error(f"--output {args.output} is a file; give a folder for the records")
        ours = {WORK, records.DATASET_INFO, FAILURES}
        # another build's probe (creation_problem) is not someone's file
        entries = {n for n in os.listdir(args.output) if not n.startswith(PROBE_PREFIX)}
        if entries and not entries & ours:
            parser.error(
                f"--output {args.output} already holds other files (e.g. {sorted(entries)[0]}); "
                "give a new or empty folder, or one an earlier build_records wrote"
            )
    if args.landmark_cache == "":
        parser.error("--landmark-cache needs a folder, got ''")
    if args.landmark_cache is not None and os.path.exists(args.landmark_cache):
        if not os.path.isdir(args.landmark_cache):
            parser.error(
                f"--landmark-cache {args.landmark_cache} is a file; give a folder for the "
                "landmarks (new, or one an earlier build kept them in)"
            )
    for flag, path in outputs.items():
        problem = path is not None and creation_problem(path)
        if problem:
            parser.error(f"cannot write {flag} {path}: {problem}; give a folder you can write to")
    if args.landmark_cache is not None and tunneller_factory is not None:
        raise ValueError("--landmark-cache keeps the landmarks of the real Tunneller only")
    try:
        values = {f.name: getattr(args, f.name) for f in _hht_settings_fields()}
        values["quadrants"] = parse_quadrants(args.quadrants)
        settings = HHTSettings(**values)
        manifest = manifests.load_manifest(
            args.dataset, args.split_file, args.class_list, args.num_glosses
        )
    except (ValueError, FileNotFoundError) as e:
        message = e.flag_message() if isinstance(e, HHTSettingsError) else e
        print(f"error: {message}", file=sys.stderr)
        return 2
    if manifest.entries and not any(
        os.path.isfile(os.path.join(args.videos, e.path)) for e in manifest.entries
    ):
        example = os.path.join(args.videos, manifest.entries[0].path)
        # the folder is right when only the case of the names differs, or its links dangle
        fix = _case_hint(example) or (
            "it is not a file but a folder or a link to nothing (is what it links to mounted?)"
            if os.path.lexists(example)
            else "point --videos at the folder they are in"
        )
        print(
            f"error: --videos {args.videos} holds none of the {len(manifest.entries)} videos "
            f"the split files name (e.g. {example}); {fix}",
            file=sys.stderr,
        )
        return 2
    hht = settings.to_dict()
    landmark_cache = None
    if tunneller_factory is None:
        from signnet_jax.hht import find_models

        try:
            # Resolved (and downloaded, verified) once here rather than per video in workers.
            models = str(find_models(args.models))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        tunneller_factory = _HHTFactory(hht, models)
        if args.landmark_cache is not None:
            landmark_cache = LandmarkCache.create(args.landmark_cache, hht, models)
    try:
        result = build(
            manifest,
            args.videos,
            args.output,
            hht_settings=hht,
            tunneller_factory=tunneller_factory,
            workers=args.workers,
            jpeg_quality=args.jpeg_quality,
            shard_bytes=args.shard_size,
            max_failure_fraction=args.max_failure_fraction,
            info={
                "dataset": args.dataset,
                "split_files": [os.path.basename(p) for p in args.split_file],
            },
            landmark_cache=landmark_cache,
        )
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing the shards or dataset_info.json: a full disk, most often
        where = f"{e.filename}: " if e.filename else ""
        fix = (
            "free space there (or build into another --output)"
            if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "fix that"
        )
        print(
            f"error: cannot write the records in {args.output}: {where}{e.strerror or e}; {fix}, "
            "then run the same command again: the videos finished so far are cached in "
            f"{os.path.join(args.output, WORK)}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return interrupted(
            f"the videos finished so far are cached in {os.path.join(args.output, WORK)}; run "
            "the same command again to go on"
        )
    print(_summary(result, args.output), file=sys.stderr)
    if result.exceeded:
        print(
            f"error: {result.failure_fraction:.1%} of the videos failed, more than "
            f"--max-failure-fraction {args.max_failure_fraction:.1%}; what succeeded is written "
            f"to {args.output}, see {os.path.join(args.output, FAILURES)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
