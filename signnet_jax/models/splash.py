"""Flash attention on TPUs: JAX's Pallas splash-attention kernel, for any token count.

The kernel works in blocks of 128 tokens; a 32-frame clip has 3136 (24.5 blocks). The
tokens are padded to the next multiple of 128 and given segment ids (real 0, padding
1), so real queries never attend to padding keys and the padding rows, which attend
only to each other, are dropped afterwards. The tokens x tokens score matrix is never
built: memory grows linearly with the tokens instead of quadratically.

On a backend other than TPU the same kernel runs in Pallas' interpreter (correct but
slow): that is how the tests check it against the other attention forms on the CPU.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from signnet_jax import sharding

BLOCK = 128  # tokens per kernel block (the kernel's default tile)


def padded_tokens(n: int) -> int:
    """Token count the kernel runs on: ``n`` rounded up to a whole number of blocks."""
    return -(-n // BLOCK) * BLOCK


def _sa():
    """JAX's splash-attention module, imported on first use (about 60 ms)."""
    from jax.experimental.pallas.ops.tpu import splash_attention

    return splash_attention


@functools.cache
def _kernel(heads: int, tokens: int, interpret: bool):
    sa = _sa()
    mask = sa.MultiHeadMask([sa.FullMask((tokens, tokens))] * heads)
    # Concrete block tables even when first asked for inside a trace (they are cached), kept
    # as numpy: a jax array made inside shard_map carries its manual mesh, which another
    # trace (the backward pass, a later step outside shard_map) would refuse.
    with jax.ensure_compile_time_eval():
        kernel = sa.make_splash_mha_single_device(
            mask, block_sizes=sa.BlockSizes.get_default(), interpret=interpret
        )
    return jax.tree.map(np.asarray, kernel)


def prepare(num_heads: int, num_tokens: int, platform: str) -> None:
    """Builds the kernel for this shape now (it is cached), outside any mesh.

    For compiling ahead of time for a TPU topology on a host without one
    (``bench/train.py --topology``): no array can be made under that topology's mesh, and
    building the kernel makes some.
    """
    _kernel(num_heads, padded_tokens(num_tokens), platform != "tpu")


_INTERPRET_WARNED = []


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v over (batch, tokens, heads, head_dim), the scale already in q.

    Each device runs the kernel on its own examples (``sharding.per_device_batch``).
    """
    platform = sharding.mesh_device().platform  # the device compiled for
    interpret = platform != "tpu"
    if interpret and not _INTERPRET_WARNED:
        _INTERPRET_WARNED.append(True)
        warnings.warn(
            f"model.attention='splash' is a TPU kernel; on {platform} it runs in "
            "Pallas' interpreter (slow). Use 'auto' outside TPUs.",
            stacklevel=2,
        )
    return sharding.per_device_batch(functools.partial(_local, interpret=interpret), q, k, v)


def _local(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool) -> jax.Array:
    _, n, heads, _ = q.shape
    p = padded_tokens(n)
    kernel = _kernel(heads, p, interpret)
    segment = (jnp.arange(p) >= n).astype(jnp.int32)
    ids = _sa().SegmentIds(q=segment, kv=segment)

    def one(q, k, v):  # (tokens, heads, head_dim) of one example
        q, k, v = (jnp.pad(t.transpose(1, 0, 2), ((0, 0), (0, p - n), (0, 0))) for t in (q, k, v))
        return kernel(q, k, v, segment_ids=ids)[:, :n].transpose(1, 0, 2)

    return jax.vmap(one)(q, k, v)
