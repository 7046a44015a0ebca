"""Box logic on synthetic landmarks, with hand-computed boxes.

Source frame 256 x 128; every coordinate below is an integer pixel, so the
normalized values are exact in float32.
"""

import io

import numpy as np
import pytest

from signnet_jax.hht import HHTSettings, Landmarks, compute_boxes

W, H = 256, 128
NONE, LANDMARK, POSE, INTERPOLATED = 0, 1, 2, 3
EXACT = HHTSettings(smoothing=0.0)

POSE_PX = {
    0: (128, 40),  # nose
    1: (124, 36), 2: (122, 36), 3: (120, 36), 4: (132, 36), 5: (134, 36), 6: (136, 36),
    7: (144, 40), 8: (112, 40), 9: (124, 48), 10: (132, 48),
    11: (176, 64), 12: (80, 64),  # body's left shoulder is on the image's right
    16: (64, 96), 18: (60, 88), 20: (68, 84), 22: (72, 92),  # body's right hand
    15: (192, 96), 17: (196, 88), 19: (188, 84), 21: (184, 92),  # body's left hand
}  # fmt: skip


def pose(visibility=0.9, moves=None) -> np.ndarray:
    p = np.zeros((33, 3), np.float32)
    for i, (x, y) in {**POSE_PX, **(moves or {})}.items():
        p[i] = (x / W, y / H, visibility)
    return p


def hand(wrist) -> np.ndarray:
    """21 points: the wrist, then a 16 x 24 px fan above it."""
    wx, wy = wrist
    xs = np.linspace(wx - 8, wx + 8, 20)
    ys = np.linspace(wy - 24, wy - 4, 20)
    pts = np.concatenate([[[wx, wy]], np.stack([xs, ys], -1)])
    return (pts / [W, H]).astype(np.float32)


def landmarks(n: int) -> Landmarks:
    return Landmarks.empty(n)


def px(box) -> np.ndarray:
    return np.asarray(box) * [W, H, W, H]


def test_nothing_found_gives_no_boxes():
    boxes, source = compute_boxes(landmarks(5), W, H, EXACT)
    assert (source == NONE).all() and (boxes == -1).all()
    assert boxes.dtype == np.float32 and source.dtype == np.int8


def test_landmark_hands_go_to_the_nearest_pose_wrist_whatever_their_label():
    lm = landmarks(1)
    lm.pose[0] = pose()
    # Both labelled 'Left', listed left hand first: only the pose decides the side.
    lm.hands[0] = [hand((192, 96)), hand((64, 96))]
    lm.hand_label[0] = [-1, -1]
    boxes, source = compute_boxes(lm, W, H, EXACT)
    assert source[0].tolist() == [POSE, LANDMARK, LANDMARK]
    # extent 56..72 x 72..96 -> side 24 * 1.3 = 31.2 around (64, 84)
    np.testing.assert_allclose(px(boxes[0, 1]), [48.4, 68.4, 79.6, 99.6], atol=1e-3)
    np.testing.assert_allclose(px(boxes[0, 2]), [176.4, 68.4, 207.6, 99.6], atol=1e-3)


def test_pose_fallback_box_from_wrist_knuckles_and_shoulder_width():
    lm = landmarks(1)
    lm.pose[0] = pose()
    boxes, source = compute_boxes(lm, W, H, EXACT)
    assert source[0].tolist() == [POSE, POSE, POSE]
    # centre 0.3 * wrist (64, 96) + 0.7 * knuckles (64, 86) = (64, 89);
    # side 0.6 * shoulder width 96 = 57.6, times 1 + 2 * 0.15.
    np.testing.assert_allclose(px(boxes[0, 1]), [26.56, 51.56, 101.44, 126.44], atol=1e-3)


