"""VideoMAEv2 fine-tuning video ViT in Flax NNX.

Attribute names mirror the PyTorch VideoMAEv2 checkpoint (``patch_embed.proj``,
``blocks[i].attn.qkv``, ``q_bias``, ``mlp.fc1``, ``fc_norm``, ``head`` ...) so the
weight conversion in ``signnet_jax.convert`` reads as a table.

Input clips are channels-last ``(batch, frames, height, width, 3)``, already
normalised. Tokens are ordered (time, row, column), as the PyTorch Conv3d
flatten orders them.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from signnet_jax import sharding
from signnet_jax.models import splash

# name: the ViTConfig fields that make the preset (the giant is VideoMAEv2's patch-14 model)
PRESETS: dict[str, dict[str, int]] = {
    "S": dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16),
    "B": dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=16),
    "H": dict(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120, patch_size=16),
    "g": dict(embed_dim=1408, depth=40, num_heads=16, mlp_dim=6144, patch_size=14),
}
# The model names VideoMAEv2 users know, as aliases of the presets.
PRESET_ALIASES = {
    "vit_small_patch16_224": "S",
    "vit_base_patch16_224": "B",
    "vit_large_patch16_224": "L",
    "vit_huge_patch16_224": "H",
    "vit_giant_patch14_224": "g",
}

LN_EPS = 1e-6
# cosine attention's clamp of its log logit scale: VideoMAEv2's literal (about log 100, a
# temperature of at least 0.01)
MAX_LOG_LOGIT_SCALE = 4.6052
ATTENTION = ("auto", "dot_product_attention", "cudnn", "splash", "explicit")
# compute dtypes: float16 is for GPUs whose tensor cores have no bfloat16 (T4, V100); training
# in it scales the loss (optim.LossScaleConfig)
DTYPES = ("float32", "bfloat16", "float16")
# What a rematerialised block keeps for its backward pass (ViTConfig.remat_policy): nothing but
# its input ('full': the whole block runs again), or also the outputs of its matmuls with
# weights, the q/k/v projection, the attention's output projection and the MLP's first layer
# ('save_dots': the layer norms, the attention and the GELU run again, at 1568 tokens about a
# quarter of ViT-B's forward work and a fifth of ViT-L's, at 3136 two fifths and a third, for 8
# values of embed_dim per token and block).
REMAT_POLICIES = ("full", "save_dots")
SAVED_DOTS = ("qkv", "proj", "fc1")  # checkpoint_name of each kept output


def resolve_preset(name: str) -> str:
    """Canonical preset name (S, B, L, H, g) from a preset or VideoMAEv2 model name."""
    if name in PRESETS:
        return name
    if name in PRESET_ALIASES:
        return PRESET_ALIASES[name]
    known = ", ".join(list(PRESETS) + list(PRESET_ALIASES))
    raise ValueError(f"unknown model preset {name!r}; choose one of: {known}")


def clip_problems(
    preset: str | None, num_frames: int, img_size: int, flags: tuple[str, str]
) -> list[str]:
    """Messages for a clip size that makes no model of ``preset`` (a canonical name; None:
    unknown, so the frame size is not checked), for a command line whose options for the
    frames and the frame size are ``flags``: ``--frames 15: give ..., e.g. --frames 16``."""

    def nearest(value: int, multiple: int) -> int:
        return max(multiple, (value + multiple // 2) // multiple * multiple)

    tubelet = ViTConfig.tubelet_size
    problems = []
    if num_frames < 1 or num_frames % tubelet:
        problems.append(
            f"{flags[0]} {num_frames}: give a positive multiple of {tubelet} (the model embeds "
            f"frames in groups of {tubelet}), e.g. {flags[0]} {nearest(num_frames, tubelet)}"
        )
    patch = PRESETS[preset]["patch_size"] if preset else None
    if patch and (img_size < 1 or img_size % patch):
        problems.append(
            f"{flags[1]} {img_size}: give a positive multiple of {patch} (the patch size of "
            f"ViT-{preset}), e.g. {flags[1]} {nearest(img_size, patch)}"
        )
    return problems


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture and numerics of the video ViT (saved with every checkpoint)."""

    preset: str = "B"
    num_classes: int = 2000
    num_frames: int = 16
    img_size: int = 224
    patch_size: int = 16
    tubelet_size: int = 2
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    init_values: float = 0.0  # layer scale; 0 disables it (VideoMAEv2 fine-tuning default)
    cos_attn: bool = False
    learned_pos_emb: bool = False
    drop_path_rate: float = 0.0
    head_drop_rate: float = 0.0
    init_scale: float = 0.001  # head weights scaled at init, as the original fine-tuning does
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False
    remat_policy: str = "full"  # with remat: what each block keeps (REMAT_POLICIES)
    # Run the blocks as one jax.lax.scan over their stacked parameters: XLA compiles one block
    # instead of ``depth``; each block keeps its drop path rate and key, so the numbers are the
    # unrolled blocks' (in float32; within rounding in bfloat16 and float16).
    scan_layers: bool = False
    # 'auto': see attention_implementation (cuDNN flash attention on Ampere or newer GPUs in
    # bfloat16 or float16, XLA's attention on TPUs and older GPUs, the explicit form with a
    # hand-written backward on CPUs).
    attention: str = "auto"

    def __post_init__(self):
        if self.num_frames % self.tubelet_size:
            raise ValueError(
                f"num_frames={self.num_frames} is not divisible by tubelet_size={self.tubelet_size}"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} not divisible by heads={self.num_heads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}"
            )
        if self.remat_policy != "full" and not self.remat:
            raise ValueError(
                f"remat_policy={self.remat_policy!r} says what a rematerialised block keeps: "
                "set remat=True too"
            )

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> ViTConfig:
        """Config of a named preset (S, B, L, H, g or a VideoMAEv2 model name)."""
        preset = resolve_preset(preset)
        kw = dict(preset=preset, **PRESETS[preset])
        kw.update(overrides)
        return cls(**kw)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (time, rows, columns) for the configured clip size."""
        p = self.img_size // self.patch_size
        return self.num_frames // self.tubelet_size, p, p

    @property
    def num_patches(self) -> int:
        return int(np.prod(self.grid))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys: {unknown}")
        return cls(**d)


def sinusoid_table(n_position: int, dim: int) -> np.ndarray:
    """The fixed 1-D sinusoid position table of VideoMAE over all tokens, (n, dim) float32.

    Computed in float64 and cast, as the original does.
    """
    pos = np.arange(n_position, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return table.astype(np.float32)


def timm_trunc_normal(std: float, scale: float = 1.0):
    """timm's trunc_normal_(std) init: bounds at +-2 absolute (not +-2 std), times ``scale``."""

    def init(key, shape, dtype=jnp.float32):
        x = jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32)
        return (x * (std * scale)).astype(dtype)

    return init


