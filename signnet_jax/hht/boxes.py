"""Box logic: raw per-frame detections -> head / right hand / left hand boxes with sources.

Pure numpy, no MediaPipe: tests drive it with synthetic landmarks.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from signnet_jax.hht.settings import HHTSettings

NONE, LANDMARK, POSE, INTERPOLATED = 0, 1, 2, 3
SOURCE_NAMES = ("none", "landmark", "pose", "interpolated")
PART_NAMES = ("head", "right_hand", "left_hand")

# BlazePose landmark indices. The body's left side has the odd numbers.
POSE_FACE = slice(0, 11)
L_SHOULDER, R_SHOULDER = 11, 12
# wrist, pinky, index, thumb of the body's right (index 0) and left (index 1) hand
POSE_HAND = np.array([[16, 18, 20, 22], [15, 17, 19, 21]])
POSE_NOSE = 0
MAX_FACES = 4
MIN_SIDE_PX = 8.0
# A face detection without a pose nose inside it counts only above this score: the
# short-range detector scores random noise up to about 0.6.
FACE_ALONE = 0.75


@dataclasses.dataclass
class Landmarks:
    """Raw detections for N frames, normalized to the source frame (x right, y down).

    Attributes:
      pose: (N, 33, 3) x, y, visibility; NaN where no pose was found.
      hands: (N, 2, 21, 2) x, y of up to two hands; NaN where fewer were found.
      hand_label: (N, 2) int8, the landmarker's handedness: +1 'Right', -1 'Left', 0 none.
        Tasks labels are for a non-mirrored image, i.e. the body's own side.
      faces: (N, MAX_FACES, 5) x0, y0, x1, y1, score of face detections; NaN padded.
      hands_run: (N,) bool, whether the hand landmarker ran on the frame.
    """

    pose: np.ndarray
    hands: np.ndarray
    hand_label: np.ndarray
    faces: np.ndarray
    hands_run: np.ndarray

    @classmethod
    def empty(cls, n: int) -> Landmarks:
        """Landmarks of n frames in which nothing was found."""
        return cls(
            pose=np.full((n, 33, 3), np.nan, np.float32),
            hands=np.full((n, 2, 21, 2), np.nan, np.float32),
            hand_label=np.zeros((n, 2), np.int8),
            faces=np.full((n, MAX_FACES, 5), np.nan, np.float32),
            hands_run=np.zeros((n,), bool),
        )

    def __len__(self) -> int:
        return self.pose.shape[0]

    def to_bytes(self) -> bytes:
        """The arrays as an .npz file's bytes (compressed), for `from_bytes`."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **dataclasses.asdict(self))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Landmarks:
        """Landmarks from `to_bytes`' output, exactly as they were.

        Raises:
          ValueError: not such a file (damaged, or another layout): the arrays, their
            dtypes and shapes are checked against those of `empty`.
        """
        try:
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError("one array (.npy), not an .npz file")
            with loaded as npz:
                arrays = {name: npz[name] for name in npz.files}
        except Exception as e:  # what damaged bytes raise varies: zip, zlib, .npy headers
            raise ValueError(f"not a landmarks file ({type(e).__name__}: {e})") from e
        n = len(arrays["pose"]) if "pose" in arrays and arrays["pose"].ndim else 0
        expected = cls.empty(n)
        for field in dataclasses.fields(cls):
            want, got = getattr(expected, field.name), arrays.get(field.name)
            if got is None or got.dtype != want.dtype or got.shape != want.shape:
                found = "missing" if got is None else f"{got.dtype} {got.shape}"
                raise ValueError(
                    f"not a landmarks file: {field.name} is {found}, expected {want.dtype} "
                    f"{want.shape}"
                )
        if set(arrays) != {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"not a landmarks file: it holds {sorted(arrays)}")
        return cls(**arrays)


def wrist_in_view(pose: np.ndarray, visibility: float) -> np.ndarray:
    """(N, 2) bool: the body's right / left pose wrist is visible and inside the frame."""
    wrists = pose[:, POSE_HAND[:, 0]]  # (N, 2, 3)
    with np.errstate(invalid="ignore"):
        inside = np.all((wrists[..., :2] >= 0) & (wrists[..., :2] <= 1), axis=-1)
        return inside & (wrists[..., 2] > visibility)


