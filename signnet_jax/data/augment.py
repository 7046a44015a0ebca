"""Clip augmentation on uint8 ``(T, H, W, 3)`` RGB arrays, vectorised over frames.

Follows the VideoMAEv2 fine-tuning transform (``VideoClsDataset._aug_frame``):
RandAugment on the full frames (one set of operations and magnitudes for the
whole clip), then a random resized crop (bilinear, as the reference's
``torch.nn.functional.interpolate``), then a horizontal flip with probability
0.5, then random erasing. (Bicubic is the reference's interpolation for
RandAugment's geometric operations, ``--train_interpolation bicubic``; its crop
resize is bilinear. The reference crops normalised floats; here the crop is
resized in uint8, half a grey level of rounding.) Erasing is only *sampled*
here: the reference erases after normalisation with N(0, 1) noise, and clips
leave the host as uint8, so the box travels with the clip and
``device.normalize_and_erase`` fills it.

The PIL operations of the reference are re-expressed with OpenCV lookup tables,
colour conversion, ``filter2D`` and ``warpAffine`` on whole clips; results
match PIL to within one grey level except for the bicubic kernel of the
geometric operations (OpenCV a=-0.75, PIL a=-0.5).

Flip modes: ``plain`` mirrors the whole frame after the crop (the reference).
``hht`` keeps the Head & Hands Tunnelling layout valid (top-left whole frame,
bottom-left head, top-right right hand, bottom-right left hand): each quadrant
is mirrored in place and the two hand quadrants swap, because a mirrored right
hand looks like a left hand. Quadrants only exist in the uncropped frame, so the
``hht`` flip is applied first, before RandAugment's geometric operations and
the random crop; since the crop position and the geometric magnitudes are
sampled symmetrically, flipping first gives the same distribution as the
reference's flip-after-crop for the plain mirror.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import cv2
import numpy as np

# Fill colour of RandAugment's geometric ops: the reference's create_random_augment
# passes no img_mean, so timm's default (128, 128, 128) applies.
_FILL = (128, 128, 128)
_MAX_LEVEL = 10.0

# "inc1" operation set of rand_augment_transform, in the reference order.
RAND_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)

FLIP_MODES = ("plain", "hht", "none")


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """Parsed ``rand-mM-nN-mstdS-incI`` string (timm / VideoMAEv2 grammar)."""

    magnitude: float = 7.0
    num_layers: int = 4
    magnitude_std: float = 0.5
    increasing: bool = True
    prob: float = 0.5

    @classmethod
    def parse(cls, spec: str) -> RandAugmentSpec:
        """Parse e.g. ``rand-m7-n4-mstd0.5-inc1``; raises ValueError on anything else."""
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-'")
        kwargs: dict = {}
        for part in parts[1:]:
            for key, conv, name in (
                ("mstd", float, "magnitude_std"),
                ("inc", lambda v: bool(int(v)), "increasing"),
                ("m", float, "magnitude"),
                ("n", int, "num_layers"),
            ):
                if part.startswith(key) and part[len(key) :][:1].isdigit():
                    kwargs[name] = conv(part[len(key) :])
                    break
            else:
                raise ValueError(
                    f"RandAugment spec {spec!r}: unknown part {part!r} (known: m, n, mstd, inc)"
                )
        if not kwargs.get("increasing", False):
            raise ValueError(
                f"RandAugment spec {spec!r}: only the 'inc1' operation set is implemented"
            )
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """Training augmentation settings (defaults: the SignNet recipe)."""

    crop_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    # The reference passes [0.75, 1.3333], not exactly 4/3.
    ratio: tuple[float, float] = (0.75, 1.3333)
    flip: str = "plain"
    rand_augment: str | None = "rand-m7-n4-mstd0.5-inc1"
    erase_prob: float = 0.25

    def __post_init__(self):
        if self.flip not in FLIP_MODES:
            raise ValueError(f"flip mode {self.flip!r} is not one of {FLIP_MODES}")
        if self.rand_augment:
            RandAugmentSpec.parse(self.rand_augment)


def check_flip_layout(flip: str, hht_settings: dict | None, records_dir: str) -> None:
    """Raises ValueError when ``flip='hht'`` meets records of another layout than grid2x2.

    The hht flip moves the quadrants of the published 2x2 grid; on a strip layout it would
    scramble the cells instead of mirroring them.
    """
    layout = (hht_settings or {}).get("layout", "grid2x2")
    if flip == "hht" and layout != "grid2x2":
        raise ValueError(
            f"flip='hht' mirrors the cells of the 'grid2x2' layout, but {records_dir} holds "
            f"layout {layout!r}; use flip='plain' (--config.data.flip=plain) or rebuild the "
            "records with --layout grid2x2"
        )


# --------------------------------------------------------------------------- decoding


def decode_frames(jpegs: Sequence[bytes], indices: np.ndarray, *, where: str = "") -> np.ndarray:
    """Decode the JPEG frames at ``indices`` into a ``(T, H, W, 3)`` uint8 RGB clip.

    Each distinct frame is decoded once (padded clips repeat the last frame).

    Args:
      jpegs: encoded frames of one video.
      indices: frame indices, each in [0, len(jpegs)).
      where: description of the record for error messages.

    Returns:
      uint8 array ``(len(indices), H, W, 3)``.
    """
    unique, inverse = np.unique(indices, return_inverse=True)
    decoded = []
    for i in unique:
        if not 0 <= i < len(jpegs):
            raise ValueError(f"{where}: frame {i} requested but the record has {len(jpegs)}")
        img = cv2.imdecode(np.frombuffer(jpegs[i], np.uint8), cv2.IMREAD_COLOR_RGB)
        if img is None:
            raise ValueError(f"{where}: frame {i} is not a decodable JPEG")
        decoded.append(img)
    shapes = {d.shape for d in decoded}
    if len(shapes) != 1:
        raise ValueError(f"{where}: frames have different sizes {sorted(shapes)}")
    # One copy into the clip (np.stack + fancy indexing would copy twice).
    out = np.empty((len(indices),) + decoded[0].shape, np.uint8)
    for j, u in enumerate(inverse.reshape(-1)):
        out[j] = decoded[u]
    return out


# --------------------------------------------------------------------------- geometry


def resize_clip(clip: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (half-pixel centres, no antialiasing) resize of every frame."""
    if clip.shape[1:3] == (height, width):
        return clip
    out = np.empty((clip.shape[0], height, width, clip.shape[3]), np.uint8)
    for t, frame in enumerate(clip):
        cv2.resize(frame, (width, height), dst=out[t], interpolation=cv2.INTER_LINEAR)
    return out


