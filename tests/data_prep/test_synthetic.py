"""Tests for data_prep.synthetic: the smoke dataset's records, boxes, balance, determinism,
reuse and what the H&HT frames show."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest

from data_prep import build_records, synthetic
from signnet_jax.data import pipeline, records
from signnet_jax.files import PROBE_PREFIX
from signnet_jax.hht import HHTSettings
from tests.helpers import interrupt_after

REPO = pathlib.Path(__file__).resolve().parents[2]

SMALL = dict(
    classes=4, train_per_class=3, val_per_class=2, test_per_class=1, frames=8, size=32, seed=3
)


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    """The default smoke dataset, as the trainer builds it."""
    return synthetic.ensure_smoke_dataset(tmp_path_factory.mktemp("smoke") / "records")


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return synthetic.ensure_smoke_dataset(tmp_path_factory.mktemp("small") / "records", **SMALL)


def _decode(jpeg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR_RGB)


# The published grid2x2 layout, (row, column) of each cell in the 2x2 grid.
GRID = {"frame": (0, 0), "right_hand": (0, 1), "head": (1, 0), "left_hand": (1, 1)}


def share(mask, cell, rows=(0, 1), cols=(0, 1)):
    """Share of True in a window (fractions of the cell) of one grid cell over all frames."""
    h = mask.shape[1] // 2
    r, c = GRID[cell]
    window = mask[:, r * h : (r + 1) * h, c * h : (c + 1) * h]
    r0, r1 = (int(v * h) for v in rows)
    c0, c1 = (int(v * h) for v in cols)
    return window[:, r0:r1, c0:c1].mean()


def _files(folder) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def test_default_counts_classes_and_balance(default_dir):
    info = records.load_dataset_info(default_dir)
    assert info["classes"][:3] == ["smoke_circle_cw", "smoke_circle_ccw", "smoke_line_h"]
    assert len(info["classes"]) == len(set(info["classes"])) == info["num_classes"] == 10
    assert info["synthetic"]["options"] == synthetic.SmokeOptions().to_dict()
    assert info["tool"]["name"] == "data_prep.synthetic"
    assert info["hht_settings"] == HHTSettings(size=64).to_dict()
    assert info["features"] == build_records.RECORD_FEATURES
    expected = {"train": 24, "val": 6, "test": 6}
    for split, per_class in expected.items():
        source = records.RecordSource(default_dir, split)
        assert len(source) == info["splits"][split]["num_records"] == 10 * per_class
        labels = [int(source[i]["label"][0]) for i in range(len(source))]
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        # Class-interleaved, so any prefix is balanced too.
        assert labels[:10] == list(range(10))
        ids = [source[i]["video_id"][0] for i in range(len(source))]
        assert len(set(ids)) == len(ids)
    assert [s["file"] for s in info["splits"]["train"]["shards"]] == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    with open(os.path.join(default_dir, build_records.FAILURES)) as f:
        assert f.read() == ""


def test_records_decode_like_build_records_output(small_dir):
    source = records.RecordSource(small_dir, "val")
    classes = source.classes
    for i in range(len(source)):
        e = source[i]
        label = int(e["label"][0])
        assert e["gloss"][0].decode() == classes[label]
        assert int(e["num_frames"][0]) == len(e["frames"]) == SMALL["frames"]
        assert int(e["height"][0]) == int(e["width"][0]) == SMALL["size"]
        assert e["fps"][0] == pytest.approx(25.0)
        frames = np.stack([_decode(f) for f in e["frames"]])
        assert frames.shape == (SMALL["frames"], 32, 32, 3)
        assert e["boxes"].shape == (SMALL["frames"] * 12,)
        assert e["box_source"].tolist() == [1] * (SMALL["frames"] * 3)


def test_record_boxes_are_the_rendered_landmarks_boxes(small_dir):
    source = records.RecordSource(small_dir, "train")
    options = synthetic.SmokeOptions(**SMALL)
    settings = HHTSettings(size=SMALL["size"])
    s = synthetic.SOURCE_SIZE
    for i in range(len(source)):
        e = source[i]
        label, n = int(e["label"][0]), i // SMALL["classes"]
        _, rendered, _ = synthetic.make_video(options, "train", label, n)
        boxes = e["boxes"].reshape(-1, 3, 4)
        np.testing.assert_array_equal(boxes, rendered.boxes)
        px = boxes.astype(np.float64) * s
        side = px[..., 2:] - px[..., :2]
        # Square, whole pixels, margin 0.15 of the extent on each side (side rounded up).
        np.testing.assert_array_equal(side[..., 0], side[..., 1])
        np.testing.assert_allclose(px, np.round(px), atol=1e-4)
        extent = 2 * rendered.half_sizes.max(axis=-1)
        margins = np.array([settings.head_margin, settings.hand_margin, settings.hand_margin])
        assert np.all(side[..., 0] >= extent * (1 + 2 * margins) - 1e-4)
        assert np.all(side[..., 0] < extent * (1 + 2 * margins) + 1)
        # Centred on the landmark (within the half pixel of snapping) and inside the frame.
        centre = (px[..., :2] + px[..., 2:]) / 2
        assert np.abs(centre - rendered.centres).max() <= 1.0
        assert px.min() >= 0 and px.max() <= s
        # The drawn hand lies inside its box: hand-coloured pixels around each hand centre
        # (out to 1.5 radii, so when the hands are apart only this hand's pixels count).
        colour = np.array(rendered.colours["hands"], float)
        yy, xx = np.mgrid[0:s, 0:s]
        for t in range(SMALL["frames"]):
            is_hand = np.linalg.norm(rendered.frames[t].astype(float) - colour, axis=-1) < 40
            r = rendered.half_sizes[t, 1, 0]
            if np.linalg.norm(rendered.centres[t, 1] - rendered.centres[t, 2]) < 3.5 * r:
                continue
            for part in (1, 2):
                cx, cy = rendered.centres[t, part]
                ys, xs = np.nonzero(is_hand & ((xx - cx) ** 2 + (yy - cy) ** 2 < (1.5 * r) ** 2))
                assert len(xs) > 0.8 * np.pi * (0.45 * r) ** 2  # at least the palm
                x0, y0, x1, y1 = px[t, part]
                assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1


def test_hand_quadrants_show_the_hands(default_dir):
    """grid2x2: top-right cell shows the right hand, bottom-right the left, bottom-left the head."""
    source = records.RecordSource(default_dir, "test")
    options = synthetic.SmokeOptions()
    for i in range(len(source)):
        e = source[i]
        label, n = int(e["label"][0]), i // options.classes
        _, rendered, tunnelled = synthetic.make_video(options, "test", label, n)
        hand = np.array(rendered.colours["hands"], float)
        skin = np.array(rendered.colours["skin"], float)
        frames = np.stack([_decode(f) for f in e["frames"]]).astype(float)
        # The stored JPEGs are exactly the composer's frames, encoded.
        assert e["frames"] == [
            build_records.encode_jpeg(f, synthetic.JPEG_QUALITY) for f in tunnelled
        ]
        is_hand = np.linalg.norm(frames - hand, axis=-1) < 50
        is_skin = np.linalg.norm(frames - skin, axis=-1) < 50
        centre = dict(rows=(3 / 8, 5 / 8), cols=(3 / 8, 5 / 8))
        # The palm fills the middle of both hand cells in every video...
        assert share(is_hand, "right_hand", **centre) > 0.85
        assert share(is_hand, "left_hand", **centre) > 0.85
        assert share(is_hand, "frame", **centre) < 0.05
        # ...and raised fingers show above it exactly for handshapes that have them.
        above = dict(rows=(4 / 32, 8 / 32), cols=(10 / 32, 22 / 32))
        for cell, motion in zip(
            ("right_hand", "left_hand"), synthetic.CLASS_TABLE[label], strict=True
        ):
            shape = synthetic.MOTION_HANDSHAPE[motion]
            if shape in ("fist", "thumb"):
                assert share(is_hand, cell, **above) < 0.01, (label, cell, shape)
            else:
                assert share(is_hand, cell, **above) > 0.04, (label, cell, shape)
        # The head cell is mostly skin and, apart from the hand-to-head class, no hand.
        assert share(is_skin, "head") > 0.25
        if source.classes[label] != "smoke_to_head":
            assert share(is_hand, "head") < 0.05


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_dir):
    again = synthetic.ensure_smoke_dataset(tmp_path / "again", **SMALL)
    assert _files(again) == _files(small_dir)
    other = synthetic.ensure_smoke_dataset(tmp_path / "other", **{**SMALL, "seed": 4})
    a, b = _files(small_dir), _files(other)
    assert a.keys() == b.keys()
    assert a["train-00000-of-00001.tfrecord"] != b["train-00000-of-00001.tfrecord"]


def test_existing_dataset_is_reused_without_rebuilding(small_dir, monkeypatch):
    before = {n: os.stat(os.path.join(small_dir, n)).st_mtime_ns for n in os.listdir(small_dir)}

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt an existing dataset")

    monkeypatch.setattr(synthetic, "build_smoke_dataset", no_build)
    assert synthetic.ensure_smoke_dataset(small_dir, **SMALL) == str(small_dir)
    after = {n: os.stat(os.path.join(small_dir, n)).st_mtime_ns for n in os.listdir(small_dir)}
    assert after == before


def test_other_options_name_the_folder_and_the_difference(small_dir):
    with pytest.raises(synthetic.SmokeDatasetError) as e:
        synthetic.ensure_smoke_dataset(small_dir, **{**SMALL, "seed": 9, "frames": 10})
    msg = str(e.value)
    assert str(small_dir) in msg
    assert "frames: 8 there, 10 requested" in msg and "seed: 3 there, 9 requested" in msg
    assert "delete" in msg
    # Nothing was touched.
    assert records.load_dataset_info(small_dir)["synthetic"]["options"]["seed"] == 3


def test_records_of_another_tool_are_refused(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    info = {"tool": {"name": "data_prep.build_records"}, "classes": ["a"], "splits": {}}
    (folder / records.DATASET_INFO).write_text(json.dumps(info))
    with pytest.raises(synthetic.SmokeDatasetError, match="not a synthetic smoke dataset"):
        synthetic.ensure_smoke_dataset(folder, **SMALL)
    assert json.loads((folder / records.DATASET_INFO).read_text()) == info


def test_older_generator_format_is_refused(tmp_path, small_dir):
    folder = tmp_path / "old"
    folder.mkdir()
    info = records.load_dataset_info(small_dir)
    info["tool"]["format_version"] = synthetic.FORMAT_VERSION - 1
    (folder / records.DATASET_INFO).write_text(json.dumps(info))
    with pytest.raises(synthetic.SmokeDatasetError, match=f"delete {folder}"):
        synthetic.ensure_smoke_dataset(folder, **SMALL)


def test_missing_shard_is_reported(tmp_path, small_dir):
    folder = tmp_path / "copy"
    shutil.copytree(small_dir, folder)
    os.remove(folder / "val-00000-of-00001.tfrecord.index")
    with pytest.raises(synthetic.SmokeDatasetError, match="incomplete: val-00000-of-00001"):
        synthetic.ensure_smoke_dataset(folder, **SMALL)


def test_remote_paths_are_refused():
    with pytest.raises(ValueError, match="local folder"):
        synthetic.ensure_smoke_dataset("gs://bucket/smoke", **SMALL)


def test_unrelated_files_are_never_deleted(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(synthetic.SmokeDatasetError, match="not empty"):
        synthetic.ensure_smoke_dataset(folder, **SMALL)
    assert os.listdir(folder) == ["notes.txt"]


def test_unfinished_build_is_rebuilt(tmp_path, small_dir):
    """No dataset_info.json = an interrupted build: stale shards and temporaries go."""
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "train-00000-of-00003.tfrecord").write_bytes(b"stale")
    (folder / "train-00000-of-00003.tfrecord.index").write_bytes(b"0 5\n")
    (folder / "val-00000-of-00001.tfrecord.tmp-1-abc").write_bytes(b"half")
    synthetic.ensure_smoke_dataset(folder, **SMALL)
    files = _files(folder)
    files.pop(synthetic.LOCK, None)
    expected = _files(small_dir)
    expected.pop(synthetic.LOCK, None)
    assert files == expected


def test_another_callers_probe_is_not_foreign(tmp_path, small_dir):
    """A caller checking that it can write probes inside the folder another caller has just
    created; a third caller listing the folder at that moment builds (the race CI once hit)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    probe = folder / f"{PROBE_PREFIX}4b0k0ws8"
    probe.write_bytes(b"")
    synthetic.ensure_smoke_dataset(folder, **SMALL)
    built = _files(folder)
    assert built.pop(probe.name) == b""  # its owner removes it
    built.pop(synthetic.LOCK, None)
    expected = _files(small_dir)
    expected.pop(synthetic.LOCK, None)
    assert built == expected


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    real = synthetic.build_smoke_dataset

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "build_smoke_dataset", counting)
    folder = tmp_path / "shared"
    results, errors = [], []

    def call():
        try:
            results.append(synthetic.ensure_smoke_dataset(folder, **SMALL))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [str(folder)] * 3
    assert len(calls) == 1


