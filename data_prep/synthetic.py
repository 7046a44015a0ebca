"""A synthetic smoke dataset: rendered signers in real H&HT records.

python -m data_prep.synthetic --output records/smoke [--classes 10 --train-per-class 24 \
    --val-per-class 6 --test-per-class 6 --frames 24 --size 64 --seed 0]

Every video is a cartoon signer on a textured, noisy background: a head (ellipse with eyes
and mouth), a torso with arms, and two gloved hands (a palm and raised fingers, a colour unlike
the head) that move along class-specific paths (circles, lines, diagonals, zig-zags, taps, a
move to the head; one hand or both) with a handshape shared by related motions. Position,
size, speed, start phase, colours, hand rotation and background vary per video, the hands
jitter slightly per frame and every frame gets pixel noise, so the task is learnable but not
trivial (two classes differ only in the direction of a circle).

The landmarks are known exactly, so the head / hand boxes are made from them (box_source 1,
the square-plus-margin rule of `signnet_jax.hht.compute_boxes`), the real composer
`signnet_jax.hht.compose_frames` tunnels the frames and `data_prep.build_records.make_example`
writes the records, so `RecordSource` and the input pipeline read them like real data.

`ensure_smoke_dataset` is what the trainer calls: it builds the folder on first use and
reuses it afterwards. Output is deterministic: the same options give byte-identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from data_prep import build_records, manifests
from signnet_jax.data import records
from signnet_jax.files import (
    PROBE_PREFIX,
    atomic_write,
    creation_problem,
    interrupt_as_usual,
    interrupted,
)
from signnet_jax.hht import HHTSettings, compose_frames

TOOL = "data_prep.synthetic"
# Bump when the bytes written for the same options change: an older folder is then refused.
FORMAT_VERSION = 1
SOURCE_SIZE = 128  # side of the rendered (source) frames in pixels
FPS = 25.0
JPEG_QUALITY = 90
RECORDS_PER_SHARD = 128
SPLITS = ("train", "val", "test")
LOCK = ".synthetic.lock"
_SUB = 16  # cv2 drawing with shift=4: coordinates in 1/16 pixel

# --------------------------------------------------------------------------------------------
# Classes: one motion per hand
# --------------------------------------------------------------------------------------------

# Motions of the body's right hand in image coordinates (x right, y down); the left hand does
# the mirror image (x negated), so "both_circle_cw" is a symmetric two-handed circle.
MOTIONS = (
    "still",
    "circle_cw",
    "circle_ccw",
    "line_h",
    "line_v",
    "diag_up",
    "diag_down",
    "zigzag_down",
    "zigzag_up",
    "to_head",
    "tap",
)

# Handshape of a hand performing each motion: finger directions in degrees (0 = the hand's
# thumb side, -90 = up; the left hand mirrors them). Shapes are shared by related motions, so a
# single frame narrows a sign down to a family and the movement decides within it.
HANDSHAPES = {
    "fist": (),
    "index": (-90,),
    "v": (-105, -75),
    "flat": (-112, -98, -84, -70),
    "open": (-10, -55, -80, -105, -130),
    "thumb": (-20,),
}
MOTION_HANDSHAPE = {
    "still": "fist",
    "circle_cw": "index",
    "circle_ccw": "index",
    "line_h": "flat",
    "line_v": "flat",
    "diag_up": "v",
    "diag_down": "v",
    "zigzag_down": "v",
    "zigzag_up": "v",
    "to_head": "open",
    "tap": "thumb",
}

# The first classes: a mix of one-handed, two-handed and left-handed signs, including a pair
# that differs only in direction (circle_cw / circle_ccw). Further classes are the other
# (right, left) motion pairs in MOTIONS order, leaving out mirror images (see _class_table).
_FIRST = (
    ("circle_cw", "still"),
    ("circle_ccw", "still"),
    ("line_h", "still"),
    ("line_v", "still"),
    ("zigzag_down", "still"),
    ("to_head", "still"),
    ("circle_cw", "circle_cw"),
    ("line_h", "line_h"),
    ("tap", "tap"),
    ("still", "diag_up"),
)


def _class_table() -> list[tuple[str, str]]:
    """_FIRST, then the other (right, left) pairs whose mirror image is not a class yet.

    The mirror image of (right, left), which H&HT-aware flipping (`flip='hht'`) makes, is the
    sign (left, right) done by a left-handed signer: it must not be another class, or flipped
    training clips would carry the wrong label.
    """
    table = list(_FIRST)
    for r in MOTIONS:
        for left in MOTIONS:
            if (r, left) != ("still", "still") and (r, left) not in table:
                if (left, r) not in table:
                    table.append((r, left))
    return table


CLASS_TABLE = _class_table()
MAX_CLASSES = len(CLASS_TABLE)


def class_name(right: str, left: str) -> str:
    """Gloss of a (right-hand motion, left-hand motion) pair, e.g. 'smoke_circle_cw'."""
    if left == "still":
        return f"smoke_{right}"
    if right == "still":
        return f"smoke_left_{left}"
    if right == left:
        return f"smoke_both_{right}"
    return f"smoke_{right}_with_{left}"


def class_names(num_classes: int) -> list[str]:
    """The first `num_classes` class names (label i is names[i]).

    Args:
      num_classes: 2..MAX_CLASSES.

    Returns:
      Class names.
    """
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"classes must be in 2..{MAX_CLASSES}, got {num_classes}")
    return [class_name(r, left) for r, left in CLASS_TABLE[:num_classes]]


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SmokeOptions:
    """What a smoke dataset is made of (stored in dataset_info.json, compared on reuse).

    Attributes:
      classes: number of classes (2..MAX_CLASSES).
      train_per_class: training videos per class.
      val_per_class: validation videos per class.
      test_per_class: test videos per class.
      frames: frames per video.
      size: side of the tunnelled (H&HT) frames in the records (even, >= 16).
      seed: everything random derives from it.
    """

    classes: int = 10
    train_per_class: int = 24
    val_per_class: int = 6
    test_per_class: int = 6
    frames: int = 24
    size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | np.integer) or isinstance(value, bool):
                problems.append(f"{f.name} must be an integer, got {value!r}")
        if problems:
            raise SmokeDatasetError("invalid smoke dataset options: " + "; ".join(problems))
        if not 2 <= self.classes <= MAX_CLASSES:
            problems.append(f"classes must be in 2..{MAX_CLASSES}, got {self.classes}")
        for name in ("train_per_class", "val_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frames < 2:
            problems.append(f"frames must be >= 2, got {self.frames}")
        if self.size < 16 or self.size % 2:
            problems.append(f"size must be an even integer >= 16, got {self.size}")
        if self.seed < 0:
            problems.append(f"seed must be >= 0, got {self.seed}")
        if problems:
            raise SmokeDatasetError("invalid smoke dataset options: " + "; ".join(problems))

    def per_class(self, split: str) -> int:
        """Videos per class in `split`."""
        return getattr(self, f"{split}_per_class")

    def to_dict(self) -> dict[str, int]:
        """JSON-able dict."""
        return {k: int(v) for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RenderedVideo:
    """One rendered signer video and its exact landmarks.

    Attributes:
      frames: (T, SOURCE_SIZE, SOURCE_SIZE, 3) uint8 RGB source frames.
      centres: (T, 3, 2) float pixel centres of head, right hand, left hand.
      half_sizes: (T, 3, 2) float pixel half width / half height of each part (head ellipse
        axes, hand extent from palm centre to fingertips); a part lies within centre +-
        half_size.
      boxes: (T, 3, 4) float32 normalized xyxy boxes made from the landmarks.
      box_source: (T, 3) int8, all 1 (landmark).
      colours: RGB colours of 'skin', 'hands', 'shirt' and the background 'base'.
    """

    frames: np.ndarray
    centres: np.ndarray
    half_sizes: np.ndarray
    boxes: np.ndarray
    box_source: np.ndarray
    colours: dict[str, tuple[int, int, int]]


def _tri(x: np.ndarray) -> np.ndarray:
    """Triangle wave of period 1 in [-1, 1]."""
    return 4 * np.abs(x - np.floor(x + 0.5)) - 1


def motion_offsets(motion: str, u: np.ndarray, amplitude: float, to_head: np.ndarray) -> np.ndarray:
    """Offsets (T, 2) from the hand's home position along a motion, for the body's right hand.

    Args:
      motion: one of MOTIONS.
      u: (T,) motion phase; one full gesture is u from 0 to 1.
      amplitude: size of the motion in pixels.
      to_head: (2,) offset from the home position to the side of the head (for 'to_head').

    Returns:
      (T, 2) x, y offsets in pixels.
    """
    a = amplitude
    two_pi_u = 2 * np.pi * u
    zero = np.zeros_like(u)
    # One-way motions stop at their end when a fast video runs past u = 1.
    w = np.clip(u, 0, 1)
    if motion == "still":
        # A little sway so that "still" is not a frozen image.
        dx, dy = 0.08 * a * np.sin(two_pi_u), 0.06 * a * np.cos(two_pi_u)
    elif motion == "circle_cw":  # clockwise on screen (y points down)
        dx, dy = a * np.cos(two_pi_u), a * np.sin(two_pi_u)
    elif motion == "circle_ccw":
        dx, dy = a * np.cos(two_pi_u), -a * np.sin(two_pi_u)
    elif motion == "line_h":
        dx, dy = 1.2 * a * np.sin(two_pi_u), zero
    elif motion == "line_v":
        dx, dy = zero, 1.2 * a * np.sin(two_pi_u)
    elif motion == "diag_up":
        s = 2 * w - 1
        dx, dy = a * s, -a * s
    elif motion == "diag_down":
        s = 2 * w - 1
        dx, dy = a * s, a * s
    elif motion == "zigzag_down":
        dx, dy = 0.7 * a * _tri(2.5 * w), a * (2 * w - 1)
    elif motion == "zigzag_up":
        dx, dy = 0.7 * a * _tri(2.5 * w), -a * (2 * w - 1)
    elif motion == "to_head":
        s = np.sin(np.pi * w) ** 2
        dx, dy = to_head[0] * s, to_head[1] * s
    elif motion == "tap":
        dx, dy = zero, 0.5 * a * np.abs(np.sin(3 * np.pi * u)) - 0.25 * a
    else:
        raise ValueError(f"unknown motion {motion!r}; known: {', '.join(MOTIONS)}")
    return np.stack([dx, dy], axis=-1)


def _pt(p: Sequence[float]) -> tuple[int, int]:
    return int(round(p[0] * _SUB)), int(round(p[1] * _SUB))


def _muted_colour(rng: np.random.Generator, lo: int, hi: int, grey: float) -> np.ndarray:
    c = rng.uniform(lo, hi, 3)
    return c * (1 - grey) + c.mean() * grey


def _hand_colour(rng: np.random.Generator) -> np.ndarray:
    """Bright yellow-green gloves: far from the muted background and skin tones.

    The hue varies little on purpose: like skin in real videos, the hands' colour is a stable
    cue, and a small training set cannot teach a model colour invariance on top of the task.
    """
    hue = rng.uniform(28, 42)  # OpenCV hue units (0..180): yellow to yellow-green
    hsv = np.array([[[hue, rng.uniform(200, 255), rng.uniform(215, 255)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64)


def _draw_hand(
    img: np.ndarray,
    centre: np.ndarray,
    extent: float,
    shape: str,
    turn: float,
    finger_len: float,
    *,
    mirror: bool,
    colour: tuple[float, ...],
) -> None:
    """Draws a palm and the fingers of `shape`, all within `extent` of `centre`."""
    fingers = HANDSHAPES[shape]
    palm = (0.62 if not fingers else 0.45) * extent
    width = 0.22 * extent
    for angle in fingers:
        a = np.deg2rad(angle + turn)
        direction = np.array([-np.cos(a) if mirror else np.cos(a), np.sin(a)])
        # Round caps add width / 2 beyond the end point: stay inside the extent.
        tip = centre + direction * (extent * finger_len - width / 2)
        thickness = max(1, int(round(width)))
        cv2.line(img, _pt(centre), _pt(tip), colour, thickness, cv2.LINE_AA, 4)
    cv2.circle(img, _pt(centre), int(palm * _SUB), colour, -1, cv2.LINE_AA, 4)


def landmark_boxes(
    centres: np.ndarray, half_sizes: np.ndarray, settings: HHTSettings, source_size: int
) -> np.ndarray:
    """Boxes from exact landmark extents, by `compute_boxes`' square-plus-margin rule.

    Each part's box is the square around its extent (centre +- half size), grown by
    `head_margin` / `hand_margin` of its side on each side and shifted inside the frame.
    No temporal smoothing: the landmarks are exact. Corners are snapped to whole pixels
    (side rounded up): the composer rounds each edge separately, so a fractional square
    could become one pixel wider than high and get a black letterbox line in its cell.

    Args:
      centres: (T, 3, 2) pixel centres of head, right hand, left hand.
      half_sizes: (T, 3, 2) pixel half extents.
      settings: margins.
      source_size: side of the square source frame in pixels.

    Returns:
      (T, 3, 4) float32 normalized xyxy (multiples of 1 / source_size).
    """
    margins = np.array([settings.head_margin, settings.hand_margin, settings.hand_margin])
    side = np.ceil(2 * half_sizes.max(axis=-1) * (1 + 2 * margins) - 1e-6)  # (T, 3)
    side = np.minimum(side, source_size)[..., None]
    lo = np.clip(np.round(centres - side / 2), 0, source_size - side)
    return (np.concatenate([lo, lo + side], axis=-1) / source_size).astype(np.float32)


def render_video(
    label: int, num_frames: int, rng: np.random.Generator, settings: HHTSettings
) -> RenderedVideo:
    """Renders one signer performing class `label` (see CLASS_TABLE).

    Args:
      label: class index.
      num_frames: frames to render.
      rng: source of all per-video variation.
      settings: H&HT settings whose margins shape the boxes.

    Returns:
      Frames, exact landmarks, boxes and the colours used.
    """
    right_motion, left_motion = CLASS_TABLE[label]
    s_px = float(SOURCE_SIZE)
    t = np.arange(num_frames)

    # The signer: position and scale jitter.
    scale = rng.uniform(0.88, 1.1)
    cx = s_px * (0.5 + rng.uniform(-0.05, 0.05))
    top = s_px * rng.uniform(-0.03, 0.03)
    head_c = np.array([cx, top + 0.27 * s_px * scale + 0.04 * s_px])
    head_ax = np.array([0.085, 0.11]) * s_px * scale * rng.uniform(0.92, 1.08, 2)
    shoulder_y = head_c[1] + head_ax[1] + 0.06 * s_px * scale
    shoulder_dx = 0.19 * s_px * scale
    # Hand extent (palm plus fingers) from the centre.
    hand_r = 0.075 * s_px * scale * rng.uniform(0.9, 1.1)
    # Hands rest at the waist; the body's right hand is on the image's left.
    homes = np.array(
        [
            [cx - 0.12 * s_px * scale, shoulder_y + 0.24 * s_px * scale],
            [cx + 0.12 * s_px * scale, shoulder_y + 0.24 * s_px * scale],
        ]
    )
    # Per-video hand rotation and finger length, a slight per-frame wobble.
    hand_turn = rng.uniform(-18, 18, 2)[None, :] + rng.normal(0, 4, (num_frames, 2))
    finger_len = rng.uniform(0.9, 1.0)

    # The motion: speed, start phase and amplitude jitter, per hand.
    centres = np.zeros((num_frames, 3, 2))
    # The head nods a little.
    centres[:, 0] = head_c + np.stack(
        [
            rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * (t / num_frames + rng.uniform())),
            rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * (t / num_frames + rng.uniform())),
        ],
        axis=-1,
    )
    speed = rng.uniform(0.8, 1.2)
    u0 = rng.uniform(0, 0.15)
    for side, motion in enumerate((right_motion, left_motion)):
        u = u0 + rng.uniform(-0.03, 0.03) + speed * t / max(num_frames - 1, 1)
        amplitude = 0.11 * s_px * scale * rng.uniform(0.85, 1.15)
        mirror = -1.0 if side else 1.0
        to_head = (head_c + np.array([mirror * -1.1 * head_ax[0], 0.2 * head_ax[1]])) - homes[side]
        to_head[0] *= mirror  # motion_offsets works in the right hand's mirror frame
        off = motion_offsets(motion, u, amplitude, to_head)
        off[:, 0] *= mirror
        # Small per-frame tremor: no two frames of a path are exactly on the curve.
        off += rng.normal(0, 0.6, off.shape)
        centres[:, 1 + side] = homes[side] + off
    margin = hand_r + 1
    centres[:, 1:] = np.clip(centres[:, 1:], margin, s_px - margin)
    half_sizes = np.zeros((num_frames, 3, 2))
    half_sizes[:, 0] = head_ax
    half_sizes[:, 1:] = hand_r

    # Colours: a muted background, skin, a dark shirt and bright hands.
    base = _muted_colour(rng, 70, 200, 0.6)
    skin = np.array([225, 180, 150]) * rng.uniform(0.55, 1.05) + rng.normal(0, 8, 3)
    shirt = _muted_colour(rng, 20, 110, 0.3)
    hands = _hand_colour(rng)
    texture = cv2.resize(
        rng.normal(0, 28, (6, 6, 3)).astype(np.float32),
        (SOURCE_SIZE, SOURCE_SIZE),
        interpolation=cv2.INTER_CUBIC,
    )
    background = np.clip(base + texture, 0, 255).astype(np.float32)
    # Some vertical stripes (a curtain, a door frame) whose place varies per video.
    for _ in range(rng.integers(0, 3)):
        x0 = int(rng.integers(0, SOURCE_SIZE - 8))
        background[:, x0 : x0 + int(rng.integers(2, 8))] *= rng.uniform(0.75, 1.2)
    background = np.clip(background, 0, 255).round().astype(np.uint8)
    noise_std = rng.uniform(3, 8)

    frames = np.empty((num_frames, SOURCE_SIZE, SOURCE_SIZE, 3), np.uint8)
    shirt_c = tuple(float(v) for v in shirt)
    sleeve_c = tuple(float(v) for v in np.clip(shirt * 1.4 + 30, 0, 255))  # arms stand out
    skin_c = tuple(float(v) for v in np.clip(skin, 0, 255))
    hand_c = tuple(float(v) for v in hands)
    dark = (30.0, 25.0, 25.0)
    arm_w = max(2, int(round(0.06 * s_px * scale)))
    noise = rng.normal(0, noise_std, frames.shape).astype(np.float32)
    for i in range(num_frames):
        img = background.copy()
        # Torso: a trapezoid from the shoulders down.
        torso = np.array(
            [
                [cx - shoulder_dx, shoulder_y],
                [cx + shoulder_dx, shoulder_y],
                [cx + shoulder_dx * 1.15, s_px + 2],
                [cx - shoulder_dx * 1.15, s_px + 2],
            ]
        )
        cv2.fillPoly(img, [(torso * _SUB).round().astype(np.int32)], shirt_c, cv2.LINE_AA, 4)
        neck = head_c + np.array([0, head_ax[1] * 0.8])
        cv2.line(img, _pt(neck), _pt(neck + [0, 0.1 * s_px]), skin_c, arm_w, cv2.LINE_AA, 4)
        hc, ha = centres[i, 0], half_sizes[i, 0]
        cv2.ellipse(img, _pt(hc), _pt(ha), 0, 0, 360, skin_c, -1, cv2.LINE_AA, 4)
        for ex in (-0.35, 0.35):
            cv2.circle(img, _pt(hc + ha * [ex, -0.15]), int(0.1 * ha[0] * _SUB), dark, -1, 4, 4)
        cv2.ellipse(img, _pt(hc + ha * [0, 0.45]), _pt(ha * [0.3, 0.08]), 0, 0, 360, dark, -1, 4, 4)
        for side in range(2):
            mirror = -1.0 if side else 1.0
            shoulder = np.array([cx - mirror * shoulder_dx * 0.85, shoulder_y + 3])
            hand = centres[i, 1 + side]
            # The elbow hangs below and outside the line from shoulder to hand.
            elbow = (shoulder + hand) / 2 + np.array([-mirror * 0.06 * s_px, 0.05 * s_px]) * scale
            for a, b in ((shoulder, elbow), (elbow, hand)):
                cv2.line(img, _pt(a), _pt(b), sleeve_c, arm_w, cv2.LINE_AA, 4)
        for side, motion in enumerate((right_motion, left_motion)):
            _draw_hand(
                img,
                centres[i, 1 + side],
                hand_r,
                MOTION_HANDSHAPE[motion],
                hand_turn[i, side],
                finger_len,
                mirror=bool(side),
                colour=hand_c,
            )
        frames[i] = np.clip(img + noise[i], 0, 255).astype(np.uint8)

    boxes = landmark_boxes(centres, half_sizes, settings, SOURCE_SIZE)
    return RenderedVideo(
        frames=frames,
        centres=centres,
        half_sizes=half_sizes,
        boxes=boxes,
        box_source=np.ones((num_frames, 3), np.int8),
        colours={
            "base": tuple(int(v) for v in np.clip(base, 0, 255).round()),
            "skin": tuple(int(round(v)) for v in skin_c),
            "shirt": tuple(int(round(v)) for v in shirt_c),
            "hands": tuple(int(round(v)) for v in hand_c),
        },
    )


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


def video_rng(seed: int, split: str, label: int, i: int) -> np.random.Generator:
    """The generator of one video: independent of every other video and of build order."""
    return np.random.default_rng([seed, SPLITS.index(split), label, i])


@dataclasses.dataclass(frozen=True)
class _Tunnelled:
    """What make_example needs of an H&HT result."""

    frames: np.ndarray
    boxes: np.ndarray
    box_source: np.ndarray
    fps: float


def make_video(
    options: SmokeOptions, split: str, label: int, i: int
) -> tuple[manifests.Entry, RenderedVideo, np.ndarray]:
    """Renders and tunnels video `i` of class `label` in `split`.

    Args:
      options: dataset options (seed, frames, size).
      split: one of SPLITS.
      label: class index.
      i: video number within the class and split.

    Returns:
      The manifest entry, the rendered source video and the (T, size, size, 3) H&HT frames.
    """
    settings = HHTSettings(size=options.size)
    gloss = class_names(options.classes)[label]
    rendered = render_video(
        label, options.frames, video_rng(options.seed, split, label, i), settings
    )
    tunnelled = compose_frames(rendered.frames, rendered.boxes, rendered.box_source, settings)
    video_id = f"{split}-{label:03d}-{i:03d}"
    entry = manifests.Entry(
        split=split, video_id=video_id, path=f"{video_id}.synthetic", label=label, gloss=gloss
    )
    return entry, rendered, tunnelled


_STALE = re.compile(
    r"(.*-\d{5}-of-\d{5}\.tfrecord(\.index)?|"
    + re.escape(build_records.FAILURES)
    + "|"
    + re.escape(records.DATASET_INFO)
    + r")(\.tmp-.*)?"
)


# A concurrent caller's probe (files.creation_problem) is neither foreign nor stale: its owner
# removes it.
_OURS = re.compile(rf"{_STALE.pattern}|{re.escape(LOCK)}|{re.escape(PROBE_PREFIX)}.*")


def build_smoke_dataset(output_dir: str | os.PathLike, options: SmokeOptions) -> dict[str, Any]:
    """Writes the smoke dataset to `output_dir` (no reuse check; see `ensure_smoke_dataset`).

    Any earlier dataset_info.json is removed first and the new one is written last, so the
    folder counts as complete only once everything is in place.

    Args:
      output_dir: records folder (created).
      options: what to generate.

    Returns:
      The dataset_info.json contents.
    """
    output = os.fspath(output_dir)
    os.makedirs(output, exist_ok=True)
    info_path = os.path.join(output, records.DATASET_INFO)
    if os.path.exists(info_path):
        os.remove(info_path)
    settings = HHTSettings(size=options.size)
    classes = class_names(options.classes)
    written: set[str] = set()
    splits_info = {}
    for split in SPLITS:
        per_class = options.per_class(split)
        # Class-interleaved order: any prefix of a split is balanced.
        order = [(label, i) for i in range(per_class) for label in range(options.classes)]
        num_shards = max(1, math.ceil(len(order) / RECORDS_PER_SHARD))
        shards = []
        for k in range(num_shards):
            name = records.shard_name(split, k, num_shards)
            part = order[k * len(order) // num_shards : (k + 1) * len(order) // num_shards]
            with records.TFRecordWriter(os.path.join(output, name)) as writer:
                for label, i in part:
                    entry, rendered, tunnelled = make_video(options, split, label, i)
                    result = _Tunnelled(tunnelled, rendered.boxes, rendered.box_source, FPS)
                    writer.write(build_records.make_example(entry, result, JPEG_QUALITY))
            shards.append(
                {
                    "file": name,
                    "num_records": len(part),
                    "num_bytes": os.path.getsize(os.path.join(output, name)),
                }
            )
            written |= {name, name + records.INDEX_SUFFIX}
        splits_info[split] = {
            "num_entries": len(order),
            "num_records": len(order),
            "num_failures": 0,
            "fps": build_records.fps_summary([FPS] * len(order)),
            "shards": shards,
        }
    # Shards of an earlier build with other counts, and temporaries of an interrupted one.
    for name in os.listdir(output):
        if _STALE.fullmatch(name) and name not in written:
            os.remove(os.path.join(output, name))
    atomic_write(os.path.join(output, build_records.FAILURES), b"", fsync=True)
    num_records = sum(s["num_records"] for s in splits_info.values())
    info = {
        "tool": {
            "name": TOOL,
            "version": build_records.tool_version(),
            "format_version": FORMAT_VERSION,
        },
        "dataset": "smoke",
        "synthetic": {
            "description": "rendered signers: a head and two hands moving along class-specific "
            "paths; boxes from the exact landmarks; frames tunnelled by "
            "signnet_jax.hht.compose_frames",
            "options": options.to_dict(),
            "source_size": SOURCE_SIZE,
            "motions": {
                name: {
                    "right_hand": r,
                    "left_hand": left,
                    "handshapes": [MOTION_HANDSHAPE[r], MOTION_HANDSHAPE[left]],
                }
                for name, (r, left) in zip(classes, CLASS_TABLE[: len(classes)], strict=True)
            },
        },
        "classes": classes,
        "num_classes": len(classes),
        "splits": splits_info,
        "num_records": num_records,
        "num_failures": 0,
        "hht_settings": settings.to_dict(),
        "jpeg_quality": JPEG_QUALITY,
        "features": build_records.RECORD_FEATURES,
        "index": "NAME.tfrecord.index beside each shard: one 'offset length' line per record",
    }
    atomic_write(info_path, (json.dumps(info, indent=1) + "\n").encode(), fsync=True)
    return info


class SmokeDatasetError(ValueError):
    """Options the smoke dataset cannot take, or a folder it cannot use: one holding something
    other than the requested dataset, a remote path, one that cannot be written."""


def _check_existing(output: str, info: dict, options: SmokeOptions) -> None:
    synthetic = info.get("synthetic")
    tool = info.get("tool", {})
    if tool.get("name") != TOOL or not isinstance(synthetic, dict):
        raise SmokeDatasetError(
            f"{output} holds records that are not a synthetic smoke dataset "
            f"(written by {tool.get('name', 'an unknown tool')}); give the smoke dataset "
            "its own folder"
        )
    if tool.get("format_version") != FORMAT_VERSION:
        raise SmokeDatasetError(
            f"{output} holds a smoke dataset of generator format "
            f"{tool.get('format_version')}, this code writes format {FORMAT_VERSION}; "
            f"delete {output} to regenerate it"
        )
    missing = [
        name
        for split in info.get("splits", {}).values()
        for shard in split.get("shards", [])
        for name in (shard["file"], shard["file"] + records.INDEX_SUFFIX)
        if not os.path.exists(os.path.join(output, name))
    ]
    if missing:
        raise SmokeDatasetError(
            f"{output} is incomplete: {', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''} missing; delete {output} to regenerate it"
        )
    stored = synthetic.get("options", {})
    wanted = options.to_dict()
    if stored != wanted:
        diff = ", ".join(
            f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} requested"
            for k in sorted(set(stored) | set(wanted))
            if stored.get(k) != wanted.get(k)
        )
        raise SmokeDatasetError(
            f"{output} holds a smoke dataset built with other options ({diff}); delete "
            f"{output} to regenerate it or choose another folder"
        )


def ensure_smoke_dataset(
    output_dir: str | os.PathLike,
    *,
    classes: int = 10,
    train_per_class: int = 24,
    val_per_class: int = 6,
    test_per_class: int = 6,
    frames: int = 24,
    size: int = 64,
    seed: int = 0,
) -> str:
    """Returns a records folder holding the smoke dataset, building it on first use.

    Safe to call from several processes at once (they take a lock; one builds, the others
    then reuse). A folder whose dataset_info.json is missing is an unfinished build and is
    rebuilt.

    Args:
      output_dir: records folder (local).
      classes, train_per_class, val_per_class, test_per_class, frames, size, seed: see
        `SmokeOptions`.

    Returns:
      output_dir as a string, ready for `RecordSource(output_dir, split)`.

    Raises:
      ValueError: invalid options.
      SmokeDatasetError: the folder holds records of another tool, another generator
        format or other options (the message names the folder and the differences).
    """
    options = SmokeOptions(
        classes=classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        frames=frames,
        size=size,
        seed=seed,
    )
    output = os.fspath(output_dir)
    if "://" in output:
        raise SmokeDatasetError(
            f"{output}: the smoke dataset is built in a local folder; give a local path "
            "(copy it to remote storage afterwards if needed)"
        )
    info_path = os.path.join(output, records.DATASET_INFO)
    if os.path.exists(info_path):  # fast path, no lock needed: the file is written last
        _check_existing(output, records.load_dataset_info(output), options)
        return output
    # Only our own files may be replaced: never build over somebody's folder.
    foreign = sorted(
        n for n in (os.listdir(output) if os.path.isdir(output) else []) if not _OURS.fullmatch(n)
    )
    if foreign:
        raise SmokeDatasetError(
            f"{output} is not empty and holds no dataset ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); choose an empty or new folder"
        )
    if os.path.exists(output) and not os.path.isdir(output):
        raise SmokeDatasetError(f"{output} is a file; give a folder for the smoke dataset")
    problem = creation_problem(output)
    if problem:
        raise SmokeDatasetError(
            f"cannot write the smoke dataset in {output}: {problem}; give a folder you can write to"
        )
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, LOCK), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process builds
        if os.path.exists(info_path):
            _check_existing(output, records.load_dataset_info(output), options)
            return output
        build_smoke_dataset(output, options)
    return output


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    """The command-line interface (options from SmokeOptions' fields)."""
    p = argparse.ArgumentParser(
        prog="python -m data_prep.synthetic",
        description="Generate the synthetic smoke dataset (rendered signers, real H&HT records).",
    )
    p.add_argument("--output", required=True, help="records folder (created)")
    for f in dataclasses.fields(SmokeOptions):
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=int,
            default=f.default,
            help=f"default {f.default}",
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI.

    Args:
      argv: arguments (default sys.argv[1:]).

    Returns:
      Exit status: 0, or 2 on bad options / a folder holding something else.
    """
    interrupt_as_usual()
    args = make_parser().parse_args(argv)
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(SmokeOptions)}
    existed = os.path.exists(os.path.join(args.output, records.DATASET_INFO))
    t0 = time.perf_counter()
    try:
        output = ensure_smoke_dataset(args.output, **kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # dataset_info.json is written last: no dataset until then
        return interrupted(
            f"{args.output} holds an unfinished smoke dataset, which the next run builds again"
            if not existed
            else f"{args.output} unchanged"
        )
    info = records.load_dataset_info(output)
    counts = ", ".join(f"{k} {v['num_records']}" for k, v in info["splits"].items())
    verb = "reused" if existed else f"built in {time.perf_counter() - t0:.1f} s"
    print(
        f"{output}: smoke dataset {verb}: {info['num_classes']} classes, {counts} videos",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