def compute_boxes(
    landmarks: Landmarks, width: int, height: int, settings: HHTSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Turns raw detections into the per-frame boxes the composer crops.

    Args:
      landmarks: raw detections of N frames.
      width: source frame width in pixels.
      height: source frame height in pixels.
      settings: margins, fallback and temporal settings; `faithful` selects the
        original's boxes (landmark extent plus a pixel margin, nothing else, and none in
        a frame without a pose).

    Returns:
      boxes (N, 3, 4) float32 normalized xyxy of head, right hand, left hand (-1 where
      none) and box_source (N, 3) int8 (0 none, 1 landmark, 2 pose fallback,
      3 interpolated).
    """
    scale = np.array([width, height], np.float64)
    raw, source = _raw_boxes(landmarks, scale, settings)
    n = len(landmarks)
    if settings.faithful:
        m = settings.faithful_margin_px
        # int() truncation, then the margin, then clipping: the original's get_crop.
        lo = np.maximum(np.trunc(raw[..., :2]) - m, 0)
        hi = np.minimum(np.trunc(raw[..., 2:]) + m, scale)
        pix = np.concatenate([lo, hi], axis=-1)
    else:
        margins = np.array([settings.head_margin, settings.hand_margin, settings.hand_margin])
        centre = (raw[..., :2] + raw[..., 2:]) / 2
        side = np.max(raw[..., 2:] - raw[..., :2], axis=-1) * (1 + 2 * margins)
        # A collapsed detection (all points on one pixel) still gets a visible crop.
        side = np.maximum(side, MIN_SIDE_PX)
        params = np.concatenate([centre, side[..., None]], axis=-1)  # (N, 3, 3)
        params = _smooth(params, settings.smoothing)
        params, filled = _fill(params, settings.max_gap, settings.max_hold)
        source = np.where(filled, INTERPOLATED, source).astype(np.int8)
        pix = _square_in_frame(params, scale)
    boxes = np.where(source[..., None] > 0, pix / np.tile(scale, 2), -1.0).astype(np.float32)
    assert boxes.shape == (n, 3, 4)
    return boxes, source.astype(np.int8)


def _raw_boxes(
    lm: Landmarks, scale: np.ndarray, settings: HHTSettings
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame pixel xyxy boxes (N, 3, 4), NaN where none, and their sources."""
    n = len(lm)
    raw = np.full((n, 3, 4), np.nan)
    source = np.zeros((n, 3), np.int8)
    pose_px = lm.pose[..., :2] * scale  # (N, 33, 2)
    has_pose = np.isfinite(lm.pose[:, 0, 0])
    shoulder = np.linalg.norm(pose_px[:, L_SHOULDER] - pose_px[:, R_SHOULDER], axis=-1)
    in_view = wrist_in_view(lm.pose, settings.wrist_visibility)
    faces_px = lm.faces[..., :4] * np.tile(scale, 2)
    hands_px = lm.hands * scale
    for t in range(n):
        if settings.faithful and not has_pose[t]:
            # The original's Holistic finds the face and hands in regions its pose gives.
            continue
        face = _pick_face(faces_px[t], lm.faces[t, :, 4], pose_px[t] if has_pose[t] else None)
        if face is not None:
            raw[t, 0], source[t, 0] = face, LANDMARK
        elif has_pose[t] and not settings.faithful and np.mean(lm.pose[t, POSE_FACE, 2]) > 0.5:
            raw[t, 0], source[t, 0] = _pose_head(pose_px[t, POSE_FACE]), POSE
        sides = _assign_hands(
            hands_px[t],
            lm.hand_label[t],
            pose_px[t, POSE_HAND[:, 0]] if has_pose[t] else None,
            lm.pose[t, POSE_HAND[:, 0], 2] > settings.wrist_visibility,
            shoulder[t],
        )
        for side in range(2):
            k = sides[side]
            if k >= 0:
                pts = hands_px[t, k]
                raw[t, 1 + side] = [*pts.min(axis=0), *pts.max(axis=0)]
                source[t, 1 + side] = LANDMARK
            elif in_view[t, side] and not settings.faithful:
                raw[t, 1 + side] = _pose_hand(
                    pose_px[t, POSE_HAND[side]], settings.hand_scale * shoulder[t]
                )
                source[t, 1 + side] = POSE
    return raw, source


def _pick_face(faces: np.ndarray, scores: np.ndarray, pose: np.ndarray | None) -> np.ndarray | None:
    """The face detection that agrees with the pose head, else a confident one, else None."""
    valid = np.isfinite(scores)
    if not valid.any():
        return None
    faces, scores = faces[valid], scores[valid]
    if pose is not None:
        # Weak detections (chin, hands, even noise) reach 0.5-0.6: prefer a box holding
        # the pose nose, the nearest to the pose face points among several.
        nose = pose[POSE_NOSE]
        holds = np.all((faces[:, :2] <= nose) & (nose <= faces[:, 2:]), axis=-1)
        if holds.any():
            head = pose[POSE_FACE].mean(axis=0)
            dist = np.linalg.norm((faces[:, :2] + faces[:, 2:]) / 2 - head, axis=-1)
            return faces[np.flatnonzero(holds)[np.argmin(dist[holds])]]
    best = np.argmax(scores)
    return faces[best] if scores[best] >= FACE_ALONE else None


def _pose_head(points: np.ndarray) -> np.ndarray:
    """Head box from the 11 pose face points (nose, eyes, ears, mouth)."""
    centre = points.mean(axis=0)
    # Ear to ear spans about the face detector's box width on frontal faces.
    side = max(np.ptp(points[:, 0]), np.ptp(points[:, 1])) * 1.1
    return np.array([*(centre - side / 2), *(centre + side / 2)])


