"""Devices to compile for ahead of time that are not on this host (``bench/train.py --topology``).

A TPU slice comes from JAX's TPU compiler (libtpu), a GPU node from JAX's CUDA plugin; both run
on any host, CPU only included, and neither runs anything: XLA compiles the step for the target
and reports its memory, so a batch and kernel can be sized before the hardware is rented.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

import jax

from signnet_jax import sharding
from signnet_jax.models.flops import tpu_memory_bytes


@dataclasses.dataclass(frozen=True)
class Gpu:
    """What XLA's GPU compiler needs to know of a GPU it cannot query (NVIDIA's data sheets)."""

    device_kind: str  # as the CUDA driver names it, so peak_flops and attention 'auto' match
    capability: tuple[int, int]
    memory: int  # bytes: the total CUDA reports to programs (see GPUS)
    sms: int
    fp32_per_sm: int
    threads_per_sm: int
    shared_per_sm: int  # bytes
    shared_per_block_optin: int  # bytes
    l2: int  # bytes
    bandwidth: float  # bytes/s
    clock_ghz: float


MIB, GIB = 2**20, 2**30
# The memory is the total CUDA reports to a program (cuMemGetInfo, as in PyTorch's "total
# capacity"), which XLA sizes against and JAX takes its share of: 1-4% under nvidia-smi's
# figure, and it varies a little with the driver.
GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 84_929_347_584, 132, 128, 2048,
                228 * 1024, 227 * 1024, 50 * MIB, 3.35e12, 1.98),
    "a100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), int(79.15 * GIB), 108, 64, 2048,
                164 * 1024, 163 * 1024, 40 * MIB, 2.039e12, 1.41),
    "a100-40gb": Gpu("NVIDIA A100-SXM4-40GB", (8, 0), int(39.49 * GIB), 108, 64, 2048,
                     164 * 1024, 163 * 1024, 40 * MIB, 1.555e12, 1.41),
    "l4": Gpu("NVIDIA L4", (8, 9), int(22.03 * GIB), 58, 128, 1536,
              100 * 1024, 99 * 1024, 48 * MIB, 300e9, 2.04),
    "t4": Gpu("Tesla T4", (7, 5), int(14.74 * GIB), 40, 64, 1024,
              64 * 1024, 64 * 1024, 4 * MIB, 320e9, 1.59),
    "v100": Gpu("Tesla V100-SXM2-16GB", (7, 0), int(15.77 * GIB), 80, 64, 2048,
                96 * 1024, 96 * 1024, 6 * MIB, 900e9, 1.53),
}  # fmt: skip

# The share of a GPU's memory JAX's allocator takes unless XLA_PYTHON_CLIENT_MEM_FRACTION says.
JAX_GPU_MEMORY_FRACTION = 0.75

TPU_EXAMPLES = "v5e:2x4, v6e:2x4, v4:2x2x1, v5p:2x2x1"
GPU_EXAMPLES = "h100:8, a100:8, a100-40gb, l4, t4, v100"


def target_config(gpu: Gpu) -> str:
    """XLA's GpuTargetConfig (text proto) for a GPU that is not attached."""
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_per_sm}
  threads_per_core_limit: {gpu.threads_per_sm}
  core_count: {gpu.sms}
  fpus_per_core: {gpu.fp32_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.bandwidth)}
  l2_cache_size: {gpu.l2}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory}
  shared_memory_per_block_optin: {gpu.shared_per_block_optin}
  cuda_compute_capability {{ major: {gpu.capability[0]} minor: {gpu.capability[1]} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
runtime_version {{ major: 12 minor: 8 }}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{gpu.device_kind}"
"""


def parse_gpu(name: str) -> tuple[Gpu, str] | None:
    """(the GPU, JAX's topology string 'slices x hosts x GPUs per host') of a GPU topology name
    ('h100', 'h100:8', 'h100:2x8' for two nodes of 8), or None for a name that is not a GPU's.

    Raises:
      ValueError: a GPU name with a malformed count.
    """
    kind, _, count = name.partition(":")
    if kind.lower() not in GPUS:
        return None
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)", count or "1")
    if not m or int(m[2]) < 1 or (m[1] is not None and int(m[1]) < 1):
        raise ValueError(
            f"--topology {name}: after '{kind}:' give the GPUs per node, or NODESxGPUS "
            f"(e.g. {kind}:8 or {kind}:2x8)"
        )
    return GPUS[kind.lower()], f"1x{int(m[1] or 1)}x{int(m[2])}"


def _cuda_plugin_installed() -> bool:
    for name in ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:  # no JAX plugin at all
            pass
    return False


def is_tpu_slice(topology: str) -> bool:
    """Whether ``topology`` names a TPU slice (``v5e:2x4``, ``TPU v4:2x2x1``)."""
    return bool(re.match(r"(v\d+[a-z]*|tpu\w*):", topology, re.IGNORECASE))


def target_devices(topology: str | None) -> list:
    """The devices compiled for: this host's, or those of ``topology``: a TPU slice in the TPU
    compiler's names (``v5e:2x4``) or a GPU node (``h100:8``, see GPUS), which need not be here.

    Must run before JAX's backends start (a GPU topology keeps them to the CPU: JAX's CUDA
    plugin would otherwise look for a GPU driver and fail without one).

    Raises:
      ValueError: the compiler is not installed, or a name it does not know.
    """
    if topology is None:
        return jax.devices()
    from jax.experimental.topologies import get_topology_desc

    gpu = parse_gpu(topology)
    if gpu is not None:
        if not _cuda_plugin_installed():
            raise ValueError(
                f"--topology {topology} needs JAX's CUDA compiler: pip install 'jax[cuda12]' "
                "(it compiles here; nothing runs on a GPU)"
            )
        jax.config.update("jax_platforms", "cpu")
        spec, shape = gpu
        desc = get_topology_desc(
            "signnet", "cuda", target_config=target_config(spec), topology=shape
        )
        return sharding.remember_devices(list(desc.devices))

    if not is_tpu_slice(topology):
        raise ValueError(
            f"--topology {topology}: not a GPU known here ({', '.join(GPUS)}) nor a TPU slice "
            f"(like {TPU_EXAMPLES})"
        )
    # a v4 chip is one JAX device (megacore), as on a real v4 slice; later chips have one core
    extra = {"chip_config_name": "megacore"} if topology.startswith("v4:") else {}
    try:  # hosts of up to 2x2 chips (the compiler's default), fewer for a smaller slice
        dims = [int(d) for d in topology.split(":", 1)[1].split("x")] + [1, 1]
        extra["chips_per_host_bounds"] = tuple(
            min(d, b) for d, b in zip(dims[:3], (2, 2, 1), strict=True)
        )
    except (IndexError, ValueError):
        pass  # the compiler names what is wrong with the name
    try:
        desc = get_topology_desc(platform="tpu", topology_name=topology, **extra)
    except RuntimeError as e:  # JaxRuntimeError (a bad name) is a RuntimeError too
        if "not installed" in str(e):
            raise ValueError(
                f"--topology {topology} needs JAX's TPU compiler: pip install 'jax[tpu]' (it "
                "compiles here; nothing runs on a TPU)"
            ) from e
        raise ValueError(
            f"--topology {topology}: {e} (TPU slices look like {TPU_EXAMPLES}; GPU nodes like "
            f"{GPU_EXAMPLES})"
        ) from e
    return sharding.remember_devices(list(desc.devices))


def memory_limit(device) -> tuple[int, str] | None:
    """(bytes a training process can use on ``device``, what that number is), or None where
    unknown: a compiled-for TPU's nominal HBM, the share of a compiled-for GPU's memory JAX
    takes by default, an attached accelerator's own allocator limit; None on the CPU."""
    if device.platform == "cpu":
        return None
    if limit := sharding.device_memory_limit(device):
        return limit, "the allocator's limit"
    if device.platform == "tpu":
        hbm = tpu_memory_bytes(device.device_kind)
        return (hbm, "HBM") if hbm else None
    spec = next((g for g in GPUS.values() if g.device_kind == device.device_kind), None)
    if spec is None:
        return None
    try:
        fraction = float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"])
        whose = "XLA_PYTHON_CLIENT_MEM_FRACTION's"
    except (KeyError, ValueError):
        fraction, whose = JAX_GPU_MEMORY_FRACTION, "JAX's default"
    return int(spec.memory * fraction), f"{whose} {fraction:.0%} of {spec.memory / GIB:.1f} GiB"