@pytest.mark.parametrize(
    "moves, visibility",
    [({16: (64, 130)}, 0.9), ({16: (-3, 96)}, 0.9), ({}, 0.4)],
    ids=["wrist-below-frame", "wrist-left-of-frame", "wrist-not-visible"],
)
def test_no_fallback_for_a_wrist_out_of_frame_or_invisible(moves, visibility):
    lm = landmarks(1)
    lm.pose[0] = pose(visibility, moves)
    _, source = compute_boxes(lm, W, H, EXACT)
    assert source[0, 1] == NONE


def test_collapsed_landmarks_still_give_a_small_square():
    lm = landmarks(1)
    lm.hands[0, 0] = np.full((21, 2), [100 / W, 50 / H], np.float32)
    lm.hand_label[0, 0] = 1
    boxes, source = compute_boxes(lm, W, H, EXACT)
    assert source[0, 1] == LANDMARK
    np.testing.assert_allclose(px(boxes[0, 1]), [96, 46, 104, 54], atol=1e-4)


def test_box_near_the_edge_moves_inside_and_stays_square():
    lm = landmarks(1)
    lm.pose[0] = pose(moves={15: (254, 96), 17: (255, 88), 19: (250, 84), 21: (248, 92)})
    boxes, source = compute_boxes(lm, W, H, EXACT)
    x0, y0, x1, y1 = px(boxes[0, 2])
    assert source[0, 2] == POSE
    assert x1 == pytest.approx(256) and x0 == pytest.approx(256 - 74.88, abs=1e-3)
    assert (x1 - x0) == pytest.approx(y1 - y0, abs=1e-3)


def test_face_that_agrees_with_the_pose_beats_a_stronger_stray_one():
    lm = landmarks(2)
    stray, real = (100, 70, 150, 120, 0.9), (112, 24, 144, 56, 0.6)
    for t in range(2):
        lm.faces[t, :2] = [np.array(f) / [W, H, W, H, 1] for f in (stray, real)]
    lm.pose[0] = pose()
    boxes, source = compute_boxes(lm, W, H, HHTSettings(smoothing=0.0, max_hold=0))
    assert source[:, 0].tolist() == [LANDMARK, LANDMARK]
    # square 32 * 1.3 around (128, 40)
    np.testing.assert_allclose(px(boxes[0, 0]), [107.2, 19.2, 148.8, 60.8], atol=1e-3)
    # no pose in frame 1: the most confident face is all there is to go on
    np.testing.assert_allclose(px(boxes[1, 0])[[0, 2]], [125 - 32.5, 125 + 32.5], atol=1e-3)


def test_weak_face_without_pose_agreement_is_ignored():
    lm = landmarks(2)
    weak = np.array([100, 70, 150, 120, 0.6]) / [W, H, W, H, 1]  # not around the nose
    lm.faces[:, 0] = weak
    lm.pose[0] = pose()
    _, source = compute_boxes(lm, W, H, HHTSettings(smoothing=0.0, max_hold=0))
    # frame 0: the pose head instead; frame 1 (no pose): nothing
    assert source[:, 0].tolist() == [POSE, NONE]


def test_head_falls_back_to_pose_face_points():
    lm = landmarks(1)
    lm.pose[0] = pose()
    boxes, source = compute_boxes(lm, W, H, EXACT)
    assert source[0, 0] == POSE
    centre = px(boxes[0, 0]).reshape(2, 2).mean(axis=0)
    np.testing.assert_allclose(centre, np.mean([POSE_PX[i] for i in range(11)], axis=0), atol=1e-3)


def test_a_hand_far_from_a_confident_wrist_is_a_false_detection():
    lm = landmarks(1)
    lm.pose[0] = pose()
    lm.hands[0, 0] = hand((250, 5))
    lm.hand_label[0, 0] = -1
    _, source = compute_boxes(lm, W, H, EXACT)
    assert source[0, 1:].tolist() == [POSE, POSE]


