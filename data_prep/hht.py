"""Head & Hands Tunnelling of one video.

    python -m data_prep.hht --video IN.mp4 --output OUT.mp4 [--preview OUT.png]

Writes the tunnelled video (H.264 MP4) and, on request, a contact sheet PNG; prints
progress and, at the end, how many frames have a head / right hand / left hand box,
by source. Exit status 1 on a bad input, with nothing written; 130 on Ctrl-C, with one
line saying what was written.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
import warnings

import cv2
import numpy as np

from signnet_jax.files import (
    atomic_write,
    creation_problem,
    interrupt_as_usual,
    interrupted,
    stamp,
)
from signnet_jax.hht import (
    HHTSettings,
    Tunneller,
    VideoError,
    coverage,
    write_video,
)
from signnet_jax.hht.boxes import SOURCE_NAMES
from signnet_jax.hht.models import ModelFileError
from signnet_jax.hht.preview import contact_sheet
from signnet_jax.hht.settings import LAYOUTS, HHTSettingsError, parse_quadrants
from signnet_jax.hht.video import check_writable, decode_video


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    d = HHTSettings()
    p = argparse.ArgumentParser(
        prog="python -m data_prep.hht", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--video", required=True, help="input video file")
    p.add_argument("--output", required=True, help="output .mp4 (parent folders are created)")
    p.add_argument("--preview", help="also write a contact sheet PNG here")
    p.add_argument(
        "--models",
        help="folder with the MediaPipe model files (default: $SIGNNET_MEDIAPIPE_MODELS, else "
        "~/.cache/signnet_jax/mediapipe, filled by a one-time download)",
    )
    p.add_argument(
        "--layout", choices=LAYOUTS, default=d.layout,
        help=f"cell arrangement (default {d.layout}, the published one)",
    )  # fmt: skip
    p.add_argument(
        "--size", type=int, default=d.size, help=f"output side in pixels, even (default {d.size})"
    )
    p.add_argument(
        "--quadrants",
        default="1111",
        help="four 0/1 flags for frame, head, right hand, left hand, e.g. 1011 or 1,0,1,1 "
        "(ablations); default 1111",
    )
    p.add_argument(
        "--faithful",
        action="store_true",
        help="reproduce the original preprocessing (no fallbacks, black when missing, stretch)",
    )
    p.add_argument("--start-frame", type=int, default=0, help="first frame (default 0)")
    p.add_argument("--end-frame", type=int, default=None, help="exclusive; default: to the end")
    p.add_argument(
        "--detect-size",
        type=int,
        default=d.detect_size,
        help="give the detectors a copy with this longest side (default 0: the frame itself)",
    )
    p.add_argument(
        "--min-confidence", type=float, default=d.min_confidence,
        help=f"MediaPipe detection / presence / tracking threshold in [0, 1] "
        f"(default {d.min_confidence})",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> HHTSettings:
    return HHTSettings(
        layout=args.layout,
        size=args.size,
        quadrants=parse_quadrants(args.quadrants),
        faithful=args.faithful,
        detect_size=args.detect_size,
        min_confidence=args.min_confidence,
    )


def format_coverage(box_source: np.ndarray) -> str:
    """The per-part coverage table printed at the end."""
    n = len(box_source)
    cov = coverage(box_source)
    names = SOURCE_NAMES[1:] + SOURCE_NAMES[:1]
    lines = [
        f"coverage of {n} frames:",
        f"  {'part':<11} {'located':>13}" + "".join(f" {name:>12}" for name in names),
    ]
    for part, counts in cov.items():
        located = f"{counts['located']} ({100 * counts['located'] / n:.0f}%)"
        lines.append(
            f"  {part.replace('_', ' '):<11} {located:>13}"
            + "".join(f" {counts[name]:>12}" for name in names)
        )
    return "\n".join(lines)


def _write_png(path: pathlib.Path, rgb: np.ndarray) -> None:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: could not encode PNG")
    atomic_write(path, png.tobytes())


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (130 on Ctrl-C)."""
    interrupt_as_usual()
    args = parse_args(argv)
    wanted = {p: stamp(p) for p in (args.output, args.preview) if p}
    try:
        return _run(args)
    except KeyboardInterrupt:  # each output is written under a temporary name, then renamed
        written = [p for p, before in wanted.items() if stamp(p) != before]
        if not written:
            return interrupted(f"nothing written at {' or '.join(wanted)}")
        missing = [p for p in wanted if p not in written]
        left = f"wrote {' and '.join(written)}"
        return interrupted(left + (f", not {missing[0]}" if missing else ""))


