"""Device-side normalisation and random erasing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from signnet_jax.data import device


def test_normalize_matches_imagenet_formula():
    clip = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5, 3), dtype=np.uint8)
    out = np.asarray(device.normalize(jnp.asarray(clip)))
    expected = (clip / 255.0 - np.array(device.IMAGENET_MEAN)) / np.array(device.IMAGENET_STD)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert device.normalize(jnp.asarray(clip), jnp.bfloat16).dtype == jnp.bfloat16


def test_erase_replaces_exactly_the_box_in_every_frame_with_fresh_noise():
    clip = np.full((2, 4, 16, 20, 3), 128, np.uint8)
    boxes = np.array([[2, 3, 5, 7], [0, 0, 0, 0]], np.int32)
    fn = jax.jit(device.normalize_and_erase)
    out = np.asarray(fn(jnp.asarray(clip), jnp.asarray(boxes), jax.random.key(0)))
    plain = np.asarray(device.normalize(jnp.asarray(clip)))
    inside = np.zeros((16, 20), bool)
    inside[2:7, 3:10] = True
    # Clip 0: outside the box untouched, inside replaced in every frame.
    np.testing.assert_array_equal(out[0][:, ~inside], plain[0][:, ~inside])
    noise = out[0][:, inside]
    assert not np.any(np.isclose(noise, plain[0][:, inside]))
    assert abs(noise.mean()) < 0.2 and abs(noise.std() - 1.0) < 0.15
    # Per-pixel, per-frame noise (the reference draws new noise for each frame).
    assert not np.allclose(noise[0], noise[1])
    # Clip 1: height 0 means no erasing.
    np.testing.assert_array_equal(out[1], plain[1])


def test_erase_box_shape_is_checked():
    with pytest.raises(ValueError, match=r"erase_box has shape \(3, 4\), expected \(2, 4\)"):
        device.normalize_and_erase(
            jnp.zeros((2, 1, 4, 4, 3), jnp.uint8), jnp.zeros((3, 4), jnp.int32), jax.random.key(0)
        )