def test_without_pose_the_handedness_label_decides():
    lm = landmarks(2)
    lm.hands[0] = [hand((192, 96)), hand((64, 96))]
    lm.hand_label[0] = [-1, 1]
    lm.hands[1] = [hand((192, 96)), hand((64, 96))]
    lm.hand_label[1] = [1, 1]  # same label twice: image left is the body's right
    boxes, source = compute_boxes(lm, W, H, HHTSettings(smoothing=0.0, max_hold=0))
    assert (source[:, 1:] == LANDMARK).all()
    for t in range(2):
        assert px(boxes[t, 1])[0] < 100 < px(boxes[t, 2])[0]


def test_short_gaps_are_interpolated():
    lm = landmarks(15)
    for t in [*range(5), *range(10, 15)]:
        lm.hands[t, 0] = hand((64 if t < 5 else 80, 96))
        lm.hand_label[t, 0] = 1
    boxes, source = compute_boxes(lm, W, H, EXACT)
    assert source[:, 1].tolist() == [LANDMARK] * 5 + [INTERPOLATED] * 5 + [LANDMARK] * 5
    centre_x = px(boxes[:, 1])[:, [0, 2]].mean(axis=1)
    # frame 4 at x 64 to frame 10 at x 80, in six equal steps
    np.testing.assert_allclose(centre_x[4:11], 64 + 16 / 6 * np.arange(7), atol=1e-3)


def test_long_gaps_hold_the_ends_for_a_bounded_number_of_frames():
    lm = landmarks(20)
    for t in [0, 1, 2, 17, 18, 19]:
        lm.hands[t, 0] = hand((64, 96))
        lm.hand_label[t, 0] = 1
    boxes, source = compute_boxes(lm, W, H, HHTSettings(smoothing=0.0, max_gap=4, max_hold=3))
    expected = [1] * 3 + [3] * 3 + [0] * 8 + [3] * 3 + [1] * 3
    assert source[:, 1].tolist() == expected
    np.testing.assert_array_equal(boxes[3:6, 1], np.repeat(boxes[2:3, 1], 3, axis=0))
    assert (boxes[6:14, 1] == -1).all()


def test_smoothing_keeps_a_still_box_still_and_calms_jitter():
    lm = landmarks(9)
    jitter = [0, 4, 0, 4, 0, 4, 0, 4, 0]
    for t in range(9):
        lm.hands[t, 0] = hand((64 + jitter[t], 96))
        lm.hand_label[t, 0] = 1
    raw, _ = compute_boxes(lm, W, H, EXACT)
    smooth, source = compute_boxes(lm, W, H, HHTSettings(smoothing=1.0))
    assert (source[:, 1] == LANDMARK).all()
    assert np.ptp(px(smooth[:, 1])[2:7, 0]) < 0.5 * np.ptp(px(raw[:, 1])[2:7, 0])
    for t in range(9):
        lm.hands[t, 0] = hand((64, 96))
    still, _ = compute_boxes(lm, W, H, HHTSettings(smoothing=2.0))
    np.testing.assert_allclose(still[:, 1], np.repeat(still[:1, 1], 9, axis=0), atol=1e-6)


def test_faithful_boxes_are_landmark_extent_plus_pixels_and_nothing_else():
    lm = landmarks(3)
    lm.pose[:] = pose()
    lm.hands[0, 0] = hand((64, 96))
    lm.faces[0, 0] = np.array([112, 24, 144, 56, 0.6]) / [W, H, W, H, 1]
    boxes, source = compute_boxes(lm, W, H, HHTSettings(faithful=True))
    # extent 56..72 x 72..96, then 10 px each side; the face box likewise.
    np.testing.assert_allclose(px(boxes[0, 1]), [46, 62, 82, 106], atol=1e-4)
    np.testing.assert_allclose(px(boxes[0, 0]), [102, 14, 154, 66], atol=1e-4)
    # no pose fallback (left hand, head in frames 1-2), no interpolation or holding
    assert source.tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_faithful_margin_is_clipped_at_the_frame_edge():
    lm = landmarks(1)
    lm.pose[:] = pose(moves={16: (4, 126)})
    lm.hands[0, 0] = hand((4, 126))
    boxes, _ = compute_boxes(lm, W, H, HHTSettings(faithful=True))
    # extent x -4..12, y 102..126 -> int() truncation, minus/plus 10, clipped
    np.testing.assert_allclose(px(boxes[0, 1]), [0, 92, 22, 128], atol=1e-4)


