"""Shared helpers for model tests: torch reference -> flax model with the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from signnet_jax import convert
from signnet_jax.models import vit


def torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def flax_twin(tmodel, preset, num_classes, num_frames, img_size, **cfg_overrides):
    """The Flax model holding the weights of a torch reference model."""
    src = convert.Source(torch_state(tmodel), "videomae_v2", pretrain=False, dropped=[])
    cfg, params, report = convert.to_flax(src, preset, num_frames, num_classes, img_size)
    assert not report.fresh and not report.warnings
    if cfg_overrides:
        cfg = vit.ViTConfig.from_dict({**cfg.to_dict(), **cfg_overrides})
    return vit.model_from_params(cfg, params)


def random_clip(batch, frames, size, seed=0) -> np.ndarray:
    """A normalised-looking clip, channels-last (B, T, H, W, C)."""
    return (
        np.random.default_rng(seed)
        .standard_normal((batch, frames, size, size, 3))
        .astype(np.float32)
    )


def torch_logits(tmodel, clip: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tmodel(torch.from_numpy(clip).permute(0, 4, 1, 2, 3)).numpy()


def rel_err(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def assert_attention_kernels_agree(attention: str, reference: str, dtype: str) -> None:
    """A tiny ViT with ``attention`` gives the logits and gradients of ``reference``."""

    def config(kernel):
        return vit.ViTConfig.from_preset(
            "S", num_classes=6, num_frames=4, img_size=32, depth=2, dtype=dtype, attention=kernel
        )

    ref = vit.create_model(config(reference))
    fast = vit.model_from_params(config(attention), vit.params_of(ref))
    x = jnp.asarray(random_clip(2, 4, 32, seed=9))

    # float16 gradients this small flush to zero unless the loss is scaled, as training does
    scale = 2.0**16 if dtype == "float16" else 1.0

    def grads(m):
        g = nnx.grad(lambda m: scale * jnp.sum(m(x).astype(jnp.float32) ** 2))(m)
        return [leaf / scale for leaf in jax.tree.leaves(g)]

    tol, grad_tol = {"float32": (1e-5, 1e-4), "float16": (2e-3, 1e-2)}.get(dtype, (2e-2, 5e-2))
    assert rel_err(fast(x), ref(x)) <= tol
    for a, b in zip(grads(fast), grads(ref), strict=True):
        assert rel_err(a, b) <= grad_tol
