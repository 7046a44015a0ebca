"""Splash attention (the TPU flash kernel), run in Pallas' interpreter on the CPU."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from signnet_jax import sharding
from signnet_jax.models import splash, vit
from tests.models.helpers import assert_attention_kernels_agree, random_clip, rel_err


@pytest.fixture(autouse=True)
def _quiet_interpreter(monkeypatch):
    # the once-per-process "runs in the interpreter" warning is checked on its own below
    monkeypatch.setattr(splash, "_INTERPRET_WARNED", [True])


@pytest.mark.parametrize(
    ("tokens", "padded"), [(1, 128), (128, 128), (200, 256), (1568, 1664), (3136, 3200)]
)
def test_tokens_are_padded_to_whole_blocks(tokens, padded):
    assert splash.padded_tokens(tokens) == padded


def _qkv(batch, tokens, heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    return [
        jnp.asarray(rng.normal(size=(batch, tokens, heads, head_dim)), jnp.float32)
        for _ in range(3)
    ]


def _explicit(q, k, v):  # (b, n, h, d) like splash_attention
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    return vit.explicit_attention(q, k, v).transpose(0, 2, 1, 3)


def test_padding_is_invisible_to_the_real_tokens():
    # 200 tokens run as 256: real queries must not attend to the 56 padding keys
    q, k, v = _qkv(2, 200, 3, 64)
    q = q * 64**-0.5
    np.testing.assert_allclose(splash.splash_attention(q, k, v), _explicit(q, k, v), atol=2e-6)

    def loss(attention):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))

    got = jax.grad(loss(splash.splash_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_explicit), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 1e-5


def _tiny(attention, dtype="float32"):
    return vit.ViTConfig.from_preset(
        "S", num_classes=6, num_frames=4, img_size=32, depth=2, dtype=dtype, attention=attention
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_splash_model_matches_the_explicit_model(dtype):
    assert_attention_kernels_agree("splash", "explicit", dtype)


def test_each_device_runs_the_kernel_on_its_own_examples():
    mesh = sharding.make_mesh(1)  # 8 x 1: the batch split 8 ways
    ref = vit.create_model(_tiny("explicit"))
    fast = vit.model_from_params(_tiny("splash"), vit.params_of(ref))
    x = jnp.asarray(random_clip(8, 4, 32, seed=2))
    want = np.asarray(ref(x))
    forward = nnx.jit(lambda m, x: m(x))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
        assert "shard_map" in str(jax.make_jaxpr(lambda x: fast(x))(xs))
        hlo = forward.lower(fast, xs).compile().as_text()
        got = forward(fast, xs)
        # a batch the mesh does not split evenly runs whole, with the same numbers
        odd = forward(fast, x[:3])
    assert "all-gather" not in hlo  # no device gathers the others' examples
    assert {s.data.shape[0] for s in got.addressable_shards} == {1}  # logits stay split
    assert rel_err(got, want) <= 1e-5
    assert rel_err(odd, want[:3]) <= 1e-5


def test_outside_tpus_the_interpreter_is_announced_once(monkeypatch):
    monkeypatch.setattr(splash, "_INTERPRET_WARNED", [])
    q, k, v = _qkv(1, 16, 2, 8)
    with pytest.warns(UserWarning, match="TPU kernel; on cpu it runs in Pallas' interpreter"):
        splash.splash_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splash.splash_attention(q, k, v)


def test_splash_is_taken_by_name_on_every_backend():
    for backend in ("tpu", "gpu", "cpu"):
        assert vit.attention_implementation("splash", backend, "bfloat16") == "splash"
    assert dataclasses.replace(_tiny("auto"), attention="splash").attention == "splash"
