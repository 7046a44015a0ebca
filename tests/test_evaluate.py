"""The evaluation step: softmax probabilities of the model on ImageNet-normalised views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import wlasl2000
from signnet_jax import evaluate, sharding, train
from signnet_jax.models import vit

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def test_eval_step_gives_the_softmax_of_the_models_logits():
    # A tiny ViT with random weights of scale 0.5 (the published init, its head scaled by 0.001,
    # gives near-uniform probabilities): logits far enough apart that logits,
    # log-probabilities, another temperature or another normalisation of the input give other
    # numbers.
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=5, num_frames=4, img_size=32, embed_dim=32, depth=2, num_heads=2,
        mlp_dim=64,
    )  # fmt: skip
    mesh = sharding.make_mesh()  # the trainer's: 8 devices on the data axis
    graphdef, param_sh, _ = train.parameter_shardings(cfg, wlasl2000.get_config(), mesh)
    setup = train.Setup(cfg, list("abcde"), {}, mesh, graphdef, param_sh, None, "")
    rng = np.random.default_rng(1)
    host = jax.tree.map(
        lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32), vit.abstract_params(cfg)
    )
    params = jax.device_put(host, param_sh)
    views = np.random.default_rng(0).integers(0, 256, (8, 4, 32, 32, 3), dtype=np.uint8)

    probs = np.asarray(evaluate.eval_step(setup)(params, jnp.asarray(views)))

    model = vit.model_from_params(cfg, host)
    x = jnp.asarray((views / 255.0 - MEAN) / STD, jnp.float32)
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, x), np.float64)  # eager is slow
    assert np.ptp(logits, axis=1).min() > 1.0
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert probs.shape == (8, 5) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs, jax.nn.softmax(logits, axis=-1), atol=1e-5)


def _tiny_setup(fsdp: int = 1):
    cfg = vit.ViTConfig.from_preset(
        "S", num_classes=5, num_frames=4, img_size=32, embed_dim=32, depth=2, num_heads=2,
        mlp_dim=64,
    )  # fmt: skip
    config = wlasl2000.get_config()
    mesh = sharding.make_mesh(fsdp)
    graphdef, param_sh, _ = train.parameter_shardings(cfg, config, mesh)
    setup = train.Setup(cfg, list("abcde"), {}, mesh, graphdef, param_sh, None, "")
    rng = np.random.default_rng(1)
    host = jax.tree.map(
        lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32), vit.abstract_params(cfg)
    )
    return setup, jax.device_put(host, param_sh)


def test_eval_chunks_bound_the_views_a_device_takes_at_once():
    assert evaluate.eval_chunks(8, 0) == (1, 8)  # 0: all at once
    assert evaluate.eval_chunks(8, 8) == (1, 8)
    assert evaluate.eval_chunks(3, 4) == (1, 3)
    assert evaluate.eval_chunks(8, 4) == (2, 4)
    assert evaluate.eval_chunks(6, 4) == (2, 3)  # even chunks, no overlap
    assert evaluate.eval_chunks(7, 4) == (2, 4)  # the last chunk overlaps by one
    assert evaluate.eval_chunks(5, 1) == (5, 1)
    for share in range(1, 20):
        for k in range(1, 9):
            n, size = evaluate.eval_chunks(share, k)
            assert size <= k and (n - 1) * size < share <= n * size


@pytest.mark.parametrize("fsdp", [1, 2])
def test_eval_step_in_chunks_gives_the_whole_batchs_probabilities(fsdp):
    """Every device's share of the batch through the model a few views at a time: the same
    probabilities, row for row, as the whole batch at once (on 8 devices, data parallel and with
    the parameters sharded)."""
    setup, params = _tiny_setup(fsdp)
    views = np.random.default_rng(0).integers(0, 256, (56, 4, 32, 32, 3), dtype=np.uint8)
    whole = np.asarray(evaluate.eval_step(setup, 0)(params, jnp.asarray(views)))
    assert np.ptp(whole, axis=0).max() > 0.1  # the rows differ: a misplaced row shows
    for k in (1, 2, 3, 4, 7):  # 7 views per device: chunks 7 x 1, 4 + 3 (overlapping), ...
        chunked = np.asarray(evaluate.eval_step(setup, k)(params, jnp.asarray(views)))
        assert chunked.shape == whole.shape and chunked.dtype == np.float32
        np.testing.assert_allclose(chunked, whole, atol=1e-6, err_msg=f"{k} views at a time")
