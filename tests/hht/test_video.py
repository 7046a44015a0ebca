"""Decoding (rotation, odd sizes, spans, bad files) and atomic encoding."""

import os
import re
import struct
from fractions import Fraction

import av
import numpy as np
import pytest

from signnet_jax.hht import VideoError, read_video, write_video
from signnet_jax.hht.video import TruncatedVideoError, decode_video


def write_lossless(path, frames, rate=25):
    """FFV1 in Matroska: lossless RGB and any frame size, odd ones included."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=rate)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "bgr0"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


def rotate_mp4(path, out):
    """Copies an MP4 and sets its track matrix to 'display rotated 90 degrees clockwise'."""
    data = bytearray(path.read_bytes())
    i = data.find(b"tkhd")
    offset = i + (56 if data[i + 4] == 1 else 44)  # the 3x3 matrix, after the v0/v1 header
    data[offset : offset + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    out.write_bytes(bytes(data))


def test_reads_the_sample(sign_sample):
    frames, fps = read_video(sign_sample)
    assert frames.shape == (76, 256, 256, 3) and frames.dtype == np.uint8
    assert fps == 25.0
    # the clip is letterboxed: black rows at the top, picture in the middle
    assert frames[:, :30].max() < 10 and frames[:, 100:150].mean() > 50


def test_span_decodes_only_the_requested_frames(sign_sample):
    full, _, times = decode_video(sign_sample)
    part, fps, part_times = decode_video(sign_sample, 10, 20)
    np.testing.assert_array_equal(part, full[10:20])
    np.testing.assert_allclose(part_times, times[10:20])
    np.testing.assert_allclose(np.diff(times), 1 / fps, atol=1e-6)


def test_odd_sizes_decode_exactly(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 33, 47, 3), dtype=np.uint8)
    write_lossless(tmp_path / "odd.mkv", frames)
    decoded, fps = read_video(tmp_path / "odd.mkv")
    np.testing.assert_array_equal(decoded, frames)
    assert fps == 25.0


def test_rotation_metadata_is_applied(tmp_path):
    frame = np.zeros((32, 64, 3), np.uint8)
    frame[:, :16] = 255  # white strip on the left of the stored picture
    write_video(tmp_path / "plain.mp4", [frame] * 3, 25)
    rotate_mp4(tmp_path / "plain.mp4", tmp_path / "rotated.mp4")
    with av.open(str(tmp_path / "rotated.mp4")) as c:
        assert next(c.decode(video=0)).rotation == -90
    decoded, _ = read_video(tmp_path / "rotated.mp4")
    # turned clockwise for display: portrait, and the left strip is now at the top
    assert decoded.shape == (3, 64, 32, 3)
    assert decoded[:, :12].min() > 200 and decoded[:, 20:].max() < 50


def test_write_video_round_trip_and_no_temp_left(tmp_path):
    frames = np.zeros((5, 64, 64, 3), np.uint8)
    frames[:, :, :32] = (200, 40, 40)
    write_video(tmp_path / "out.mp4", frames, 30000 / 1001)
    decoded, fps = read_video(tmp_path / "out.mp4")
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    assert fps == pytest.approx(29.97, abs=0.01)
    assert os.listdir(tmp_path) == ["out.mp4"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out.mp4").st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="no frames to write"):
        write_video(tmp_path / "out.mp4", [], 25)
    with pytest.raises(ValueError, match=r"needs even sizes, got \(33, 64, 3\)"):
        write_video(tmp_path / "out.mp4", np.zeros((2, 33, 64, 3), np.uint8), 25)
    assert os.listdir(tmp_path) == []


def test_not_a_video_names_the_file(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are not frames\n" * 20)
    with pytest.raises(VideoError, match=rf"{re.escape(str(path))}: cannot decode as video"):
        read_video(path)


def test_zero_frames_names_the_file(tmp_path):
    path = tmp_path / "empty.y4m"
    path.write_bytes(b"YUV4MPEG2 W64 H48 F25:1 Ip A1:1 C420jpeg\n")  # header, no frames
    with pytest.raises(VideoError, match=rf"{re.escape(str(path))}: zero decodable video frames"):
        read_video(path)


def test_span_past_the_end_has_zero_frames(sign_sample):
    with pytest.raises(VideoError, match=r"zero decodable video frames in \[100, 120\)"):
        decode_video(sign_sample, 100, 120)
    with pytest.raises(VideoError, match=r"zero decodable video frames in \[100, the end\)"):
        decode_video(sign_sample, 100)
    with pytest.raises(VideoError, match=r"empty frame span \[5, 5\)"):
        decode_video(sign_sample, 5, 5)


def test_unreadable_codec_names_the_file(sign_sample, tmp_path):
    data = bytearray(sign_sample.read_bytes())
    # Make the stream claim an unknown codec: private MPEG-4 object type, unknown fourcc.
    i = data.find(b"esds")
    assert data[i + 21] == 0x20
    data[i + 21] = 0xC0
    path = tmp_path / "strange_codec.mp4"
    path.write_bytes(bytes(data).replace(b"mp4v", b"zzzz"))
    message = rf"{re.escape(str(path))}: cannot decode as video \(.*Decoder not found"
    with pytest.raises(VideoError, match=message):
        read_video(path)


def test_audio_only_file_has_no_video_stream(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        silence = np.zeros((1, 800), np.int16)
        frame = av.AudioFrame.from_ndarray(silence, format="s16", layout="mono")
        frame.sample_rate = 8000
        frame.time_base = Fraction(1, 8000)
        c.mux(s.encode(frame))
        c.mux(s.encode())
    with pytest.raises(VideoError, match=rf"{re.escape(str(path))}: no video stream"):
        read_video(path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(VideoError, match=re.escape(f"{tmp_path / 'nope.mp4'}: no such file")):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoError, match=re.escape(f"{tmp_path}: a folder, not a video file")):
        read_video(tmp_path)


def test_variable_frame_rate_keeps_real_times(tmp_path):
    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as c:
        s = c.add_stream("ffv1", rate=25)
        s.width, s.height, s.pix_fmt = 48, 32, "bgr0"
        s.codec_context.time_base = s.time_base = Fraction(1, 1000)
        for pts in (0, 40, 120, 200):  # a dropped frame, then a slower stretch
            vf = av.VideoFrame.from_ndarray(np.zeros((32, 48, 3), np.uint8), format="rgb24")
            vf.pts, vf.time_base = pts, Fraction(1, 1000)
            c.mux(s.encode(vf))
        c.mux(s.encode())
    frames, _, times = decode_video(path)
    assert len(frames) == 4
    np.testing.assert_allclose(times, [0, 0.04, 0.12, 0.2])


def faststart_copy(src, out):
    """The same stream remuxed with its index (moov) before the data, as web downloads are."""
    with av.open(str(src)) as i, av.open(str(out), "w", options={"movflags": "faststart"}) as o:
        s = o.add_stream_from_template(i.streams.video[0])
        for packet in i.demux(i.streams.video[0]):
            if packet.dts is not None:
                packet.stream = s
                o.mux(packet)
    data = out.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    return out


def test_a_download_cut_short_is_not_silently_shorter(sign_sample, tmp_path):
    whole = faststart_copy(sign_sample, tmp_path / "fast.mp4")
    assert len(read_video(whole)[0]) == 76  # intact: no false alarm
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    message = rf"{re.escape(str(cut))}: truncated: only \d+ of the 76 frames its header lists"
    with pytest.raises(TruncatedVideoError, match=message):
        read_video(cut)
    with pytest.raises(TruncatedVideoError, match=message):
        decode_video(cut, 10, 70)  # the span runs into the missing part
    # a span that ends before the cut is all there
    np.testing.assert_array_equal(decode_video(cut, 0, 20)[0], decode_video(whole, 0, 20)[0])


@pytest.mark.parametrize("kept", [0.3, 0.6, 0.9])
def test_an_h264_download_cut_short_is_called_truncated(sign_sample, tmp_path, kept):
    # H.264 cut mid-packet makes FFmpeg raise (InvalidDataError) after the frames before the
    # cut: still a download cut short, not a file that cannot be decoded
    frames, _ = read_video(sign_sample)
    h264 = tmp_path / "h264.mp4"
    with av.open(str(h264), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.height, s.width, s.pix_fmt = *frames.shape[1:3], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    whole = faststart_copy(h264, tmp_path / "fast.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * kept)])
    with pytest.raises(TruncatedVideoError, match=(
        rf"^{re.escape(str(cut))}: truncated: only \d+ of the 76 frames its header lists can "
        r"be decoded \(an incomplete download or copy\?\); download or copy it again$"
    )):  # fmt: skip
        read_video(cut)


def test_a_trim_without_reencoding_is_not_called_truncated(sign_sample, tmp_path):
    # like `ffmpeg -ss 1 -c copy`: all 76 samples stay in the track, an edit list hides the
    # first second, so 51 frames decode although the header counts 76
    out = tmp_path / "trimmed.mp4"
    with av.open(str(sign_sample)) as i, av.open(str(out), "w") as o:
        stream = i.streams.video[0]
        s = o.add_stream_from_template(stream)
        shift = int(1.0 / stream.time_base)
        for packet in i.demux(stream):
            if packet.dts is not None:
                packet.pts -= shift
                packet.dts -= shift
                packet.stream = s
                o.mux(packet)
    with av.open(str(out)) as c:
        assert c.streams.video[0].frames == 76
    frames, fps = read_video(out)
    assert len(frames) == 51 and fps == 25.0


def _mpegts(path, frames):
    with av.open(str(path), "w", format="mpegts") as c:
        s = c.add_stream("mpeg2video", rate=25)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


def test_a_stream_that_changes_size_is_resized_to_its_first_size(tmp_path):
    # two MPEG-TS pieces joined byte-wise, as streamed or concatenated recordings are
    rng = np.random.default_rng(0)
    _mpegts(tmp_path / "a.ts", rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8))
    _mpegts(tmp_path / "b.ts", np.full((5, 48, 64, 3), 200, np.uint8))
    joined = tmp_path / "joined.ts"
    joined.write_bytes((tmp_path / "a.ts").read_bytes() + (tmp_path / "b.ts").read_bytes())
    with pytest.warns(UserWarning) as caught:
        frames, _, times = decode_video(joined)
    # (FFmpeg drops a frame at the seam, where the second piece's clock starts again)
    assert frames.shape[1:] == (64, 64, 3) and len(frames) in (9, 10) and len(times) == len(frames)
    first = int((frames.reshape(len(frames), -1).mean(1) < 180).sum())  # the noise piece
    assert first >= 4 and abs(float(frames[first:].mean()) - 200) < 4  # the flat one, stretched
    (w,) = caught
    assert str(w.message) == (
        f"{joined}: the frame size changes from 64x64 to 64x48 at frame {first}; "
        "later frames were resized to the first size"
    )
    # frames are counted from the video's start, also when decoding starts later
    with pytest.warns(UserWarning, match=rf"at frame {first}; later frames"):
        part, _, _ = decode_video(joined, 2)
    np.testing.assert_array_equal(part, frames[2:])


def test_a_video_too_large_for_memory_is_named(sign_sample, monkeypatch):
    from signnet_jax.hht import video

    real = video._FrameBuffer.append

    def append(self, image):
        if self.n == 3:
            raise MemoryError
        real(self, image)

    monkeypatch.setattr(video._FrameBuffer, "append", append)
    with pytest.raises(VideoError, match=(
        rf"^{re.escape(str(sign_sample))}: too large to decode at once \(3 frames decoded before "
        r"memory ran out\); use a part of it"
    )):  # fmt: skip
        decode_video(sign_sample)


def test_a_video_the_header_says_cannot_fit_is_refused_before_decoding(sign_sample, monkeypatch):
    from signnet_jax.hht import video

    frame = 256 * 256 * 3  # sign_sample: 76 frames of 256x256, 14,942,208 bytes
    monkeypatch.setattr(video, "free_memory", lambda: 75 * frame)
    monkeypatch.setattr(video._FrameBuffer, "append", lambda self, image: pytest.fail("decoded"))
    with pytest.raises(VideoError) as e:
        decode_video(sign_sample)
    assert str(e.value) == (
        f"{sign_sample}: too large to decode at once: 76 frames of 256x256 need 15 MB and "
        "15 MB of memory is free; use a part of it (a start and end frame)"
    )
    monkeypatch.undo()
    monkeypatch.setattr(video, "free_memory", lambda: 75 * frame)
    assert len(decode_video(sign_sample, 1)[0]) == 75  # a part that fits


@pytest.mark.parametrize("sar, width", [(Fraction(2, 1), 128), (Fraction(3, 4), 48)])
def test_non_square_pixels_are_shown_in_their_display_shape(tmp_path, sar, width):
    # anamorphic video stores 64 columns that are shown 2x wider (or narrower): the crops of
    # the head and hands must not come out squashed
    path = tmp_path / "anamorphic.mp4"
    stripes = np.zeros((48, 64, 3), np.uint8)
    stripes[:, 32:] = 255  # left half black, right half white
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.sample_aspect_ratio = sar
        for _ in range(3):
            c.mux(s.encode(av.VideoFrame.from_ndarray(stripes, format="rgb24")))
        c.mux(s.encode())
    frames, _, _ = decode_video(path)
    assert frames.shape == (3, 48, width, 3)
    row = frames[0, 24, :, 0].astype(int)
    assert row[: width // 2 - 2].max() < 20 and row[width // 2 + 2 :].min() > 235


def test_a_start_past_the_end_says_how_many_frames_there_are(sign_sample):
    with pytest.raises(VideoError, match=r"in \[80, the end\); it has 76 frames: start below 76$"):
        decode_video(sign_sample, 80)


@pytest.mark.parametrize("cap", [2**31, 20 * 2**20])  # the header's count is trusted
def test_decoding_holds_the_frames_once(tmp_path, cap):
    import subprocess
    import sys

    frames = np.zeros((120, 480, 640, 3), np.uint8)  # 110 MB decoded
    frames[:, :, :, 0] = np.arange(120, dtype=np.uint8)[:, None, None]
    with av.open(str(tmp_path / "v.mp4"), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.height, s.width, s.pix_fmt = 480, 640, "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    # VmHWM: this process's peak resident memory (ru_maxrss would start at pytest's)
    code = (
        "import re, sys; from signnet_jax.hht import video; from signnet_jax.hht.video "
        f"import decode_video\nvideo.PREALLOCATE_BYTES = {cap}\n"
        "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status')"
        ".read())[1]) * 1024\n"
        "decode_video(sys.argv[1], 0, 2)\n"  # codecs loaded before the baseline
        "base = peak()\n"
        "f, _, _ = decode_video(sys.argv[1])\n"
        "print((peak() - base) / f.nbytes)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "v.mp4")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    # a list of frames stacked into an array would peak at twice the frames
    assert float(r.stdout) < 1.3


def test_empty_and_index_less_files_say_what_happened(sign_sample, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match=rf"^{re.escape(str(empty))}: an empty file \(0 bytes\)"):
        read_video(empty)
    # phone recorders write the index (moov) last: a copy cut short has data and no index
    data = sign_sample.read_bytes()
    assert data.find(b"moov") > data.find(b"mdat") > 0
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=(
        rf"^{re.escape(str(half))}: an incomplete MP4: it holds video data but not its index"
    )):  # fmt: skip
        read_video(half)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(VideoError) as e:
        read_video(garbage)
    assert str(e.value) == f"{garbage}: cannot decode as video (Invalid data found when " \
        "processing input)"  # fmt: skip
    assert not isinstance(e.value, TruncatedVideoError)
