"""grain pipeline over small TFRecord folders: determinism, restore, sharding, errors."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import cv2
import grain
import numpy as np
import pytest

from signnet_jax.data import augment, pipeline, records, sampling

# Video k has LENGTHS[k] frames; frame t of video k is uniform with colour
# RGB (k, 3 t, 100) (OpenCV encodes BGR) so the frame index survives JPEG,
# cropping and flipping.
LENGTHS = [5, 20, 40, 70, 8, 33, 12, 16, 3, 25, 50]


def _make_records(root, lengths=LENGTHS, size=32, shards=3, split="train"):
    os.makedirs(root, exist_ok=True)
    files = []
    for s, ids in enumerate(np.array_split(np.arange(len(lengths)), shards)):
        name = records.shard_name(split, s, shards)
        with records.TFRecordWriter(os.path.join(root, name)) as w:
            for k in ids:
                frames = [
                    cv2.imencode(".jpg", np.full((size, size, 3), (100, 3 * t, k), np.uint8))[
                        1
                    ].tobytes()
                    for t in range(lengths[k])
                ]
                example = {
                    "video_id": f"v{k}",
                    "label": int(k % 5),
                    "gloss": "g",
                    "frames": frames,
                    "height": size,
                    "width": size,
                    "num_frames": lengths[k],
                }
                w.write(records.encode_example(example))
        files.append({"file": name, "num_records": len(ids)})
    info = {
        "classes": list("abcde"),
        "splits": {split: {"num_records": len(lengths), "num_failures": 0, "shards": files}},
    }
    with open(os.path.join(root, records.DATASET_INFO), "w") as f:
        json.dump(info, f)
    return str(root)


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    return _make_records(tmp_path_factory.mktemp("records"))


def _frame_ids(clip):
    """Frame index of every frame of a (..., T, H, W, 3) clip of uniform frames."""
    return np.round(clip[..., 1].mean(axis=(-1, -2)) / 3).astype(int)


def _train(records_dir, **kw):
    args = dict(
        global_batch_size=4,
        seed=7,
        clip_len=4,
        sampling_rate=2,
        augment_options=augment.AugmentOptions(crop_size=16),
        process_index=0,
        process_count=1,
    )
    args.update(kw)
    return pipeline.train_dataset(records_dir, **args)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_batch_layout(records_dir):
    batch = next(iter(_train(records_dir, repeated_aug=2)))
    assert batch["clip"].shape == (8, 4, 16, 16, 3) and batch["clip"].dtype == np.uint8
    assert batch["erase_box"].shape == (8, 4) and batch["erase_box"].dtype == np.int32
    assert batch["label"].dtype == np.int32 and batch["video_index"].dtype == np.int32
    # Repeats of one video are adjacent, share the label and differ in augmentation.
    vi = batch["video_index"]
    np.testing.assert_array_equal(vi[0::2], vi[1::2])
    np.testing.assert_array_equal(batch["label"], vi % 5)
    assert any(not np.array_equal(batch["clip"][i], batch["clip"][i + 1]) for i in (0, 2, 4, 6))


def test_train_clips_follow_the_reference_window(records_dir):
    options = augment.AugmentOptions(crop_size=16, rand_augment=None, erase_prob=0.0)
    it = iter(_train(records_dir, augment_options=options))
    for batch in _take(it, 6):
        assert not batch["erase_box"].any()
        for clip, k in zip(batch["clip"], batch["video_index"], strict=True):
            ids = _frame_ids(clip)
            n = LENGTHS[k]
            # Crop and flip keep uniform frames.
            assert np.all(np.abs(clip[..., 0].astype(int) - k) <= 2)
            low, high = sampling.train_window_end_range(n, 4, 2)
            ends = range(low, high) if high > low else [0]
            candidates = [sampling.window_indices(n, 4, 2, e).tolist() for e in ends]
            assert ids.tolist() in candidates


def test_same_seed_same_batches_and_other_seed_differs(records_dir):
    a = _take(iter(_train(records_dir)), 5)
    b = _take(iter(_train(records_dir)), 5)
    _assert_same(a, b)
    c = _take(iter(_train(records_dir, seed=8)), 5)
    assert any(not np.array_equal(x["clip"], y["clip"]) for x, y in zip(a, c, strict=True))


def test_fresh_shuffle_every_epoch(records_dir):
    # 11 videos, batch 1: each run of 11 steps is one epoch.
    it = iter(_train(records_dir, global_batch_size=1))
    epochs = [[int(next(it)["video_index"][0]) for _ in range(11)] for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(11))
    assert len({tuple(order) for order in epochs}) == 3  # three different orders


def test_each_epoch_uses_whole_batches_of_its_own_permutation(records_dir):
    # 11 videos, batch 4: 2 steps per epoch use 8 videos of that epoch's permutation and
    # drop 3 (the reference's drop_last), so the data's epochs stay the trainer's
    import grain

    perm = grain.MapDataset.range(11).shuffle(seed=7).repeat()
    expected = [[perm[e * 11 + j] for j in range(8)] for e in range(3)]
    it = iter(_train(records_dir, global_batch_size=4))
    got = [[int(v) for _ in range(2) for v in next(it)["video_index"]] for _ in range(3)]
    assert got == expected
    assert all(len(set(epoch)) == 8 for epoch in got)
    # with gradient accumulation the epoch counts whole updates (4), not micro-batches (2)
    it = iter(_train(records_dir, global_batch_size=2, epoch_batch_size=4))
    micro = [[int(v) for _ in range(4) for v in next(it)["video_index"]] for _ in range(3)]
    assert micro == expected
    with pytest.raises(ValueError, match="a batch of 12 videos exceeds the 11 of split"):
        _train(records_dir, global_batch_size=12)


def test_restored_iterator_gives_the_following_batches(records_dir):
    it = iter(_train(records_dir))
    _take(it, 3)
    state = it.get_state()
    json.dumps(state)  # small and serialisable with the checkpoint
    expected = _take(it, 4)
    restored = iter(_train(records_dir))
    restored.set_state(state)
    _assert_same(_take(restored, 4), expected)


def test_worker_processes_give_the_same_batches_and_restore(records_dir):
    reference = _take(iter(_train(records_dir)), 6)
    it = iter(_train(records_dir, num_workers=2))
    _assert_same(_take(it, 3), reference[:3])
    state = it.get_state()
    restored = iter(_train(records_dir, num_workers=2))
    restored.set_state(state)
    _assert_same(_take(restored, 3), reference[3:])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_stream_started_after_used_batches_gives_the_following_ones(records_dir, num_workers):
    # how a resumed run finds its place, whatever the worker, process or micro-batch count;
    # 11 records make epochs of 2 batches of 4: batches 3 and 4 are in the 2nd and 3rd epochs
    reference = _take(iter(_train(records_dir)), 5)
    later = iter(_train(records_dir, start_batch=3, num_workers=num_workers))
    _assert_same(_take(later, 2), reference[3:])
    pipeline.release(later, num_workers)
    # process 1 of 2 from its batch 3: the second halves of global batches 3 and 4
    half = _take(iter(_train(records_dir, start_batch=3, process_index=1, process_count=2)), 2)
    for got, want in zip(half, reference[3:], strict=True):
        for k in got:
            np.testing.assert_array_equal(got[k], want[k][2:])
    with pytest.raises(ValueError, match="start_batch must be >= 0, got -1"):
        _train(records_dir, start_batch=-1)


def test_worker_processes_outlive_a_sigterm_to_the_process_group(records_dir):
    # a preemption signals every process of the group; the trainer must still get the batch
    # it is waiting for, save, and close the workers itself
    reference = _take(iter(_train(records_dir)), 4)
    before = set(multiprocessing.active_children())
    it = iter(_train(records_dir, num_workers=2))
    _assert_same(_take(it, 2), reference[:2])  # one batch from each worker: both started
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    for p in workers:  # SIGTERM is in each worker's mask of ignored signals
        with open(f"/proc/{p.pid}/status") as f:
            ignored = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
        assert ignored & 1 << (signal.SIGTERM - 1)
        os.kill(p.pid, signal.SIGTERM)
    _assert_same(_take(it, 2), reference[2:])
    assert all(p.is_alive() for p in workers)
    pipeline.release(it, 2)
    for p in workers:
        p.join(timeout=30)
    assert not any(p.is_alive() for p in workers)


def test_a_batch_kept_past_release_holds_no_shared_memory_name(records_dir):
    # JAX on the CPU shares a batch's memory and lets go of it when its work is done, which
    # can be after the pipeline's release: a block still named then was unlinked only by the
    # resource tracker at exit, which warned of "leaked shared_memory objects"
    reference = _take(iter(_train(records_dir)), 2)
    it = iter(_train(records_dir, num_workers=2))
    kept = [next(it), next(it)]
    blocks = [
        leaf for batch in kept for leaf in batch.values()
        if isinstance(leaf, grain.multiprocessing.SharedMemoryArray)
    ]  # fmt: skip
    assert len(blocks) >= 2 * 4  # the clip, labels, indices and flags of each batch
    pipeline.release(it, 2)
    assert [
        b.shm.name for b in blocks if os.path.exists(f"/dev/shm/{b.shm.name.lstrip('/')}")
    ] == []
    _assert_same(kept, reference)  # still mapped: the memory goes with the last array


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_worker_processes_leave_with_a_trainer_killed_outright(records_dir, tmp_path):
    # kill -9 or the OOM killer: the trainer cannot close its workers, which must not stay
    # behind holding their memory
    script = tmp_path / "trainer.py"
    script.write_text(
        "import multiprocessing, sys, time\n"
        "from signnet_jax.data import augment, pipeline\n"
        "if __name__ == '__main__':\n"
        f"    it = iter(pipeline.train_dataset({records_dir!r}, global_batch_size=4, seed=7,\n"
        "        clip_len=4, augment_options=augment.AugmentOptions(crop_size=16),\n"
        "        process_index=0, process_count=1, num_workers=2))\n"
        "    next(it), next(it)\n"
        "    print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(workers) == 2 and all(map(_running, workers))
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_running, workers))


@pytest.mark.parametrize("repeated_aug", [1, 2])
def test_processes_split_the_global_batch(records_dir, repeated_aug):
    kw = dict(global_batch_size=4, repeated_aug=repeated_aug)
    single = _take(iter(_train(records_dir, **kw)), 3)
    shards = [
        _take(iter(_train(records_dir, **kw, process_index=p, process_count=2)), 3)
        for p in range(2)
    ]
    rows = 2 * repeated_aug
    for step in range(3):
        for p in range(2):
            part = shards[p][step]
            assert part["clip"].shape[0] == rows
            # Process p holds the p-th contiguous block of the step's global batch, so the
            # parts in process order are the one-process batch, row for row.
            for key in part:
                np.testing.assert_array_equal(
                    part[key], single[step][key][p * rows : (p + 1) * rows]
                )


def test_train_argument_errors(records_dir):
    with pytest.raises(ValueError, match="global_batch_size 3 must be a positive multiple"):
        _train(records_dir, global_batch_size=3, process_count=2)
    with pytest.raises(ValueError, match="process_index 2 outside"):
        _train(records_dir, process_index=2, process_count=2)
    with pytest.raises(KeyError, match="split 'nope' not in"):
        _train(records_dir, split="nope")


def _eval(records_dir, process_index, process_count, **kw):
    args = dict(
        mode="test",
        global_batch_size=4,
        clip_len=4,
        sampling_rate=2,
        num_segment=3,
        num_crop=2,
        short_side_size=24,
        process_index=process_index,
        process_count=process_count,
    )
    args.update(kw)
    return pipeline.eval_dataset(records_dir, "train", **args)


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_covers_every_view_exactly_once(records_dir, process_count):
    seen, steps = [], set()
    for p in range(process_count):
        ds, info = _eval(records_dir, p, process_count)
        batches = list(ds)
        steps.add(len(batches))
        assert info.num_steps == len(batches)
        assert info.num_views == len(LENGTHS) * 6
        for b in batches:
            assert b["clip"].shape == (4 // process_count, 4, 24, 24, 3)
            assert b["valid"].dtype == bool
            assert np.all(b["video_index"][~b["valid"]] == -1)
            for k, s, c, clip, label in zip(
                b["video_index"][b["valid"]],
                b["segment"][b["valid"]],
                b["crop"][b["valid"]],
                b["clip"][b["valid"]],
                b["label"][b["valid"]],
                strict=True,
            ):
                seen.append((int(k), int(s), int(c)))
                assert label == k % 5
                expected = sampling.test_indices(LENGTHS[k], 4, 2, 3, int(s))
                np.testing.assert_array_equal(_frame_ids(clip), expected)
    assert len(steps) == 1  # every process runs the same number of steps
    views = [(k, s, c) for k in range(len(LENGTHS)) for s in range(3) for c in range(2)]
    assert sorted(seen) == views


def test_eval_test_crops_follow_the_long_side(tmp_path):
    # Non-square frames: a 24x40 frame with a horizontal ramp, resized to short side 12.
    root = tmp_path / "wide"
    os.makedirs(root)
    ramp = np.tile(np.linspace(0, 240, 40).astype(np.uint8)[None, :, None], (24, 1, 3))
    frame = cv2.imencode(".png", ramp)[1].tobytes()
    name = records.shard_name("test", 0, 1)
    with records.TFRecordWriter(root / name) as w:
        w.write(records.encode_example({"video_id": "w", "label": 0, "frames": [frame] * 4}))
    info = {"classes": ["a"], "splits": {"test": {"shards": [{"file": name, "num_records": 1}]}}}
    (root / records.DATASET_INFO).write_text(json.dumps(info))
    ds, _ = pipeline.eval_dataset(
        str(root), "test", global_batch_size=3, clip_len=2, num_segment=1, num_crop=3,
        short_side_size=12, process_index=0, process_count=1,
    )  # fmt: skip
    batch = next(iter(ds))
    resized = cv2.resize(ramp, (20, 12), interpolation=cv2.INTER_LINEAR)
    for crop, left in zip(range(3), (0, 4, 8), strict=True):
        np.testing.assert_array_equal(batch["clip"][crop, 0], resized[:, left : left + 12])


def test_eval_val_mode_is_one_centre_clip(records_dir):
    ds, info = _eval(records_dir, 0, 1, mode="val", crop_size=16)
    assert info.views_per_video == 1 and info.num_steps == 3
    batches = list(ds)
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == len(LENGTHS)
    for b in batches:
        assert b["clip"].shape == (4, 4, 16, 16, 3)
        for k, clip in zip(b["video_index"][b["valid"]], b["clip"][b["valid"]], strict=True):
            np.testing.assert_array_equal(_frame_ids(clip), sampling.val_indices(LENGTHS[k], 4, 2))


def test_eval_views_identical_whatever_the_process_count(records_dir):
    def by_view(process_count):
        out = {}
        for p in range(process_count):
            for b in _eval(records_dir, p, process_count)[0]:
                for i in np.flatnonzero(b["valid"]):
                    key = (int(b["video_index"][i]), int(b["segment"][i]), int(b["crop"][i]))
                    out[key] = b["clip"][i]
        return out

    one, four = by_view(1), by_view(4)
    assert one.keys() == four.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], four[key])


def test_corrupted_record_is_reported_with_file_and_index(tmp_path):
    root = _make_records(tmp_path / "bad", shards=2)
    shard = os.path.join(root, records.shard_name("train", 1, 2))
    offsets = records.read_index(shard)
    with open(shard, "r+b") as f:  # flip a byte inside record 2 of shard 1
        f.seek(int(offsets[2, 0]) + 40)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    ds, _ = _eval(root, 0, 1, mode="val", crop_size=16)
    where = r"train-00001-of-00002.tfrecord: record 2"
    with pytest.raises(records.CorruptRecordError, match=where):
        list(ds)
    it = iter(_train(root, global_batch_size=1))
    with pytest.raises(records.CorruptRecordError, match="data CRC mismatch"):
        _take(it, len(LENGTHS))


def test_undecodable_frame_is_reported_with_file_record_and_video(tmp_path):
    root = tmp_path / "badjpeg"
    os.makedirs(root)
    good = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    name = records.shard_name("train", 0, 1)
    with records.TFRecordWriter(root / name) as w:
        w.write(records.encode_example({"video_id": "ok", "label": 0, "frames": [good] * 4}))
        w.write(records.encode_example({"video_id": "broken", "label": 1, "frames": [b"x"] * 4}))
    shards = [{"file": name, "num_records": 2}]
    info = {"classes": ["a", "b"], "splits": {"train": {"shards": shards}}}
    (root / records.DATASET_INFO).write_text(json.dumps(info))
    ds, _ = pipeline.eval_dataset(
        str(root), "train", mode="val", global_batch_size=2, clip_len=2, short_side_size=8,
        crop_size=8, process_index=0, process_count=1,
    )  # fmt: skip
    where = r"train-00000-of-00001.tfrecord: record 1 \(video broken\)"
    with pytest.raises(ValueError, match=where):
        list(ds)


def test_steps_per_epoch_drops_the_partial_batch():
    assert pipeline.steps_per_epoch(14289, 256) == 55
    assert pipeline.steps_per_epoch(11, 4) == 2


QUADRANT_COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def _quadrant_means(clip):
    """Mean colour of each quadrant (top-left, top-right, bottom-left, bottom-right), away from
    the edges JPEG blurs."""
    h, w = clip.shape[-3] // 2, clip.shape[-2] // 2
    m = h // 4
    cells = [clip[..., r + m : r + h - m, c + m : c + w - m, :] for r in (0, h) for c in (0, w)]
    return [tuple(np.round(q.reshape(-1, 3).mean(0)).astype(int)) for q in cells]


def test_hht_flip_mode_runs_through_the_pipeline(tmp_path):
    # frames of four solid cells (frame, right hand / head, left hand): the hht flip swaps the
    # hands' cells and keeps the others; a plain flip would swap the columns
    frame = np.zeros((32, 32, 3), np.uint8)
    for (r, c), colour in zip([(0, 0), (0, 16), (16, 0), (16, 16)], QUADRANT_COLOURS, strict=True):
        frame[r : r + 16, c : c + 16] = colour
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1].tobytes()
    root = tmp_path / "grid"
    root.mkdir()
    with records.TFRecordWriter(str(root / records.shard_name("train", 0, 1))) as w:
        for k in range(8):
            example = {"video_id": f"v{k}", "label": k % 5, "gloss": "g", "frames": [jpeg] * 6,
                       "height": 32, "width": 32, "num_frames": 6}  # fmt: skip
            w.write(records.encode_example(example))
    shards = [{"file": records.shard_name("train", 0, 1), "num_records": 8}]
    info = {"classes": list("abcde"), "splits": {"train": {"num_records": 8, "shards": shards}}}
    (root / records.DATASET_INFO).write_text(json.dumps(info))
    options = augment.AugmentOptions(
        crop_size=32, scale=(1.0, 1.0), flip="hht", rand_augment=None, erase_prob=0.0
    )  # the whole frame, not resized
    kept, hht = list(QUADRANT_COLOURS), [QUADRANT_COLOURS[i] for i in (0, 3, 2, 1)]
    seen = []
    for batch in _take(iter(_train(str(root), augment_options=options)), 4):
        for clip in batch["clip"]:
            means = _quadrant_means(clip.astype(np.float64))
            [match] = [name for name, want in (("kept", kept), ("hht", hht))
                       if np.abs(np.subtract(means, want)).max() <= 3]  # fmt: skip
            seen.append(match)
    assert sorted(set(seen)) == ["hht", "kept"]
    # records of the strip layout have no 2x2 grid for it to mirror
    options = augment.AugmentOptions(crop_size=16, flip="hht")
    strip = _make_records(tmp_path)
    info_path = os.path.join(strip, records.DATASET_INFO)
    with open(info_path) as f:
        info = json.load(f)
    info["hht_settings"] = {"layout": "strip"}
    with open(info_path, "w") as f:
        json.dump(info, f)
    with pytest.raises(ValueError, match="holds layout 'strip'; use flip='plain'"):
        _train(strip, augment_options=options)
    _train(strip)  # the plain flip is fine


def test_eval_with_worker_processes_ends_and_matches(records_dir):
    def views(**kw):
        ds, info = _eval(records_dir, 1, 2, **kw)
        batches = list(ds)
        assert len(batches) == info.num_steps
        return batches

    _assert_same(views(num_workers=2), views())