def _torch_default_uniform(fan_in: int):
    """PyTorch's default Conv/Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _logical(init, names: tuple[str | None, ...]):
    """Attach logical axis names; the mesh rules in the config map them to devices later."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def _param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _linear(din: int, dout: int, axes: tuple[str, str], *, rngs, dtype, use_bias=True, scale=1.0):
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_logical(timm_trunc_normal(0.02, scale), axes),
        bias_init=_logical(nnx.initializers.zeros_init(), axes[1:]),
        rngs=rngs,
    )


def _layer_norm(dim: int, *, rngs, dtype) -> nnx.LayerNorm:
    # Flax computes the statistics in float32 whatever the compute dtype.
    return nnx.LayerNorm(
        dim,
        epsilon=LN_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=_logical(nnx.initializers.ones_init(), ("norm",)),
        bias_init=_logical(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = (tubelet, patch, patch), computed as patchify + matmul."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, dtype):
        t, p = cfg.tubelet_size, cfg.patch_size
        fan_in = cfg.in_chans * t * p * p
        # Kernel layout DHWIO, as flax's Conv stores it.
        self.proj = nnx.Conv(
            cfg.in_chans,
            cfg.embed_dim,
            kernel_size=(t, p, p),
            strides=(t, p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=jnp.float32,
            kernel_init=_logical(_torch_default_uniform(fan_in), (None, None, None, None, "embed")),
            bias_init=_logical(_torch_default_uniform(fan_in), ("embed",)),
            rngs=rngs,
        )
        self.tubelet, self.patch, self.dtype = t, p, dtype

    def __call__(self, x: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
        b, f, h, w, c = x.shape
        t, p = self.tubelet, self.patch
        if f % t or h % p or w % p:
            raise ValueError(
                f"clip shape {x.shape[1:4]} (frames, height, width) must be divisible by "
                f"({t}, {p}, {p})"
            )
        grid = (f // t, h // p, w // p)
        # A strided, non-overlapping conv is a matmul over flattened patches; XLA's CPU
        # backend runs that much faster than the conv.
        x = x.reshape(b, grid[0], t, grid[1], p, grid[2], p, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, int(np.prod(grid)), t * p * p * c)
        kernel = self.proj.kernel[...].reshape(t * p * p * c, -1)
        x = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        return x + self.proj.bias[...].astype(self.dtype), grid


class Attention(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, dtype):
        d, self.num_heads = cfg.embed_dim, cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.qkv = _linear(d, 3 * d, ("embed", "qkv"), rngs=rngs, dtype=dtype, use_bias=False)
        self.q_bias = _param(jnp.zeros((d,), jnp.float32), ("qkv",))
        self.v_bias = _param(jnp.zeros((d,), jnp.float32), ("qkv",))
        self.cos_attn = cfg.cos_attn
        if cfg.cos_attn:
            self.scale = _param(
                jnp.full((cfg.num_heads, 1, 1), np.log(10.0), jnp.float32), ("heads", None, None)
            )
        self.proj = _linear(d, d, ("qkv", "embed"), rngs=rngs, dtype=dtype)
        self.dtype = dtype
        self.attention = cfg.attention

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        # The k bias is zero by construction (VideoMAEv2 has only q and v biases).
        q_bias, v_bias = self.q_bias[...], self.v_bias[...]
        bias = jnp.concatenate([q_bias, jnp.zeros_like(v_bias), v_bias])
        qkv = checkpoint_name(self.qkv(x) + bias.astype(self.dtype), "qkv")
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, self.head_dim), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (b, n, heads, head_dim)
        if self.cos_attn:
            q = _l2_normalize(q)
            k = _l2_normalize(k)
            logit_scale = jnp.exp(jnp.minimum(self.scale[...], MAX_LOG_LOGIT_SCALE))
            q = q * logit_scale.reshape(1, 1, self.num_heads, 1).astype(q.dtype)
            scale = 1.0
        else:
            scale = self.head_dim**-0.5
        device = sharding.mesh_device()  # the device compiled for
        impl = attention_implementation(
            self.attention, device.platform, self.dtype, getattr(device, "compute_capability", None)
        )
        if impl == "cudnn":
            try:
                out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
            except (RuntimeError, ValueError, NotImplementedError) as e:
                if self.attention == "cudnn":  # asked for by name: no silent fallback
                    raise
                _warn_cudnn_fallback(e)
                impl = "dot_product_attention"
        if impl == "dot_product_attention":
            out = jax.nn.dot_product_attention(q, k, v, scale=scale)
        elif impl == "splash":
            out = splash.splash_attention(q * jnp.asarray(scale, q.dtype), k, v)
        elif impl == "explicit":
            q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (b, heads, n, head_dim)
            out = explicit_attention(q * jnp.asarray(scale, q.dtype), k, v).transpose(0, 2, 1, 3)
        return checkpoint_name(self.proj(out.reshape(b, n, d)), "proj")


def attention_implementation(
    choice: str, backend: str, dtype: Any, compute_capability: str | None = None
) -> str:
    """The attention kernel a config's ``attention`` runs on ``backend``.

    'auto' picks cuDNN's flash attention on NVIDIA GPUs of compute capability 8.0 or newer
    (Ampere, Ada, Hopper: A100, L4, H100) in bfloat16 or float16 (it never builds the tokens x
    tokens score matrix: 3136 tokens at 32 frames); the explicit form with a hand-written
    backward on CPUs and, in bfloat16, on older NVIDIA GPUs (T4 7.5, V100 7.0), where cuDNN's
    kernel needs 8.0 and XLA's attention fails to compile (it asks for a bfloat16 dot with
    float32 results, which their compiler rejects as ALG_DOT_BF16_BF16_F32); XLA's attention
    through ``jax.nn.dot_product_attention`` everywhere else: TPUs, GPUs in float32, older
    GPUs in float16 (their tensor cores' type), GPUs of unknown capability. Other choices are
    taken as they are.

    Args:
      choice: the config's ``attention``.
      backend: the device platform ('cpu', 'gpu', 'tpu').
      dtype: the compute dtype.
      compute_capability: a CUDA device's ``compute_capability`` ("8.0"); None where unknown
        (then no cuDNN).
    """
    if choice != "auto":
        return choice
    if backend == "cpu":
        return "explicit"
    capability = _capability(compute_capability)
    if backend in ("gpu", "cuda") and capability > (0, 0):
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        if half and capability >= (8, 0):
            return "cudnn"
        if jnp.dtype(dtype) == jnp.bfloat16:
            return "explicit"
    return "dot_product_attention"


def unsupported_dtype(dtype: Any, platform: str) -> str | None:
    """Why the compute ``dtype`` cannot run on ``platform``, or None where it can.

    Float16 does not compile for TPUs: their compiler has no float16 dot with float32 results
    (``ALG_DOT_F16_F16_F32``, which the attention's scores use) nor a float16 splash kernel.
    """
    if platform == "tpu" and jnp.dtype(dtype) == jnp.float16:
        return (
            "float16 does not run on TPUs (their compiler has no float16 dot with float32 "
            "results, ALG_DOT_F16_F16_F32); TPUs compute in bfloat16"
        )
    return None


def _capability(text: str | None) -> tuple[int, int]:
    """(major, minor) of a CUDA compute capability string; (0, 0) for anything else."""
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?", str(text))
    return (int(m[1]), int(m[2] or 0)) if m else (0, 0)


_CUDNN_WARNED = []


def _warn_cudnn_fallback(error: Exception) -> None:
    if not _CUDNN_WARNED:
        _CUDNN_WARNED.append(error)
        warnings.warn(
            f"cuDNN flash attention is not available here ({error}); using XLA's attention "
            "instead (slower, more memory). Set model.attention='dot_product_attention' to "
            "silence this.",
            stacklevel=3,
        )


@jax.custom_vjp
def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v over (batch, heads, tokens, head_dim), scale already in q.

    The softmax runs in float32. The backward pass is written out (it reuses the saved
    probabilities and the output), which XLA's CPU backend runs about 1.7x faster than
    the derivative it generates itself.
    """
    return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", p, v)
    return out, (q, k, v, p, out)


def _attention_bwd(res, d_out):
    q, k, v, p, out = res
    d_v = jnp.einsum("bhqk,bhqd->bhkd", p, d_out)
    d_p = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    # sum_k p * d_p equals sum_d out * d_out (the flash-attention identity)
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), -1, keepdims=True)
    d_logits = (p.astype(jnp.float32) * (d_p - delta)).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k)
    d_k = jnp.einsum("bhqk,bhqd->bhkd", d_logits, q)
    return d_q, d_k, d_v


explicit_attention.defvjp(_attention_fwd, _attention_bwd)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize over the last axis."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


class Mlp(nnx.Module):
    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs, dtype):
        self.fc1 = _linear(cfg.embed_dim, cfg.mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = _linear(cfg.mlp_dim, cfg.embed_dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(checkpoint_name(self.fc1(x), "fc1"), approximate=False))


class Block(nnx.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float, *, rngs: nnx.Rngs, dtype):
        self.norm1 = _layer_norm(cfg.embed_dim, rngs=rngs, dtype=dtype)
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
        self.norm2 = _layer_norm(cfg.embed_dim, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(cfg, rngs=rngs, dtype=dtype)
        if cfg.init_values > 0:
            init = jnp.full((cfg.embed_dim,), cfg.init_values, jnp.float32)
            self.gamma_1 = _param(init, ("norm",))
            self.gamma_2 = _param(init, ("norm",))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.drop_rate = float(drop_path)  # of this block's two residual branches

    def __call__(
        self, x: jax.Array, drop_key: jax.Array | None = None, drop_rate: Any = None
    ) -> jax.Array:
        """One block over tokens ``x``.

        Args:
          x: (batch, tokens, embed_dim).
          drop_key: the random key of this block's drop path in training; None: no drop path.
          drop_rate: the drop path rate in place of the block's own (a traced value when the
            blocks run as a scan).
        """
        rate = self.drop_rate if drop_rate is None else drop_rate
        keys = (None, None) if drop_key is None else jax.random.split(drop_key)
        y = self.attn(self.norm1(x))
        if self.gamma_1 is not None:
            y = y * self.gamma_1[...].astype(y.dtype)
        x = x + drop_path(y, rate, keys[0])
        y = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            y = y * self.gamma_2[...].astype(y.dtype)
        return x + drop_path(y, rate, keys[1])


def drop_path(y: jax.Array, rate: Any, key: jax.Array | None) -> jax.Array:
    """timm's DropPath: each sample's residual branch ``y`` is dropped whole with probability
    ``rate`` or kept and scaled by 1 / (1 - rate); ``y`` as it is without a ``key``."""
    if key is None or (isinstance(rate, float) and rate == 0.0):
        return y
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(key, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    # at rate 1 no sample is kept; the division stays finite, and so does its gradient
    return jnp.where(mask, y / jnp.where(keep > 0, keep, 1.0).astype(y.dtype), 0)


class VisionTransformer(nnx.Module):
    """VideoMAEv2 ViT for clip classification: mean-pooled tokens, fc_norm, linear head."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        self.patch_embed = PatchEmbed(cfg, rngs=rngs, dtype=dtype)
        if cfg.learned_pos_emb:
            init = timm_trunc_normal(0.02)(rngs.params(), (1, cfg.num_patches, cfg.embed_dim))
            self.pos_embed = _param(init, (None, None, "embed"))
        else:
            self.pos_embed = None
        rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
        self.blocks = nnx.List([Block(cfg, float(r), rngs=rngs, dtype=dtype) for r in rates])
        self.fc_norm = _layer_norm(cfg.embed_dim, rngs=rngs, dtype=jnp.float32)
        self.head_dropout = nnx.Dropout(cfg.head_drop_rate)
        self.head = _linear(
            cfg.embed_dim,
            cfg.num_classes,
            ("embed", "classes"),
            rngs=rngs,
            dtype=jnp.float32,
            scale=cfg.init_scale,
        )

    def forward_features(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Pooled clip features after fc_norm, (batch, embed_dim) float32.

        Args:
          x: normalised clips, (batch, frames, height, width, channels).
          train: enables drop path (needs ``rngs`` with a ``dropout`` stream).
          rngs: random streams for drop path.
        """
        x, grid = self.patch_embed(x)
        if self.pos_embed is not None:
            if x.shape[1] != self.pos_embed[...].shape[1]:
                raise ValueError(
                    f"clip gives {x.shape[1]} tokens but the learned position table has "
                    f"{self.pos_embed[...].shape[1]}; convert the checkpoint for this clip size"
                )
            pos = self.pos_embed[...]
        else:
            # The sinusoid table is built for the actual token grid of this input.
            pos = jnp.asarray(sinusoid_table(int(np.prod(grid)), x.shape[-1]))[None]
        x = x + pos.astype(x.dtype)
        depth = len(self.blocks)
        keys = None
        if train and self.cfg.drop_path_rate > 0:
            if rngs is None:
                raise ValueError("training with drop path needs rngs with a 'dropout' stream")
            keys = jax.random.split(rngs.dropout(), depth)  # one per block
        if self.cfg.scan_layers:
            x = self._scan_blocks(x, keys)
        else:
            block_fn = _apply_block
            if self.cfg.remat:
                block_fn = nnx.remat(_apply_block, policy=self._policy())
            for i, blk in enumerate(self.blocks):
                x = block_fn(blk, x, None if keys is None else keys[i])
        return self.fc_norm(x.astype(jnp.float32).mean(axis=1))

    def _scan_blocks(self, x: jax.Array, keys: jax.Array | None) -> jax.Array:
        """The blocks as one ``jax.lax.scan`` over their parameters stacked on a leading axis.

        The checkpoint layout stays one entry per block: the stack is built in the step (one
        more copy of the blocks' parameters, and of their gradients, per device, in the
        compute dtype), and each block's drop path rate and key ride along the scanned axis,
        so the numbers are those of the blocks run one after another (in half precision XLA
        rounds differently across the loop: within a rounding step).
        """
        graphdef = nnx.graphdef(self.blocks[0])  # the blocks differ only in their drop rate
        stacked = jax.tree.map_with_path(
            self._stack, *(nnx.state(b, nnx.Param) for b in self.blocks)
        )
        rates = jnp.asarray([b.drop_rate for b in self.blocks], jnp.float32)

        def body(x, layer):
            params, rate, key = layer
            blk = nnx.merge(graphdef, params)
            return blk(x, key, None if key is None else rate), None

        if self.cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False, policy=self._policy())
        return jax.lax.scan(body, x, (stacked, rates, keys))[0]

    def _policy(self):
        """The jax.checkpoint policy of ``remat_policy`` (None: nothing saved)."""
        if self.cfg.remat_policy == "save_dots":
            return jax.checkpoint_policies.save_only_these_names(*SAVED_DOTS)
        return None

    def _stack(self, path, *layers: jax.Array) -> jax.Array:
        """One parameter of every block stacked, in the compute dtype where the block casts it
        to that anyway (all but the layer norms' and cosine attention's scale, used in
        float32): half the copy in bfloat16, and the same values in the block."""
        stacked = jnp.stack(layers)
        if {getattr(k, "key", None) for k in path} & {"norm1", "norm2", "scale"}:
            return stacked
        return stacked.astype(self.cfg.dtype)

    def __call__(
        self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Class logits, (batch, num_classes) float32. Arguments as in forward_features."""
        x = self.forward_features(x, train=train, rngs=rngs)
        x = self.head_dropout(x, deterministic=not train, rngs=rngs)
        return self.head(x)


def _apply_block(blk: Block, x: jax.Array, key: jax.Array | None) -> jax.Array:
    return blk(x, key)


def create_model(cfg: ViTConfig, seed: int = 0) -> VisionTransformer:
    """A freshly initialised model (the original's initialisers, head scaled by init_scale)."""
    return VisionTransformer(cfg, rngs=nnx.Rngs(params=seed))


def abstract_params(cfg: ViTConfig) -> dict:
    """Parameter shapes of a model, as a nested dict of ShapeDtypeStruct (nothing allocated)."""
    model = nnx.eval_shape(lambda: create_model(cfg))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def params_of(model: VisionTransformer) -> dict:
    """The parameters of a model as a plain nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def model_from_params(cfg: ViTConfig, params: dict) -> VisionTransformer:
    """A model holding ``params`` (nested dict, int or str keys), without a random init."""
    model = nnx.eval_shape(lambda: create_model(cfg))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def match_structure(template: dict, params: dict) -> dict:
    """``params`` re-keyed like ``template`` (checkpoints store block indices as strings)."""
    if not isinstance(template, dict):
        return params
    return {
        k: match_structure(v, params[k] if k in params else params[str(k)])
        for k, v in template.items()
    }
