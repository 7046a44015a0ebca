"""Tests for data_prep.build_records: the real H&HT end to end, resume after kill -9,
worker-count determinism, corruption detection; a small stand-in Tunneller for the rest."""

import argparse
import dataclasses
import errno
import fcntl
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap

import av
import cv2
import numpy as np
import pytest

from data_prep import build_records, manifests
from signnet_jax.data import records
from signnet_jax.files import PROBE_PREFIX
from signnet_jax.hht import HHTSettings, Landmarks, Tunneller, VideoError
from signnet_jax.hht.settings import DETECTION_FIELDS

REPO = pathlib.Path(__file__).resolve().parents[2]

# WLASL_v0.3-style manifest: spans 1-indexed, inclusive, applied to YouTube downloads (named
# by the url's last 11 characters); sign_sample has 76 frames.
GOOD = {"00001": (1, -1), "00002": (11, 40), "00003": (41, 76)}
BAD = {
    "00004": "missing_file",
    "00005": "undecodable",  # truncated mp4
    "00006": "undecodable",  # text file named .mp4
    "00007": "empty_span",  # span past the end of the clip
}


def _youtube_id(video_id):
    return f"ytid__{video_id}"  # 11 characters


def _manifest_json():
    inst = dict(fps=25)
    yt = {vid: {"url": f"https://www.youtube.com/watch?v={_youtube_id(vid)}"} for vid in GOOD}
    yt["00007"] = {"url": f"https://youtu.be/{_youtube_id('00007')}"}
    return [
        {
            "gloss": "hello",
            "instances": [
                {**inst, "video_id": "00001", "split": "train", "frame_start": 1, "frame_end": -1},
                {**inst, "video_id": "00004", "split": "train", "frame_start": 1, "frame_end": -1},
                {**inst, "video_id": "00005", "split": "train", "frame_start": 1, "frame_end": -1},
            ],
        },
        {
            "gloss": "world",
            "instances": [
                {
                    **inst,
                    **yt["00002"],
                    "video_id": "00002",
                    "split": "train",
                    "frame_start": 11,
                    "frame_end": 40,
                },
                {**inst, "video_id": "00006", "split": "val", "frame_start": 1, "frame_end": -1},
                {
                    **inst,
                    **yt["00003"],
                    "video_id": "00003",
                    "split": "test",
                    "frame_start": 41,
                    "frame_end": 76,
                },
                {
                    **inst,
                    **yt["00007"],
                    "video_id": "00007",
                    "split": "test",
                    "frame_start": 200,
                    "frame_end": 300,
                },
            ],
        },
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, sign_sample):
    """Videos folder + WLASL_v0.3-style manifest with three good and four bad entries."""
    root = tmp_path_factory.mktemp("dataset")
    videos = root / "videos"
    videos.mkdir()
    data = sign_sample.read_bytes()
    for vid in ("00001", "00002", "00003"):  # as clips named by id (the CSV tests use them)
        (videos / f"{vid}.mp4").write_bytes(data)
    for vid in ("00002", "00003", "00007"):  # as YouTube downloads (the manifest uses them)
        (videos / f"{_youtube_id(vid)}.mp4").write_bytes(data)
    (videos / "00005.mp4").write_bytes(data[: len(data) // 2])  # the moov atom is at the end
    (videos / "00006.mp4").write_text("this is not a video\n" * 20)
    split_file = root / "WLASL_v0.3.json"
    split_file.write_text(json.dumps(_manifest_json()))
    return root


def _cli(dataset_root, output, *extra):
    return [
        "--dataset",
        "wlasl",
        "--split-file",
        str(dataset_root / "WLASL_v0.3.json"),
        "--videos",
        str(dataset_root / "videos"),
        "--output",
        str(output),
        "--max-failure-fraction",
        "0.6",
        *extra,
    ]


def _tree_bytes(output):
    """Every final file of a records folder (the work cache excluded), name -> bytes."""
    return {
        p.name: p.read_bytes()
        for p in sorted(pathlib.Path(output).iterdir())
        if p.is_file() and p.name != build_records.WORK
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory, dataset):
    """The reference build: real H&HT, two worker processes."""
    out = tmp_path_factory.mktemp("built") / "records"
    assert build_records.main(_cli(dataset, out, "--workers", "2")) == 0
    return out


def test_end_to_end_real_hht(built, dataset, sign_sample):
    info = records.load_dataset_info(built)
    assert info["classes"] == ["hello", "world"] and info["num_classes"] == 2
    assert info["hht_settings"] == HHTSettings().to_dict()
    assert info["tool"]["name"] == "data_prep.build_records"
    assert info["tool"]["version"] == build_records.tool_version() != "unknown"
    assert info["dataset"] == "wlasl" and info["split_files"] == ["WLASL_v0.3.json"]
    assert info["jpeg_quality"] == 90
    splits = info["splits"]
    assert {k: (v["num_records"], v["num_failures"]) for k, v in splits.items()} == {
        "train": (2, 2),
        "val": (0, 1),
        "test": (1, 1),
    }
    assert splits["val"]["shards"] == []
    # the source frame rates, which training checkpoints pass on to predict
    assert splits["train"]["fps"] == {"min": 25.0, "median": 25.0, "max": 25.0}
    assert splits["val"]["fps"] is None

    failures = [json.loads(line) for line in (built / "failures.jsonl").read_text().splitlines()]
    assert {f["video_id"]: f["reason"] for f in failures} == BAD
    assert all(f["detail"] for f in failures)
    assert next(f for f in failures if f["video_id"] == "00004")["detail"].endswith(
        "00004.mp4: no such file"
    )
    # every manifest entry is exactly one record or one failure line
    ids = []
    for split in ("train", "test"):
        src = records.RecordSource(built, split)
        ids += [src[i]["video_id"][0].decode() for i in range(len(src))]
    assert sorted(ids + [f["video_id"] for f in failures]) == sorted([*GOOD, *BAD])

    # the records hold what a fresh Tunneller makes of the same spans (fps 25: same frames)
    src = records.RecordSource(built, "train")
    got = {src[i]["video_id"][0].decode(): src[i] for i in range(len(src))}
    got["00003"] = records.RecordSource(built, "test")[0]
    for vid, (start, end) in GOOD.items():
        r = got[vid]
        with Tunneller(HHTSettings()) as t:
            ref = t.process_video(sign_sample, start - 1, None if end == -1 else end)
        n, h, w, _ = ref.frames.shape
        assert (r["num_frames"][0], r["height"][0], r["width"][0]) == (n, h, w)
        assert n == (76 if end == -1 else end - start + 1)
        assert r["label"][0] == (0 if vid == "00001" else 1)
        assert r["gloss"] == [b"hello" if vid == "00001" else b"world"]
        assert r["fps"][0] == pytest.approx(ref.fps)
        np.testing.assert_array_equal(r["boxes"].reshape(n, 3, 4), ref.boxes)
        np.testing.assert_array_equal(r["box_source"].reshape(n, 3), ref.box_source)
        decoded = np.stack(
            [
                cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
                for b in r["frames"]
            ]
        )
        err = np.abs(decoded.astype(np.int16) - ref.frames.astype(np.int16))
        assert decoded.shape == ref.frames.shape
        assert err.mean() < 3.0, f"{vid}: JPEG q90 error {err.mean():.2f} too large"


def test_wlasl_k_from_v03_keeps_the_first_k_glosses_and_their_videos(dataset, tmp_path):
    out = tmp_path / "wlasl1"
    args = _cli(dataset, out, "--num-glosses", "1", "--workers", "0")
    args[args.index("--max-failure-fraction") + 1] = "1"  # 00004 and 00005 fail
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 0
    info = records.load_dataset_info(out)
    assert info["classes"] == ["hello"]
    assert {k: v["num_records"] for k, v in info["splits"].items()} == {"train": 1}
    assert records.RecordSource(out, "train")[0]["video_id"] == [b"00001"]


def test_record_features_have_the_kinds_of_the_design_table(tmp_path):
    # Readers (tf.data's parse_example among them) type each feature by its kind: a label
    # written as a float, or boxes as ints, would be another record format.
    n, h, w = 3, 8, 12
    rng = np.random.default_rng(0)
    boxes = rng.uniform(0, 1, (n, 3, 4)).astype(np.float32)
    boxes[1, 2] = -1.0  # no left hand in frame 1
    box_source = np.array([[1, 1, 1], [1, 3, 0], [2, 1, 1]])
    frames = np.broadcast_to(np.array([60, 120, 180], np.uint8)[:, None, None, None], (n, h, w, 3))
    result = _Result(frames, boxes, box_source, 29.97)
    entry = manifests.Entry("train", "v001", "v001.mp4", 7, "hello")
    shard = tmp_path / "train-00000-of-00001.tfrecord"
    with records.TFRecordWriter(shard) as writer:
        writer.write(build_records.make_example(entry, result, 90))
    (data,) = records.read_records(shard)

    feats = records.Example.FromString(data).features.feature
    kinds = {name: feats[name].WhichOneof("kind") for name in feats}
    assert kinds == {
        "video_id": "bytes_list",
        "label": "int64_list",
        "gloss": "bytes_list",
        "frames": "bytes_list",
        "height": "int64_list",
        "width": "int64_list",
        "num_frames": "int64_list",
        "fps": "float_list",
        "boxes": "float_list",
        "box_source": "int64_list",
    }
    assert list(feats["video_id"].bytes_list.value) == [b"v001"]
    assert list(feats["gloss"].bytes_list.value) == [b"hello"]
    assert list(feats["label"].int64_list.value) == [7]
    assert [feats[k].int64_list.value[:] for k in ("height", "width", "num_frames")] == [
        [h], [w], [n]
    ]  # fmt: skip
    assert list(feats["fps"].float_list.value) == [pytest.approx(29.97)]
    # row-major num_frames x 3 x 4 and num_frames x 3
    np.testing.assert_array_equal(feats["boxes"].float_list.value, boxes.ravel())
    assert list(feats["box_source"].int64_list.value) == box_source.ravel().tolist()
    jpegs = feats["frames"].bytes_list.value
    assert len(jpegs) == n and all(f[:2] == b"\xff\xd8" for f in jpegs)
    decoded = np.stack([cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR) for f in jpegs])
    assert decoded.shape == frames.shape
    np.testing.assert_allclose(decoded.mean((1, 2, 3)), [60, 120, 180], atol=2)  # in order


def test_fps_summary():
    assert build_records.fps_summary([30, 25, 29.97, 60]) == {
        "min": 25.0, "median": 29.985, "max": 60.0,
    }  # fmt: skip
    assert build_records.fps_summary([24000 / 1001]) == {
        "min": 23.976, "median": 23.976, "max": 23.976,
    }  # fmt: skip
    assert build_records.fps_summary([]) is None


def test_index_agrees_with_records(built):
    info = records.load_dataset_info(built)
    for split, s in info["splits"].items():
        for shard in s["shards"]:
            path = built / shard["file"]
            reader = records.ShardReader(path)
            index = reader.index
            assert len(index) == shard["num_records"]
            assert index[0, 0] == 0
            np.testing.assert_array_equal(index[1:, 0], np.cumsum(index[:-1, 1]))
            assert index[-1].sum() == path.stat().st_size == shard["num_bytes"]
            assert [reader.read(i) for i in range(len(reader))] == list(
                records.read_records(path)
            ), split


def test_rerun_is_cached_and_exit_code_follows_failure_fraction(built, dataset, tmp_path, capsys):
    copy = tmp_path / "records"
    shutil.copytree(built, copy)
    before = _tree_bytes(copy)
    # 4 of 7 failed: above the default 5% -> exit 1, but everything that succeeded is written
    args = _cli(dataset, copy, "--workers", "0")
    args.remove("--max-failure-fraction")
    args.remove("0.6")
    assert build_records.main(args) == 1
    err = capsys.readouterr().err
    assert "6 of 7 videos already done" in err  # the missing one is looked for again
    assert "57.1% of the videos failed, more than --max-failure-fraction 5.0%" in err
    assert "failures by reason: empty_span 1, missing_file 1, undecodable 2" in err
    assert _tree_bytes(copy) == before


def test_two_worker_counts_same_bytes(built, dataset, tmp_path):
    out = tmp_path / "records"
    assert build_records.main(_cli(dataset, out, "--workers", "0")) == 0
    assert _tree_bytes(out) == _tree_bytes(built)


_DRIVER = """
import os, signal, sys
from data_prep import build_records
from signnet_jax.data import records

KILL_AT = os.environ["KILL_AT"]
KILL_AFTER = int(os.environ["KILL_AFTER"])
count = 0


def _die():
    os.killpg(os.getpgrp(), signal.SIGKILL)  # this build's own process group only


if KILL_AT == "video":
    original = build_records.process

    def process(*args, **kwargs):
        global count
        out = original(*args, **kwargs)
        count += 1
        if count == KILL_AFTER:
            _die()
        return out

    # Module level on purpose: spawned workers re-run this file and get the patch too.
    build_records.process = process
else:
    original_write = records.TFRecordWriter.write

    def write(self, record):
        global count
        original_write(self, record)
        count += 1
        if count == KILL_AFTER:
            _die()

    records.TFRecordWriter.write = write

if __name__ == "__main__":
    sys.exit(build_records.main(sys.argv[1:]))
"""


def _run_killed(tmp_path, args, kill_at, kill_after):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_DRIVER))
    env = dict(os.environ, KILL_AT=kill_at, KILL_AFTER=str(kill_after), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(driver), *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        start_new_session=True,  # own process group, so the kill reaches only this build
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]


