"""Device-side half of the input pipeline: normalisation and random erasing.

Clips leave the host as uint8 (4x less host-to-device traffic than float32);
the training step calls ``normalize_and_erase`` inside its jit, eval calls
``normalize``. Erasing follows the reference ``RandomErasing(mode='pixel',
cube=True)``: inside the clip's box every frame, pixel and channel becomes
fresh N(0, 1) noise in normalised space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(clip: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """(x / 255 - mean) / std per channel.

    Args:
      clip: uint8 ``(..., H, W, 3)``.
      dtype: output dtype.

    Returns:
      normalised clip of ``dtype``, same shape.
    """
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    inv_std = 1.0 / (jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0)
    return ((clip.astype(jnp.float32) - mean) * inv_std).astype(dtype)


def erase_mask(erase_box: jax.Array, height: int, width: int) -> jax.Array:
    """Boolean ``(B, H, W)`` mask of each erase box (top, left, h, w); h = 0 erases nothing."""
    top, left, h, w = (erase_box[:, i, None, None] for i in range(4))
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def normalize_and_erase(
    clip: jax.Array, erase_box: jax.Array, key: jax.Array, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """Normalise a training batch and apply its random-erasing boxes.

    Args:
      clip: uint8 ``(B, T, H, W, 3)`` from the train iterator's ``clip``.
      erase_box: int32 ``(B, 4)`` from the train iterator's ``erase_box``.
      key: PRNG key for the noise (e.g. ``jax.random.fold_in(key, step)``).
      dtype: output dtype.

    Returns:
      ``(B, T, H, W, 3)`` array of ``dtype``.
    """
    batch, _, height, width, _ = clip.shape
    if erase_box.shape != (batch, 4):
        raise ValueError(f"erase_box has shape {erase_box.shape}, expected ({batch}, 4)")
    normed = normalize(clip, jnp.float32)
    mask = erase_mask(erase_box, height, width)[:, None, :, :, None]
    noise = jax.random.normal(key, clip.shape, jnp.float32)
    return jnp.where(mask, noise, normed).astype(dtype)
