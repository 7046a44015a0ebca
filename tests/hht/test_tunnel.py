"""The Tunneller end to end on the real sample clip (MediaPipe stand-in models)."""

import re

import cv2
import numpy as np
import pytest

from signnet_jax.hht import (
    HHTSettings,
    NoPersonWarning,
    Tunneller,
    VideoError,
    coverage,
    layout_cells,
    read_video,
    write_video,
)
from signnet_jax.hht.boxes import POSE_HAND, wrist_in_view

NONE = 0


@pytest.fixture(scope="module")
def tunneller():
    with Tunneller() as t:
        yield t


@pytest.fixture(scope="module")
def result(tunneller, sign_sample):
    calls = []
    r = tunneller.process_video(sign_sample, progress=lambda *args: calls.append(args))
    assert calls == [(i, 76) for i in range(1, 77)]
    return r


@pytest.fixture(scope="module")
def source(sign_sample):
    return read_video(sign_sample)[0]


def centres(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def test_result_shapes_and_ranges(result):
    n = 76
    assert result.frames.shape == (n, 256, 256, 3) and result.frames.dtype == np.uint8
    assert result.boxes.shape == (n, 3, 4) and result.boxes.dtype == np.float32
    assert result.box_source.shape == (n, 3) and result.box_source.dtype == np.int8
    assert result.fps == 25.0 and result.source_size == (256, 256)
    located = result.box_source > 0
    assert (result.boxes[~located] == -1).all()
    b = result.boxes[located]
    assert (b >= 0).all() and (b <= 1).all() and (b[:, 2:] > b[:, :2]).all()
    # square crops: the source frame is square, so normalized sides are equal too
    np.testing.assert_allclose(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], atol=1e-5)
    assert set(np.unique(result.box_source)) <= {0, 1, 2, 3}


def test_head_found_in_at_least_95_percent_of_frames(result):
    assert coverage(result.box_source)["head"]["located"] >= 0.95 * 76
    # and from the face detector itself in all but the last (black) frame
    assert coverage(result.box_source)["head"]["landmark"] >= 75


def test_both_hands_located_wherever_the_pose_wrist_is_visible_in_frame(result):
    visible = wrist_in_view(result.landmarks.pose, 0.5)
    # the reference finds pose wrists in about frames 23-57
    assert 30 <= visible[:, 0].sum() <= 40 and 30 <= visible[:, 1].sum() <= 40
    for side in range(2):
        assert (result.box_source[visible[:, side], 1 + side] != NONE).all()
    # hand landmarks fail on the painted hands, so this is the pose fallback's work
    assert coverage(result.box_source)["right_hand"]["pose"] >= 30


def test_no_right_left_swap(result):
    both = (result.box_source[:, 1] > 0) & (result.box_source[:, 2] > 0)
    c = centres(result.boxes)
    for t in np.flatnonzero(both[1:] & both[:-1]) + 1:
        keep = np.linalg.norm(c[t, 1] - c[t - 1, 1]) + np.linalg.norm(c[t, 2] - c[t - 1, 2])
        swap = np.linalg.norm(c[t, 1] - c[t - 1, 2]) + np.linalg.norm(c[t, 2] - c[t - 1, 1])
        assert keep < swap, t
    # and each box sits on its own side's pose wrist
    wrists = result.landmarks.pose[:, POSE_HAND[:, 0], :2]
    for t in np.flatnonzero(both & np.isfinite(wrists[:, 0, 0])):
        d = np.linalg.norm(c[t, 1:, None] - wrists[t, None], axis=-1)  # box x wrist
        assert d[0, 0] < d[0, 1] and d[1, 1] < d[1, 0], t


def test_hands_gated_to_frames_where_they_can_be_found(result):
    run = result.landmarks.hands_run
    assert 0 < run.sum() < 76
    assert not run[:10].any()  # hands at rest below the frame
    # after a run that found no hand, the next comes hand_retry (3) frames later
    tries = np.flatnonzero(run)
    found = np.isfinite(result.landmarks.hands[tries, :, 0, 0]).any(axis=1)
    gaps = np.diff(tries)
    assert (gaps[~found[:-1]] >= 3).all()