def _final_names(output):
    return sorted(p.name for p in pathlib.Path(output).iterdir() if p.name != build_records.WORK)


def test_kill_during_hht_then_rerun_gives_same_bytes(built, dataset, tmp_path):
    out = tmp_path / "records"
    _run_killed(tmp_path, _cli(dataset, out, "--workers", "2"), "video", 2)
    # killed before any shard: nothing under a final name, some videos already cached
    assert _final_names(out) == []
    cached = [p for p in (out / "work").iterdir() if p.suffix in (".rec", ".fail")]
    assert 2 <= len(cached) < 7
    assert build_records.main(_cli(dataset, out, "--workers", "1")) == 0
    assert _tree_bytes(out) == _tree_bytes(built)


def test_kill_while_writing_shards_then_rerun_gives_same_bytes(built, dataset, tmp_path):
    out = tmp_path / "records"
    out.mkdir()
    shutil.copytree(built / "work", out / "work")  # every video cached: straight to shards
    _run_killed(tmp_path, _cli(dataset, out, "--workers", "0"), "shard", 1)
    names = os.listdir(out)
    assert any(".tmp-" in n for n in names), names  # the half-written shard ...
    assert _final_names(out) == sorted(n for n in names if n != "work" and ".tmp-" in n)
    assert build_records.main(_cli(dataset, out, "--workers", "0")) == 0
    assert _tree_bytes(out) == _tree_bytes(built)  # ... is gone, the result is identical
    assert not any(".tmp-" in n for n in os.listdir(out))


_SLOW_DRIVER = """
import sys
import time

from data_prep import build_records
from tests.data_prep.test_build_records import FakeTunneller


class SlowTunneller(FakeTunneller):
    def process_video(self, *args, **kwargs):
        time.sleep(0.5)
        return super().process_video(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(build_records.main(sys.argv[1:], tunneller_factory=SlowTunneller))
"""


def test_a_log_file_gets_whole_progress_lines_not_a_redrawn_bar(dataset, tmp_path):
    """`... > build.log 2>&1`: the bar's carriage returns made the log one ever longer line."""
    driver = tmp_path / "driver.py"
    driver.write_text(_SLOW_DRIVER)
    log = tmp_path / "build.log"
    with open(log, "w") as f:
        r = subprocess.run(
            [sys.executable, str(driver), *_cli(dataset, tmp_path / "records", "--workers", "0")],
            env=dict(os.environ, PYTHONPATH=str(REPO), TQDM_MININTERVAL="0.4"),
            cwd=REPO,
            stderr=f,
            timeout=300,
        )
    text = log.read_text()
    assert r.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("H&HT: ")]
    # a line whenever 0.4 s have passed (a video takes 0.5 s), the last one on the close
    assert [line.split(" videos")[0] for line in lines] == [f"H&HT: {n}/6" for n in range(1, 7)]
    speed = r"(\d+\.\d\d videos/s|\d+\.\d s/video)"  # about 2 videos/s
    first = rf"H&HT: 1/6 videos \(17%\), {speed}, \d\d:\d\d so far, about \d\d:\d\d left"
    assert re.fullmatch(first, lines[0]), lines[0]
    assert re.fullmatch(rf"H&HT: 6/6 videos \(100%\), {speed}, \d\d:\d\d so far", lines[-1])
    assert "3 records, 4 failures (57.1%) from 7 entries" in text


def test_a_terminal_gets_the_bar_and_its_last_line_once(dataset, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(_SLOW_DRIVER)
    main, terminal = os.openpty()
    # 24 rows of 100 columns, as a terminal has (a new one has 0, which tqdm draws as nothing)
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, str(driver), *_cli(dataset, tmp_path / "records", "--workers", "2")],
            env=dict(os.environ, PYTHONPATH=str(REPO), TQDM_MININTERVAL="0"),
            cwd=REPO,
            stderr=terminal,
        )
    finally:
        os.close(terminal)
    chunks = []
    while True:  # until the process ends and closes its end
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: no process has the terminal open any more
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert proc.wait(timeout=120) == 0
    err = b"".join(chunks).decode()
    assert err.count("H&HT: 100%|") == 1, err  # the last video: drawn once, by the close
    assert err.count("6/6 [") == 1, err
    assert "\r" in err and "H&HT: 6/6 videos" not in err


