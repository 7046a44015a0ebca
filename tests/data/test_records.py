"""Tests for signnet_jax.data.records: wire format against hand-built bytes, reader, atomicity."""

import json
import os
import pickle
import struct

import fsspec
import numpy as np
import pytest

from signnet_jax.data import records


def _crc32c_reference(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli, reflected 0x82F63B78): independent of google-crc32c."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_reference(data: bytes) -> int:
    crc = _crc32c_reference(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % (1 << 32)


def _frame_reference(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", _masked_reference(length))
        + data
        + struct.pack("<I", _masked_reference(data))
    )


# Example{features{feature{"a": int64 [1, 300]} {"b": bytes ["xy"]} {"c": float [1.5]}}},
# written out by hand from tensorflow/core/example/{example,feature}.proto field numbers.
_HAND_EXAMPLE = bytes.fromhex(
    # Example.features (field 1), 42 bytes
    "0a2a"
    # map entry "a" -> Feature.int64_list (field 3) -> packed varints 1, 300
    "0a0c 0a0161 1207 1a05 0a03 01ac02"
    # map entry "b" -> Feature.bytes_list (field 1) -> "xy"
    "0a0b 0a0162 1206 0a04 0a02 7879"
    # map entry "c" -> Feature.float_list (field 2) -> packed little-endian float 1.5
    "0a0d 0a0163 1208 1206 0a04 0000c03f"
)


def test_crc32c_check_value_and_mask_match_reference():
    assert _crc32c_reference(b"123456789") == 0xE3069283  # the published CRC-32C check value
    for data in [b"", b"123456789", bytes(range(256)) * 3]:
        assert records.masked_crc32c(data) == _masked_reference(data)


def test_encode_matches_hand_built_example_bytes():
    encoded = records.encode_example(
        {"c": np.array([1.5], np.float32), "b": [b"xy"], "a": [1, 300]}
    )
    assert encoded == _HAND_EXAMPLE


def test_decode_hand_built_example_bytes():
    decoded = records.decode_example(_HAND_EXAMPLE)
    assert decoded.keys() == {"a", "b", "c"}
    assert decoded["a"].dtype == np.int64 and decoded["a"].tolist() == [1, 300]
    assert decoded["b"] == [b"xy"]
    assert decoded["c"].dtype == np.float32 and decoded["c"].tolist() == [1.5]


def test_round_trip_all_feature_kinds():
    boxes = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7 - 1
    features = {
        "video_id": b"00335",
        "gloss": "thank you",
        "label": 1999,
        "fps": 29.97,
        "frames": [b"\xff\xd8jpeg0", b"\xff\xd8jpeg1"],
        "boxes": boxes,
        "box_source": np.array([[0, 1, 2], [3, 1, 0]], np.int8),
        "negative": [-5, 2**40],
        "empty": [],
    }
    out = records.decode_example(records.encode_example(features))
    assert out["video_id"] == [b"00335"]
    assert out["gloss"] == [b"thank you"]
    assert out["label"].tolist() == [1999]
    np.testing.assert_array_equal(out["fps"], np.float32([29.97]))
    assert out["frames"] == [b"\xff\xd8jpeg0", b"\xff\xd8jpeg1"]
    np.testing.assert_array_equal(out["boxes"].reshape(2, 3, 4), boxes)
    assert out["box_source"].tolist() == [0, 1, 2, 3, 1, 0]
    assert out["negative"].tolist() == [-5, 2**40]
    assert out["empty"] == []


def test_encoding_is_deterministic_regardless_of_key_order():
    a = {"x": [1], "y": b"q", "z": np.zeros(3, np.float32)}
    b = dict(reversed(list(a.items())))
    assert records.encode_example(a) == records.encode_example(b)


def test_encode_rejects_unsupported_values_naming_the_feature():
    with pytest.raises(TypeError, match="feature 'bad'"):
        records.encode_example({"bad": {"nested": 1}})
    with pytest.raises(TypeError, match="feature 'mixed'"):
        records.encode_example({"mixed": [b"a", 1]})


def _write_shard(path, datas):
    with records.TFRecordWriter(path) as w:
        for d in datas:
            w.write(d)


def test_writer_framing_and_index_match_hand_built_bytes(tmp_path):
    datas = [b"", b"hello", _HAND_EXAMPLE, bytes(range(256)) * 40]
    path = tmp_path / "train-00000-of-00001.tfrecord"
    _write_shard(path, datas)
    expected = b"".join(_frame_reference(d) for d in datas)
    assert path.read_bytes() == expected
    lines = (tmp_path / "train-00000-of-00001.tfrecord.index").read_text().splitlines()
    offsets, pos = [], 0
    for d in datas:
        offsets.append(f"{pos} {len(d) + 16}")
        pos += len(d) + 16
    assert lines == offsets
    assert sorted(os.listdir(tmp_path)) == [path.name, path.name + ".index"]


def test_reader_random_access_and_sequential(tmp_path):
    datas = [f"record {i}".encode() * (i + 1) for i in range(10)]
    path = tmp_path / "s.tfrecord"
    _write_shard(path, datas)
    with records.ShardReader(path) as r:
        assert len(r) == 10
        assert [r.read(i) for i in [7, 0, 9, 3]] == [datas[7], datas[0], datas[9], datas[3]]
        assert r.read(-1) == datas[-1]
        with pytest.raises(IndexError, match="record 10 out of range"):
            r.read(10)
        assert list(r) == datas
    assert list(records.read_records(path)) == datas


def test_reader_is_picklable_and_reopens(tmp_path):
    path = tmp_path / "s.tfrecord"
    _write_shard(path, [b"a", b"b"])
    r = records.ShardReader(path)
    assert r.read(1) == b"b"  # opens the file
    r2 = pickle.loads(pickle.dumps(r))
    assert r2.read(0) == b"a"
    r.close()
    r2.close()


@pytest.mark.parametrize(
    "where,message",
    [("data", "record 2: data CRC mismatch"), ("header", "record 2: length CRC mismatch")],
)
def test_flipped_byte_names_file_and_record(tmp_path, where, message):
    datas = [b"x" * 50 for _ in range(4)]
    path = tmp_path / "s.tfrecord"
    _write_shard(path, datas)
    raw = bytearray(path.read_bytes())
    offset = 2 * 66 + (12 + 20 if where == "data" else 3)
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))
    r = records.ShardReader(path)
    assert r.read(1) == datas[1] and r.read(3) == datas[3]  # neighbours are intact
    with pytest.raises(records.CorruptRecordError, match=message) as err:
        r.read(2)
    assert str(path) in str(err.value)
    with pytest.raises(records.CorruptRecordError, match=message):
        list(records.read_records(path))


