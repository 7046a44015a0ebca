"""TFRecord shards of tf.train.Example: writing, indexed random-access reading, decoding.

The on-disk format is the standard one (`tf.data.TFRecordDataset` reads the shards and
`tf.train.Example.FromString` the records) without depending on TensorFlow:

* framing per record: uint64 length, masked CRC32C of the length, data, masked CRC32C of the
  data (all little endian);
* next to every shard `NAME.tfrecord.index`, one text line `offset length` per record (the
  layout DALI's `tfrecord2idx` and the `tfrecord` package use), so any record is one seek away;
* `dataset_info.json` in the records folder lists classes, shards and counts per split.

Paths may be local or any fsspec URL (`gs://...` with gcsfs installed).
"""

from __future__ import annotations

import bisect
import io
import json
import os
import struct
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import fsspec
import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DATASET_INFO = "dataset_info.json"
FAILURES = "failures.jsonl"  # one JSON line per video the build could not make
INDEX_SUFFIX = ".index"

_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_HEADER = 12  # uint64 length + uint32 masked crc of the length
_MASK_DELTA = 0xA282EAD8


class CorruptRecordError(IOError):
    """A record whose framing or CRC does not check out, or a shard or index file that is
    missing; the message names the file (and record)."""


class DatasetInfoError(ValueError):
    """A dataset_info.json that is not JSON, or lacks what readers need; names the file."""


# --------------------------------------------------------------------------------------------
# tf.train.Example schema
# --------------------------------------------------------------------------------------------


def _build_example_classes() -> tuple[type, type]:
    """Builds tensorflow/core/example/{feature,example}.proto at runtime.

    Why: the six messages are all we need and protobuf's descriptor API gives the exact wire
    format, whereas the vendored copy lives in tensorflow-datasets (a heavy dependency).
    A private pool keeps this from clashing with TensorFlow's own registration if both are
    imported in one process.
    """
    f = descriptor_pb2.FileDescriptorProto(
        name="signnet_jax/tensorflow_example.proto", package="tensorflow", syntax="proto3"
    )
    label_rep = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    label_opt = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    t = descriptor_pb2.FieldDescriptorProto

    def add_list(name: str, field_type: int, packed: bool) -> None:
        m = f.message_type.add(name=name)
        fld = m.field.add(name="value", number=1, label=label_rep, type=field_type)
        if packed:
            fld.options.packed = True

    add_list("BytesList", t.TYPE_BYTES, packed=False)
    add_list("FloatList", t.TYPE_FLOAT, packed=True)
    add_list("Int64List", t.TYPE_INT64, packed=True)

    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        [("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")],
        start=1,
    ):
        feature.field.add(
            name=name,
            number=number,
            label=label_opt,
            type=t.TYPE_MESSAGE,
            type_name=f".tensorflow.{type_name}",
            oneof_index=0,
        )

    features = f.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=label_opt, type=t.TYPE_STRING)
    entry.field.add(
        name="value",
        number=2,
        label=label_opt,
        type=t.TYPE_MESSAGE,
        type_name=".tensorflow.Feature",
    )
    features.field.add(
        name="feature",
        number=1,
        label=label_rep,
        type=t.TYPE_MESSAGE,
        type_name=".tensorflow.Features.FeatureEntry",
    )

    example = f.message_type.add(name="Example")
    example.field.add(
        name="features",
        number=1,
        label=label_opt,
        type=t.TYPE_MESSAGE,
        type_name=".tensorflow.Features",
    )

    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    example_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))
    feature_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Feature"))
    return example_cls, feature_cls


Example, Feature = _build_example_classes()


