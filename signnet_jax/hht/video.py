"""Video decoding and encoding with PyAV (FFmpeg)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
import warnings
from collections.abc import Iterable
from fractions import Fraction

import av
import cv2
import numpy as np


class VideoError(ValueError):
    """A file that is not a usable video: unreadable, no video stream, zero frames."""


class VideoWarning(UserWarning):
    """A video that decodes, with something its user should know (e.g. a frame size change)."""


class VideoTooLargeError(VideoError):
    """A video whose frames do not fit in the memory free now (a part of it may)."""


class TruncatedVideoError(VideoError):
    """A video that ends before the frames its header lists (an incomplete download or copy)."""


def _listed_frames(stream, rate: float) -> int:
    """Frames the header promises: the track's sample count, or fewer when an edit list
    (a trim without re-encoding) shortens the stream's duration; 0 when unknown."""
    listed = stream.frames or 0
    if listed and stream.duration and stream.time_base and rate > 0:
        listed = min(listed, round(float(stream.duration * stream.time_base) * rate))
    return listed


def _truncated(listed: int, decoded: int) -> bool:
    """Whether fewer frames decoded than the header lists, beyond the usual small mismatch."""
    return listed > 0 and listed - decoded > max(2, listed // 50)


def decode_video(
    path: str | os.PathLike, start_frame: int = 0, end_frame: int | None = None
) -> tuple[np.ndarray, float, np.ndarray]:
    """Decodes frames [start_frame, end_frame) as RGB, upright, with their times.

    Args:
      path: video file.
      start_frame: first frame index kept.
      end_frame: one past the last frame index kept (None = to the end).

    Returns:
      frames (N, H, W, 3) uint8 RGB with rotation metadata applied, the average frame
      rate, and each frame's presentation time in seconds (N,) (non-decreasing; for
      variable frame rate videos these are the real times).

    Raises:
      VideoError: the file is missing, not a video, undecodable, or has no frames in
        the requested span.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise VideoError(f"{path}: a folder, not a video file")
    if not path.is_file():
        raise VideoError(f"{path}: no such file")
    if start_frame < 0 or (end_frame is not None and end_frame <= start_frame):
        raise VideoError(f"{path}: empty frame span {_span(start_frame, end_frame)}")
    frames = _FrameBuffer(path, start_frame)
    times: list[float] = []
    listed = decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream (is it a video file?)")
            stream = container.streams.video[0]
            # FFmpeg's own threading would compete with MediaPipe for the same cores.
            stream.thread_type = "NONE"
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            listed, decoded, reached_end = _listed_frames(stream, rate), 0, True
            wanted = (listed if end_frame is None else min(listed, end_frame)) - start_frame
            try:
                size = stream.width, stream.height
                sar = stream.sample_aspect_ratio
            except AttributeError:  # no decoder for the codec: reported as FFmpeg says
                size, sar = (0, 0), None
            # non-square pixels (anamorphic DV, some phone and broadcast files): frames are
            # stretched to the shape they are shown in, as players and FFmpeg's scale=iw*sar do
            display_width = round(size[0] * sar) if sar and sar != 1 else None
            _check_fits(path, wanted, display_width or size[0], size[1])
            frames.expect(wanted)
            for index, frame in enumerate(container.decode(stream)):
                if end_frame is not None and index >= end_frame:
                    reached_end = False
                    break
                decoded = index + 1
                if index < start_frame:
                    continue
                image = frame.to_ndarray(format="rgb24")
                if display_width and image.shape[1] == size[0]:
                    wider = display_width > image.shape[1]
                    image = cv2.resize(
                        image,
                        (display_width, image.shape[0]),
                        interpolation=cv2.INTER_LINEAR if wider else cv2.INTER_AREA,
                    )
                if frame.rotation:
                    # rotation is the counterclockwise angle that makes the frame upright.
                    image = np.ascontiguousarray(np.rot90(image, k=round(frame.rotation / 90)))
                frames.append(image)
                times.append(float(frame.time) if frame.time is not None else float("nan"))
    except VideoError:
        raise
    except (av.FFmpegError, ValueError, IndexError) as e:
        if decoded and _truncated(listed, decoded):  # data cut short after a whole index
            raise TruncatedVideoError(_truncated_message(path, decoded, listed)) from e
        raise _undecodable(path, e) from e
    except MemoryError as e:
        raise VideoTooLargeError(
            f"{path}: too large to decode at once ({len(frames)} frames decoded before memory "
            "ran out); use a part of it (a start and end frame)"
        ) from e
    # A file cut short with its index up front (as web downloads are) decodes without an
    # error up to the cut; only the header's frame count tells.
    if reached_end and _truncated(listed, decoded):
        raise TruncatedVideoError(_truncated_message(path, decoded, listed))
    if not len(frames):
        whole = (start_frame, end_frame) == (0, None)
        span = "" if whole else f" in {_span(start_frame, end_frame)}"
        past = f"; it has {decoded} frames: start below {decoded}" if decoded else ""
        raise VideoError(f"{path}: zero decodable video frames{span}{past}")
    if rate <= 0:
        rate = 25.0
    return frames.array(), rate, _clean_times(np.asarray(times), rate)


def free_memory() -> int | None:
    """Bytes of memory the system can give without swapping (Linux' MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits(path: pathlib.Path, frames: int, width: int, height: int) -> None:
    """Refuses, before decoding, a span whose frames the header says cannot fit in memory
    (else decoding would run for a while and then be killed by the system)."""
    need, free = frames * width * height * 3, free_memory()
    if frames > 0 and free is not None and need > free:
        raise VideoTooLargeError(
            f"{path}: too large to decode at once: {frames} frames of {width}x{height} need "
            f"{need / 1e6:,.0f} MB and {free / 1e6:,.0f} MB of memory is free; use a part of "
            "it (a start and end frame)"
        )


# Frames preallocated when the header lists no frame count.
PREALLOCATE_BYTES = 2**31


def _truncated_message(path: pathlib.Path, decoded: int, listed: int) -> str:
    return (
        f"{path}: truncated: only {decoded} of the {listed} frames its header lists can be "
        "decoded (an incomplete download or copy?); download or copy it again"
    )


class _FrameBuffer:
    """Decoded frames in one preallocated array (a list and np.stack would hold them twice).

    Frames whose size differs from the first frame's (a stream that changes resolution
    midway) are resized to it, with a warning.
    """

    def __init__(self, path: pathlib.Path, first_index: int = 0):
        self.path, self.n, self.capacity, self.data = path, 0, 0, None
        self.first_index = first_index  # the video's frame number of the first frame kept
        self.resized_from: tuple[int, int, int] | None = None  # first odd size and its index

    def expect(self, frames: int) -> None:
        """The frame count the header lists (0: unknown)."""
        self.capacity = max(frames, 0)

    def __len__(self) -> int:
        return self.n

    def append(self, image: np.ndarray) -> None:
        if self.data is None:
            # the header's count (checked to fit in memory; the pages of np.empty are only
            # taken as frames fill them, so a header that overstates costs nothing), else
            # 2 GiB, grown by half when exceeded
            room = self.capacity or PREALLOCATE_BYTES // image.nbytes
            self.data = np.empty((max(1, room), *image.shape), np.uint8)
        elif image.shape != self.data.shape[1:]:
            if self.resized_from is None:
                self.resized_from = (*image.shape[:2], self.first_index + self.n)
            h, w = self.data.shape[1:3]
            image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        if self.n == len(self.data):  # more frames than the header listed: grow by half
            grown = np.empty((self.n + max(self.n // 2, 16), *self.data.shape[1:]), np.uint8)
            grown[: self.n] = self.data
            self.data = grown
        self.data[self.n] = image
        self.n += 1

    def array(self) -> np.ndarray:
        if self.resized_from is not None:
            h, w, index = self.resized_from
            warnings.warn(
                f"{self.path}: the frame size changes from {self.data.shape[2]}x"
                f"{self.data.shape[1]} to {w}x{h} at frame {index}; later frames were resized "
                "to the first size",
                VideoWarning,
                stacklevel=3,
            )
        return self.data[: self.n]


def _undecodable(path: pathlib.Path, error: Exception) -> VideoError:
    """Why FFmpeg could not open ``path``, with the fix where the file's shape tells."""
    size = path.stat().st_size
    if size == 0:
        return VideoError(f"{path}: an empty file (0 bytes); copy or download it again")
    if _mp4_without_index(path, size):
        return VideoError(  # (not TruncatedVideoError: nothing at all decodes)
            f"{path}: an incomplete MP4: it holds video data but not its index (the 'moov' "
            "box, written last), as when a copy, download or recording was cut short; copy "
            "it again, or re-export it from the recorder"
        )
    reason = getattr(error, "strerror", None) or str(error)
    return VideoError(f"{path}: cannot decode as video ({reason})")


def _mp4_without_index(path: pathlib.Path, size: int) -> bool:
    """Whether the file's top-level MP4/MOV boxes have media data but no 'moov' index."""
    boxes = set()
    with open(path, "rb") as f:
        offset = 0
        for _ in range(64):  # top-level boxes are few; a damaged file must not loop long
            if offset + 8 > size:
                break
            f.seek(offset)
            head = f.read(16)
            length, kind = int.from_bytes(head[:4], "big"), head[4:8]
            if length == 1 and len(head) == 16:  # a 64-bit size follows
                length = int.from_bytes(head[8:16], "big")
            if not kind.isalnum():  # not a box: not an MP4
                break
            boxes.add(kind)
            if length < 8:  # 0: to the end of the file
                break
            offset += length
    return b"ftyp" in boxes and b"mdat" in boxes and b"moov" not in boxes


def _span(start: int, end: int | None) -> str:
    return f"[{start}, {'the end' if end is None else end})"


def _clean_times(times: np.ndarray, rate: float) -> np.ndarray:
    """Fills missing times from the frame rate and makes them non-decreasing."""
    times = np.where(np.isfinite(times), times, np.arange(len(times)) / rate)
    return np.maximum.accumulate(times)


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Reads a whole video.

    Args:
      path: video file.

    Returns:
      frames (N, H, W, 3) uint8 RGB (rotation metadata applied) and the frame rate.

    Raises:
      VideoError: missing, not a video, undecodable or zero frames (message names the file).
    """
    frames, fps, _ = decode_video(path)
    return frames, fps


def write_video(path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float) -> None:
    """Writes RGB frames as H.264 MP4, atomically (temp file, then rename).

    Args:
      path: output file; its parent directory must exist.
      frames: (H, W, 3) uint8 RGB frames of one size (even: H.264 4:2:0).
      fps: frame rate.
    """
    path = pathlib.Path(path)
    tmp = private_temp(path, ".part")
    try:
        with av.open(tmp, "w", format="mp4") as container:
            stream = None
            for frame in frames:
                if stream is None:
                    if frame.shape[0] % 2 or frame.shape[1] % 2:
                        raise ValueError(f"{path}: H.264 4:2:0 needs even sizes, got {frame.shape}")
                    stream = container.add_stream("libx264", rate=_rate(fps))
                    stream.height, stream.width = frame.shape[:2]
                    stream.pix_fmt = "yuv420p"
                    # superfast, one thread, OpenCV's colour conversion: encoding must stay a
                    # small share of detection (veryfast took twice as long per frame).
                    stream.options = {"preset": "superfast", "crf": "18", "threads": "1"}
                yuv = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2YUV_I420)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")))
            if stream is None:
                raise ValueError(f"{path}: no frames to write")
            container.mux(stream.encode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_writable(
    path: str | os.PathLike, what: str, source: str | os.PathLike | None = None
) -> None:
    """Raises VideoError unless a file can be written at ``path`` (checked before long work).

    Args:
      path: the output file; its folder must exist.
      what: how the message names the output (e.g. '--output').
      source: the input video, which the output must not replace (compared after resolving
        links and '..', and as the same file on disk).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        raise VideoError(f"{what} {path} is a folder; give a file name")
    if source is not None and _same_file(path, pathlib.Path(source)):
        raise VideoError(f"{what} {path} is the input video; give another file name")
    if not path.parent.is_dir():
        raise VideoError(f"cannot write {what} {path}: folder {path.parent} does not exist")
    try:
        os.unlink(private_temp(path, ".probe"))
    except OSError as e:
        raise VideoError(
            f"cannot write {what} {path}: {e.strerror or e}; choose a folder you can write to"
        ) from e


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def private_temp(path: pathlib.Path, suffix: str) -> str:
    """A fresh hidden temp file beside `path` with the permissions a new file would get."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)
