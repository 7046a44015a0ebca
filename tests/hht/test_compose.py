"""The pure composer, driven by synthetic frames and known boxes."""

import cv2
import numpy as np
import pytest

from signnet_jax.hht import HHTSettings, compose_frames, layout_cells, read_video
from signnet_jax.hht.compose import box_to_pixels
from signnet_jax.hht.settings import PARTS

W, H = 200, 100
YELLOW, RED, BLUE, GREY = (255, 255, 0), (255, 0, 0), (0, 0, 255), (50, 50, 50)
# Solid patches (x0, y0, x1, y1) in source pixels, so any crop inside one is one colour.
HEAD, RIGHT, LEFT = (10, 10, 50, 50), (120, 40, 160, 80), (160, 0, 200, 40)


def source_frame() -> np.ndarray:
    f = np.full((H, W, 3), GREY, np.uint8)
    for (x0, y0, x1, y1), colour in ((HEAD, YELLOW), (RIGHT, RED), (LEFT, BLUE)):
        f[y0:y1, x0:x1] = colour
    return f


def norm(px) -> list[float]:
    x0, y0, x1, y1 = px
    return [x0 / W, y0 / H, x1 / W, y1 / H]


def compose_one(boxes, source=(1, 1, 1), frame=None, **settings) -> np.ndarray:
    frame = source_frame() if frame is None else frame
    out = compose_frames(
        frame[None],
        np.asarray(boxes, np.float32)[None],
        np.asarray(source, np.int8)[None],
        HHTSettings(**settings),
    )
    assert out.shape[0] == 1 and out.dtype == np.uint8
    return out[0]


def cell(image, c):
    x0, y0, x1, y1 = c
    return image[y0:y1, x0:x1]


def test_layout_cells_by_hand():
    assert layout_cells("grid2x2", 256) == {
        "frame": (0, 0, 128, 128),
        "right_hand": (128, 0, 256, 128),
        "head": (0, 128, 128, 256),
        "left_hand": (128, 128, 256, 256),
    }
    assert layout_cells("strip", 256) == {
        "frame": (0, 0, 256, 171),
        "head": (0, 171, 85, 256),
        "right_hand": (85, 171, 170, 256),
        "left_hand": (170, 171, 256, 256),
    }


@pytest.mark.parametrize("layout", ["grid2x2", "strip"])
@pytest.mark.parametrize("size", [16, 96, 224, 256, 258])
def test_cells_tile_the_output_exactly(layout, size):
    cover = np.zeros((size, size), int)
    for x0, y0, x1, y1 in layout_cells(layout, size).values():
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()