def sample_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """Inception-style crop (top, left, h, w): 10 tries, then the central fallback.

    Same rule as the reference's ``_get_param_spatial_crop`` (log-uniform ratio).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(clip: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop ``box`` (top, left, h, w) from every frame and resize it to ``size`` x ``size``."""
    top, left, h, w = box
    return resize_clip(clip[:, top : top + h, left : left + w], size, size)


def hflip(clip: np.ndarray) -> np.ndarray:
    """Mirror every frame left-right."""
    # cv2.flip is ~15x faster than copying numpy's negative-stride view.
    out = np.empty_like(clip)
    for t, frame in enumerate(clip):
        cv2.flip(frame, 1, dst=out[t])
    return out


def hht_flip(clip: np.ndarray) -> np.ndarray:
    """Mirror an H&HT clip: each 2x2 quadrant in place, hand quadrants swapped.

    Args:
      clip: ``(T, H, W, C)`` with even H and W; quadrants top-left whole frame,
        bottom-left head, top-right right hand, bottom-right left hand.

    Returns:
      The mirrored clip, same layout (the former left hand now in the right-hand quadrant).
    """
    _, height, width, _ = clip.shape
    if height % 2 or width % 2:
        raise ValueError(
            f"hht flip needs even frame sizes to find the 2x2 quadrants, got {height}x{width}; "
            "use flip='plain' for other layouts"
        )
    h2, w2 = height // 2, width // 2
    # Mirroring the whole frame mirrors every quadrant but also swaps left and right
    # halves; moving the halves back (and the hands between rows) gives the result.
    mirrored = hflip(clip)
    out = np.empty_like(clip)
    out[:, :, :w2] = mirrored[:, :, w2:]  # whole frame, head: mirrored in place
    out[:, :h2, w2:] = mirrored[:, h2:, :w2]  # right-hand quadrant <- mirrored left hand
    out[:, h2:, w2:] = mirrored[:, :h2, :w2]  # left-hand quadrant <- mirrored right hand
    return out