def test_no_class_is_the_mirror_image_of_another():
    """hht flipping turns (right, left) into (left, right): that must be the same class."""
    table = synthetic.CLASS_TABLE
    assert len(set(table)) == len(table)
    for right, left in table:
        assert (left, right) not in table or left == right, (right, left)
    assert synthetic.MOTIONS[0] == "still" and ("still", "still") not in table


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"classes": 1}, "classes must be in 2.."),
        ({"classes": synthetic.MAX_CLASSES + 1}, "classes must be in 2.."),
        ({"size": 33}, "size must be an even integer >= 16"),
        ({"frames": 1}, "frames must be >= 2"),
        ({"test_per_class": 0}, "test_per_class must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"frames": 2.5}, "frames must be an integer"),
    ],
)
def test_bad_options(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        synthetic.ensure_smoke_dataset(tmp_path / "x", **{**SMALL, **bad})
    assert not (tmp_path / "x").exists()


def test_class_names_are_unique_up_to_the_maximum():
    names = synthetic.class_names(synthetic.MAX_CLASSES)
    # Unordered pairs of the 11 motions but (still, still): a sign's mirror image is itself.
    assert len(set(names)) == synthetic.MAX_CLASSES == 11 * 12 // 2 - 1
    assert all(n.startswith("smoke_") for n in names)
    assert synthetic.class_names(10)[6] == "smoke_both_circle_cw"


def test_cli_builds_reuses_and_refuses(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["--output", out] + [
        f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items() if k != "seed"
    ]
    assert synthetic.main(args) == 0
    assert "smoke dataset built" in capsys.readouterr().err
    assert synthetic.main(args) == 0
    assert "smoke dataset reused" in capsys.readouterr().err
    assert synthetic.main(args + ["--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and out in err and "seed: 0 there, 5 requested" in err


def test_cli_ctrl_c_is_one_line_and_the_next_run_builds_again(tmp_path, small_dir):
    out = tmp_path / "cli"
    args = ["--output", out, *(f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items())]
    r = interrupt_after(
        "signnet_jax.data.records:TFRecordWriter.write#2", "data_prep.synthetic:main", *args
    )
    assert (r.returncode, r.stdout) == (130, "")
    assert r.stderr == (
        f"interrupted: {out} holds an unfinished smoke dataset, which the next run builds again\n"
    )
    assert not (out / records.DATASET_INFO).exists()
    assert synthetic.main([str(a) for a in args]) == 0
    before, expected = _files(out), _files(small_dir)
    assert {k: v for k, v in before.items() if k != synthetic.LOCK} == {
        k: v for k, v in expected.items() if k != synthetic.LOCK
    }
    # a Ctrl-C while a finished dataset is reused leaves it as it was
    r = interrupt_after("data_prep.synthetic:_check_existing", "data_prep.synthetic:main", *args)
    assert (r.returncode, r.stderr) == (130, f"interrupted: {out} unchanged\n")
    assert _files(out) == before


def test_input_pipeline_reads_every_test_view(small_dir):
    ds, info = pipeline.eval_dataset(
        small_dir,
        "val",
        mode="test",
        global_batch_size=3,
        clip_len=4,
        sampling_rate=2,
        num_segment=2,
        short_side_size=32,
        process_index=0,
        process_count=1,
    )
    source = records.RecordSource(small_dir, "val")
    seen = {}
    for batch in ds:
        assert batch["clip"].shape[1:] == (4, 32, 32, 3)
        for v, label, valid in zip(
            batch["video_index"], batch["label"], batch["valid"], strict=True
        ):
            if valid:
                seen.setdefault(int(v), []).append(int(label))
    assert info.num_videos == len(source) == 8
    assert seen == {i: [int(source[i]["label"][0])] * 2 for i in range(len(source))}


def test_building_leaves_the_caller_collectable_and_mediapipe_unloaded(tmp_path):
    # The trainer builds the smoke dataset inside its run. MediaPipe keeps an import-time
    # exception whose traceback holds every frame on the stack at its first import, so if the
    # build imported it, a notebook's finished run would keep its model and optimizer alive.
    code = f"""
import gc, sys, weakref

class Model:
    pass

def run():
    model = Model()
    from data_prep import synthetic
    synthetic.ensure_smoke_dataset({str(tmp_path / "records")!r}, **{SMALL!r})
    return weakref.ref(model)

ref = run()
gc.collect()
print(ref() is None, "mediapipe" in sys.modules)
"""
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "False"]
