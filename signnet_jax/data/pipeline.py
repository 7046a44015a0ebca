"""grain input pipeline: H&HT TFRecords -> uint8 clip batches, per host.

Train: a global shuffle of the split, fresh every epoch (grain derives each
epoch's permutation from ``seed + epoch``), the reference random clip and
augmentation per element (grain's per-index generator, so every element's
randomness depends only on the seed and its position in the global stream),
then each process takes every ``process_count``-th element of that stream and
batches its share. The stream is endless; the trainer decides the number of
steps (``steps_per_epoch``). Every process therefore runs the same steps, and
the batches are the same for any ``num_workers``/``num_threads``.

Eval (``mode='val'``: one centred clip, short side resized, centre crop;
``mode='test'``: ``num_segment`` clips x ``num_crop`` crops): the views of all
videos are laid out video-major, padded with blank invalid views to a multiple
of the global batch and dealt round-robin to the processes, so every view is
produced exactly once across processes and every process runs
``EvalInfo.num_steps`` steps.

A resumed run builds its stream with ``start_batch`` (the batches it already used),
which continues with exactly the batches an uninterrupted run would have produced,
whatever the worker and process counts. The iterators are grain
``DatasetIterator``s: their ``get_state()`` / ``set_state()`` do the same for an
iterator built with the same arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import cv2
import grain
import jax
import numpy as np
from absl import flags

from signnet_jax.data import augment, sampling
from signnet_jax.data.records import DATASET_INFO, CorruptRecordError, RecordSource

EVAL_MODES = ("val", "test")


def _first(element: dict, key: str, where: str) -> Any:
    value = element.get(key)
    if value is None or len(value) == 0:
        raise ValueError(f"{where}: feature {key!r} missing; rebuild the records with data_prep")
    return value[0]


def _label(element: dict, where: str, located) -> int:
    """The record's label, refused (as a damaged record) when its folder's class list has no
    such class: the head would index past its last class. ``located``: a ``_Located`` (a
    record of a folder), or any callable naming the record (predict's video, no label)."""
    label = int(_first(element, "label", where))
    source = getattr(located, "source", None)
    if source is None:
        return label
    classes = len(source.info["classes"])
    if not 0 <= label < classes:
        raise CorruptRecordError(
            f"{where}: label {label} is out of range for the {classes} classes of its "
            f"{DATASET_INFO}"
        )
    return label


class _Located:
    """Names a record in error messages: shard file, record number, video id."""

    def __init__(self, source: RecordSource):
        self.source = source

    def __call__(self, index: int, element: dict | None = None) -> str:
        path, local = self.source.locate(index)
        vid = ""
        if element is not None and element.get("video_id"):
            vid = f" (video {element['video_id'][0].decode('utf-8', 'replace')})"
        return f"{path}: record {local}{vid}"


def record_name(records_dir: str, split: str, index: int) -> str:
    """Names record ``index`` of a split for a message: its shard, number and video id."""
    source = RecordSource(records_dir, split)
    try:
        return _Located(source)(index, source[index])
    finally:
        source.close()


class IndexedSource:
    """RecordSource whose elements also carry their global record index."""

    def __init__(self, source: RecordSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        element = self.source[index]
        element["index"] = index
        return element

    def __repr__(self) -> str:
        return f"IndexedSource({self.source!r})"


def _frames(element: dict, where: str) -> list[bytes]:
    frames = element.get("frames") or []
    declared = element.get("num_frames")
    if len(frames) == 0:
        raise ValueError(f"{where}: record has no frames")
    if declared is not None and len(declared) and int(declared[0]) != len(frames):
        raise ValueError(
            f"{where}: num_frames says {int(declared[0])} but the record holds {len(frames)} frames"
        )
    return frames


class TrainClip(grain.transforms.RandomMap):
    """Record -> ``repeated_aug`` augmented clips of one random window."""

    def __init__(
        self,
        located: _Located,
        clip_len: int,
        sampling_rate: int,
        options: augment.AugmentOptions,
        repeated_aug: int,
    ):
        self.located = located
        self.clip_len = clip_len
        self.sampling_rate = sampling_rate
        self.options = options
        self.repeated_aug = repeated_aug

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        where = self.located(element["index"], element)
        frames = _frames(element, where)
        # Like the reference (num_sample > 1), the repeats share the decoded window
        # and differ in their spatial augmentation.
        idx = sampling.train_indices(len(frames), self.clip_len, self.sampling_rate, rng)
        clip = augment.decode_frames(frames, idx, where=where)
        clips, boxes = [], []
        for _ in range(self.repeated_aug):
            out, box = augment.augment_train_clip(clip, rng, self.options)
            clips.append(out)
            boxes.append(box)
        r = self.repeated_aug
        return {
            # A view when there is one repeat: batching copies the clip anyway.
            "clip": clips[0][None] if r == 1 else np.stack(clips),
            "erase_box": np.stack(boxes),
            "label": np.full(r, _label(element, where, self.located), np.int32),
            "video_index": np.full(r, element["index"], np.int32),
        }


class _EpochPrefix(grain.MapDataset):
    """Element k of an endless stream whose epochs are the first ``used`` of ``length``."""

    def __init__(self, parent: grain.MapDataset, length: int, used: int):
        super().__init__(parent)
        self._length, self._used = length, used

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._used)
        return self._parent[epoch * self._length + position]

    def __str__(self) -> str:
        return f"EpochPrefix(used={self._used} of {self._length})"


def _flatten_repeats(batch: dict) -> dict:
    """(B, R, ...) -> (B * R, ...): repeats of a video stay adjacent."""
    return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class EvalInfo:
    """Size of an eval pass."""

    num_videos: int
    views_per_video: int
    num_views: int  # real views, num_videos * views_per_video
    num_steps: int  # batches every process runs
    batch_size: int  # per process


class EvalViews:
    """Random-access source of eval views, padded to ``length``; view g is
    (video g // V, segment (g % V) // num_crop, crop g % num_crop)."""

    def __init__(self, source: RecordSource, num_segment: int, num_crop: int, length: int):
        self.source = source
        self.num_segment = num_segment
        self.num_crop = num_crop
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, g: int) -> dict:
        per_video = self.num_segment * self.num_crop
        video, view = divmod(g, per_video)
        element = {"video": video, "segment": view // self.num_crop, "crop": view % self.num_crop}
        element["valid"] = video < len(self.source)
        element["record"] = self.source[video] if element["valid"] else None
        return element


class EvalClip(grain.transforms.Map):
    """Eval view -> uint8 clip (blank for padding views)."""

    def __init__(
        self,
        located: _Located,
        mode: str,
        clip_len: int,
        sampling_rate: int,
        num_segment: int,
        num_crop: int,
        short_side_size: int,
        crop_size: int,
    ):
        self.located = located
        self.mode = mode
        self.clip_len = clip_len
        self.sampling_rate = sampling_rate
        self.num_segment = num_segment
        self.num_crop = num_crop
        self.short_side_size = short_side_size
        self.crop_size = crop_size
        self.out_size = short_side_size if mode == "test" else crop_size

    def map(self, element: dict) -> dict:
        out = {
            "label": np.int32(-1),
            "video_index": np.int32(element["video"]),
            "segment": np.int32(element["segment"]),
            "crop": np.int32(element["crop"]),
            "valid": np.bool_(element["valid"]),
        }
        if not element["valid"]:
            out["video_index"] = np.int32(-1)
            out["clip"] = np.zeros((self.clip_len, self.out_size, self.out_size, 3), np.uint8)
            return out
        record = element["record"]
        where = self.located(element["video"], record)
        frames = _frames(record, where)
        out["label"] = np.int32(_label(record, where, self.located))
        if self.mode == "test":
            idx = sampling.test_indices(
                len(frames), self.clip_len, self.sampling_rate, self.num_segment, element["segment"]
            )
        else:
            idx = sampling.val_indices(len(frames), self.clip_len, self.sampling_rate)
        clip = augment.decode_frames(frames, idx, where=where)
        h, w = sampling.short_side_resize_shape(clip.shape[1], clip.shape[2], self.short_side_size)
        if min(clip.shape[1:3]) != self.short_side_size:
            clip = augment.resize_clip(clip, h, w)
        h, w = clip.shape[1:3]
        if self.mode == "test":
            top, left = sampling.test_crop_offset(
                h, w, self.short_side_size, self.num_crop, element["crop"]
            )
        else:
            top, left = sampling.center_crop_offset(h, w, self.crop_size)
        s = self.out_size
        out["clip"] = np.ascontiguousarray(clip[:, top : top + s, left : left + s])
        return out


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} outside [0, {pc})")
    return pi, pc