def encode_example(features: Mapping[str, Any]) -> bytes:
    """Serializes features as a standard tf.train.Example.

    Args:
      features: name -> value. `bytes`/`str` or a list of them -> bytes_list; a list of ints or
        an integer/bool numpy array -> int64_list; a float numpy array or float / list of
        floats -> float_list. Arrays are flattened (row-major); store their shape separately.

    Returns:
      The serialized Example; map keys are sorted, so equal inputs give equal bytes.
    """
    example = Example()
    fmap = example.features.feature
    for name, value in features.items():
        feat = fmap[name]
        if isinstance(value, bytes | str):
            value = [value]
        if isinstance(value, np.ndarray):
            if value.dtype.kind in "iub":
                feat.int64_list.value.extend(value.astype(np.int64).ravel().tolist())
            elif value.dtype.kind == "f":
                feat.float_list.value.extend(value.astype(np.float32).ravel().tolist())
            else:
                raise TypeError(f"feature {name!r}: unsupported array dtype {value.dtype}")
        elif isinstance(value, bool | int | np.integer):
            feat.int64_list.value.append(int(value))
        elif isinstance(value, float | np.floating):
            feat.float_list.value.append(float(value))
        elif isinstance(value, Sequence):
            items = list(value)
            if all(isinstance(v, bytes | str) for v in items):
                feat.bytes_list.value.extend(
                    v.encode("utf-8") if isinstance(v, str) else v for v in items
                )
            elif all(isinstance(v, bool | int | np.integer) for v in items):
                feat.int64_list.value.extend(int(v) for v in items)
            elif all(isinstance(v, int | float | np.integer | np.floating) for v in items):
                feat.float_list.value.extend(float(v) for v in items)
            else:
                raise TypeError(f"feature {name!r}: list mixes types or holds unsupported ones")
        else:
            raise TypeError(f"feature {name!r}: unsupported value of type {type(value).__name__}")
        if not feat.WhichOneof("kind"):
            # An empty list still needs a kind so readers know the type; bytes is TF's default.
            feat.bytes_list.SetInParent()
    return example.SerializeToString(deterministic=True)


def decode_example(data: bytes) -> dict[str, list[bytes] | np.ndarray]:
    """Parses tf.train.Example bytes.

    Args:
      data: serialized Example.

    Returns:
      name -> list[bytes] (bytes_list), np.int64 array (int64_list) or np.float32 array
      (float_list); a feature with no kind set decodes as an empty list.
    """
    example = Example.FromString(data)
    out: dict[str, list[bytes] | np.ndarray] = {}
    for name, feat in example.features.feature.items():
        kind = feat.WhichOneof("kind")
        if kind == "bytes_list":
            out[name] = list(feat.bytes_list.value)
        elif kind == "int64_list":
            out[name] = np.array(feat.int64_list.value, dtype=np.int64)
        elif kind == "float_list":
            out[name] = np.array(feat.float_list.value, dtype=np.float32)
        else:
            out[name] = []
    return out


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C (rotate right by 15, add a constant)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One record with TFRecord framing: length, its masked CRC, data, the data's masked CRC."""
    length = _LEN.pack(len(data))
    return b"".join(
        [length, _CRC.pack(masked_crc32c(length)), data, _CRC.pack(masked_crc32c(data))]
    )


def _check_header(header: bytes, where: str) -> int:
    """Returns the data length of a 12-byte record header after checking its CRC."""
    if masked_crc32c(header[:8]) != _CRC.unpack_from(header, 8)[0]:
        raise CorruptRecordError(f"{where}: length CRC mismatch (corrupted header)")
    return _LEN.unpack_from(header, 0)[0]


def _check_data(body: bytes, length: int, where: str) -> bytes:
    """Returns the data of `data + masked CRC` after checking the CRC."""
    data = body[:length]
    if masked_crc32c(data) != _CRC.unpack_from(body, length)[0]:
        raise CorruptRecordError(f"{where}: data CRC mismatch (corrupted record)")
    return data


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: str) -> str:
    path = str(path)
    return path[len("file://") :] if path.startswith("file://") else path


