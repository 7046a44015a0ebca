"""Analytic FLOP counts of the ViT (a multiply-add counts 2), for throughput and MFU."""

import re

from signnet_jax.models.vit import ViTConfig


def forward_flops(
    cfg: ViTConfig, num_frames: int | None = None, img_size: int | None = None
) -> int:
    """FLOPs of one forward pass over one clip (matmuls and attention; norms ignored)."""
    frames = cfg.num_frames if num_frames is None else num_frames
    size = cfg.img_size if img_size is None else img_size
    n = (frames // cfg.tubelet_size) * (size // cfg.patch_size) ** 2
    d, m = cfg.embed_dim, cfg.mlp_dim
    patch = 2 * n * (cfg.in_chans * cfg.tubelet_size * cfg.patch_size**2) * d
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m
    return patch + cfg.depth * block + 2 * d * cfg.num_classes


def train_flops(cfg: ViTConfig) -> int:
    """FLOPs of training on one clip: forward + backward, counted as 3x the forward (MFU's
    convention)."""
    return 3 * forward_flops(cfg)


# Dense bfloat16 peak FLOP/s of one JAX device, by device_kind. TPU v2 and v3 expose each
# TensorCore as a device (two per chip); later TPUs one device per chip. Only devices with
# bfloat16 tensor cores / MXUs are listed (a T4 has none, so it gets no MFU); None marks a
# kind whose peak is not known here, so it is not given a neighbour's.
PEAK_FLOPS: dict[str, float | None] = {
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v4 lite": None,  # the inference chip v4i, not the training chip v4
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


# Dense float16 tensor-core peak FLOP/s of GPUs whose tensor cores have no bfloat16 (float16
# runs there: model.dtype=float16). Newer GPUs' float16 peak equals their bfloat16 one.
FLOAT16_PEAK_FLOPS: dict[str, float | None] = {
    "T4": 65e12,
    "V100": 125e12,  # SXM2
    "V100 PCIE": 112e12,
}


# Memory (HBM) of one JAX device of a TPU kind, nominal (the runtime keeps a little of it), for
# compiling ahead of time on a host without the TPU (``bench/train.py --topology``); a real
# device reports its own limit.
TPU_MEMORY_BYTES: dict[str, int | None] = {
    "TPU v2": 8 * 2**30,  # per TensorCore
    "TPU v3": 16 * 2**30,  # per TensorCore
    "TPU v4": 32 * 2**30,
    "TPU v4 lite": None,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v5p": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
}


def _tokens(name: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", name.lower()))


def _lookup(table: dict, device_kind: str):
    """The value of the longest table name whose words are all whole words of ``device_kind``."""
    kind = _tokens(device_kind)
    names = [k for k in table if _tokens(k) <= kind]
    return table[max(names, key=len)] if names else None


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Peak FLOP/s of one device of this kind, or None where it is not known: the dense
    bfloat16 peak, or for a float16 run the float16 one (GPUs only: the T4 and V100 have one
    too).

    A table name matches when each of its words is a whole word of ``device_kind`` (so "A100"
    matches "NVIDIA A100-SXM4-80GB" but not "NVIDIA RTX A1000", "L4" not "NVIDIA L40S"); the
    longest matching name wins ("TPU v5 lite" before "TPU v5", "H100 PCIe" before "H100").
    """
    if dtype != "float16":
        return _lookup(PEAK_FLOPS, device_kind)
    gpus = {k: v for k, v in PEAK_FLOPS.items() if not k.startswith("TPU")}
    return _lookup(gpus | FLOAT16_PEAK_FLOPS, device_kind)


def tpu_memory_bytes(device_kind: str) -> int | None:
    """Nominal memory of one TPU device of this kind (matched as ``peak_flops``), or None."""
    return _lookup(TPU_MEMORY_BYTES, device_kind)