def _run(args: argparse.Namespace) -> int:
    """``main`` after the options are parsed."""
    try:
        settings = _settings(args)
    except HHTSettingsError as e:
        print(f"error: {e.flag_message()}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.start_frame < 0 or (args.end_frame is not None and args.end_frame <= args.start_frame):
        end = "" if args.end_frame is None else f" --end-frame {args.end_frame}"
        print(
            f"error: --start-frame {args.start_frame}{end}: the first frame must be >= 0 and "
            "before --end-frame",
            file=sys.stderr,
        )
        return 2
    output = pathlib.Path(args.output)
    if output.suffix.lower() != ".mp4":
        print(f"error: --output {output} must end in .mp4", file=sys.stderr)
        return 2
    preview = pathlib.Path(args.preview) if args.preview else None
    if preview is not None and preview.suffix.lower() != ".png":
        print(f"error: --preview {preview} must end in .png", file=sys.stderr)
        return 2
    # checked before the work: a bad output path must not cost the whole run; a missing folder
    # is made only when its file is written, so a run that fails before it leaves none (and
    # removes none another run is about to write in)
    outputs = [(flag, path) for flag, path in (("--output", output), ("--preview", preview))]
    for flag, path in outputs:
        if path is None:
            continue
        if not path.parent.is_dir():
            problem = creation_problem(path)
            if problem:
                print(f"error: cannot create the folder of {flag} {path}: {problem}; choose a "
                      "folder you can write to", file=sys.stderr)  # fmt: skip
                return 1
            continue
        try:
            check_writable(path, flag, source=args.video)
        except VideoError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    bar = None

    def progress(done: int, total: int) -> None:
        # The bar starts with the first frame detected, once the models have loaded: a model
        # error must not come after a progress line.
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            from signnet_jax.progress import progress_bar

            bar = progress_bar(total, "detecting", "frame", leave=False)
        bar.update(done - bar.n)

    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Decoded here rather than by process_video: the contact sheet needs the source.
            source, fps, times = decode_video(args.video, args.start_frame, args.end_frame)
            decode = time.perf_counter() - start
            with Tunneller(settings, args.models) as tunneller:
                result = tunneller.process_frames(
                    source, fps, times, progress=progress, name=args.video
                )
    except (VideoError, FileNotFoundError, ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if len(source) < 2:
        print(f"warning: {args.video} has a single frame (a still image?)", file=sys.stderr)

    t0 = time.perf_counter()
    writing = output
    try:  # each written under a temporary name, renamed when whole
        output.parent.mkdir(parents=True, exist_ok=True)
        write_video(output, result.frames, result.fps)
        encode = time.perf_counter() - t0
        if preview is not None:
            writing = preview
            sheet = contact_sheet(
                source, result.frames, result.boxes, result.box_source, first_frame=args.start_frame
            )
            preview.parent.mkdir(parents=True, exist_ok=True)
            _write_png(preview, sheet)
    except OSError as e:  # a disk that filled up during the run, a folder removed
        written = f" ({output} was written)" if writing == preview else ""
        print(f"error: cannot write {writing}: {e.strerror or e}{written}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    n = len(result.frames)
    print(format_coverage(result.box_source))
    stages = {"decode": decode, **result.timings, "encode": encode}
    print("ms/frame: " + ", ".join(f"{k} {1000 * v / n:.1f}" for k, v in stages.items()))
    print(
        f"wrote {output} ({n} frames, {settings.size}x{settings.size}, {result.fps:g} fps)"
        + (f" and {preview}" if preview else "")
        + f" in {elapsed:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