def test_grid2x2_places_each_part_in_its_quadrant():
    out = compose_one([norm(HEAD), norm(RIGHT), norm(LEFT)], size=256)
    cells = layout_cells("grid2x2", 256)
    assert (cell(out, cells["head"]) == YELLOW).all()
    assert (cell(out, cells["right_hand"]) == RED).all()
    assert (cell(out, cells["left_hand"]) == BLUE).all()
    # Whole frame, aspect kept: 200x100 -> 128x64, centred with 32 black rows above/below.
    frame_cell = cell(out, cells["frame"])
    assert (frame_cell[:32] == 0).all() and (frame_cell[96:] == 0).all()
    expected = cv2.resize(source_frame(), (128, 64), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(frame_cell[32:96], expected)


def test_strip_layout_places_whole_frame_on_top_and_parts_below():
    out = compose_one([norm(HEAD), norm(RIGHT), norm(LEFT)], layout="strip", size=96)
    # top 96x64: frame 200x100 -> 96x48 at rows 8..56; row below: three 32x32 cells.
    assert (out[:8] == 0).all() and (out[56:64] == 0).all()
    expected = cv2.resize(source_frame(), (96, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out[8:56], expected)
    assert (out[64:, 0:32] == YELLOW).all()
    assert (out[64:, 32:64] == RED).all()
    assert (out[64:, 64:96] == BLUE).all()


def test_missing_parts_leave_their_cells_black_but_keep_the_frame():
    out = compose_one([[-1] * 4] * 3, source=(0, 0, 0), size=64)
    cells = layout_cells("grid2x2", 64)
    for part in ("head", "right_hand", "left_hand"):
        assert (cell(out, cells[part]) == 0).all()
    # the whole frame as ever: 200x100 -> 32x16, 8 black rows above and below
    frame_cell = cell(out, cells["frame"])
    assert (frame_cell[:8] == 0).all() and (frame_cell[24:] == 0).all()
    expected = cv2.resize(source_frame(), (32, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(frame_cell[8:24], expected)


def test_source_none_wins_over_a_valid_box():
    out = compose_one([norm(HEAD), norm(RIGHT), norm(LEFT)], source=(1, 0, 3), size=64)
    cells = layout_cells("grid2x2", 64)
    assert (cell(out, cells["head"]) == YELLOW).all()
    assert (cell(out, cells["right_hand"]) == 0).all()
    assert (cell(out, cells["left_hand"]) == BLUE).all()


def test_boxes_past_the_edges_are_clipped():
    frame = source_frame()
    frame[0:20, 0:20] = (0, 255, 0)
    # Reaches 20 px past the top-left corner: clipped to the 20x20 green corner.
    out = compose_one([[-0.1, -0.2, 0.1, 0.2], norm(RIGHT), norm(LEFT)], frame=frame, size=64)
    assert (cell(out, layout_cells("grid2x2", 64)["head"]) == (0, 255, 0)).all()


def test_clipped_narrow_box_keeps_aspect_unless_faithful():
    frame = np.zeros((H, W, 3), np.uint8)
    frame[40:80, 190:200] = RED
    box = [0.95, 0.4, 1.3, 0.8]  # clipped to x 190..200, y 40..80: 10 x 40 px
    assert box_to_pixels(np.array(box), W, H) == (190, 40, 200, 80)
    out = compose_one([norm(HEAD), box, norm(LEFT)], frame=frame, size=256)
    hand = cell(out, layout_cells("grid2x2", 256)["right_hand"])
    # 10x40 scaled by 3.2 -> 32x128 centred in the 128x128 cell.
    assert (hand[:, 48:80] == RED).all()
    assert (hand[:, :48] == 0).all() and (hand[:, 80:] == 0).all()
    faithful = compose_one([norm(HEAD), box, norm(LEFT)], frame=frame, size=256, faithful=True)
    assert (cell(faithful, layout_cells("grid2x2", 256)["right_hand"]) == RED).all()


def test_tiny_box_grows_to_one_pixel():
    frame = source_frame()
    frame[50, 100] = (7, 8, 9)
    tiny = [0.5, 0.5, 0.501, 0.501]
    assert box_to_pixels(np.array(tiny), W, H) == (100, 50, 101, 51)
    out = compose_one([tiny, norm(RIGHT), norm(LEFT)], frame=frame, size=32)
    assert (cell(out, layout_cells("grid2x2", 32)["head"]) == (7, 8, 9)).all()
    # A zero-width box on the right edge still yields the last column.
    assert box_to_pixels(np.array([0.999, 0.2, 0.9999, 0.3]), W, H) == (199, 20, 200, 30)


@pytest.mark.parametrize(
    "box",
    [
        [0.5, 0.5, 0.4, 0.6],  # x1 < x0
        [0.5, 0.5, 0.5, 0.6],  # zero width
        [1.2, 0.2, 1.5, 0.4],  # entirely right of the frame
        [0.2, -0.5, 0.4, 0.0],  # entirely above
        [np.nan, 0.1, 0.2, 0.3],
        [-1, -1, -1, -1],
    ],
)
def test_degenerate_boxes_leave_the_cell_black(box):
    assert box_to_pixels(np.array(box, np.float32), W, H) is None
    out = compose_one([box, norm(RIGHT), norm(LEFT)], size=32)
    assert (cell(out, layout_cells("grid2x2", 32)["head"]) == 0).all()
    assert (cell(out, layout_cells("grid2x2", 32)["right_hand"]) == RED).all()


@pytest.mark.parametrize("layout", ["grid2x2", "strip"])
@pytest.mark.parametrize(
    "mask", [(True, False, True, False), (False, True, True, True), (True, True, False, False)]
)
def test_quadrant_mask_blacks_out_switched_off_cells(layout, mask):
    boxes = [norm(HEAD), norm(RIGHT), norm(LEFT)]
    full = compose_one(boxes, size=96, layout=layout)
    out = compose_one(boxes, size=96, layout=layout, quadrants=mask)
    for part, c in layout_cells(layout, 96).items():
        if mask[PARTS.index(part)]:
            np.testing.assert_array_equal(cell(out, c), cell(full, c))
        else:
            assert (cell(out, c) == 0).all(), part


def test_faithful_matches_a_hand_computed_frame():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    head, right = (5, 6, 25, 30), (40, 10, 63, 20)
    boxes = np.array(
        [
            [head[0] / 64, head[1] / 48, head[2] / 64, head[3] / 48],
            [right[0] / 64, right[1] / 48, right[2] / 64, right[3] / 48],
            [-1, -1, -1, -1],
        ],
        np.float32,
    )
    settings = HHTSettings(size=32, faithful=True)
    out = compose_frames(frame[None], boxes[None], np.array([[1, 1, 0]], np.int8), settings)[0]
    expected = np.zeros((32, 32, 3), np.uint8)
    expected[:16, :16] = cv2.resize(frame, (16, 16))  # whole frame stretched
    expected[16:, :16] = cv2.resize(frame[6:30, 5:25], (16, 16))  # head, bottom-left
    expected[:16, 16:] = cv2.resize(frame[10:20, 40:63], (16, 16))  # right hand, top-right
    # left hand missing: bottom-right stays black
    np.testing.assert_array_equal(out, expected)


def test_shape_errors_are_explained():
    with pytest.raises(ValueError, match=r"boxes must be \(2, 3, 4\)"):
        compose_frames(
            np.zeros((2, 8, 8, 3), np.uint8),
            np.zeros((2, 4), np.float32),
            np.zeros((2, 3), np.int8),
            HHTSettings(size=16),
        )
    with pytest.raises(ValueError, match="uint8"):
        compose_frames(
            np.zeros((1, 8, 8, 3), np.float32),
            np.zeros((1, 3, 4)),
            np.zeros((1, 3), np.int8),
            HHTSettings(size=16),
        )


def test_large_downscale_matches_plain_area_resize(sign_sample):
    # a real frame at HD size: the halving path must look like one area resize
    frame = read_video(sign_sample)[0][40]
    big = cv2.resize(frame, (1280, 640), interpolation=cv2.INTER_CUBIC)
    out = compose_frames(
        big[None], -np.ones((1, 3, 4), np.float32), np.zeros((1, 3), np.int8), HHTSettings()
    )[0]
    direct = cv2.resize(big, (128, 64), interpolation=cv2.INTER_AREA)
    diff = np.abs(out[32:96, :128].astype(int) - direct)
    assert diff.mean() < 1 and np.percentile(diff, 99) <= 6
