"""Flax models."""

from signnet_jax.models.vit import PRESETS, VisionTransformer, ViTConfig, create_model

__all__ = ["PRESETS", "ViTConfig", "VisionTransformer", "create_model"]
