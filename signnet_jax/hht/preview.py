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
) -> np.ndarray:
    """Builds a contact sheet of `count` evenly spaced frames.

    Each tile shows the source frame (scaled to the tunnelled height) with the head,
    right-hand and left-hand boxes drawn and labelled with their source, and the
    tunnelled frame beside it.

    Args:
      source_frames: (N, H, W, 3) uint8 RGB source frames.
      tunnelled: (N, S, S, 3) uint8 RGB tunnelled frames.
      boxes: (N, 3, 4) normalized boxes.
      box_source: (N, 3) source codes.
      count: number of tiles.
      columns: tiles per row.

    Returns:
      (rows * tile_h, columns * tile_w, 3) uint8 RGB image.
    """
    n = len(tunnelled)
    picks = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    size = tunnelled.shape[1]
    height, width = source_frames.shape[1:3]
    scaled_w = max(1, round(width * size / height))
    tiles = []
    for t in picks:
        src = cv2.resize(source_frames[t], (scaled_w, size), interpolation=cv2.INTER_AREA)
        for p, part in enumerate(PART_NAMES):
            if box_source[t, p] == 0:
                continue
            pix = box_to_pixels(boxes[t, p], scaled_w, size)
            if pix is None:
                continue
            x0, y0, x1, y1 = pix
            cv2.rectangle(src, (x0, y0), (x1 - 1, y1 - 1), COLOURS[p], 2)
            label = f"{_SHORT[part]} {SOURCE_NAMES[box_source[t, p]]}"
            cv2.putText(
                src,
                label,
                (x0 + 2, max(y0 - 4, 10)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4,
                COLOURS[p],
                1,
                cv2.LINE_AA,
            )
        cv2.putText(
            src,
            f"frame {t}",
            (4, size - 6),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            (255, 255, 255),
            1,
            cv2.LINE_AA,
        )
        gap = np.full((size, 4, 3), 255, np.uint8)
        tiles.append(np.concatenate([src, gap, tunnelled[t], gap], axis=1))
    while len(tiles) % columns:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + columns], axis=1) for i in range(0, len(tiles), columns)]
    return np.concatenate(rows, axis=0)