def test_truncated_shard_names_record(tmp_path):
    path = tmp_path / "s.tfrecord"
    _write_shard(path, [b"a" * 10, b"b" * 10])
    path.write_bytes(path.read_bytes()[:-5])
    r = records.ShardReader(path)
    assert r.read(0) == b"a" * 10
    with pytest.raises(records.CorruptRecordError, match=r"s\.tfrecord: record 1: truncated"):
        r.read(1)


def test_writer_leaves_nothing_under_final_name_until_closed_and_on_error(tmp_path):
    path = tmp_path / "s.tfrecord"
    w = records.TFRecordWriter(path)
    w.write(b"a")
    assert not path.exists() and not (tmp_path / "s.tfrecord.index").exists()
    w.close()
    assert path.exists()

    failed = tmp_path / "f.tfrecord"
    with pytest.raises(RuntimeError):
        with records.TFRecordWriter(failed) as w:
            w.write(b"a")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["s.tfrecord", "s.tfrecord.index"]


def _make_records_dir(root, counts):
    """A records folder with one split spread over shards of the given sizes."""
    shards, k = [], 0
    for i, n in enumerate(counts):
        name = records.shard_name("train", i, len(counts))
        with records.TFRecordWriter(os.path.join(root, name)) as w:
            for _ in range(n):
                w.write(records.encode_example({"video_id": f"v{k}", "label": k}))
                k += 1
        shards.append({"file": name, "num_records": n})
    info = {
        "classes": ["a", "b"],
        "splits": {"train": {"num_records": k, "num_failures": 0, "shards": shards}},
    }
    with open(os.path.join(root, records.DATASET_INFO), "w") as f:
        json.dump(info, f)
    return k


