"""Analytic FLOP counts of the ViT (a multiply-add counts 2), for throughput and MFU."""

from signnet_jax.models.vit import ViTConfig


def forward_flops(
    cfg: ViTConfig, num_frames: int | None = None, img_size: int | None = None
) -> int:
    """FLOPs of one forward pass over one clip (matmuls and attention; norms ignored).

    A training step costs about three times this (forward + backward).
    """
    frames = cfg.num_frames if num_frames is None else num_frames
    size = cfg.img_size if img_size is None else img_size
    n = (frames // cfg.tubelet_size) * (size // cfg.patch_size) ** 2
    d, m = cfg.embed_dim, cfg.mlp_dim
    patch = 2 * n * (cfg.in_chans * cfg.tubelet_size * cfg.patch_size**2) * d
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m
    return patch + cfg.depth * block + 2 * d * cfg.num_classes