def test_faithful_finds_no_head_or_hands_in_a_frame_without_pose():
    # The original's Holistic crops the face and both hands from regions its pose
    # landmarks give, so in a frame without a pose all three cells stay black.
    lm = landmarks(2)
    lm.pose[1] = pose()
    for t in range(2):
        lm.hands[t, 0] = hand((64, 96))
        lm.hand_label[t, 0] = 1
        lm.faces[t, 0] = np.array([112, 24, 144, 56, 0.9]) / [W, H, W, H, 1]
    boxes, source = compute_boxes(lm, W, H, HHTSettings(faithful=True))
    assert source.tolist() == [[0, 0, 0], [1, 1, 0]]
    assert np.all(boxes[0] == -1)
    np.testing.assert_allclose(px(boxes[1, 1]), [46, 62, 82, 106], atol=1e-4)
    np.testing.assert_allclose(px(boxes[1, 0]), [102, 14, 154, 66], atol=1e-4)


def test_landmarks_round_trip_through_bytes_exactly():
    rng = np.random.default_rng(0)
    lm = Landmarks.empty(5)
    lm.pose[1:] = rng.random((4, 33, 3), np.float32)
    lm.hands[2, 0] = rng.random((21, 2), np.float32)
    lm.hand_label[2] = (1, -1)
    lm.faces[3, 0] = (0.1, 0.2, 0.3, 0.4, 0.9)
    lm.hands_run[::2] = True
    back = Landmarks.from_bytes(lm.to_bytes())
    assert len(back) == 5
    for name in ("pose", "hands", "hand_label", "faces", "hands_run"):
        a, b = getattr(lm, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)  # NaN where nothing was found, too
    assert len(Landmarks.from_bytes(Landmarks.empty(0).to_bytes())) == 0


def test_landmarks_from_other_bytes_are_refused():
    good = Landmarks.empty(3).to_bytes()
    for damaged in (good[:100], good[: len(good) // 2], b"", b"not an npz file"):
        with pytest.raises(ValueError, match="not a landmarks file"):
            Landmarks.from_bytes(damaged)
    # damage anywhere: whatever np.load raises for it (zip, zlib, .npy header errors) is this
    rng = np.random.default_rng(0)
    for _ in range(200):
        damaged = bytearray(good)
        for i in rng.integers(0, len(good), rng.integers(1, 5)):
            damaged[i] = rng.integers(0, 256)
        try:
            Landmarks.from_bytes(bytes(damaged))
        except ValueError as e:
            assert str(e).startswith("not a landmarks file"), e
    one = io.BytesIO()
    np.save(one, np.zeros(3))
    with pytest.raises(ValueError, match=r"one array \(.npy\), not an .npz file"):
        Landmarks.from_bytes(one.getvalue())
    other = io.BytesIO()
    np.savez(other, pose=np.zeros((3, 33, 3), np.float32))
    with pytest.raises(ValueError, match=r"not a landmarks file: hands is missing"):
        Landmarks.from_bytes(other.getvalue())
    lm = Landmarks.empty(3)
    lm.hands = np.zeros((3, 2, 21, 3), np.float32)  # another layout
    with pytest.raises(ValueError, match=r"hands is float32 \(3, 2, 21, 3\), expected float32 "):
        Landmarks.from_bytes(lm.to_bytes())
    extra = io.BytesIO()
    np.savez(extra, **vars(Landmarks.empty(3)), more=np.zeros(1))
    with pytest.raises(ValueError, match=r"it holds \['faces', "):
        Landmarks.from_bytes(extra.getvalue())