class TFRecordWriter:
    """Writes one TFRecord shard and its offset index, atomically.

    Both files are written under temporary names and renamed to `path` and
    `path + ".index"` only when the writer is closed without an exception, so an interrupted
    run never leaves a partial file under a final name. Local paths only.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        """Opens the temporary file.

        Args:
          path: final shard path (local).
        """
        self.path = os.fspath(path)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp = self.path + tag
        self._tmp_index = self.path + INDEX_SUFFIX + tag
        self._file: io.BufferedWriter | None = open(self._tmp, "wb")
        self._offsets: list[tuple[int, int]] = []
        self._pos = 0

    def write(self, record: bytes) -> None:
        """Appends one record (already serialized, e.g. by `encode_example`)."""
        if self._file is None:
            raise ValueError(f"{self.path}: writer is closed")
        framed = frame_record(record)
        self._file.write(framed)
        self._offsets.append((self._pos, len(framed)))
        self._pos += len(framed)

    def __len__(self) -> int:
        return len(self._offsets)

    def close(self) -> None:
        """Flushes, fsyncs and renames shard and index to their final names."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        with open(self._tmp_index, "w") as f:
            f.write("".join(f"{o} {n}\n" for o, n in self._offsets))
            f.flush()
            os.fsync(f.fileno())
        # Index first: a shard under its final name always has its index beside it.
        os.replace(self._tmp_index, self.path + INDEX_SUFFIX)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Closes and deletes the temporary files; nothing appears under the final names."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for p in (self._tmp, self._tmp_index):
            if os.path.exists(p):
                os.remove(p)

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_index(path: str) -> np.ndarray:
    """Reads `path + ".index"`.

    Args:
      path: shard path.

    Returns:
      (num_records, 2) int64 array of byte offset and framed length.
    """
    try:
        with fsspec.open(str(path) + INDEX_SUFFIX, "rt") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise CorruptRecordError(f"{path}{INDEX_SUFFIX}: missing (the shard's index)") from e
    rows = [line.split() for line in text.splitlines() if line.strip()]
    try:
        index = np.array(rows, dtype=np.int64).reshape(-1, 2)
    except ValueError as e:
        raise CorruptRecordError(f"{path}{INDEX_SUFFIX}: not an 'offset length' index: {e}") from e
    return index


class ShardReader:
    """Random access to the records of one shard through its offset index.

    Thread-safe; picklable (file handles are reopened lazily after unpickling), so it can
    live inside a grain data source used by worker processes.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        """Reads the index; the shard itself is opened on first read.

        Args:
          path: shard path, local or an fsspec URL such as gs://bucket/train-00000-of-00004.tfrecord.
        """
        self.path = os.fspath(path) if not isinstance(path, str) else path
        self._index = read_index(self.path)
        self._fd: int | None = None
        self._file: Any = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index)

    @property
    def index(self) -> np.ndarray:
        """(num_records, 2) offsets and framed lengths."""
        return self._index

    def _pread(self, offset: int, size: int) -> bytes:
        if _is_local(self.path):
            if self._fd is None:
                with self._lock:
                    if self._fd is None:
                        try:
                            self._fd = os.open(_local(self.path), os.O_RDONLY)
                        except FileNotFoundError as e:
                            raise CorruptRecordError(f"{self.path}: missing") from e
            return os.pread(self._fd, size, offset)
        with self._lock:
            if self._file is None:
                try:
                    self._file = fsspec.open(self.path, "rb").open()
                except FileNotFoundError as e:
                    raise CorruptRecordError(f"{self.path}: missing") from e
            self._file.seek(offset)
            return self._file.read(size)

    def read(self, i: int) -> bytes:
        """Returns record i's data after checking length and both CRCs.

        Raises:
          IndexError: i out of range.
          CorruptRecordError: framing/CRC mismatch; the message names the shard and record i.
        """
        n = len(self._index)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: record {i} out of range (shard has {n})")
        i %= n
        offset, size = (int(v) for v in self._index[i])
        buf = self._pread(offset, size)
        return self._check(buf, i, size)

    def _check(self, buf: bytes, i: int, size: int) -> bytes:
        where = f"{self.path}: record {i}"
        if len(buf) != size or size < _HEADER + 4:
            raise CorruptRecordError(f"{where}: truncated (read {len(buf)} of {size} bytes)")
        length = _check_header(buf[:_HEADER], where)
        if length != size - _HEADER - 4:
            raise CorruptRecordError(
                f"{where}: length field {length} disagrees with the index ({size - _HEADER - 4})"
            )
        return _check_data(buf[_HEADER:], length, where)

    def __iter__(self) -> Iterator[bytes]:
        for i in range(len(self)):
            yield self.read(i)

    def close(self) -> None:
        """Closes the open file, if any (reading again reopens it)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path, "_index": self._index}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fd = None
        self._file = None
        self._lock = threading.Lock()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
    """Reads a TFRecord file sequentially without its index (CRCs checked).

    Args:
      path: shard path, local or fsspec URL.

    Yields:
      Each record's data in file order.
    """
    path = os.fspath(path) if not isinstance(path, str) else path
    with fsspec.open(path, "rb") as f:
        i = 0
        while header := f.read(_HEADER):
            where = f"{path}: record {i}"
            if len(header) < _HEADER:
                raise CorruptRecordError(f"{where}: truncated header")
            length = _check_header(header, where)
            body = f.read(length + 4)
            if len(body) != length + 4:
                raise CorruptRecordError(f"{where}: truncated data")
            yield _check_data(body, length, where)
            i += 1


