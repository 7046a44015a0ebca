"""The contact sheet: tile sizes, enlarged small frames, labels that never overlap."""

import numpy as np
import pytest

from signnet_jax.hht import preview


def _inputs(n=12, size=64):
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (n, 90, 160, 3), np.uint8)
    tunnelled = rng.integers(0, 256, (n, size, size, 3), np.uint8)
    # both hands in the same place: their labels would sit on each other
    boxes = np.tile(np.float32([0.4, 0.4, 0.6, 0.6]), (n, 3, 1))
    return source, tunnelled, boxes, np.full((n, 3), 3, np.int8)


def test_small_frames_are_enlarged_and_captioned():
    sheet = preview.contact_sheet(*_inputs(size=64), count=6, columns=2)
    # tiles of 256: source 455 (16:9) + 4 + tunnelled 256 + 4, over a 20-pixel caption
    assert sheet.shape == (3 * (256 + 20), 2 * (455 + 4 + 256 + 4), 3)
    # the tunnelled frame is enlarged by repeating pixels (nearest neighbour)
    _, tunnelled, _, _ = _inputs(size=64)
    np.testing.assert_array_equal(sheet[:256, 459 : 459 + 256][::4, ::4], tunnelled[0])
    assert preview.contact_sheet(*_inputs(size=320), count=2).shape[0] == 320 + 25


@pytest.mark.parametrize("y", [0, 40, 98])  # boxes at the top, in the middle, at the bottom
def test_labels_never_overlap_and_stay_inside(y):
    image = np.full((100, 120, 3), 255, np.uint8)  # white: the dark label grounds show
    placed = []
    for text in ("head landmark", "R interpolated", "L interpolated"):
        preview._label(image, text, 30, y, (255, 0, 0), 0.4, placed)
    assert len(placed) == 3
    drawn = np.zeros((100, 120), bool)
    for i, (a0, b0, a1, b1) in enumerate(placed):
        assert 0 <= a0 < a1 <= 120 and 0 <= b0 < b1 <= 100
        for c0, d0, c1, d1 in placed[i + 1 :]:
            assert not (a0 < c1 and c0 < a1 and b0 < d1 and d0 < b1)
        label = image[b0:b1, a0:a1]
        # a whole label in its box: dark ground with red text on it, no white left
        assert not (label == 255).all(-1).any()
        assert (label == (0, 0, 0)).all(-1).mean() > 0.5
        assert ((label[..., 0] > 128) & (label[..., 1] < 64)).sum() > 20
        drawn[b0:b1, a0:a1] = True
    assert (image[~drawn] == 255).all()  # nothing drawn outside the boxes