def _pose_hand(points: np.ndarray, side: float) -> np.ndarray:
    """Hand box from pose wrist, pinky, index and thumb points; `side` from body scale."""
    wrist, knuckles = points[0], points[1:3].mean(axis=0)
    # The pose hand points sit at the knuckles; the hand's middle lies just past them.
    centre = 0.3 * wrist + 0.7 * knuckles
    side = max(side, 1.5 * np.max(np.ptp(points, axis=0)))
    return np.array([*(centre - side / 2), *(centre + side / 2)])


def _assign_hands(
    hands: np.ndarray,
    labels: np.ndarray,
    wrists: np.ndarray | None,
    wrist_visible: np.ndarray,
    shoulder: float,
) -> tuple[int, int]:
    """Which detected hand (0/1, -1 none) is the body's right and left hand.

    With a pose, hands go to the nearer pose wrist (the pose knows the body's sides,
    so hands cannot swap between frames); a hand far from a confidently placed wrist
    is a false detection. Without a pose, the landmarker's handedness decides.
    """
    found = [k for k in range(2) if np.isfinite(hands[k, 0, 0])]
    if not found:
        return -1, -1
    if wrists is not None and np.all(np.isfinite(wrists)):
        best, best_cost = (-1, -1), np.inf
        candidates = [(found[0], -1), (-1, found[0])]
        if len(found) == 2:
            candidates = [(0, 1), (1, 0)]
        for pair in candidates:
            cost = sum(
                np.linalg.norm(hands[k, 0] - wrists[side]) for side, k in enumerate(pair) if k >= 0
            )
            if cost < best_cost:
                best, best_cost = pair, cost
        keep = []
        for side, k in enumerate(best):
            far = k >= 0 and np.linalg.norm(hands[k, 0] - wrists[side]) > max(shoulder, 1.0)
            keep.append(-1 if far and wrist_visible[side] else k)
        return keep[0], keep[1]
    right = [k for k in found if labels[k] > 0]
    left = [k for k in found if labels[k] < 0]
    if len(found) == 2 and len(right) != 1:
        # Same label twice: a camera-facing body's right hand is on the image's left.
        order = sorted(found, key=lambda k: hands[k, :, 0].mean())
        return order[0], order[1]
    return (right[0] if right else -1), (left[0] if left else -1)


def _smooth(params: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing over time of (N, P, C) params, using only valid frames."""
    if sigma <= 0:
        return params
    radius = max(1, int(round(3 * sigma)))
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    valid = np.isfinite(params[..., :1]).astype(np.float64)
    values = np.nan_to_num(params)

    def conv(x: np.ndarray) -> np.ndarray:
        padded = np.pad(x, [(radius, radius)] + [(0, 0)] * (x.ndim - 1))
        windows = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=0)
        return windows @ kernel

    with np.errstate(invalid="ignore", divide="ignore"):
        out = conv(values * valid) / conv(valid)
    return np.where(valid > 0, out, np.nan)


def _fill(params: np.ndarray, max_gap: int, max_hold: int) -> tuple[np.ndarray, np.ndarray]:
    """Interpolates gaps up to max_gap frames and holds run ends for max_hold frames.

    Returns:
      the filled params and a (N, P) mask of the frames that were filled.
    """
    n, parts = params.shape[:2]
    out = params.copy()
    filled = np.zeros((n, parts), bool)
    t = np.arange(n)
    for p in range(parts):
        idx = np.flatnonzero(np.isfinite(params[:, p, 0]))
        if idx.size == 0:
            continue
        pos = np.searchsorted(idx, t)  # first valid index >= t
        nxt = np.where(pos < idx.size, idx[np.minimum(pos, idx.size - 1)], n + n)
        prv = np.where(pos > 0, idx[np.maximum(pos - 1, 0)], -n - n)
        missing = ~np.isfinite(params[:, p, 0])
        gap = nxt - prv - 1
        interp = missing & (prv >= 0) & (nxt < n) & (gap <= max_gap)
        d_prev, d_next = t - prv, nxt - t
        hold_prev = missing & ~interp & (d_prev <= max_hold) & (d_prev <= d_next)
        hold_next = missing & ~interp & (d_next <= max_hold) & ~hold_prev
        for c in range(params.shape[2]):
            values = np.interp(t, idx, params[idx, p, c])
            out[interp, p, c] = values[interp]
        out[hold_prev, p] = params[prv[hold_prev], p]
        out[hold_next, p] = params[nxt[hold_next], p]
        filled[:, p] = interp | hold_prev | hold_next
    return out, filled


def _square_in_frame(params: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(cx, cy, side) -> pixel xyxy squares moved inside the frame, clipped if too big."""
    centre, side = params[..., :2], params[..., 2:3]
    lo = centre - side / 2
    # Shift rather than clip so crops stay square (undistorted) near the edges.
    lo = np.clip(lo, 0, np.maximum(scale - side, 0))
    hi = np.minimum(lo + side, scale)
    return np.concatenate([lo, hi], axis=-1)
