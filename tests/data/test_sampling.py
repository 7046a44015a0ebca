"""Sampling indices against hand-computed cases of the VideoMAEv2 rules."""

import numpy as np
import pytest

from signnet_jax.data import sampling

# clip_len 4, sampling_rate 2: the window is 8 frames.


def test_train_short_video_spreads_and_pads_with_last_frame():
    # 5 // 2 = 2 frames at linspace(0, 5, 2) = [0, 5], padded with 5, clipped to 4.
    idx = sampling.window_indices(5, 4, 2, end=0)
    np.testing.assert_array_equal(idx, [0, 4, 4, 4])
    assert idx.dtype == np.int64


def test_train_short_video_longer_case():
    # 7 // 2 = 3 frames at linspace(0, 7, 3) = [0, 3.5, 7] -> [0, 3, 7->6], pad 6.
    np.testing.assert_array_equal(sampling.window_indices(7, 4, 2, end=0), [0, 3, 6, 6])


def test_single_frame_video_repeats_it():
    np.testing.assert_array_equal(sampling.window_indices(1, 4, 2, end=0), [0, 0, 0, 0])
    np.testing.assert_array_equal(sampling.test_indices(1, 4, 2, 3, 2), [0, 0, 0, 0])


def test_train_exact_length_uses_linspace_over_whole_video():
    # n == 8: linspace(0, 8, 4) = [0, 2.67, 5.33, 8] -> [0, 2, 5, 7].
    np.testing.assert_array_equal(sampling.window_indices(8, 4, 2, end=0), [0, 2, 5, 7])
    assert sampling.train_window_end_range(8, 4, 2) == (0, 0)


def test_train_long_video_window():
    # end 10: start 2, linspace(2, 10, 4) = [2, 4.67, 7.33, 10] -> clipped to 9.
    np.testing.assert_array_equal(sampling.window_indices(20, 4, 2, end=10), [2, 4, 7, 9])
    assert sampling.train_window_end_range(20, 4, 2) == (8, 20)
    with pytest.raises(ValueError, match="window end 20 outside"):
        sampling.window_indices(20, 4, 2, end=20)


def test_train_random_end_covers_its_range():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(500):
        idx = sampling.train_indices(20, 4, 2, rng)
        assert len(idx) == 4 and idx.min() >= 0 and idx.max() <= 19
        assert np.all(np.diff(idx) >= 0)
        starts.add(int(idx[0]))
    # end in [8, 20) -> start in [0, 12).
    assert starts == set(range(12))


def test_val_window_is_centred():
    # end = (8 + 20) // 2 = 14, start 6, linspace(6, 14, 4) -> [6, 8, 11, 13].
    np.testing.assert_array_equal(sampling.val_indices(20, 4, 2), [6, 8, 11, 13])
    np.testing.assert_array_equal(sampling.val_indices(5, 4, 2), [0, 4, 4, 4])


def test_test_indices_one_segment():
    # strided [0, 2, ..., 18] (10 frames); one segment -> first window.
    np.testing.assert_array_equal(sampling.test_indices(20, 4, 2, 1, 0), [0, 2, 4, 6])


def test_test_indices_three_segments_long():
    # strided has 10 frames, step (10 - 4) / 2 = 3 -> starts 0, 3, 6.
    views = [sampling.test_indices(20, 4, 2, 3, s) for s in range(3)]
    np.testing.assert_array_equal(views[0], [0, 2, 4, 6])
    np.testing.assert_array_equal(views[1], [6, 8, 10, 12])
    np.testing.assert_array_equal(views[2], [12, 14, 16, 18])


def test_test_indices_three_segments_fractional_step():
    # n 10: strided [0, 2, 4, 6, 8], step 0.5 -> starts int(0), int(0.5)=0, int(1.0)=1.
    views = [sampling.test_indices(10, 4, 2, 3, s).tolist() for s in range(3)]
    assert views == [[0, 2, 4, 6], [0, 2, 4, 6], [2, 4, 6, 8]]


def test_test_indices_short_and_exact():
    # n 5: strided [0, 2, 4] padded -> [0, 2, 4, 4]; all segments equal.
    for s in range(3):
        np.testing.assert_array_equal(sampling.test_indices(5, 4, 2, 3, s), [0, 2, 4, 4])
    # n 8: strided [0, 2, 4, 6] is exactly one clip.
    for s in range(3):
        np.testing.assert_array_equal(sampling.test_indices(8, 4, 2, 3, s), [0, 2, 4, 6])
    with pytest.raises(ValueError, match="segment 3 outside"):
        sampling.test_indices(8, 4, 2, 3, 3)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="video has 0 frames"):
        sampling.window_indices(0, 4, 2, end=0)
    with pytest.raises(ValueError, match="must be positive"):
        sampling.test_indices(10, 0, 2, 1, 0)


def test_spatial_rules():
    assert sampling.short_side_resize_shape(256, 256, 224) == (224, 224)
    assert sampling.short_side_resize_shape(240, 320, 224) == (224, 298)
    assert sampling.short_side_resize_shape(320, 240, 224) == (298, 224)
    # 3 crops along the long side: step (298 - 224) / 2 = 37.
    assert [sampling.test_crop_offset(224, 298, 224, 3, c) for c in range(3)] == [
        (0, 0),
        (0, 37),
        (0, 74),
    ]
    assert [sampling.test_crop_offset(298, 224, 224, 3, c) for c in range(3)] == [
        (0, 0),
        (37, 0),
        (74, 0),
    ]
    assert sampling.test_crop_offset(224, 298, 224, 1, 0) == (0, 0)
    assert sampling.center_crop_offset(256, 256, 224) == (16, 16)
    assert sampling.center_crop_offset(224, 298, 224) == (0, 37)