def _per_process(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    return global_batch_size // process_count


def _init_worker(worker_index: int, worker_count: int) -> None:
    # Workers already use every core between them; OpenCV's own thread pool in each
    # would oversubscribe the machine.
    cv2.setNumThreads(1)
    # A preemption (SLURM, systemd, a TPU VM's shutdown) sends SIGTERM to the whole process
    # group: the trainer saves and closes its pipelines, so a worker must not die first
    # (grain would raise on the next batch). Closing stops workers with an event, then SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Ctrl-C in a terminal reaches the whole process group too: the trainer stops and closes
    # its pipelines, so workers leave it to the trainer instead of each printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A trainer killed outright (kill -9, the OOM killer) cannot close its workers, and grain's
    # would wait for it forever, holding their memory: they leave when it is gone.
    # (the parent's pid as spawn recorded it: the trainer may be gone already)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.pid,), daemon=True).start()


def _exit_with(parent: int, every: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def _to_iter(ds: grain.MapDataset, num_workers: int, num_threads: int, prefetch: int):
    # Elements are whole batches, so workers and threads never change batch contents.
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
    if num_workers > 0:
        # grain's worker start-up reads absl flags; outside an absl app (tests,
        # notebooks) they are unparsed, so use their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch),
            worker_init_fn=_init_worker,
        ).map(_unnamed)
    return it


def _unnamed(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch from grain's workers with the names of its shared memory blocks removed.

    Its arrays stay mapped, and the memory is freed once the last of them goes, whenever
    that is. JAX on the CPU shares an array's memory instead of copying it, and lets go of
    it when its own work is done: a block freed after the pipeline's ``release`` would keep
    its name to the process's exit, where Python's resource tracker unlinks it and warns of
    "leaked shared_memory objects". Batches still in grain's buffers keep theirs, for
    ``release`` to unlink.
    """
    for leaf in jax.tree.leaves(batch):
        if isinstance(leaf, grain.multiprocessing.SharedMemoryArray) and leaf._unlink_on_del:
            leaf.shm.unlink()  # the name only (and the resource tracker's note of it)
            leaf._unlink_on_del = False
    return batch


def release(iterator, num_workers: int) -> None:
    """Close a pipeline iterator (at the end of a pass, or on an error) and free its batches.

    Closing stops the worker processes and unlinks the shared memory of the batches they had
    prefetched. A finite pipeline (eval) needs more with grain's (0.2.18) worker processes: when a
    worker's share ends, grain's prefetch thread in this process receives its StopIteration and
    keeps it in a reference cycle (``ProcessPrefetchDatasetIterator.__next__`` raises the
    ``err`` it holds as a local) whose traceback holds the thread's frame and in it the
    worker's last batch. Its shared memory is only unlinked once the cyclic garbage collector
    runs; uncollected at exit it is reported by Python's resource tracker as "leaked
    shared_memory objects". So collect the cycles here (a full collection, some 0.2 s), and
    wait for grain's deletion thread (one thread, first in first out) to unlink what was freed:
    a process that exits right after a pass (eval mode) would otherwise stop it mid-queue.
    """
    iterator.close()
    if num_workers > 0:
        unlink_freed()


def unlink_freed() -> None:
    """Unlink the shared memory of batches no longer referenced (``release``'s second half).

    A command that stops on a Ctrl-C calls this once the KeyboardInterrupt is handled: its
    traceback held the frames of the step, and in them the batches.
    """
    gc.collect()
    deletions = getattr(grain.multiprocessing.SharedMemoryArray, "_del_thread_pool", None)
    if deletions is not None:  # grain 0.2.18's; without it, blocks are unlinked at once
        deletions.apply(int)  # returns after every deletion queued before it


@contextlib.contextmanager
def released(iterator, num_workers: int):
    """``release`` the iterator when the block ends, however it ends (a Ctrl-C, a stop)."""
    try:
        yield iterator
    finally:
        release(iterator, num_workers)


def steps_per_epoch(num_videos: int, global_batch_size: int) -> int:
    """Training steps per epoch (full batches only, like the reference's drop_last)."""
    return num_videos // global_batch_size


def train_dataset(
    records_dir: str,
    split: str = "train",
    *,
    global_batch_size: int,
    seed: int,
    clip_len: int = 32,
    sampling_rate: int = 2,
    augment_options: augment.AugmentOptions | None = None,
    repeated_aug: int = 1,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    num_threads: int = 2,
    prefetch: int = 2,
    epoch_batch_size: int | None = None,
    start_batch: int = 0,
) -> grain.IterDataset:
    """Endless training stream of this process's batches.

    Args:
      records_dir: records folder (local or gs://).
      split: split name.
      global_batch_size: videos per step over all processes.
      seed: shuffle and augmentation seed (same on every process).
      clip_len: frames per clip.
      sampling_rate: temporal stride.
      augment_options: crop size, flip mode, RandAugment, erasing (default: SignNet recipe).
      repeated_aug: augmented clips per video per step (the recipe's 2).
      process_index, process_count: default ``jax.process_index()/process_count()``.
      num_workers: grain worker processes (0: in this process).
      num_threads: threads per process building batches (0: built inside next()).
      prefetch: batches buffered per worker / thread pool.
      epoch_batch_size: videos per optimizer update when it is several batches (gradient
        accumulation); each epoch uses its whole updates' worth of videos (default:
        global_batch_size).
      start_batch: batches already used (a resumed run: its videos so far /
        global_batch_size); the stream starts after them. Unlike an iterator state, this
        holds for any worker or process count.

    Returns:
      IterDataset of dicts, B = global_batch_size / process_count * repeated_aug:
      ``clip`` uint8 (B, clip_len, crop, crop, 3), ``erase_box`` int32 (B, 4)
      top/left/height/width (height 0: no erasing), ``label`` int32 (B,),
      ``video_index`` int32 (B,).
    """
    options = augment_options or augment.AugmentOptions()
    if repeated_aug < 1:
        raise ValueError(f"repeated_aug must be >= 1, got {repeated_aug}")
    pi, pc = _process(process_index, process_count)
    per_process = _per_process(global_batch_size, pc)
    source = RecordSource(records_dir, split)
    if len(source) == 0:
        raise ValueError(f"split {split!r} of {records_dir} has no records")
    augment.check_flip_layout(options.flip, source.info.get("hht_settings"), records_dir)
    located = _Located(source)
    # Like the reference's DataLoader (drop_last, a new permutation each epoch), each epoch
    # uses the first whole global batches of its own permutation and drops the rest, so
    # the trainer's epochs (steps_per_epoch) and the data's never drift apart.
    shuffled = grain.MapDataset.source(IndexedSource(source)).shuffle(seed=seed).repeat()
    epoch_batch = epoch_batch_size or global_batch_size
    used = steps_per_epoch(len(source), epoch_batch) * epoch_batch
    if used == 0:
        raise ValueError(
            f"a batch of {epoch_batch} videos exceeds the {len(source)} of split {split!r} "
            f"in {records_dir}; lower the batch size"
        )
    ds = _EpochPrefix(shuffled, len(source), used).random_map(
        TrainClip(located, clip_len, sampling_rate, options, repeated_aug), seed=seed
    )
    # Process p takes every pc-th batch of per_process consecutive videos: its part of each
    # global batch is the p-th contiguous block, so the processes' parts concatenated in
    # process order (the order of the batch slots of sharding.make_mesh's mesh: each host's
    # devices together, hosts in process order) are the one-process batch, and the
    # device-side randomness indexed by batch row (erasing noise, drop path) meets the same
    # videos whatever the process count.
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    ds = ds.batch(per_process, drop_remainder=True)[pi::pc][start_batch:]
    ds = ds.map(_flatten_repeats)
    return _to_iter(ds, num_workers, num_threads, prefetch)


def eval_dataset(
    records_dir: str,
    split: str,
    *,
    mode: str = "test",
    global_batch_size: int,
    clip_len: int = 32,
    sampling_rate: int = 2,
    num_segment: int = 1,
    num_crop: int = 1,
    short_side_size: int = 224,
    crop_size: int = 224,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    num_threads: int = 2,
    prefetch: int = 2,
) -> tuple[grain.IterDataset, EvalInfo]:
    """One pass over every view of a split, padded and sharded over processes.

    Args:
      records_dir: records folder (local or gs://).
      split: split name.
      mode: ``val`` (reference validation: one centred clip, resize + centre crop to
        ``crop_size``) or ``test`` (``num_segment`` x ``num_crop`` views of
        ``short_side_size`` squares).
      global_batch_size: views per step over all processes.
      clip_len, sampling_rate: temporal sampling.
      num_segment, num_crop: test views per video (ignored for ``val``).
      short_side_size: frames are resized so their short side has this length.
      crop_size: validation crop.
      process_index, process_count: default ``jax.process_index()/process_count()``.
      num_workers, num_threads, prefetch: as for ``train_dataset``.

    Returns:
      (IterDataset of dicts with ``clip`` uint8 (B, clip_len, S, S, 3), ``label``,
      ``video_index`` (-1 on padding), ``segment``, ``crop`` int32 (B,), ``valid`` bool (B,);
      EvalInfo).
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"eval mode {mode!r} is not one of {EVAL_MODES}")
    if mode == "val":
        num_segment = num_crop = 1
    if num_segment < 1 or num_crop < 1:
        raise ValueError(f"num_segment ({num_segment}) and num_crop ({num_crop}) must be >= 1")
    if mode == "val" and crop_size > short_side_size:
        raise ValueError(f"crop_size {crop_size} exceeds short_side_size {short_side_size}")
    pi, pc = _process(process_index, process_count)
    per_process = _per_process(global_batch_size, pc)
    source = RecordSource(records_dir, split)
    per_video = num_segment * num_crop
    num_views = len(source) * per_video
    num_steps = math.ceil(num_views / global_batch_size)
    views = EvalViews(source, num_segment, num_crop, num_steps * global_batch_size)
    transform = EvalClip(
        _Located(source),
        mode,
        clip_len,
        sampling_rate,
        num_segment,
        num_crop,
        short_side_size,
        crop_size,
    )
    ds = grain.MapDataset.source(views)[pi::pc].map(transform).batch(per_process)
    info = EvalInfo(len(source), per_video, num_views, num_steps, per_process)
    return _to_iter(ds, num_workers, num_threads, prefetch), info