# --------------------------------------------------------------------------------------------
# Records folder
# --------------------------------------------------------------------------------------------


def shard_name(split: str, i: int, n: int) -> str:
    """`{split}-{i:05d}-of-{n:05d}.tfrecord`."""
    return f"{split}-{i:05d}-of-{n:05d}.tfrecord"


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if not _is_local(root) else os.path.join(root, name)


def load_dataset_info(records_dir: str | os.PathLike) -> dict:
    """Reads `dataset_info.json` of a records folder.

    Args:
      records_dir: folder written by `python -m data_prep.build_records` (local or URL).

    Returns:
      The parsed JSON: `classes`, `splits` (per split `num_records`, `num_failures`,
      `shards` with `file` and `num_records`), `hht_settings`, `tool`, ...
    """
    path = _join(os.fspath(records_dir), DATASET_INFO)
    try:
        with fsspec.open(path, "rt") as f:
            info = json.load(f)
    except NotADirectoryError as e:
        raise NotADirectoryError(
            f"{records_dir} is a file, not a records folder: give the folder that "
            "`python -m data_prep.build_records` wrote"
        ) from e
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{path} not found: {records_dir} is not a records folder built by "
            "`python -m data_prep.build_records` (or the build did not finish)"
        ) from e
    except ImportError as e:  # fsspec's protocol for a URL is not installed
        raise ImportError(f"reading {records_dir}: {e} (pip install -e '.[gcs]')") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetInfoError(f"{path} is not valid JSON ({e})") from e
    problem = _info_problem(info)
    if problem:
        raise DatasetInfoError(f"{path}: {problem}")
    return info


def _info_problem(info: Any) -> str | None:
    """What a parsed dataset_info.json lacks that readers rely on, or None."""
    if not isinstance(info, dict):
        return f"holds a {type(info).__name__}, not the object build_records writes"
    classes, splits = info.get("classes"), info.get("splits")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of class names"
    if not isinstance(splits, dict):
        return "'splits' is not an object of splits"
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(
            isinstance(sh, dict)
            and isinstance(sh.get("file"), str)
            and isinstance(sh.get("num_records"), int)
            for sh in shards
        ):
            return f"split {name!r} has no 'shards' list of {{'file', 'num_records'}}"
        held = sum(sh["num_records"] for sh in shards)
        if "num_records" in split and split["num_records"] != held:
            return (
                f"split {name!r} says num_records {split['num_records']!r}, its shards hold {held}"
            )
    return None