def test_tunnelled_frame_holds_the_crops(result, source):
    cells = layout_cells("grid2x2", 256)
    t = 40
    expected = cv2.resize(source[t], (128, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(result.frames[t, :128, :128], expected)
    height, width = source.shape[1:3]
    for i, part in enumerate(("head", "right_hand", "left_hand")):
        assert result.box_source[t, i] > 0, part  # found at this frame
        # the box's pixels (it lies inside the frame here), fitted into the 128 px cell with
        # its aspect ratio kept, centred on black: bilinear when enlarged, area when shrunk
        bx0, by0, bx1, by1 = np.rint(result.boxes[t, i] * [width, height, width, height]).astype(
            int
        )
        assert 0 <= bx0 < bx1 <= width and 0 <= by0 < by1 <= height, part
        crop = source[t, by0:by1, bx0:bx1]
        scale = min(128 / crop.shape[1], 128 / crop.shape[0])
        nw, nh = round(crop.shape[1] * scale), round(crop.shape[0] * scale)
        shrink = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        expected = np.zeros((128, 128, 3), np.uint8)
        ox, oy = (128 - nw) // 2, (128 - nh) // 2
        expected[oy : oy + nh, ox : ox + nw] = cv2.resize(crop, (nw, nh), interpolation=shrink)
        x0, y0, x1, y1 = cells[part]
        np.testing.assert_array_equal(result.frames[t, y0:y1, x0:x1], expected, err_msg=part)


def test_reused_tunneller_gives_the_same_result(tunneller, result, sign_sample):
    again = tunneller.process_video(sign_sample)
    np.testing.assert_array_equal(again.box_source, result.box_source)
    np.testing.assert_allclose(again.boxes, result.boxes, atol=1e-4)


def test_a_video_detects_the_same_after_another_as_in_a_new_tunneller(source):
    # the pose task smooths its landmarks over frames: after ten frames of another video a
    # single frame's pose visibilities differed by up to 0.88 when only the tracks were ended
    times = np.arange(len(source)) / 25.0
    with Tunneller() as reused:
        reused.detect(source[:10], times[:10])
        after = reused.detect(source[30:31], times[30:31])
    with Tunneller() as new:
        alone = new.detect(source[30:31], times[30:31])
    for field in ("pose", "hands", "faces", "hands_run", "hand_label"):
        np.testing.assert_array_equal(getattr(after, field), getattr(alone, field), err_msg=field)


def test_span_detects_only_its_frames(tunneller, sign_sample, source):
    part = tunneller.process_video(sign_sample, start_frame=30, end_frame=40)
    assert part.frames.shape[0] == 10 and len(part.landmarks) == 10
    np.testing.assert_array_equal(
        part.frames[0, :128, :128],
        cv2.resize(source[30], (128, 128), interpolation=cv2.INTER_AREA),
    )
    assert (part.box_source > 0).all()


def test_timestamps_start_at_zero_and_increase_over_repeated_times():
    from signnet_jax.hht.tunnel import _timestamps

    np.testing.assert_array_equal(_timestamps(np.array([5.0, 5.04, 5.04, 5.08])), [0, 40, 41, 80])
    np.testing.assert_array_equal(_timestamps(np.array([0.0, 0.0, 0.0])), [0, 1, 2])


def test_faithful_mode_keeps_the_originals_gaps(sign_sample, source):
    with Tunneller(HHTSettings(faithful=True)) as t:
        r = t.process_video(sign_sample, start_frame=30, end_frame=36)
    assert r.landmarks.hands_run.all()  # no gating: the original runs hands everywhere
    assert (r.box_source[:, 0] == 1).all()
    # no hand landmarks on the painted hands -> black hand quadrants, no fallback
    assert (r.box_source[:, 1:] == NONE).all()
    assert (r.frames[:, :128, 128:] == 0).all() and (r.frames[:, 128:, 128:] == 0).all()
    np.testing.assert_array_equal(r.frames[0, :128, :128], cv2.resize(source[30], (128, 128)))
    # head box: face detector box plus 10 px, whole pixels
    px = r.boxes[:, 0] * 256
    np.testing.assert_allclose(px, np.round(px), atol=1e-3)


def test_noise_video_warns_and_keeps_the_whole_frame(tunneller, tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (12, 96, 128, 3), dtype=np.uint8)
    path = tmp_path / "noise.mp4"
    write_video(path, noise, 25)
    with pytest.warns(NoPersonWarning, match=re.escape(f"{path}: no head or hand found")):
        r = tunneller.process_video(path)
    assert (r.box_source == NONE).all() and (r.boxes == -1).all()
    decoded, _ = read_video(path)
    # 128x96 -> 128x96 in the 128x128 cell: 16 black rows above and below
    np.testing.assert_array_equal(r.frames[:, 16:112, :128], decoded)
    assert (r.frames[:, :16, :128] == 0).all()
    assert (r.frames[:, 128:] == 0).all() and (r.frames[:, :, 128:] == 0).all()


def test_bad_file_raises_video_error(tunneller, tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("not a video")
    with pytest.raises(VideoError, match=re.escape(str(path))):
        tunneller.process_video(path)


def test_closed_tunneller_refuses_work(sign_sample):
    t = Tunneller()
    with t:
        pass
    t.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        t.process_video(sign_sample, end_frame=2)


def test_a_model_that_fails_to_load_closes_the_tasks_already_made(
    shared_dir, tmp_path, monkeypatch
):
    import shutil
    import zipfile

    from mediapipe.tasks.python import vision

    from signnet_jax.hht.models import ModelFileError

    models = tmp_path / "models"
    shutil.copytree(shared_dir / "mediapipe_models", models)
    with zipfile.ZipFile(models / "hand_landmarker.task", "w") as z:  # right names, bad bytes
        z.writestr("hand_detector.tflite", b"broken")
        z.writestr("hand_landmarks_detector.tflite", b"broken")
    closed = []
    close = vision.PoseLandmarker.close
    monkeypatch.setattr(
        vision.PoseLandmarker, "close", lambda task: (closed.append(1), close(task))
    )
    with pytest.raises(ModelFileError, match=r"hand_landmarker.task: MediaPipe cannot load"):
        Tunneller(models_dir=str(models))
    # the pose task made before the hand model failed is closed now: left to the garbage
    # collector, MediaPipe's close could block whatever code happened to trigger it
    assert closed  # (its own __del__ then calls close() again, a no-op)
