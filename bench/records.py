"""Benchmark of the dataset builder and the record reader.

python bench/records.py [--videos 8] [--workers 0] [--reads 2000]
python bench/records.py --landmark-cache [--videos 8] [--repeats 3]

Builder: copies of shared/assets/sign_sample.mp4 (76 frames, 256x256) go through the real
H&HT; reported is where the wall time went: H&HT itself (Tunneller.process_video), the
Tunneller's creation per video, and the builder's own overhead (probing, JPEG encoding,
caching, shard writing, bookkeeping) as a fraction of the total. With --workers 0 all of it
runs in this process, so the fractions add up exactly.

Landmark cache (--landmark-cache): the paper's ablation build (quadrants 1011) of spans of
the sample, with and without MediaPipe's landmarks kept from a first build (1111), timed side
by side (the minimum of --repeats), and the first build's cost of keeping them.

Reader: random-order reads through RecordSource (index lookup + pread + both CRCs) and the
same plus tf.train.Example parsing, in one process, over shards of the built records.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.options import positive  # noqa: E402
from data_prep import build_records, manifests  # noqa: E402
from signnet_jax.data import records  # noqa: E402


def bench_build(root: pathlib.Path, sample: pathlib.Path, n: int, workers: int) -> dict:
    """Builds n copies of the sample and returns the time split."""
    from signnet_jax.hht import HHTSettings

    videos = root / "videos"
    videos.mkdir()
    for i in range(n):
        shutil.copyfile(sample, videos / f"{i:05d}.mp4")
    manifest = manifests.Manifest(
        ["sign"],
        [manifests.Entry("train", f"{i:05d}", f"{i:05d}.mp4", 0, "sign") for i in range(n)],
    )
    hht = HHTSettings().to_dict()
    models = os.environ.get("SIGNNET_MEDIAPIPE_MODELS")
    t0 = time.perf_counter()
    result = build_records.build(
        manifest,
        videos,
        root / "records",
        hht_settings=hht,
        tunneller_factory=build_records._HHTFactory(hht, models),
        workers=workers,
        progress=False,
    )
    wall = time.perf_counter() - t0
    assert result.num_records == n, result.failures
    # In-process, wall time is the total; with workers, add up worker time and the serial
    # shard writing instead (the workers run on several cores at once).
    total = wall if workers == 0 else result.video_seconds + result.shard_seconds
    overhead = total - result.hht_seconds - result.setup_seconds
    frames = n * 76
    return {
        "videos": n,
        "workers": workers,
        "wall_s": wall,
        "videos_per_s": n / wall,
        "frames_per_s": frames / wall,
        "hht_s": result.hht_seconds,
        "tunneller_setup_s": result.setup_seconds,
        "builder_overhead_s": overhead,
        "shard_write_s": result.shard_seconds,
        "overhead_fraction": overhead / total,
        "setup_fraction": result.setup_seconds / total,
        "record_mb": sum(
            s["num_bytes"]
            for s in records.load_dataset_info(root / "records")["splits"]["train"]["shards"]
        )
        / n
        / 1e6,
    }


def bench_landmark_cache(root: pathlib.Path, sample: pathlib.Path, n: int, repeats: int) -> dict:
    """In-process builds of n spans of the sample (frames i..76: n distinct landmark files):
    with settings 1111, without and with a landmark cache (filling it); then 1011, without
    and with the filled cache. Seconds are the minimum over repeats (each into new folders;
    the cache is filled anew each repeat, then read)."""
    from signnet_jax.hht import HHTSettings

    videos = root / "videos"
    videos.mkdir(exist_ok=True)
    shutil.copyfile(sample, videos / "sample.mp4")
    manifest = manifests.Manifest(
        ["sign"],
        [manifests.Entry("train", f"{i:05d}", "sample.mp4", 0, "sign", i + 1) for i in range(n)],
    )
    models = os.environ["SIGNNET_MEDIAPIPE_MODELS"]
    full = HHTSettings().to_dict()
    ablation = HHTSettings(quadrants=(True, False, True, True)).to_dict()
    times: dict[str, list[float]] = {}
    shards: dict[str, set[bytes]] = {}  # per quadrants: the distinct shards the builds wrote
    read = []
    for r in range(repeats):
        cache = build_records.LandmarkCache.create(root / f"landmarks{r}", full, models)
        for name, hht, with_cache in (
            ("full_plain", full, False),
            ("full_filling_cache", full, True),
            ("ablation_plain", ablation, False),
            ("ablation_from_cache", ablation, True),
        ):
            out = root / f"{name}{r}"
            t0 = time.perf_counter()
            result = build_records.build(
                manifest,
                videos,
                out,
                hht_settings=hht,
                tunneller_factory=build_records._HHTFactory(hht, models),
                workers=0,
                progress=False,
                landmark_cache=cache if with_cache else None,
            )
            times.setdefault(name, []).append(time.perf_counter() - t0)
            assert result.num_records == n, result.failures
            shard = (out / records.shard_name("train", 0, 1)).read_bytes()
            shards.setdefault(f"{hht['quadrants']}", set()).add(shard)
            if name == "ablation_from_cache":
                read.append(result.landmarks_read)
    best = {k: min(v) for k, v in times.items()}
    return {
        "videos": n,
        "frames": sum(76 - i for i in range(n)),
        "repeats": repeats,
        **{f"{k}_s": v for k, v in best.items()},
        "ablation_speedup": best["ablation_plain"] / best["ablation_from_cache"],
        "filling_cost": best["full_filling_cache"] / best["full_plain"] - 1,
        # with and without the cache, every repeat: one shard per composition
        "records_identical": all(len(v) == 1 for v in shards.values()),
        "landmarks_read": read,
    }


def bench_read(records_dir: pathlib.Path, copies: int, reads: int) -> dict:
    """Random reads over `copies` x the built records, rewritten as 4 shards."""
    src = records.RecordSource(records_dir, "train")
    datas = [src.read(i) for i in range(len(src))] * copies
    root = records_dir.parent / "reader"
    root.mkdir()
    shards, per = [], -(-len(datas) // 4)
    for s in range(4):
        name = records.shard_name("train", s, 4)
        chunk = datas[s * per : (s + 1) * per]
        with records.TFRecordWriter(root / name) as w:
            for d in chunk:
                w.write(d)
        shards.append({"file": name, "num_records": len(chunk)})
    info = {"classes": ["sign"], "splits": {"train": {"num_records": len(datas), "shards": shards}}}
    (root / records.DATASET_INFO).write_text(json.dumps(info))

    source = records.RecordSource(root, "train")
    rng = random.Random(0)
    order = [rng.randrange(len(source)) for _ in range(reads)]
    source.read(0)  # open files and read indexes outside the timing
    out = {"records": len(source), "reads": reads}
    for name, fn in [("read", source.read), ("read_decode", source.__getitem__)]:
        nbytes = 0
        t0 = time.perf_counter()
        for i in order:
            r = fn(i)
            nbytes += len(r) if isinstance(r, bytes) else sum(map(len, r["frames"]))
        dt = time.perf_counter() - t0
        out[f"{name}_records_per_s"] = reads / dt
        out[f"{name}_mb_per_s"] = nbytes / dt / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8, help="videos to build (default 8)")
    p.add_argument(
        "--workers", type=int, default=0, help="builder worker processes (default 0: in-process)"
    )
    p.add_argument("--reads", type=int, default=2000, help="records read per timing (default 2000)")
    shared = os.environ.get("SIGNNET_SHARED", str(REPO.parent / "shared"))
    p.add_argument(
        "--shared", default=shared,
        help="folder with assets/sign_sample.mp4 and mediapipe_models/ (default: "
        f"$SIGNNET_SHARED, else the repository's sibling shared/; here {shared})",
    )  # fmt: skip
    p.add_argument(
        "--landmark-cache", action="store_true",
        help="time the ablation build with and without a landmark cache instead",
    )  # fmt: skip
    p.add_argument("--repeats", type=positive, default=3, help="with --landmark-cache (default 3)")
    args = p.parse_args()
    shared = pathlib.Path(args.shared)
    os.environ.setdefault("SIGNNET_MEDIAPIPE_MODELS", str(shared / "mediapipe_models"))
    if args.landmark_cache:
        if not 1 <= args.videos <= 60:
            p.error(f"--videos with --landmark-cache: spans of the 76-frame sample, 1..60, got "
                    f"{args.videos}")  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            sample = shared / "assets" / "sign_sample.mp4"
            lc = bench_landmark_cache(pathlib.Path(tmp), sample, args.videos, args.repeats)
        print(json.dumps({"landmark_cache": lc}, indent=1))
        print(
            f"| ablation build (quadrants 1011), {lc['videos']} span{'s' * (lc['videos'] != 1)} "
            f"of sign_sample ({lc['frames']} frames), in-process | "
            f"{lc['ablation_plain_s']:.1f} s without, "
            f"{lc['ablation_from_cache_s']:.1f} s with the landmark cache: "
            f"{lc['ablation_speedup']:.1f}x; filling it cost the first build "
            f"{lc['filling_cost']:+.1%}; records "
            + ("identical |" if lc["records_identical"] else "DIFFER |")
        )
        if not lc["records_identical"] or lc["landmarks_read"] != [args.videos] * args.repeats:
            sys.exit("error: the builds with the landmark cache did not give the same records, or "
                     "did not read every video's landmarks from it")  # fmt: skip
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        build = bench_build(root, shared / "assets" / "sign_sample.mp4", args.videos, args.workers)
        read = bench_read(root / "records", copies=max(1, 200 // args.videos), reads=args.reads)
    print(json.dumps({"build": build, "read": read}, indent=1))
    print(
        f"| builder, {build['videos']} x sign_sample (76 frames), workers {build['workers']} "
        f"| {build['videos_per_s']:.2f} videos/s, {build['frames_per_s']:.0f} frames/s "
        f"| overhead beyond H&HT {build['overhead_fraction']:.1%} "
        f"(Tunneller creation {build['setup_fraction']:.1%}) |"
    )
    print(
        f"| reader, random order, one process | {read['read_records_per_s']:.0f} records/s, "
        f"{read['read_mb_per_s']:.0f} MB/s raw; {read['read_decode_records_per_s']:.0f} "
        f"records/s, {read['read_decode_mb_per_s']:.0f} MB/s with Example parsing |"
    )


if __name__ == "__main__":
    main()