def test_record_source_spans_shards(tmp_path):
    total = _make_records_dir(tmp_path, [3, 1, 4])
    src = records.RecordSource(tmp_path, "train")
    assert len(src) == total == 8
    assert [int(src[i]["label"][0]) for i in range(8)] == list(range(8))
    assert src[5]["video_id"] == [b"v5"]
    assert src.locate(3) == (str(tmp_path / "train-00001-of-00003.tfrecord"), 0)
    assert src.locate(7) == (str(tmp_path / "train-00002-of-00003.tfrecord"), 3)
    assert src.classes == ["a", "b"]
    assert records.load_dataset_info(tmp_path)["classes"] == ["a", "b"]
    clone = pickle.loads(pickle.dumps(src))
    assert clone[7]["label"].tolist() == [7]
    with pytest.raises(IndexError):
        src[8]
    with pytest.raises(KeyError, match=r"split .test. not in .*\(has: train\)"):
        records.RecordSource(tmp_path, "test")


def test_record_source_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_info.json not found.*build_records"):
        records.RecordSource(tmp_path, "train")
    _make_records_dir(tmp_path, [2])
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    info["splits"]["train"]["shards"][0]["num_records"] = 3
    info["splits"]["train"]["num_records"] = 3
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(records.CorruptRecordError, match="index has 2 records.*says 3"):
        records.RecordSource(tmp_path, "train")[0]


def test_reader_through_fsspec_url(tmp_path):
    """Non-local paths (gs:// in production) go through fsspec; memory:// stands in here."""
    local = tmp_path / "s.tfrecord"
    datas = [b"alpha", b"beta", b"gamma"]
    _write_shard(local, datas)
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/s.tfrecord", local.read_bytes())
    fs.pipe("/bucket/s.tfrecord.index", (tmp_path / "s.tfrecord.index").read_bytes())
    r = records.ShardReader("memory://bucket/s.tfrecord")
    assert [r.read(2), r.read(0)] == [b"gamma", b"alpha"]
    assert list(records.read_records("memory://bucket/s.tfrecord")) == datas


def test_missing_files_of_a_remote_folder(tmp_path, monkeypatch):
    """A bucket folder is listed once, not asked about file by file; when listing is refused
    each file is looked up, and a refused lookup is an error, not a missing file."""
    fs = fsspec.filesystem("memory")
    root = "memory://bucket/missing_files"
    for name in ("train-0.tfrecord", "train-0.tfrecord.index", "test-0.tfrecord"):
        fs.pipe(f"{root}/{name}", b"x")
    shards = {"train": ["train-0.tfrecord", "train-1.tfrecord"], "test": ["test-0.tfrecord"]}
    info = {"splits": {k: {"shards": [{"file": f} for f in v]} for k, v in shards.items()}}
    expected = [f"{root}/train-1.tfrecord", f"{root}/train-1.tfrecord.index"]
    calls = []
    listing, lookup = fs.ls, fs.info
    monkeypatch.setattr(fs, "ls", lambda *a, **k: calls.append("ls") or listing(*a, **k))
    monkeypatch.setattr(fs, "info", lambda *a, **k: calls.append("info") or lookup(*a, **k))
    assert records.missing_files(root, info, ["train"]) == expected
    assert calls == ["ls"]
    # a listing kept from before (gcsfs keeps them for the process) is not trusted: the folder
    # copied again in a notebook's kernel is looked at anew
    invalidated = []
    monkeypatch.setattr(fs, "invalidate_cache", invalidated.append)
    fs.pipe(f"{root}/train-1.tfrecord", b"x")
    fs.pipe(f"{root}/train-1.tfrecord.index", b"x")
    assert records.missing_files(root, info, ["train"]) == []
    assert invalidated == ["/bucket/missing_files"]
    for name in ("train-1.tfrecord", "train-1.tfrecord.index"):
        fs.rm(f"{root}/{name}")
    calls.clear()
    assert records.missing_files(root, info, ["test"]) == [f"{root}/test-0.tfrecord.index"]
    assert records.missing_files(root + "/nowhere", info, ["test"]) == [
        f"{root}/nowhere/test-0.tfrecord",
        f"{root}/nowhere/test-0.tfrecord.index",
    ]

    def refused(*args, **kwargs):  # as gcsfs answers a 403
        raise OSError("Forbidden: bucket/missing_files\n{'error': {'code': 403}}")

    monkeypatch.setattr(fs, "ls", refused)
    calls.clear()
    assert records.missing_files(root, info, ["train"]) == expected
    assert calls == ["info"] * 4
    monkeypatch.setattr(fs, "info", refused)
    with pytest.raises(OSError, match="^Forbidden: bucket/missing_files"):
        records.missing_files(root, info, ["train"])
