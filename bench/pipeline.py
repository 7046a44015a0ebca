"""Input pipeline throughput: training clips/s and eval views/s per CPU core.

    python bench/pipeline.py [--videos 16] [--clips 48] [--repeats 5] [--workers 2]

Builds a small records folder in a temporary directory from
shared/assets/sign_sample.mp4 (256x256 frames, JPEG quality 90 as
data_prep writes them, videos of 40-76 frames), then measures on one core
(OpenCV single-threaded, no grain workers):

* train: read + parse the record, sample 32 frames (sampling rate 2), decode,
  full augmentation (RandAugment rand-m7-n4-mstd0.5-inc1, random resized crop to
  224, flip, erase box) -- signnet_jax's OpenCV path, and side by side a
  straightforward per-frame PIL implementation of the same augmentation with the
  same random parameters (the usual PyTorch video-dataset style);
* the same training path through the grain pipeline (batches of 8);
* eval: test views (3 segments x 1 crop, short side 224) through grain.

Each number is the best of ``--repeats`` runs. ``--workers N`` adds the
whole-machine rate with N grain worker processes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import sys
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from signnet_jax.data import augment, pipeline, records, sampling  # noqa: E402
from tests.data.pil_reference import pil_op  # noqa: E402

CLIP_LEN = 32
SAMPLING_RATE = 2
CROP = 224


def _shared_dir() -> pathlib.Path:
    repo = pathlib.Path(__file__).resolve().parents[1]
    return pathlib.Path(os.environ.get("SIGNNET_SHARED", repo.parent / "shared"))


def build_records(root: str, num_videos: int, seed: int = 0) -> None:
    """Shards of sign_sample.mp4 windows (the frames data_prep would store)."""
    video = _shared_dir() / "assets" / "sign_sample.mp4"
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    if not frames:
        sys.exit(f"could not read frames from {video}; set SIGNNET_SHARED to the shared folder")
    rng = np.random.default_rng(seed)
    shard_files = []
    for s, ids in enumerate(np.array_split(np.arange(num_videos), 2)):
        name = records.shard_name("train", s, 2)
        with records.TFRecordWriter(os.path.join(root, name)) as w:
            for k in ids:
                n = int(rng.integers(40, len(frames) + 1))
                start = int(rng.integers(0, len(frames) - n + 1))
                example = {
                    "video_id": f"v{k}",
                    "label": int(k),
                    "gloss": f"g{k}",
                    "frames": frames[start : start + n],
                    "height": 256,
                    "width": 256,
                    "num_frames": n,
                }
                w.write(records.encode_example(example))
        shard_files.append({"file": name, "num_records": len(ids)})
    info = {
        "classes": [f"g{k}" for k in range(num_videos)],
        "splits": {"train": {"num_records": num_videos, "shards": shard_files}},
    }
    with open(os.path.join(root, records.DATASET_INFO), "w") as f:
        json.dump(info, f)


# ------------------------------------------------------------------ per-frame PIL baseline


def pil_train_clip(element: dict, rng: np.random.Generator, options: augment.AugmentOptions):
    """Same sampling and random parameters as pipeline.TrainClip, one PIL frame at a time."""
    frames = element["frames"]
    idx = sampling.train_indices(len(frames), CLIP_LEN, SAMPLING_RATE, rng)
    imgs = [Image.open(io.BytesIO(frames[i])).convert("RGB") for i in idx]
    program = augment.sample_rand_augment(rng, augment.RandAugmentSpec.parse(options.rand_augment))
    for name, arg in program:
        imgs = [pil_op(name, arg, img) for img in imgs]
    top, left, h, w = augment.sample_crop_box(rng, 256, 256, options.scale, options.ratio)
    imgs = [
        img.resize((CROP, CROP), Image.BILINEAR, box=(left, top, left + w, top + h)) for img in imgs
    ]
    if rng.random() < 0.5:
        imgs = [img.transpose(Image.FLIP_LEFT_RIGHT) for img in imgs]
    erase = augment.sample_erase_box(rng, CROP, CROP, options.erase_prob)
    return np.stack([np.asarray(img) for img in imgs]), erase


# ------------------------------------------------------------------ measurements


def best_rates(jobs: dict, repeats: int) -> dict:
    """Items per second of each ``fn()`` in ``jobs`` (name -> (fn, items)), best of
    ``repeats``; the jobs take turns so that load from other processes hits all alike."""
    best = {name: float("inf") for name in jobs}
    for _ in range(repeats):
        for name, (fn, _) in jobs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: items / best[name] for name, (_, items) in jobs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--videos",
        type=int,
        default=16,
        help="records cut from sign_sample.mp4 (>= 8: one batch; default 16)",
    )
    parser.add_argument("--clips", type=int, default=48, help="clips per timed run (default 48)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, best kept (default 5)")
    parser.add_argument("--workers", type=int, default=0, help="also time N grain workers")
    args = parser.parse_args()
    if args.videos < 8:
        parser.error(f"--videos must be >= 8 (the pipeline's batch of 8), got {args.videos}")
    cv2.setNumThreads(1)  # per-core numbers

    with tempfile.TemporaryDirectory() as root:
        build_records(root, args.videos)
        source = records.RecordSource(root, "train")
        indexed = pipeline.IndexedSource(source)
        options = augment.AugmentOptions(crop_size=CROP, flip="plain")
        clip_fn = pipeline.TrainClip(
            pipeline._Located(source), CLIP_LEN, SAMPLING_RATE, options, repeated_aug=1
        )
        n = len(source)

        def fast(count, seed=0):
            for k in range(count):
                clip_fn.random_map(indexed[k % n], np.random.default_rng([seed, k]))

        def slow(count, seed=0):
            for k in range(count):
                pil_train_clip(source[k % n], np.random.default_rng([seed, k]), options)

        # Same parameters, same augmentation: the outputs agree up to interpolation.
        diffs = []
        for k in range(6):
            a = clip_fn.random_map(indexed[k], np.random.default_rng([1, k]))["clip"][0]
            b, _ = pil_train_clip(source[k], np.random.default_rng([1, k]), options)
            diffs.append(np.abs(a.astype(int) - b.astype(int)).mean())

        def train_iter(workers):
            # Without workers: no prefetch thread, so each batch is made inside next()
            # and interleaved timing stays honest.
            ds = pipeline.train_dataset(
                root, global_batch_size=8, seed=0, clip_len=CLIP_LEN,
                sampling_rate=SAMPLING_RATE, augment_options=options, process_index=0,
                process_count=1, num_workers=workers, num_threads=1 if workers else 0,
                prefetch=2 if workers else 0,
            )  # fmt: skip
            it = iter(ds)
            next(it)  # start-up (and worker spawn) outside the timing
            return it

        eval_ds, eval_info = pipeline.eval_dataset(
            root, "train", mode="test", global_batch_size=6, clip_len=CLIP_LEN,
            sampling_rate=SAMPLING_RATE, num_segment=3, num_crop=1, short_side_size=CROP,
            process_index=0, process_count=1, num_threads=0, prefetch=0,
        )  # fmt: skip
        batches = max(args.clips // 8, 1)
        slow_clips = max(args.clips // 3, 4)
        it = train_iter(0)
        jobs = {
            "train clips/s/core, OpenCV path (read+decode+augment)": (
                lambda: fast(args.clips),
                args.clips,
            ),
            "train clips/s/core, per-frame PIL baseline": (lambda: slow(slow_clips), slow_clips),
            "train clips/s/core, grain pipeline (batch 8, in-line)": (
                lambda: [next(it) for _ in range(batches)],
                batches * 8,
            ),
            "eval views/s/core, grain (3 segments x 1 crop, 224)": (
                lambda: list(eval_ds),
                eval_info.num_steps * 6,
            ),
        }
        fast(2)
        slow(2)
        rates = best_rates(jobs, args.repeats)
        if args.workers:
            # Steady state: consume continuously so the worker buffers never fill up
            # while idle; the timed stretch starts and ends with them equally empty.
            it_w = train_iter(args.workers)
            for _ in range(2 * args.workers):
                next(it_w)
            steady = {"w": (lambda: [next(it_w) for _ in range(3 * batches)], 3 * batches * 8)}
            name = f"train clips/s, grain, {args.workers} workers (whole machine)"
            try:
                rates[name] = best_rates(steady, args.repeats)["w"]
            finally:
                it_w.close()  # stops the workers, frees the batches they prefetched
        names = list(jobs)
        ratio = rates[names[0]] / rates[names[1]]
        print(f"clip {CLIP_LEN}x{CROP}x{CROP} from 256x256 JPEG q90, sampling rate 2, "
              f"{args.videos} videos, best of {args.repeats}")  # fmt: skip
        for name, value in rates.items():
            print(f"  {name:62s} {value:7.1f}")
        print(f"  {'speed-up over per-frame PIL':62s} {ratio:7.1f}x")
        print(f"  {'mean |OpenCV - PIL| (grey levels, same parameters)':62s} {np.mean(diffs):7.2f}")
        ok = min(rates[names[0]], rates[names[2]]) >= 10 and ratio >= 3
        print("targets (>= 10 clips/s/core, >= 3x PIL):", "met" if ok else "MISSED")


if __name__ == "__main__":
    main()
