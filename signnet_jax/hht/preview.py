"""Contact sheet: source frames with the boxes drawn, beside their tunnelled frames."""

from __future__ import annotations

import cv2
import numpy as np

from signnet_jax.hht.boxes import PART_NAMES, SOURCE_NAMES
from signnet_jax.hht.compose import box_to_pixels

# RGB colours per part: head, right hand, left hand.
COLOURS = ((255, 200, 0), (255, 60, 60), (60, 220, 255))
_SHORT = {"head": "head", "right_hand": "R", "left_hand": "L"}


def contact_sheet(
    source_frames: np.ndarray,
    tunnelled: np.ndarray,
    boxes: np.ndarray,
    box_source: np.ndarray,
    count: int = 6,
    columns: int = 2,
    first_frame: int = 0,
    min_height: int = 256,
) -> np.ndarray:
    """Builds a contact sheet of `count` evenly spaced frames.

    Each tile shows the source frame with the head, right-hand and left-hand boxes drawn
    and labelled with their source (labels on a dark ground, never on top of each other),
    the tunnelled frame beside it, and a caption strip below with the frame number.
    Tunnelled frames smaller than ``min_height`` are enlarged (nearest neighbour, so their
    pixels stay visible) to keep the labels readable.

    Args:
      source_frames: (N, H, W, 3) uint8 RGB source frames.
      tunnelled: (N, S, S, 3) uint8 RGB tunnelled frames.
      boxes: (N, 3, 4) normalized boxes.
      box_source: (N, 3) source codes.
      count: number of tiles.
      columns: tiles per row.
      first_frame: source frame number of the first frame (captions count from it).
      min_height: smallest tile height in pixels.

    Returns:
      (rows * (tile_h + caption), columns * tile_w, 3) uint8 RGB image.
    """
    n = len(tunnelled)
    picks = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    size = max(tunnelled.shape[1], min_height)
    height, width = source_frames.shape[1:3]
    scaled_w = max(1, round(width * size / height))
    font = 0.4 * size / 256
    thick = max(1, round(2 * size / 256))
    caption = max(14, round(20 * size / 256))
    tiles = []
    for t in picks:
        src = cv2.resize(source_frames[t], (scaled_w, size), interpolation=cv2.INTER_AREA)
        tun = tunnelled[t]
        if tun.shape[0] != size:
            tun = cv2.resize(tun, (size, size), interpolation=cv2.INTER_NEAREST)
        placed: list[tuple[int, int, int, int]] = []
        for p, part in enumerate(PART_NAMES):
            if box_source[t, p] == 0:
                continue
            pix = box_to_pixels(boxes[t, p], scaled_w, size)
            if pix is None:
                continue
            x0, y0, x1, y1 = pix
            cv2.rectangle(src, (x0, y0), (x1 - 1, y1 - 1), COLOURS[p], thick)
            label = f"{_SHORT[part]} {SOURCE_NAMES[box_source[t, p]]}"
            _label(src, label, x0, y0, COLOURS[p], font, placed)
        bar = np.zeros((caption, scaled_w + 4 + size + 4, 3), np.uint8)
        cv2.putText(
            bar,
            f"frame {first_frame + t}",
            (4, caption - max(3, caption // 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            font * 1.1,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        gap = np.full((size, 4, 3), 255, np.uint8)
        tiles.append(np.concatenate([np.concatenate([src, gap, tun, gap], axis=1), bar], axis=0))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)


def _label(image, text, x, y, colour, font, placed) -> None:
    """Text just above (x, y) on a dark ground, moved down past labels already placed."""
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font, 1)
    h, w = th + base + 4, tw + 4
    x = int(min(max(x, 0), max(image.shape[1] - w, 0)))
    top = int(min(max(y - h, 0), max(image.shape[0] - h, 0)))
    bottom = max(image.shape[0] - h, 0)

    def free(y):
        return not any(x < a1 and a0 < x + w and y < b1 and b0 < y + h for a0, b0, a1, b1 in placed)

    # the first free place going down from above the box, else going up from it
    down = range(top, bottom + 1, h)
    up = range(top - h, -1, -h)
    y = next((y for y in (*down, *up) if free(y)), top)
    placed.append((x, y, x + w, y + h))
    cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), (0, 0, 0), -1)
    cv2.putText(
        image, text, (x + 2, y + th + 2), cv2.FONT_HERSHEY_SIMPLEX, font, colour, 1, cv2.LINE_AA
    )