def sample_erase_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    prob: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """Random-erasing box (top, left, h, w) as int32, all zero when not erasing.

    One box per clip, shared by all frames (the reference's ``cube`` mode, one
    box, up to 100 tries; strict ``h < height`` and ``w < width``).
    """
    box = np.zeros(4, np.int32)
    if rng.random() >= prob:
        return box
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    for _ in range(100):
        target_area = rng.uniform(*area) * height * width
        ratio = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * ratio)))
        w = int(round(math.sqrt(target_area / ratio)))
        if w < width and h < height:
            box[:] = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
            return box
    return box


# --------------------------------------------------------------------------- RandAugment


def _negate(rng: np.random.Generator, value: float) -> float:
    return -value if rng.random() > 0.5 else value


def _level_arg(name: str, magnitude: float, rng: np.random.Generator) -> float | None:
    """The reference's level_to_arg for the inc1 operations."""
    level = magnitude / _MAX_LEVEL
    if name == "Rotate":
        return _negate(rng, level * 30.0)
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "SolarizeIncreasing":
        return 256 - int(level * 256)
    if name == "SolarizeAdd":
        return int(level * 110)
    if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness
        return 1.0 + _negate(rng, level * 0.9)
    if name in ("ShearX", "ShearY"):
        return _negate(rng, level * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return _negate(rng, level * 0.45)
    return None  # AutoContrast, Equalize, Invert take no argument


def sample_rand_augment(
    rng: np.random.Generator, spec: RandAugmentSpec
) -> list[tuple[str, float | None]]:
    """Draw one clip's RandAugment program: the operations that fire and their arguments.

    ``num_layers`` operations are chosen uniformly with replacement; each fires
    with probability ``prob`` with a magnitude drawn from N(magnitude,
    magnitude_std) clipped to [0, 10] (the reference draws per call, and calls
    once per clip, so every frame of the clip shares the program).
    """
    chosen = rng.integers(0, len(RAND_INCREASING_OPS), size=spec.num_layers)
    program = []
    for op in chosen:
        name = RAND_INCREASING_OPS[op]
        if spec.prob < 1.0 and rng.random() > spec.prob:
            continue
        magnitude = spec.magnitude
        if spec.magnitude_std > 0:
            magnitude = rng.normal(magnitude, spec.magnitude_std)
        magnitude = min(_MAX_LEVEL, max(0.0, magnitude))
        program.append((name, _level_arg(name, magnitude, rng)))
    return program


def _lut_all(clip: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Apply one 256-entry table to every pixel of the clip."""
    t, h, w, c = clip.shape
    return cv2.LUT(clip.reshape(t * h, w, c), lut.astype(np.uint8)).reshape(clip.shape)


def _lut_per_frame(clip: np.ndarray, luts: np.ndarray) -> np.ndarray:
    """Apply ``luts[t]`` (256 x C) to frame t."""
    out = np.empty_like(clip)
    for t, frame in enumerate(clip):
        cv2.LUT(frame, luts[t].reshape(256, 1, -1).astype(np.uint8), dst=out[t])
    return out


def _gray(clip: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma per pixel, ``(T, H, W)`` uint8, like PIL's convert('L')."""
    t, h, w, _ = clip.shape
    return cv2.cvtColor(clip.reshape(t * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(t, h, w)


def _blend(degenerate: np.ndarray, clip: np.ndarray, factor: float) -> np.ndarray:
    """PIL Image.blend(degenerate, clip, factor) = degenerate + factor * (clip - degenerate)."""
    t, h, w, c = clip.shape
    out = cv2.addWeighted(
        clip.reshape(t * h, w, c), factor, degenerate.reshape(t * h, w, c), 1.0 - factor, 0.0
    )
    return out.reshape(clip.shape)


def _warp(
    clip: np.ndarray,
    pil_matrix: Sequence[float],
    region: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """PIL ``Image.transform(AFFINE, matrix)`` (output -> input map, pixel-centre coordinates).

    With ``region`` (top, left, h, w) only that part of the output is rendered.
    """
    a, b, c, d, e, f = pil_matrix
    # PIL samples input at M @ (x + 0.5, y + 0.5) in continuous coordinates; OpenCV
    # uses integer pixel centres, so shift by half a pixel on both sides.
    m = np.array(
        [[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]], dtype=np.float64
    )
    _, h, w, ch = clip.shape
    if region is not None:
        top, left, h, w = region
        m[:, 2] += m[:, 0] * left + m[:, 1] * top
    out = np.empty((clip.shape[0], h, w, ch), np.uint8)
    for t, frame in enumerate(clip):
        cv2.warpAffine(
            frame,
            m,
            (w, h),
            dst=out[t],
            flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=_FILL,
        )
    return out


def _frame_extrema(clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame, per-channel (min, max) as float64 ``(T, C)``."""
    # cv2.reduce is ~10x faster than numpy's strided min/max over (H, W).
    lo = np.empty(clip.shape[::3], np.float64)
    hi = np.empty(clip.shape[::3], np.float64)
    for t, frame in enumerate(clip):
        lo[t] = cv2.reduce(cv2.reduce(frame, 0, cv2.REDUCE_MIN), 1, cv2.REDUCE_MIN).ravel()
        hi[t] = cv2.reduce(cv2.reduce(frame, 0, cv2.REDUCE_MAX), 1, cv2.REDUCE_MAX).ravel()
    return lo, hi


def _autocontrast(clip: np.ndarray) -> np.ndarray:
    lo, hi = _frame_extrema(clip)
    i = np.arange(256, dtype=np.float64)[None, :, None]
    span = np.maximum(hi - lo, 1.0)[:, None, :]
    scale = 255.0 / span
    luts = np.clip((i * scale - lo[:, None, :] * scale).astype(np.int64), 0, 255)
    same = (hi <= lo)[:, None, :]
    luts = np.where(same, i.astype(np.int64), luts)
    return _lut_per_frame(clip, luts)


def _equalize(clip: np.ndarray) -> np.ndarray:
    t, _, _, c = clip.shape
    luts = np.empty((t, 256, c), np.int64)
    identity = np.arange(256)
    for ti in range(t):
        for ci in range(c):
            hist = cv2.calcHist([clip[ti]], [ci], None, [256], [0, 256]).ravel().astype(np.int64)
            nonzero = np.flatnonzero(hist)
            step = (hist.sum() - hist[nonzero[-1]]) // 255 if len(nonzero) else 0
            if not step:
                luts[ti, :, ci] = identity
                continue
            # PIL: lut[i] = (step // 2 + sum(hist[:i])) // step
            cum = np.concatenate([[0], np.cumsum(hist)[:-1]])
            luts[ti, :, ci] = np.minimum((step // 2 + cum) // step, 255)
    return _lut_per_frame(clip, luts)


def _contrast(clip: np.ndarray, factor: float) -> np.ndarray:
    # PIL: degenerate is the per-image mean of the luma, rounded.
    means = np.floor(_gray(clip).mean(axis=(1, 2)) + 0.5)
    i = np.arange(256, dtype=np.float64)[None, :]
    luts = np.clip(means[:, None] + factor * (i - means[:, None]), 0, 255).astype(np.int64)
    return _lut_per_frame(clip, np.repeat(luts[:, :, None], clip.shape[3], axis=2))


def _sharpness(clip: np.ndarray, factor: float) -> np.ndarray:
    t, h, w, c = clip.shape
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    smooth = cv2.filter2D(clip.reshape(t * h, w, c), -1, kernel).reshape(clip.shape)
    # PIL's 3x3 filter leaves the border pixels of each image untouched; this also
    # discards the rows mixed across frame boundaries by filtering the stacked clip.
    smooth[:, 0] = clip[:, 0]
    smooth[:, -1] = clip[:, -1]
    smooth[:, :, 0] = clip[:, :, 0]
    smooth[:, :, -1] = clip[:, :, -1]
    return _blend(smooth, clip, factor)


_GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
# Operations whose output pixel depends on more than the same input pixel.
_WHOLE_FRAME_OPS = _GEOMETRIC_OPS | {
    "AutoContrast",
    "Equalize",
    "ContrastIncreasing",
    "SharpnessIncreasing",
}


def _apply_op(
    clip: np.ndarray, name: str, arg: float | None, region: tuple[int, int, int, int] | None
) -> np.ndarray:
    """One RandAugment operation; ``region`` only for geometric operations."""
    _, h, w, _ = clip.shape
    i = np.arange(256)
    if name == "AutoContrast":
        return _autocontrast(clip)
    if name == "Equalize":
        return _equalize(clip)
    if name == "Invert":
        return _lut_all(clip, 255 - i)
    if name == "PosterizeIncreasing":
        # PIL keeps the top ``arg`` bits.
        return _lut_all(clip, i & (~((1 << (8 - int(arg))) - 1) & 255))
    if name == "SolarizeIncreasing":
        return _lut_all(clip, np.where(i < arg, i, 255 - i))
    if name == "SolarizeAdd":
        return _lut_all(clip, np.where(i < 128, np.minimum(255, i + arg), i))
    if name == "BrightnessIncreasing":
        return _lut_all(clip, np.clip(i * arg, 0, 255).astype(np.int64))
    if name == "ContrastIncreasing":
        return _contrast(clip, arg)
    if name == "ColorIncreasing":
        return _blend(np.repeat(_gray(clip)[..., None], 3, axis=3), clip, arg)
    if name == "SharpnessIncreasing":
        return _sharpness(clip, arg)
    if name == "Rotate":
        # PIL rotate: counter-clockwise by arg degrees about (w / 2, h / 2).
        angle = -math.radians(arg)
        cos, sin = math.cos(angle), math.sin(angle)
        cx, cy = w / 2.0, h / 2.0
        matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
        return _warp(clip, matrix, region)
    if name == "ShearX":
        return _warp(clip, (1, arg, 0, 0, 1, 0), region)
    if name == "ShearY":
        return _warp(clip, (1, 0, 0, arg, 1, 0), region)
    if name == "TranslateXRel":
        return _warp(clip, (1, 0, arg * w, 0, 1, 0), region)
    if name == "TranslateYRel":
        return _warp(clip, (1, 0, 0, 0, 1, arg * h), region)
    raise ValueError(f"unknown RandAugment operation {name!r}")


def apply_rand_augment(
    clip: np.ndarray,
    program: list[tuple[str, float | None]],
    region: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Apply a program from ``sample_rand_augment`` to every frame of ``clip``.

    Args:
      clip: uint8 ``(T, H, W, 3)`` RGB.
      program: list of (operation name, argument).
      region: optional (top, left, h, w): return only this part of the result. It is
        computed lazily (same pixels): operations up to the last one that needs
        whole frames run on whole frames, a geometric operation in that place
        renders only the region, later per-pixel operations run on the region.

    Returns:
      uint8 clip, ``(T, H, W, 3)`` or ``(T, h, w, 3)`` with ``region``.
    """
    if region is None:
        for name, arg in program:
            clip = _apply_op(clip, name, arg, None)
        return clip
    last = max((k for k, (name, _) in enumerate(program) if name in _WHOLE_FRAME_OPS), default=-1)
    for name, arg in program[: max(last, 0)]:
        clip = _apply_op(clip, name, arg, None)
    if last >= 0 and program[last][0] in _GEOMETRIC_OPS:
        clip = _apply_op(clip, *program[last], region)
    else:
        if last >= 0:
            clip = _apply_op(clip, *program[last], None)
        top, left, h, w = region
        clip = np.ascontiguousarray(clip[:, top : top + h, left : left + w])
    for name, arg in program[last + 1 :]:
        clip = _apply_op(clip, name, arg, None)
    return clip


# --------------------------------------------------------------------------- whole clip


def augment_train_clip(
    clip: np.ndarray, rng: np.random.Generator, options: AugmentOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Full training augmentation of one decoded clip.

    Args:
      clip: uint8 ``(T, H, W, 3)`` RGB frames.
      rng: generator for this clip (grain's per-element generator).
      options: augmentation settings.

    Returns:
      (uint8 ``(T, crop_size, crop_size, 3)`` clip, int32 erase box (top, left, h, w),
      all zero when the clip is not erased).
    """
    if options.flip == "hht" and rng.random() < 0.5:
        clip = hht_flip(clip)
    program = []
    if options.rand_augment:
        program = sample_rand_augment(rng, RandAugmentSpec.parse(options.rand_augment))
    box = sample_crop_box(rng, clip.shape[1], clip.shape[2], options.scale, options.ratio)
    # RandAugment then crop, as the reference, but only the cropped pixels are computed
    # where the operations allow it (see apply_rand_augment).
    clip = resize_clip(
        apply_rand_augment(clip, program, region=box), options.crop_size, options.crop_size
    )
    if options.flip == "plain" and rng.random() < 0.5:
        clip = hflip(clip)
    erase = sample_erase_box(rng, options.crop_size, options.crop_size, options.erase_prob)
    return clip, erase