def missing_files(records_dir: str | os.PathLike, info: dict, splits) -> list[str]:
    """The shards and shard indexes of ``splits`` that dataset_info.json lists but the folder
    lacks (a copy cut short, a shard deleted): checked before training, where a missing test
    shard used to surface only after the whole run."""
    root = os.fspath(records_dir)
    paths = [
        _join(root, shard["file"]) + suffix
        for split in splits
        for shard in info["splits"].get(split, {}).get("shards", [])
        for suffix in ("", INDEX_SUFFIX)
    ]
    if _is_local(root):
        return [p for p in paths if not os.path.isfile(_local(p))]
    fs, _ = fsspec.core.url_to_fs(root)
    name = fs._strip_protocol  # "gs://b/r/x" and the listing's "b/r/x" alike
    try:  # one listing a folder rather than a request a file
        there = set()
        for folder in {name(p).rsplit("/", 1)[0] for p in paths}:
            fs.invalidate_cache(folder)  # gcsfs keeps listings for the process: a copy since
            try:
                there.update(map(name, fs.ls(folder, detail=False)))
            except FileNotFoundError:
                pass
        return [p for p in paths if name(p) not in there]
    except OSError:  # may read the files but not list them (gcsfs: "Forbidden", a 403)
        pass
    missing = []
    for p in paths:  # not fs.exists, which reads a refused request as a missing file
        try:
            fs.info(p)
        except FileNotFoundError:
            missing.append(p)
    return missing


class RecordSource:
    """All shards of one split, as a random-access source of decoded examples.

    Implements `__len__` and `__getitem__`, so it serves directly as a grain
    RandomAccessDataSource; picklable for grain's worker processes.
    """

    def __init__(self, records_dir: str | os.PathLike, split: str) -> None:
        """Reads dataset_info.json; shard indexes are read on first access.

        Args:
          records_dir: records folder (local or URL).
          split: split name, e.g. "train".

        Raises:
          KeyError: the split is not in the folder (message lists the ones that are).
        """
        self.records_dir = os.fspath(records_dir)
        self.split = split
        self.info = load_dataset_info(self.records_dir)
        splits = self.info["splits"]
        if split not in splits:
            raise KeyError(
                f"split {split!r} not in {self.records_dir} (has: {', '.join(sorted(splits))})"
            )
        shards = splits[split]["shards"]
        self.shard_paths = [_join(self.records_dir, s["file"]) for s in shards]
        self._starts = np.cumsum([0] + [s["num_records"] for s in shards]).tolist()
        self._readers: list[ShardReader | None] = [None] * len(shards)
        self._lock = threading.Lock()

    @property
    def classes(self) -> list[str]:
        """Class names; label i is classes[i]."""
        return list(self.info["classes"])

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range ({self.split} has {n})")
        i %= n
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def locate(self, i: int) -> tuple[str, int]:
        """Maps global record i to (shard path, record number inside that shard)."""
        shard, local = self._locate(i)
        return self.shard_paths[shard], local

    def _reader(self, shard: int) -> ShardReader:
        reader = self._readers[shard]
        if reader is None:
            with self._lock:
                reader = self._readers[shard]
                if reader is None:
                    reader = ShardReader(self.shard_paths[shard])
                    expected = self._starts[shard + 1] - self._starts[shard]
                    if len(reader) != expected:
                        raise CorruptRecordError(
                            f"{reader.path}: index has {len(reader)} records, "
                            f"{DATASET_INFO} says {expected}"
                        )
                    self._readers[shard] = reader
        return reader

    def read(self, i: int) -> bytes:
        """Serialized Example of global record i (CRC checked)."""
        shard, local = self._locate(i)
        return self._reader(shard).read(local)

    def __getitem__(self, i: int) -> dict[str, list[bytes] | np.ndarray]:
        return decode_example(self.read(i))

    def close(self) -> None:
        """Closes all open shard files."""
        for r in self._readers:
            if r is not None:
                r.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_readers"] = [None] * len(self._readers)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"RecordSource({self.records_dir!r}, {self.split!r}: {len(self)} records in "
            f"{len(self.shard_paths)} shards)"
        )