def test_ctrl_c_is_a_message_not_tracebacks_and_leaves_no_workers(dataset, tmp_path):
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(_SLOW_DRIVER)
    out = tmp_path / "records"
    proc = subprocess.Popen(
        [sys.executable, str(driver), *_cli(dataset, out, "--workers", "2")],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
        stderr=subprocess.PIPE,
        start_new_session=True,  # own process group: Ctrl-C in a terminal signals the group
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not list((out / "work").glob("*.rec")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted: the videos finished so far are cached in" in err
    while time.monotonic() < deadline:  # the workers end too
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("worker processes outlived the interrupted build")
    assert _final_names(out) == []
    assert build_records.main(_cli(dataset, out), tunneller_factory=FakeTunneller) == 0


def test_flipped_byte_names_the_record(built, tmp_path):
    out = tmp_path / "records"
    shutil.copytree(built, out)
    info = records.load_dataset_info(out)
    shard = out / info["splits"]["train"]["shards"][0]["file"]
    index = records.read_index(shard)
    raw = bytearray(shard.read_bytes())
    raw[int(index[1, 0]) + 500] ^= 0xFF  # inside record 1's data
    shard.write_bytes(bytes(raw))
    src = records.RecordSource(out, "train")
    assert src[0]["video_id"] == [b"00001"]
    with pytest.raises(records.CorruptRecordError) as err:
        src[1]
    assert str(err.value).startswith(f"{shard}: record 1: data CRC mismatch")


# --------------------------------------------------------------------------------------------
# Stand-in Tunneller: fast tests of sharding, caching, CLI and manifests of all datasets.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Result:
    frames: np.ndarray
    boxes: np.ndarray
    box_source: np.ndarray
    fps: float


class FakeTunneller:
    """Decodes the span with PyAV and 'tunnels' by shrinking to 32x32; VideoError like H&HT."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def process_video(self, path, start_frame=0, end_frame=None):
        try:
            with av.open(str(path)) as c:
                fps = float(c.streams.video[0].average_rate)
                frames = [
                    cv2.resize(f.to_ndarray(format="rgb24"), (32, 32))
                    for i, f in enumerate(c.decode(video=0))
                    if i >= start_frame and (end_frame is None or i < end_frame)
                ]
        except (av.FFmpegError, IndexError) as e:
            raise VideoError(f"{path}: cannot decode as video ({e})") from e
        if not frames:
            raise VideoError(f"{path}: zero decodable video frames in [{start_frame}, {end_frame})")
        n = len(frames)
        boxes = np.tile(np.float32([0.1, 0.2, 0.5, 0.6]), (n, 3, 1))
        source = np.ones((n, 3), np.int8)
        return _Result(np.stack(frames), boxes, source, fps)


class NoPersonIn00002(FakeTunneller):
    """As FakeTunneller, but nothing is located in video 00002 (e.g. the signer out of view)."""

    def process_video(self, path, start_frame=0, end_frame=None):
        result = super().process_video(path, start_frame, end_frame)
        if pathlib.Path(path).stem == _youtube_id("00002"):
            result.box_source = np.zeros_like(result.box_source)
            result.boxes = np.full_like(result.boxes, -1)
        return result


def test_videos_with_no_person_found_are_kept_and_counted(dataset, tmp_path, capsys):
    out = tmp_path / "records"
    assert build_records.main(_cli(dataset, out), tunneller_factory=NoPersonIn00002) == 0
    info = records.load_dataset_info(out)
    assert {k: v["no_person"] for k, v in info["splits"].items()} == {
        "train": ["00002"], "val": [], "test": []
    }  # fmt: skip
    src = records.RecordSource(out, "train")
    assert [src[i]["video_id"][0] for i in range(len(src))] == [b"00001", b"00002"]
    assert capsys.readouterr().err.splitlines()[-3] == (
        f"  no head or hand found in 1 video (00002): recorded with the frame cell only; "
        f"listed under splits.SPLIT.no_person in {out / 'dataset_info.json'}"
    )


def test_video_names_that_differ_only_in_case_are_named(dataset, tmp_path, capsys):
    upper = tmp_path / "videos"
    shutil.copytree(dataset / "videos", upper)
    for path in sorted(upper.iterdir()):
        path.rename(path.with_suffix(".MP4"))
    first = upper / "00001.mp4"  # the split file's first entry
    args = _cli(dataset, tmp_path / "o", "--videos", str(upper))
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: --videos {upper} holds none of the 7 videos the split files name (e.g. "
        f"{first}); {first.with_suffix('.MP4')} is there: the names differ in case; rename the "
        "file to the name in the split file\n"
    )
    # some renamed: each of those fails as missing, with the file that is there
    first.with_suffix(".MP4").rename(first)
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 1
    failures = [json.loads(line) for line in (tmp_path / "o" / "failures.jsonl").open()]
    # a folder, or a link to nothing, at a video's name is named as what it is
    folder = upper / f"{_youtube_id('00003')}.mp4"
    folder.mkdir()
    dangling = upper / f"{_youtube_id('00007')}.mp4"
    dangling.symlink_to(tmp_path / "unmounted" / "x.mp4")
    args = _cli(dataset, tmp_path / "o2", "--videos", str(upper))
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 1
    failures = [json.loads(line) for line in (tmp_path / "o2" / "failures.jsonl").open()]
    details = {f["detail"] for f in failures}
    assert f"{folder}: not a file (a folder, or a link to nothing)" in details
    assert f"{dangling}: not a file (a folder, or a link to nothing)" in details
    failed = next(f for f in failures if f["video_id"] == "00002")
    other = upper / failed["path"]
    assert other.suffix == ".mp4" and other.with_suffix(".MP4").is_file()
    assert (failed["reason"], failed["detail"]) == ("missing_file", (
        f"{other}: no such file ({other.with_suffix('.MP4')} is there: the names differ in case; "
        "rename the file to the name in the split file)"
    ))  # fmt: skip


def test_a_missing_video_is_looked_for_again_on_every_run(dataset, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(dataset / "videos", videos)
    gone = videos / f"{_youtube_id('00002')}.mp4"
    kept = gone.rename(tmp_path / "kept.mp4")
    out = tmp_path / "o"
    args = _cli(dataset, out, "--videos", str(videos))

    def detail():
        failures = [json.loads(line) for line in (out / "failures.jsonl").open()]
        return [(f["reason"], f["detail"]) for f in failures if f["video_id"] == "00002"]

    assert build_records.main(args, tunneller_factory=FakeTunneller) == 1
    assert detail() == [("missing_file", f"{gone}: no such file")]
    failures = [json.loads(line) for line in (out / "failures.jsonl").open()]
    cached = [f for f in failures if f["reason"] != "missing_file"]
    assert len(list((out / "work").glob("*.fail"))) == len(cached)  # nothing for the missing
    # it turns up under a name differing in case: the next run says so (it used to repeat
    # the cached 'no such file')
    kept.rename(gone.with_suffix(".MP4"))
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 1
    assert detail() == [("missing_file", (
        f"{gone}: no such file ({gone.with_suffix('.MP4')} is there: the names differ in case; "
        "rename the file to the name in the split file)"
    ))]  # fmt: skip
    gone.with_suffix(".MP4").rename(gone)
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 0
    assert detail() == []


def test_a_video_gone_while_the_build_runs_is_counted_as_not_found(dataset, tmp_path, capsys):
    videos = tmp_path / "videos"
    shutil.copytree(dataset / "videos", videos)
    later = videos / f"{_youtube_id('00007')}.mp4"

    class RemovesALaterVideo(FakeTunneller):
        def process_video(self, path, start_frame=0, end_frame=None):
            later.unlink(missing_ok=True)
            return super().process_video(path, start_frame, end_frame)

    out = tmp_path / "o"
    args = _cli(dataset, out, "--videos", str(videos), "--workers", "0")
    assert build_records.main(args, tunneller_factory=RemovesALaterVideo) == 0  # 4 of 7 < 0.6
    # 00004 was never there; 00007 went after the build started
    assert "(5 processed, 0 cached, 2 not found)\n" in capsys.readouterr().err
    failures = {f["video_id"]: f for f in map(json.loads, (out / "failures.jsonl").open())}
    assert failures["00007"]["detail"] == f"{later}: no such file"
    assert failures["00004"]["reason"] == failures["00007"]["reason"] == "missing_file"


def test_a_video_too_large_for_free_memory_is_retried_not_cached(dataset, tmp_path, monkeypatch):
    from signnet_jax.hht import video

    monkeypatch.setattr(video, "free_memory", lambda: 1000)  # bytes: no video fits
    out = tmp_path / "o"
    args = _cli(dataset, out, "--workers", "0")
    args[args.index("--max-failure-fraction") + 1] = "1"
    assert build_records.main(args) == 0
    failures = [json.loads(line) for line in (out / "failures.jsonl").open()]
    large = [f for f in failures if f["reason"] == "error"]
    assert len(large) == 3  # the three good videos
    assert large[0]["detail"].endswith(
        "of memory is free; use a part of it (a start and end frame); or build with fewer "
        "--workers, which leaves each more memory"
    )
    assert not [p for p in (out / "work").iterdir() if p.suffix == ".fail" and any(
        f["detail"] in p.read_text() for f in large
    )]  # fmt: skip
    monkeypatch.undo()  # memory again: the next run builds them
    assert build_records.main(_cli(dataset, out, "--workers", "0")) == 0
    assert records.load_dataset_info(out)["num_records"] == 3


class BrokenFactory:
    def __call__(self):
        raise FileNotFoundError("hand_landmarker.task not found in /nowhere")


def test_setup_failure_stops_the_build(dataset, tmp_path, capsys):
    for workers in ("0", "1"):
        code = build_records.main(
            _cli(dataset, tmp_path / workers, "--workers", workers),
            tunneller_factory=BrokenFactory(),
        )
        assert code == 2
        assert "H&HT could not start: FileNotFoundError: hand_landmarker.task" in (
            capsys.readouterr().err
        )
        assert _final_names(tmp_path / workers) == []


def test_small_shards_and_stale_shards_removed(dataset, tmp_path):
    out = tmp_path / "records"
    fake = FakeTunneller
    assert build_records.main(_cli(dataset, out, "--shard-size", "1B"), tunneller_factory=fake) == 0
    info = records.load_dataset_info(out)
    assert [s["file"] for s in info["splits"]["train"]["shards"]] == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    src = records.RecordSource(out, "train")
    assert [src[i]["video_id"][0] for i in range(len(src))] == [b"00001", b"00002"]
    assert src[0]["frames"] and src[0]["height"][0] == 32
    # rebuilding with big shards removes the old two-shard files of the split
    assert build_records.main(_cli(dataset, out), tunneller_factory=fake) == 0
    assert sorted(p.name for p in out.glob("train-*")) == [
        "train-00000-of-00001.tfrecord",
        "train-00000-of-00001.tfrecord.index",
    ]


def test_cache_keys_follow_settings_and_video(dataset, tmp_path):
    entry = manifests.Entry("train", "00001", "00001.mp4", 0, "hello")
    path = str(dataset / "videos" / "00001.mp4")
    key = build_records.cache_key(entry, path, HHTSettings().to_dict(), 90)
    assert key == build_records.cache_key(entry, path, HHTSettings().to_dict(), 90)
    assert key != build_records.cache_key(entry, path, HHTSettings(size=224).to_dict(), 90)
    assert key != build_records.cache_key(entry, path, HHTSettings().to_dict(), 80)
    assert key != build_records.cache_key(
        dataclasses.replace(entry, label=1), path, HHTSettings().to_dict(), 90
    )
    assert key != build_records.cache_key(entry, path + ".other", HHTSettings().to_dict(), 90)


class FlakyTunneller(FakeTunneller):
    """Raises an unexpected error for one video."""

    def process_video(self, path, start_frame=0, end_frame=None):
        if str(path).endswith("00002.mp4"):
            raise MemoryError("out of memory")
        return super().process_video(path, start_frame, end_frame)


def test_unexpected_errors_are_reported_and_retried(dataset, tmp_path):
    out = tmp_path / "records"
    # 5 of 7 failed, more than the 60% allowed: exit 1, the rest is written
    assert build_records.main(_cli(dataset, out), tunneller_factory=FlakyTunneller) == 1
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    flaky = next(f for f in failures if f["video_id"] == "00002")
    assert flaky["reason"] == "error" and flaky["detail"].startswith("MemoryError: out of memory")
    # not cached: the next run processes it again and succeeds
    assert build_records.main(_cli(dataset, out), tunneller_factory=FakeTunneller) == 0
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert "00002" not in {f["video_id"] for f in failures}
    assert records.load_dataset_info(out)["splits"]["train"]["num_records"] == 2


class _Interrupted(Exception):
    pass


def test_interrupted_rebuild_does_not_leave_the_old_description(dataset, tmp_path, monkeypatch):
    out = tmp_path / "records"
    assert build_records.main(_cli(dataset, out), tunneller_factory=FakeTunneller) == 0
    assert records.load_dataset_info(out)["jpeg_quality"] == 90
    # the same dataset with other frames (JPEG quality 50), interrupted once the shards are
    # written
    args = _cli(dataset, out, "--jpeg-quality", "50")
    original = build_records.atomic_write

    def interrupt_at_failures(path, data, **kwargs):
        if path.endswith(build_records.FAILURES):
            raise _Interrupted  # Ctrl-C, kill -9 or a lost machine at this point
        original(path, data, **kwargs)

    monkeypatch.setattr(build_records, "atomic_write", interrupt_at_failures)
    with pytest.raises(_Interrupted):
        build_records.main(args, tunneller_factory=FakeTunneller)
    # the new shards hold other frames: the old dataset_info.json (quality 90, old shard
    # sizes) must not describe them; the folder reads as an unfinished build instead
    with pytest.raises(FileNotFoundError, match="did not finish"):
        records.RecordSource(out, "train")
    monkeypatch.setattr(build_records, "atomic_write", original)
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 0
    info = records.load_dataset_info(out)
    assert info["jpeg_quality"] == 50
    for split, s in info["splits"].items():
        for shard in s["shards"]:
            assert (out / shard["file"]).stat().st_size == shard["num_bytes"], split


class CrashingTunneller(FakeTunneller):
    """Dies in 'native code' (SIGSEGV) on one video, as a decoder or MediaPipe crash would."""

    def process_video(self, path, start_frame=0, end_frame=None):
        if str(path).endswith("00002.mp4"):
            os.kill(os.getpid(), signal.SIGSEGV)
        return super().process_video(path, start_frame, end_frame)


class AlwaysCrashingTunneller(FakeTunneller):
    """Every worker dies on its first video, as a broken installation would make them."""

    def process_video(self, path, start_frame=0, end_frame=None):
        os.kill(os.getpid(), signal.SIGSEGV)


def _within(seconds, fn, *args, **kwargs):
    """fn's result, or a test failure if it has not returned after ``seconds`` (a hang)."""
    import threading

    box = {}
    thread = threading.Thread(target=lambda: box.update(result=fn(*args, **kwargs)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no result after {seconds} s"
    return box["result"]


def test_a_worker_crash_costs_only_its_video(dataset, tmp_path):
    out = tmp_path / "records"
    args = _cli(dataset, out, "--workers", "2")
    # 5 of 7 failed (4 bad videos + the crash), more than the 60% allowed: exit 1, rest written
    assert _within(300, build_records.main, args, tunneller_factory=CrashingTunneller) == 1
    failures = {f["video_id"]: f for f in map(json.loads, open(out / "failures.jsonl"))}
    assert failures["00002"]["reason"] == "crashed"
    assert (
        "the worker process killed by SIGSEGV while processing this video"
        in (failures["00002"]["detail"])
    )
    assert {k: f["reason"] for k, f in failures.items() if k != "00002"} == BAD
    info = records.load_dataset_info(out)
    assert info["splits"]["train"]["num_records"] == 1
    assert info["splits"]["test"]["num_records"] == 1  # the other videos went on
    # not cached: the next run processes it again
    assert _within(300, build_records.main, args, tunneller_factory=FakeTunneller) == 0
    assert records.load_dataset_info(out)["splits"]["train"]["num_records"] == 2


class DecodingTunneller(FakeTunneller):
    """Decodes with the real decoder (signnet_jax.hht.video) before its stand-in tunnelling."""

    def process_video(self, path, start_frame=0, end_frame=None):
        from signnet_jax.hht.video import decode_video

        frames, fps, _ = decode_video(path, start_frame, end_frame)
        n = len(frames)
        small = np.stack([cv2.resize(f, (32, 32)) for f in frames])
        return _Result(small, np.zeros((n, 3, 4), np.float32), np.zeros((n, 3), np.int8), fps)


def test_a_truncated_download_is_a_failure_not_a_short_record(sign_sample, tmp_path):
    from tests.hht.test_video import faststart_copy

    whole = faststart_copy(sign_sample, tmp_path / "whole.mp4")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    work = tmp_path / "work"
    work.mkdir()
    entry = manifests.Entry("train", "cut", "cut.mp4", 0, "hello")
    task = build_records.Task(0, entry, str(cut), "k")
    out = build_records.process(task, DecodingTunneller, str(work), 90)
    assert not out.ok and out.reason == "truncated"
    assert "only" in out.detail and "of the 76 frames its header lists" in out.detail
    assert json.loads((work / "k.fail").read_text())["reason"] == "truncated"  # cached
    task = build_records.Task(1, entry, str(whole), "w")
    assert build_records.process(task, DecodingTunneller, str(work), 90).num_frames == 76


def test_workers_that_all_die_stop_the_build(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build_records, "MAX_DEATHS_IN_A_ROW", 3)
    args = _cli(dataset, tmp_path / "records", "--workers", "2")
    assert _within(300, build_records.main, args, tunneller_factory=AlwaysCrashingTunneller) == 2
    err = capsys.readouterr().err
    assert "error: 3 worker processes in a row died without making a record" in err
    assert "killed by SIGSEGV" in err and "--workers 0" in err


def test_csv_and_asl_citizen_datasets(dataset, tmp_path):
    videos = dataset / "videos"
    (tmp_path / "classes.txt").write_text("apple\nbook\n")
    (tmp_path / "train.csv").write_text("00001.mp4 1\n00002.mp4 0\n")
    (tmp_path / "test.csv").write_text("00004.mp4 0\n")
    out = tmp_path / "csv"
    args = ["--dataset", "csv", "--videos", str(videos), "--output", str(out)]
    args += ["--split-file", str(tmp_path / "train.csv"), str(tmp_path / "test.csv")]
    args += ["--class-list", str(tmp_path / "classes.txt"), "--max-failure-fraction", "0.5"]
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 0
    info = records.load_dataset_info(out)
    assert info["classes"] == ["apple", "book"]
    assert {k: v["num_records"] for k, v in info["splits"].items()} == {"train": 2, "test": 0}
    src = records.RecordSource(out, "train")
    assert (src[0]["video_id"], src[0]["gloss"], src[0]["label"].tolist()) == (
        [b"00001.mp4"],
        [b"book"],
        [1],
    )
    # whole clip: all 76 frames
    assert src[0]["num_frames"][0] == 76

    header = "Participant ID,Video file,Gloss,ASL-LEX Code\n"
    (tmp_path / "asl" / "splits").mkdir(parents=True)
    (tmp_path / "asl" / "splits" / "train.csv").write_text(
        header + "P1,00001.mp4,ZEBRA,A\nP2,00002.mp4,APPLE,B\n"
    )
    (tmp_path / "asl" / "splits" / "val.csv").write_text(header + "P3,00003.mp4,ZEBRA,A\n")
    out = tmp_path / "asl_records"
    args = ["--dataset", "asl_citizen", "--videos", str(videos), "--output", str(out)]
    args += [
        "--split-file",
        *(str(tmp_path / "asl" / "splits" / f) for f in ("train.csv", "val.csv")),
    ]
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 0
    info = records.load_dataset_info(out)
    assert info["classes"] == ["APPLE", "ZEBRA"] and info["num_failures"] == 0
    assert records.RecordSource(out, "val")[0]["label"].tolist() == [1]


def test_bad_inputs_exit_2_with_message(dataset, tmp_path, capsys):
    missing = _cli(dataset, tmp_path / "o")
    missing[missing.index("--split-file") + 1] = str(tmp_path / "nope.json")
    assert build_records.main(missing, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == f"error: split file {tmp_path / 'nope.json'} not found\n"
    # the folder the split files are in, a file that is not text, a class list that is a folder
    missing[missing.index("--split-file") + 1] = str(dataset)
    assert build_records.main(missing, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: split file {dataset} is a folder; give one of the files in it, e.g. "
        f"{dataset / 'WLASL_v0.3.json'}\n"
    )
    (tmp_path / "split.json").write_bytes(b"\x1f\x8b\x08\x00gzip")
    missing[missing.index("--split-file") + 1] = str(tmp_path / "split.json")
    assert build_records.main(missing, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: split file {tmp_path / 'split.json'}: not UTF-8 text (invalid start byte at "
        "byte 1); save it as UTF-8\n"
    )
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "classes.txt").write_text("a\n")
    (tmp_path / "lists" / "glosses.txt").write_text("a\n")
    listed = _cli(dataset, tmp_path / "o", "--class-list", str(tmp_path / "lists"))
    listed[listed.index("--split-file") + 1] = str(tmp_path / "nslt_2.json")
    (tmp_path / "nslt_2.json").write_text('{"00001": {"subset": "train", "action": [0, 1, 2]}}')
    assert build_records.main(listed, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: class list {tmp_path / 'lists'} is a folder; give one of the files in it, e.g. "
        f"{tmp_path / 'lists' / 'classes.txt'} (2 such files there)\n"
    )
    with pytest.raises(SystemExit) as e:
        build_records.main(_cli(dataset, tmp_path / "o", "--jpeg-quality", "0"))
    assert e.value.code == 2
    assert "--jpeg-quality must be in 1..100" in capsys.readouterr().err
    bad_hht = _cli(dataset, tmp_path / "o", "--size", "15")
    assert build_records.main(bad_hht, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == "error: --size must be an even integer >= 16, got 15\n"
    with pytest.raises(SystemExit) as e:
        build_records.main(_cli(dataset, tmp_path / "o", "--videos", str(tmp_path / "none")))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m data_prep.build_records: error: --videos {tmp_path / 'none'}: not a folder"
    )
    # the real Tunneller's model folder is checked once, before any video
    assert build_records.main(_cli(dataset, tmp_path / "o", "--models", str(tmp_path))) == 2
    assert f"--models {tmp_path} lacks" in capsys.readouterr().err
    nowhere = tmp_path / "nowhere"
    assert build_records.main(_cli(dataset, tmp_path / "o", "--models", str(nowhere))) == 2
    assert f"error: --models {nowhere}: no such folder; give the folder that holds" in (
        capsys.readouterr().err
    )
    empty = tmp_path / "no_videos"
    empty.mkdir()
    assert build_records.main(_cli(dataset, tmp_path / "o", "--videos", str(empty))) == 2
    assert f"--videos {empty} holds none of the 7 videos the split files name" in (
        capsys.readouterr().err
    )
    conf = _cli(dataset, tmp_path / "o", "--min-confidence", "3")
    assert build_records.main(conf, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == "error: --min-confidence must be in [0, 1], got 3.0\n"
    assert not (tmp_path / "o").exists()
    # an output that is a file, or a folder of someone else's files, is refused untouched
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.csv").write_text("keep")
    for out, message in [("file", "is a file"), ("mine", "already holds other files")]:
        with pytest.raises(SystemExit) as e:
            build_records.main(_cli(dataset, tmp_path / out), tunneller_factory=FakeTunneller)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.csv"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-failure-fraction", "-0.1", "--max-failure-fraction must be in [0, 1]"),
        ("--max-failure-fraction", "1.5", "--max-failure-fraction must be in [0, 1]"),
        ("--shard-size", "0", "argument --shard-size: shard size must be positive, got '0'"),
    ],
)
def test_option_values_out_of_range_exit_2(dataset, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        build_records.main(
            _cli(dataset, tmp_path / "o", flag, value), tunneller_factory=FakeTunneller
        )
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m data_prep.build_records: error: {message}"
    )
    assert list(tmp_path.iterdir()) == []


def test_remote_output_is_refused_not_written_to_a_local_gs_folder(
    dataset, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        build_records.main(_cli(dataset, "gs://bucket/records"), tunneller_factory=FakeTunneller)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--output gs://bucket/records: gs:// paths are not supported; write a local folder, " \
        "then copy it with `gsutil -m cp -r LOCAL_DIR gs://bucket/records`" in err  # fmt: skip
    args = _cli(dataset, tmp_path / "records")
    args[args.index("--videos") + 1] = "gs://bucket/videos"
    with pytest.raises(SystemExit) as e:
        build_records.main(args, tunneller_factory=FakeTunneller)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--videos gs://bucket/videos: gs:// paths are not supported; copy it to a local " \
        "folder with `gsutil -m cp -r gs://bucket/videos LOCAL_DIR`" in err  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_hht_options_reach_the_settings(dataset, tmp_path):
    out = tmp_path / "records"
    args = _cli(dataset, out, "--size", "128", "--quadrants", "1,1,0,0", "--no-gate-hands")
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 0
    hht = records.load_dataset_info(out)["hht_settings"]
    assert (
        hht
        == HHTSettings(size=128, quadrants=(True, True, False, False), gate_hands=False).to_dict()
    )


def test_parse_size():
    assert build_records.parse_size("256MB") == 256 * 2**20
    assert build_records.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert build_records.parse_size("4096") == 4096
    with pytest.raises(Exception, match="not a size"):
        build_records.parse_size("lots")
    for text in ("0", "0.5", "0MB"):
        with pytest.raises(argparse.ArgumentTypeError) as e:
            build_records.parse_size(text)
        assert str(e.value) == f"shard size must be positive, got {text!r}"


def test_shard_assignment():
    assert build_records._assign_shards([10, 10, 10, 10], 30) == [[0], [1], [2], [3]]
    assert build_records._assign_shards([10, 10, 10, 10], 60) == [[0, 1], [2, 3]]
    assert build_records._assign_shards([100, 1], 10) == [[0], [1]]
    assert build_records._assign_shards([], 10) == []


def test_real_nslt_100_through_the_cli(shared_dir, sign_sample, tmp_path, capsys):
    """The real nslt_100.json with two of its 2,038 videos present: 2 records, 2,036 failures."""
    wlasl = shared_dir / "datasets" / "wlasl"
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    for name in ("nslt_100.json", "wlasl_class_list.txt"):
        shutil.copyfile(wlasl / name, split_dir / name)  # the class list is found beside it
    videos = tmp_path / "videos"
    videos.mkdir()
    for vid in ("05237", "69422"):  # train 'basketball' (77), val 'orange' (27)
        shutil.copyfile(sign_sample, videos / f"{vid}.mp4")
    out = tmp_path / "records"
    args = ["--dataset", "wlasl", "--split-file", str(split_dir / "nslt_100.json")]
    args += ["--videos", str(videos), "--output", str(out)]
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 1
    assert "99.9% of the videos failed" in capsys.readouterr().err
    info = records.load_dataset_info(out)
    assert info["num_classes"] == 100 and info["classes"][:2] == ["book", "drink"]
    assert {k: v["num_entries"] for k, v in info["splits"].items()} == {
        "train": 1442,
        "val": 338,
        "test": 258,
    }
    assert info["num_records"] == 2 and info["num_failures"] == 2036
    lines = (out / "failures.jsonl").read_text().splitlines()
    assert len(lines) == 2036 and all('"reason": "missing_file"' in x for x in lines)
    train = records.RecordSource(out, "train")[0]
    assert (train["video_id"], train["label"].tolist()) == ([b"05237"], [77])
    val = records.RecordSource(out, "val")[0]
    assert (val["video_id"], val["label"].tolist()) == ([b"69422"], [27])


def test_cache_keys_of_whole_file_entries_are_those_of_earlier_builds(tmp_path):
    # Entries had a span_fps field until WLASL_v0.3 spans were taken as start_kit takes them;
    # the caches of nslt and CSV builds made before must still be found.
    import hashlib

    entry = manifests.Entry("train", "00001", "00001.mp4", 0, "hello")
    earlier = {
        "entry": {
            "split": "train", "video_id": "00001", "path": "00001.mp4", "label": 0,
            "gloss": "hello", "frame_start": None, "frame_end": None, "span_fps": None,
        },
        "video": None,
        "hht": {"size": 224},
        "jpeg_quality": 90,
        "format": build_records.FORMAT_VERSION,
        "version": build_records.tool_version(),
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()[:32]
    assert build_records.cache_key(entry, str(tmp_path / "none.mp4"), {"size": 224}, 90) == key


def test_an_empty_split_file_stops_the_build_before_anything_is_written(dataset, tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("apple\nbook\n")
    (tmp_path / "train.csv").write_text("00001.mp4 1\n00002.mp4 0\n")
    (tmp_path / "val.csv").write_text("00003.mp4 0\n")
    (tmp_path / "test.csv").write_bytes(b"")
    out = tmp_path / "records"
    args = ["--dataset", "csv", "--videos", str(dataset / "videos"), "--output", str(out)]
    args += ["--split-file", *(str(tmp_path / f"{s}.csv") for s in ("train", "val", "test"))]
    args += ["--class-list", str(tmp_path / "classes.txt")]
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: split file {tmp_path / 'test.csv'} is empty; every --split-file must list at "
        "least one video: give the right file, or leave this one out\n"
    )
    assert not out.exists()


def test_quadrants_take_both_forms_like_data_prep_hht(dataset, tmp_path, capsys):
    from data_prep import hht

    for i, text in enumerate(("1011", "1,0,1,1")):
        out = tmp_path / f"records{i}"
        args = _cli(dataset, out, "--quadrants", text)
        assert build_records.main(args, tunneller_factory=FakeTunneller) == 0
        assert records.load_dataset_info(out)["hht_settings"]["quadrants"] == [1, 0, 1, 1]
    capsys.readouterr()
    # a bad value: the same message from both command lines (one parser)
    assert build_records.main(_cli(dataset, tmp_path / "o", "--quadrants", "11x1")) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --quadrants takes four 0/1 flags for frame, head, right hand, left hand, like "
        "1011 or 1,0,1,1; got '11x1'\n"
    )
    argv = ["--video", "v.mp4", "--output", str(tmp_path / "o.mp4"), "--quadrants", "11x1"]
    assert hht.main(argv) == 2
    assert capsys.readouterr().err == err
    assert not (tmp_path / "o").exists()


def test_negative_workers_are_refused(dataset, tmp_path, capsys):
    for value, message in [
        ("-1", "argument --workers: must be >= 0 (0 runs in this process), got -1"),
        ("two", "argument --workers: not a whole number: 'two'"),
    ]:
        with pytest.raises(SystemExit) as e:
            build_records.main(
                _cli(dataset, tmp_path / "o", "--workers", value), tunneller_factory=FakeTunneller
            )
        assert e.value.code == 2
        assert capsys.readouterr().err.endswith(f"error: {message}\n")
    assert not (tmp_path / "o").exists()


def test_all_quadrants_off_is_refused(dataset, tmp_path, capsys):
    args = _cli(dataset, tmp_path / "o", "--quadrants", "0,0,0,0")
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        "error: --quadrants are all off, which makes every frame black; switch on at least one "
        "of frame, head, right_hand, left_hand\n"
    )
    assert not (tmp_path / "o").exists()


def test_help_states_every_options_default():
    import argparse

    parser = build_records.make_parser()
    options = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(options) == 12 + len(dataclasses.fields(HHTSettings))
    for action in options:
        name = action.option_strings[0]
        if action.required:
            assert action.help and action.help.endswith("(required)"), name
        else:
            assert action.help and re.search(r"\bdefault\b", action.help), (name, action.help)
    text = " ".join(parser.format_help().split())
    assert "--dataset {wlasl,csv,asl_citizen} format of the split files: wlasl" in text
    # every H&HT setting says what it does (they said only "default 0.6"), from HHTSettings'
    # docstring: the first sentence of each entry
    assert "--faithful, --no-faithful reproduce the original preprocessing: landmark" in text
    assert "whole frame and crops stretched to their cells (default off)" in text
    assert (
        "--gate-hands, --no-gate-hands run the hand landmarker only in frames where the pose "
        "sees a wrist in the frame, since elsewhere it cannot find a hand we would use "
        "(default on)"
    ) in text
    assert "--size SIZE output frame side in pixels (square output, even) (default 256)" in text
    assert (
        "--hand-scale HAND_SCALE side of a pose-fallback hand box as a fraction of the shoulder "
        "width (default 0.6)"
    ) in text
    assert (
        "--detect-size DETECT_SIZE longest side of a downscaled copy for the detectors (0 = the "
        "frame itself); crops always come from the full"  # argparse wraps at the hyphen
    ) in text
    assert "--layout {grid2x2,strip} 'grid2x2' (published:" in text
    assert "nslt_K.json files hold their K already) (default: all of them)" in text
    assert "e.g. 1011 or 1,0,1,1 (default 1111)" in text
    assert f"(default: every core, {os.cpu_count()} here; 0 runs in-process" in text
    assert (
        "--landmark-cache DIR keep MediaPipe's landmarks in DIR, shared by builds: a build that "
        "changes only the composition (quadrants, layout, size, margins, smoothing, JPEG "
        "quality...) reads them and skips MediaPipe, nearly all of H&HT's time; its records "
        "are the same bytes. --faithful, --detect-size, --min-confidence, --gate-hands and "
        "--hand-retry change the landmarks themselves (default: none)"
    ) in text


def test_the_last_progress_line_is_printed_once(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # every update draws, the last one too
    out = tmp_path / "records"
    for workers in ("0", "2"):
        shutil.rmtree(out, ignore_errors=True)
        args = _cli(dataset, out, "--workers", workers)
        assert build_records.main(args, tunneller_factory=FakeTunneller) == 0
        err = capsys.readouterr().err  # not a terminal: lines (the terminal's bar: below)
        assert err.count("H&HT: 6/6 videos (100%)") == 1, err  # the 7th video is missing
        assert err.count("H&HT: 5/6 videos (83%)") == 1, err
        assert "(6 processed, 0 cached, 1 not found)\n" in err
    # everything cached: no bar of zero videos, the summary says it
    assert build_records.main(_cli(dataset, out), tunneller_factory=FakeTunneller) == 0
    err = capsys.readouterr().err
    assert "H&HT:" not in err and "6 of 7 videos already done" in err
    assert "(0 processed, 6 cached, 1 not found)\n" in err
    assert "other settings" not in err
    # other settings tunnel every video again: said, where it used to start over without a word
    other = ("--jpeg-quality", "80", "--quadrants", "1011", "--no-gate-hands")
    assert build_records.main(_cli(dataset, out, *other), tunneller_factory=FakeTunneller) == 0
    err = capsys.readouterr().err
    assert (
        f"{out} was built with other settings (quadrants 1111 -> 1011, gate_hands True -> "
        "False, jpeg_quality 90 -> 80): its videos are tunnelled again (the results of the "
        f"earlier settings stay cached in {out / 'work'})\n"
    ) in err
    assert "(6 processed, 0 cached, 1 not found)\n" in err
    # and going back to the first settings costs nothing
    assert build_records.main(_cli(dataset, out), tunneller_factory=FakeTunneller) == 0
    err = capsys.readouterr().err
    assert "other settings" not in err  # nothing is tunnelled again
    # an unfinished build (no dataset_info.json yet) is compared by the settings it started with
    (out / "dataset_info.json").unlink()
    assert (
        build_records.main(
            _cli(dataset, out, "--jpeg-quality", "70"), tunneller_factory=FakeTunneller
        )
        == 0
    )
    err = capsys.readouterr().err
    # only a setting the landmarks do not depend on changed: the landmark cache is named
    assert (
        f"{out} was built with other settings (jpeg_quality 90 -> 70): its videos are tunnelled "
        f"again (the results of the earlier settings stay cached in {out / 'work'}); "
        "MediaPipe's landmarks do not depend on these settings: give every build the same "
        "--landmark-cache DIR, and a build that changes only such settings skips MediaPipe\n"
    ) in err
    assert "(6 processed, 0 cached, 1 not found)\n" in err


def _everything(folder):
    """Every file under folder (the work cache and hidden files included), path -> bytes."""
    root = pathlib.Path(folder)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


FOLDER_FIX = "give another --output, or delete {} to build this dataset there"


def test_an_output_holding_another_dataset_is_refused_untouched(dataset, tmp_path, capsys):
    out = tmp_path / "records"
    assert build_records.main(_cli(dataset, out), tunneller_factory=FakeTunneller) == 0
    capsys.readouterr()
    before = _everything(out)
    fix = FOLDER_FIX.format(out)
    there = "wlasl from WLASL_v0.3.json, 2 classes"
    # another dataset format, split files and classes
    (tmp_path / "classes.txt").write_text("apple\nbook\ncat\n")
    (tmp_path / "train.csv").write_text("00001.mp4 1\n")
    (tmp_path / "test.csv").write_text("00002.mp4 0\n")
    csv = ["--dataset", "csv", "--videos", str(dataset / "videos"), "--output", str(out)]
    csv += ["--split-file", str(tmp_path / "train.csv"), str(tmp_path / "test.csv")]
    csv += ["--class-list", str(tmp_path / "classes.txt")]
    assert build_records.main(csv, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: --output {out} holds another dataset ({there}; this build: csv from "
        f"test.csv, train.csv, 3 classes); {fix}\n"
    )
    # the same format and split file name, other classes (here: the same glosses in
    # another order, which gives every video another label)
    other = tmp_path / "other" / "WLASL_v0.3.json"
    other.parent.mkdir()
    other.write_text(json.dumps(_manifest_json()[::-1]))
    args = _cli(dataset, out)
    args[args.index("--split-file") + 1] = str(other)
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: --output {out} holds another dataset ({there}; this build: {there}, but "
        f"label 0 is 'hello' there and 'world' here); {fix}\n"
    )
    assert _everything(out) == before
    # a rebuild interrupted after it removed dataset_info.json: the folder still says what
    # it is being built as
    (out / "dataset_info.json").unlink()
    before = _everything(out)
    assert build_records.main(csv, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: --output {out} holds another dataset ({there}; this build: csv from "
        f"test.csv, train.csv, 3 classes); {fix}\n"
    )
    assert _everything(out) == before
    # the same dataset built again with other settings is a rebuild, not another dataset
    assert (
        build_records.main(_cli(dataset, out, "--size", "128"), tunneller_factory=FakeTunneller)
        == 0
    )


def test_another_builds_probe_in_a_new_output_is_not_a_foreign_file(dataset, tmp_path):
    """Two builds started together into a new folder: the second saw the first's probe."""
    out = tmp_path / "records"
    out.mkdir()
    (out / f"{PROBE_PREFIX}x1y2z3").write_bytes(b"")
    assert build_records.main(_cli(dataset, out), tunneller_factory=FakeTunneller) == 0
    assert records.load_dataset_info(out)["num_records"] == 3


def test_an_output_holding_the_smoke_dataset_is_refused_untouched(dataset, tmp_path, capsys):
    from data_prep import synthetic

    smoke = tmp_path / "smoke"
    small = dict(classes=2, train_per_class=1, val_per_class=1, test_per_class=1, frames=2)
    synthetic.ensure_smoke_dataset(smoke, size=16, **small)
    before = _everything(smoke)
    assert ".synthetic.lock" in before
    assert build_records.main(_cli(dataset, smoke), tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: --output {smoke} holds a synthetic smoke dataset (made by data_prep.synthetic: "
        f".synthetic.lock); {FOLDER_FIX.format(smoke)}\n"
    )
    # its description alone (the lock file gone) says so too
    (smoke / ".synthetic.lock").unlink()
    del before[".synthetic.lock"]
    assert build_records.main(_cli(dataset, smoke), tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: --output {smoke} holds records written by data_prep.synthetic (smoke, "
        f"2 classes); {FOLDER_FIX.format(smoke)}\n"
    )
    assert _everything(smoke) == before


def test_an_output_another_build_is_writing_is_refused_untouched(dataset, tmp_path, capsys):
    import fcntl

    out = tmp_path / "records"
    args = _cli(dataset, out, "--workers", "0")
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 0
    capsys.readouterr()
    before = _everything(out)
    # the other build holds the lock as build() takes it, on its own open file
    with open(out / build_records.WORK / ".lock", "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert build_records.main(args, tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == f"error: {out}: another build_records is writing here\n"
    assert _everything(out) == before
    # once it is done the same command goes on
    assert build_records.main(args, tunneller_factory=FakeTunneller) == 0


def test_an_output_with_a_corrupt_dataset_info_is_refused_untouched(dataset, tmp_path, capsys):
    out = tmp_path / "records"
    out.mkdir()
    (out / "dataset_info.json").write_text('{"classes": [')  # cut short
    assert build_records.main(_cli(dataset, out), tunneller_factory=FakeTunneller) == 2
    assert capsys.readouterr().err == (
        f"error: --output {out}: cannot read dataset_info.json (Expecting value: line 1 column 14 "
        f"(char 13)); {FOLDER_FIX.format(out)}\n"
    )
    assert _everything(out) == {"dataset_info.json": b'{"classes": ['}


def test_a_full_disk_stops_the_build_at_once_and_a_rerun_goes_on(
    dataset, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "records"
    work = out / build_records.WORK
    tunnelled = []

    class Counting(FakeTunneller):
        def process_video(self, path, *args):
            tunnelled.append(path)
            return super().process_video(path, *args)

    def no_space(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    args = _cli(dataset, out, "--workers", "0")
    # the cache write of the first video fails: the build stops there, not after tunnelling
    # every video only to fail keeping each (it went on to the end, with a traceback)
    write = build_records.atomic_write

    def no_space_for_videos(path, *args, **kwargs):
        (no_space if str(path).endswith(".rec") else write)(path, *args, **kwargs)

    monkeypatch.setattr(build_records, "atomic_write", no_space_for_videos)
    assert build_records.main(args, tunneller_factory=Counting) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"error: cannot write {re.escape(str(work))}/\w+\.rec: No space left on device; free "
        rf"space there \(or build into another --output\), then run the same command again: the "
        rf"videos finished so far are cached in {re.escape(str(work))}\n",
        err.splitlines(keepends=True)[-1],
    ), err
    assert len(tunnelled) == 1 and _final_names(out) == []
    monkeypatch.undo()
    # the shards cannot be written: named, with the way on; nothing under a final name
    tunnelled.clear()
    monkeypatch.setattr(records.TFRecordWriter, "write", no_space)
    assert build_records.main(args, tunneller_factory=Counting) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: cannot write the records in {out}: ")
    assert err.splitlines()[-1].endswith(
        ": No space left on device; free space there (or build into another --output), then run "
        f"the same command again: the videos finished so far are cached in {work}"
    )
    assert len(tunnelled) == 6 and _final_names(out) == []  # the 7 entries but the missing one
    monkeypatch.undo()
    tunnelled.clear()
    assert build_records.main(args, tunneller_factory=Counting) == 0
    assert tunnelled == []  # every video came from the cache
    info = records.load_dataset_info(out)  # the three good videos: 00001, 00002 and 00003
    assert info["num_records"] == 3
    assert {k: v["num_records"] for k, v in info["splits"].items()} == {
        "train": 2, "val": 0, "test": 1
    }  # fmt: skip


def test_an_output_that_cannot_be_made_is_refused_first(dataset, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "records"
    with pytest.raises(SystemExit) as e:
        build_records.main(_cli(dataset, out), tunneller_factory=FakeTunneller)
    assert e.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(
            f"error: cannot write --output {out}: {tmp_path / 'file'} is a file, not a folder; "
            "give a folder you can write to"
        )
    )


# --------------------------------------------------------------------------------------------
# --landmark-cache
# --------------------------------------------------------------------------------------------


def _landmark_files(folder):
    return sorted(pathlib.Path(folder).glob(f"*/*{build_records.LANDMARKS_SUFFIX}"))


def _no_mediapipe(monkeypatch):
    """MediaPipe fails if asked: a build reading every landmark from the cache passes."""

    def refused(*args, **kwargs):
        raise AssertionError("MediaPipe ran")

    monkeypatch.setattr(Tunneller, "__init__", refused)


def test_landmark_cache_serves_builds_of_other_compositions(
    built, dataset, tmp_path, capsys, monkeypatch
):
    cache = tmp_path / "landmarks"
    first = tmp_path / "first"
    # a cold cache: the records are those of a build without it (the reference, 2 workers)
    assert build_records.main(_cli(dataset, first, "--landmark-cache", str(cache))) == 0
    assert _tree_bytes(first) == _tree_bytes(built)
    files = _landmark_files(cache)
    assert len(files) == len(GOOD)  # the failed videos leave nothing there
    err = capsys.readouterr().err
    assert f"  landmark cache {cache}: 0 videos read from it (MediaPipe skipped), 3 " in err

    # the paper's ablation, other sizes and JPEG quality: the same bytes as without the cache,
    # MediaPipe never asked
    ablation = ("--quadrants", "1011", "--size", "128", "--smoothing", "0", "--jpeg-quality", "70")
    plain = tmp_path / "plain"
    assert build_records.main(_cli(dataset, plain, "--workers", "0", *ablation)) == 0
    with monkeypatch.context() as m:
        _no_mediapipe(m)
        with pytest.raises(AssertionError, match="MediaPipe ran"):  # the guard works
            Tunneller()
        cached = tmp_path / "cached"
        args = _cli(dataset, cached, "--workers", "0", "--landmark-cache", str(cache), *ablation)
        assert build_records.main(args) == 0
    assert _tree_bytes(cached) == _tree_bytes(plain) != _tree_bytes(built)
    assert _landmark_files(cache) == files
    err = capsys.readouterr().err
    assert f"  landmark cache {cache}: 3 videos read from it (MediaPipe skipped), 0 " in err

    # a damaged file is detected again (and replaced); the others are still read
    files[0].write_bytes(files[0].read_bytes()[:100])
    again = tmp_path / "again"
    args = _cli(dataset, again, "--workers", "0", "--landmark-cache", str(cache), *ablation)
    assert build_records.main(args) == 0
    assert _tree_bytes(again) == _tree_bytes(plain)
    # the spans' frames: 00002 [11, 40], 00003 [41, 76], 00001 the whole clip
    assert sorted(len(Landmarks.from_bytes(f.read_bytes())) for f in files) == [30, 36, 76]
    assert "2 videos read from it (MediaPipe skipped), 1 detected and kept there" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "error, message",
    [
        (
            errno.ENOSPC,
            "error: cannot write {file}: No space left on device; free space there (or leave out "
            "--landmark-cache), then run the same command again: the videos finished so far are "
            "cached in {work}",
        ),
        (
            errno.EROFS,
            "error: cannot keep the landmarks in {file}: Read-only file system; fix that or leave "
            "out --landmark-cache, then run the same command again: the videos finished so far "
            "are cached in {work}",
        ),
    ],
)
def test_landmarks_that_cannot_be_kept_stop_the_build_at_once(
    dataset, tmp_path, monkeypatch, capsys, error, message
):
    out, cache = tmp_path / "records", tmp_path / "landmarks"
    write = build_records.atomic_write
    refused = []

    def no_landmarks(path, *args, **kwargs):
        if str(path).endswith(build_records.LANDMARKS_SUFFIX):
            refused.append(str(path))
            raise OSError(error, os.strerror(error), str(path))
        write(path, *args, **kwargs)

    monkeypatch.setattr(build_records, "atomic_write", no_landmarks)
    args = _cli(dataset, out, "--workers", "0", "--landmark-cache", str(cache))
    assert build_records.main(args) == 2
    # stopped at the first video, not each video failed (or the build ran on without them)
    assert len(refused) == 1 and _final_names(out) == []
    work = out / build_records.WORK
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == message.format(file=refused[0], work=work)


def test_landmark_files_are_named_by_what_the_landmarks_depend_on(
    shared_dir, sign_sample, tmp_path
):
    models = str(shared_dir / "mediapipe_models")
    base = HHTSettings().to_dict()

    def path(settings=base, models=models, video=sign_sample, span=(0, None)):
        cache = build_records.LandmarkCache.create(tmp_path / "lm", settings, models)
        return cache.path(str(video), *span)

    first = path()
    assert first == path()  # the same inputs: the same file
    assert first.startswith(str(tmp_path / "lm") + os.sep) and first.endswith(".landmarks.npz")
    # every detection setting moves it, no other setting does
    changed = {
        "layout": "strip", "size": 128, "quadrants": [True, False, True, True],
        "faithful": True, "faithful_margin_px": 4, "head_margin": 0.2, "hand_margin": 0.2,
        "hand_scale": 0.5, "wrist_visibility": 0.4, "max_gap": 3, "max_hold": 2,
        "smoothing": 0.0, "detect_size": 512, "min_confidence": 0.6, "gate_hands": False,
        "hand_retry": 1,
    }  # fmt: skip
    assert set(changed) == set(base)
    moved = {k for k, v in changed.items() if path({**base, k: v}) != first}
    assert moved == set(DETECTION_FIELDS) == {
        "faithful", "detect_size", "min_confidence", "gate_hands", "hand_retry"
    }  # fmt: skip
    # the span, the video's contents (not its name) and the model files
    assert len({first, path(span=(0, 40)), path(span=(1, None))}) == 3
    copy = tmp_path / "renamed.mp4"
    copy.write_bytes(sign_sample.read_bytes())
    assert path(video=copy) == first
    copy.write_bytes(sign_sample.read_bytes() + b"\0")
    assert path(video=copy) != first
    other_models = tmp_path / "models"
    shutil.copytree(models, other_models)
    assert path(models=str(other_models)) == first
    face = other_models / "blaze_face_short_range.tflite"
    face.write_bytes(face.read_bytes() + b"\0")
    assert path(models=str(other_models)) != first
    # the code that decodes and detects, and the versions of what it runs on
    with pytest.MonkeyPatch.context() as m:
        m.setattr(build_records, "_DETECTION_CODE", ("signnet_jax.hht.tunnel",))
        assert path() != first
    for module in (av, cv2):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(module, "__version__", "0.0.1")
            assert path() != first
    with pytest.MonkeyPatch.context() as m:
        real = importlib.metadata.version
        m.setattr(importlib.metadata, "version", lambda n: "0.0.1" if n == "mediapipe" else real(n))
        assert path() != first
    assert path() == first


def test_a_landmark_cache_of_other_detection_settings_is_refused(shared_dir, dataset, tmp_path):
    models = str(shared_dir / "mediapipe_models")
    hht = HHTSettings().to_dict()
    cache = build_records.LandmarkCache.create(
        tmp_path / "lm", {**hht, "min_confidence": 0.6}, models
    )
    manifest = manifests.load_manifest("wlasl", [str(dataset / "WLASL_v0.3.json")])
    with pytest.raises(ValueError, match=r"made for the detection settings \{'faithful': "):
        build_records.build(
            manifest,
            dataset / "videos",
            tmp_path / "records",
            hht_settings=hht,
            tunneller_factory=build_records._HHTFactory(hht, models),
            landmark_cache=cache,
        )
    assert not (tmp_path / "records").exists()
    # the composition's settings do not matter to it
    ablation = {**hht, "quadrants": [True, False, True, True], "size": 128}
    assert build_records.LandmarkCache.create(tmp_path / "lm", ablation, models) == (
        build_records.LandmarkCache.create(tmp_path / "lm", hht, models)
    )


def test_detection_reads_only_the_detection_settings():
    """What DETECTION_FIELDS promises: the Tunneller's MediaPipe side reads no other setting
    (the boxes and the composition, which read the others, run from the landmarks)."""
    import inspect

    from signnet_jax.hht import tunnel

    source = inspect.getsource(tunnel.Tunneller._open) + inspect.getsource(tunnel.Tunneller.detect)
    read = set(re.findall(r"self\.settings\.(\w+)", source))
    assert read and read <= set(DETECTION_FIELDS), read - set(DETECTION_FIELDS)
    assert "settings" not in re.sub(r"self\.settings\.\w+", "", source)


def _exit_code(args):
    with pytest.raises(SystemExit) as e:
        build_records.main(args)
    return e.value.code


def test_a_landmark_cache_that_cannot_be_used_is_refused_first(dataset, tmp_path, capsys):
    out = tmp_path / "records"
    taken = tmp_path / "taken"
    taken.write_text("mine")
    assert _exit_code(_cli(dataset, out, "--landmark-cache", str(taken))) == 2
    assert (
        f"error: --landmark-cache {taken} is a file; give a folder for the landmarks (new, or "
        "one an earlier build kept them in)"
    ) in capsys.readouterr().err
    assert not out.exists() and taken.read_text() == "mine"
    assert _exit_code(_cli(dataset, out, "--landmark-cache", "")) == 2
    assert "error: --landmark-cache needs a folder, got ''" in capsys.readouterr().err
    assert _exit_code(_cli(dataset, out, "--landmark-cache", "gs://bucket/landmarks")) == 2
    assert "--landmark-cache gs://bucket/landmarks: gs:// paths are not supported" in (
        capsys.readouterr().err
    )
    assert _exit_code(_cli(dataset, out, "--landmark-cache", str(taken / "lm"))) == 2
    assert f"cannot write --landmark-cache {taken / 'lm'}: {taken} is a file, not a folder" in (
        capsys.readouterr().err
    )
    assert not out.exists()
