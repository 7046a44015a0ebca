"""H&HT speed per stage, pinned to one core.

    .venv/bin/python bench/hht.py [--video F] [--repeats 5] [--upscale 1280x720]

Prints a markdown table of ms per source frame (the minimum over repeats: the machine
is shared and noisy) for decode, each MediaPipe model, box logic, composition and
encode, for a series of variants, each adding one change to the one above it; plus
what a new Tunneller and the per-video tracker reset cost. --upscale first makes an
HD copy of the clip (letterboxed), where detecting on a downscaled copy matters.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time

# Pin before MediaPipe starts its threads so they inherit the single core.
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench.options import positive  # noqa: E402
from signnet_jax.hht import HHTSettings, Tunneller, coverage, write_video  # noqa: E402
from signnet_jax.hht.models import ModelFileError, find_models  # noqa: E402
from signnet_jax.hht.video import VideoError, decode_video  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("SIGNNET_SHARED", REPO.parent / "shared"))

# Variants 1-3 each add one change to the one above (3 is the default); 4-6 are
# alternatives to 3.
VARIANTS = [
    ("all 3 models on every frame", dict(gate_hands=False)),
    ("+ hands only where a pose wrist is in view", dict(hand_retry=1)),
    ("+ after a fruitless hand try, wait 3 frames (default)", dict()),
    ("3, detectors see a copy <= 512 px", dict(detect_size=512)),
    ("3, detectors see a copy <= 256 px", dict(detect_size=256)),
    ("faithful (original boxes, hands every frame)", dict(faithful=True)),
]
STAGES = ("decode", "prepare", "pose", "hands", "face", "boxes", "compose", "encode")


def upscaled_copy(video: pathlib.Path, width: int, height: int, directory: str) -> pathlib.Path:
    """The clip scaled to fit width x height and letterboxed, as an H.264 file."""
    frames, fps, _ = decode_video(video)
    h, w = frames.shape[1:3]
    scale = min(width / w, height / h)
    nw, nh = round(w * scale) // 2 * 2, round(h * scale) // 2 * 2
    out = np.zeros((len(frames), height, width, 3), np.uint8)
    x0, y0 = (width - nw) // 2, (height - nh) // 2
    for i, f in enumerate(frames):
        out[i, y0 : y0 + nh, x0 : x0 + nw] = cv2.resize(f, (nw, nh), interpolation=cv2.INTER_CUBIC)
    path = pathlib.Path(directory) / f"upscaled_{width}x{height}.mp4"
    write_video(path, out, fps)
    return path


def run_variant(video, settings, repeats, models, directory):
    """Returns per-stage min ms/frame, min total ms/frame and the last result."""
    best = {k: np.inf for k in STAGES}
    best_total = np.inf
    with Tunneller(settings, models) as tunneller:
        for i in range(repeats + 1):  # the first run warms caches and is dropped
            t0 = time.perf_counter()
            frames, fps, times = decode_video(video)
            decode = time.perf_counter() - t0
            result = tunneller.process_frames(frames, fps, times)
            t0 = time.perf_counter()
            write_video(pathlib.Path(directory) / "out.mp4", result.frames, fps)
            encode = time.perf_counter() - t0
            stages = {"decode": decode, **result.timings, "encode": encode}
            n = len(frames)
            ms = {k: 1000 * stages[k] / n for k in STAGES}
            if i:
                best = {k: min(best[k], ms[k]) for k in STAGES}
                best_total = min(best_total, sum(ms.values()))
    return best, best_total, result


def startup_costs(models, repeats):
    """Seconds to create a Tunneller and to reset its trackers between videos."""
    create, reset = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        t = Tunneller(HHTSettings(), models)
        create.append(time.perf_counter() - t0)
        with t:
            t._used = True
            t0 = time.perf_counter()
            t._reset_trackers()
            reset.append(time.perf_counter() - t0)
    return min(create), min(reset)


def _variants(text: str) -> list[int]:
    """argparse type of --variants: 1-based numbers in, indices into VARIANTS out."""
    numbers = [v.strip() for v in text.split(",")]
    if not all(v.isdigit() and 1 <= int(v) <= len(VARIANTS) for v in numbers):
        raise argparse.ArgumentTypeError(
            f"give comma-separated variant numbers from 1 to {len(VARIANTS)}, not {text!r}"
        )
    return [int(v) - 1 for v in numbers]


def _size(text: str) -> tuple[int, int]:
    """argparse type of --upscale: WxH, both even (H.264 4:2:0)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(v.isdigit() and int(v) > 0 and int(v) % 2 == 0 for v in parts):
        raise argparse.ArgumentTypeError(
            f"give WIDTHxHEIGHT, both even pixel counts, e.g. 1280x720, not {text!r}"
        )
    return int(parts[0]), int(parts[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--video", default=str(SHARED / "assets" / "sign_sample.mp4"),
        help="video to tunnel (default: the shared sign_sample.mp4)",
    )  # fmt: skip
    p.add_argument(
        "--repeats", type=positive, metavar="N", default=5, help="timed runs, best kept (default 5)"
    )
    p.add_argument("--models", default=None, help="default: $SIGNNET_MEDIAPIPE_MODELS / cache")
    p.add_argument(
        "--upscale", type=_size, default=None, metavar="WxH",
        help="time an HD copy of the video instead, e.g. 1280x720 (even sizes)",
    )  # fmt: skip
    p.add_argument(
        "--variants", type=_variants, default=None,
        help=f"comma-separated variant numbers 1-{len(VARIANTS)} (default: all)",
    )  # fmt: skip
    args = p.parse_args()
    if args.models is None and "SIGNNET_MEDIAPIPE_MODELS" not in os.environ:
        os.environ["SIGNNET_MEDIAPIPE_MODELS"] = str(SHARED / "mediapipe_models")
    try:
        find_models(args.models)
    except (FileNotFoundError, ModelFileError) as e:
        p.error(str(e))
    chosen = args.variants or range(len(VARIANTS))
    with tempfile.TemporaryDirectory() as tmp:
        video = pathlib.Path(args.video)
        try:
            if args.upscale:
                video = upscaled_copy(video, *args.upscale, tmp)
            frames, fps, _ = decode_video(video)
        except VideoError as e:  # the message starts with the path
            p.error(f"--video {e}")
        print(
            f"{video.name}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]} @ {fps:g} "
            f"fps; 1 core (cpu {sorted(os.sched_getaffinity(0))}); min of {args.repeats} runs"
        )
        print()
        header = ["variant", *STAGES, "total", "detect", "rest/detect", "R / L located"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for i in chosen:
            name, overrides = VARIANTS[i]
            settings = dataclasses.replace(HHTSettings(), **overrides)
            best, total, result = run_variant(video, settings, args.repeats, args.models, tmp)
            detect = best["prepare"] + best["pose"] + best["hands"] + best["face"]
            rest = best["boxes"] + best["compose"] + best["encode"]
            cov = coverage(result.box_source)
            located = f"{cov['right_hand']['located']} / {cov['left_hand']['located']}"
            cells = [f"{best[k]:.2f}" for k in STAGES]
            row = [f"{i + 1}. {name}", *cells, f"{total:.1f}", f"{detect:.1f}"]
            row += [f"{100 * rest / detect:.1f}%", located]
            print("| " + " | ".join(row) + " |", flush=True)
        create, reset = startup_costs(args.models, 3)
        print()
        print(
            f"new Tunneller: {1000 * create:.0f} ms; tracker reset between videos: "
            f"{1000 * reset:.1f} ms"
        )


if __name__ == "__main__":
    main()
