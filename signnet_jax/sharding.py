"""Meshes and shardings (the only module that touches meshes).

One mesh over all devices with two axes: ``data`` (pure data parallelism) and
``fsdp`` (parameters and optimizer state sharded, ZeRO-3 style; the batch is
split over it too). Parameters carry logical axis names (``embed``, ``mlp``,
``qkv``, ...); one rules table in the config maps them to mesh axes, so data
parallel versus FSDP is a config change (``mesh.fsdp``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def check_fsdp(fsdp: int, num_devices: int) -> None:
    """Raises ValueError unless ``fsdp`` divides ``num_devices``."""
    if fsdp < 1 or num_devices % fsdp:
        raise ValueError(
            f"mesh.fsdp={fsdp} must divide the number of devices ({num_devices}); "
            "set --config.mesh.fsdp to a divisor"
        )


def make_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over all devices, its batch slots host by host in process order.

    The batch is split over both axes (``batch_sharding``), so its ``k``-th slot is
    ``mesh.devices.flat[k]``. On several processes, the first ``n`` slots (``n`` devices per
    process) are process 0's devices, the next ``n`` process 1's, and so on: each process's
    part of the batch (``global_batch``) is a contiguous block of rows, its own in process
    order, so the global batch is the one-process batch whatever the process count (the
    input pipeline relies on it). ``jax.make_mesh`` orders a TPU slice's devices physically
    (a ring through every host's chips), which would scatter a host's rows over the batch.

    Within a process, devices are in the physical order ``jax.make_mesh`` would give that
    process's devices alone (TPU chips taken relative to the host's corner, so every host
    gets the same order). Each fsdp group lies within one process when ``fsdp`` divides the
    devices per process, so FSDP's all-gathers stay on a host's fast links; a larger ``fsdp``
    takes whole processes, consecutive ones (on a GPU node, its all-gathers cross the
    network; on a TPU slice, hosts are joined by the same ICI); any other ``fsdp`` (neither
    divides the other) takes blocks of ``gcd(fsdp, devices per process)`` devices of one
    process. The batch slots are host by host in every case.

    On one process this is ``jax.make_mesh``'s mesh (unchanged).

    Args:
      fsdp: size of the parameter-sharding axis; must divide the device count.
      devices: defaults to ``jax.devices()`` (every device of every process).

    Raises:
      ValueError: ``fsdp`` does not divide the device count, or the processes own
        different numbers of the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    check_fsdp(fsdp, len(devices))
    shape = (len(devices) // fsdp, fsdp)
    axis_types = (AxisType.Auto, AxisType.Auto)
    hosts: dict[int, list] = {}
    for d in devices:
        hosts.setdefault(d.process_index, []).append(d)
    if len(hosts) < jax.process_count():  # a process without devices could not take part
        raise ValueError(
            f"the mesh's devices belong to {len(hosts)} of the {jax.process_count()} "
            "processes; every process needs devices in it (use every device)"
        )
    if len(hosts) == 1:
        # Auto axes: XLA's sharding propagation inserts the FSDP all-gathers and
        # reduce-scatters; parameter and batch shardings are pinned at the jit boundary.
        return jax.make_mesh(shape, BATCH_AXES, axis_types=axis_types, devices=devices)
    counts = {p: len(ds) for p, ds in sorted(hosts.items())}
    per_host = len(devices) // len(hosts)
    if any(n != per_host for n in counts.values()):
        raise ValueError(
            "the mesh's devices must be spread evenly over the processes (devices per "
            f"process: {counts}); use every device, or a count that takes as many of each"
        )
    block = math.gcd(fsdp, per_host)
    local = [_host_order(hosts[p], (per_host // block, block)).reshape(-1) for p in sorted(hosts)]
    grid = np.concatenate(local).reshape(shape)
    return jax.sharding.Mesh(grid, BATCH_AXES, axis_types=axis_types)


@dataclasses.dataclass(frozen=True)
class _Chip:
    """A TPU device at coordinates relative to its host's corner (for ``mesh_utils``)."""

    index: int
    id: int
    platform: str
    device_kind: str
    coords: tuple[int, ...]
    core_on_chip: int


def _host_order(devices: list, shape: tuple[int, int]) -> np.ndarray:
    """One process's ``devices`` as an array of ``shape`` in the physical order
    ``jax.make_mesh`` would give them alone, the same on every host of a TPU slice."""
    if devices[0].platform != "tpu":
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    # mesh_utils gives some TPU kinds their ring only at the slice's corner (v5e, v6e: it
    # reads the largest coordinates as the bounds), so each host is seen from its own corner.
    corner = [min(c) for c in zip(*(d.coords for d in devices), strict=True)]
    chips = [
        _Chip(
            i,
            d.id,
            d.platform,
            d.device_kind,
            tuple(int(c) - m for c, m in zip(d.coords, corner, strict=True)),
            d.core_on_chip,
        )
        for i, d in enumerate(devices)
    ]
    order = mesh_utils.create_device_mesh(shape, chips, allow_split_physical_axes=True)
    return np.vectorize(lambda c: devices[c.index], otypes=[object])(order)


# Devices of topologies compiled for ahead of time (not attached), by (platform, device_kind).
_REMEMBERED: dict[tuple[str, str], jax.Device] = {}


def remember_devices(devices: list) -> list:
    """Makes ``mesh_device`` give these devices, of a topology that is not attached
    (``jax.experimental.topologies``), in full: a mesh only carries an abstract device, which
    lacks a GPU's ``compute_capability``. Returns ``devices``."""
    for d in devices:
        _REMEMBERED.setdefault((d.platform, d.device_kind), d)
    return devices


def mesh_device():
    """The kind of device a function traced now is compiled for: ``platform``, ``device_kind``
    (and ``compute_capability`` on GPUs).

    ``jax.devices()[0]``, unless the mesh in context (``jax.set_mesh``) is of another platform:
    on a CPU host compiling ahead of time for a TPU slice or a GPU node
    (``bench/train.py --topology``), that device as ``remember_devices`` was given it, else the
    mesh's abstract device. Works inside ``jax.jit``.
    """
    local = jax.devices()[0]
    mesh = jax.sharding.get_abstract_mesh()
    target = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if target is None or target.platform == local.platform:
        return local
    return _REMEMBERED.get((target.platform, target.device_kind), target)


def logical_to_spec(names: Sequence[str | None] | None, rules: dict[str, str | None]):
    """PartitionSpec of a parameter from its logical axis names and the rules table."""
    if not names:
        return PartitionSpec()
    axes, used = [], set()
    for name in names:
        axis = rules.get(name) if name is not None else None
        # A mesh axis may shard at most one dimension of an array.
        if axis is not None and axis in used:
            axis = None
        if axis is not None:
            used.add(axis)
        axes.append(axis)
    return PartitionSpec(*axes)


def param_shardings(abstract_state, mesh: jax.sharding.Mesh, rules: dict[str, str | None]):
    """NamedShardings for an nnx.State of parameters (from each Variable's ``out_sharding``).

    A dimension that the mesh axis does not divide is left replicated.

    Returns:
      ``(shardings, replicated)``: the shardings, and the dimensions the rules map to a
      mesh axis that does not divide them, ``[(path, dimension size, mesh axis), ...]``.
    """
    from flax import nnx

    dropped = []

    def one(path, variable):
        names = variable.get_metadata().get("out_sharding")
        spec = logical_to_spec(names, rules)
        shape = variable.get_value().shape
        fixed = []
        for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
            if axis is not None and dim % mesh.shape[axis]:
                dropped.append(("/".join(str(getattr(k, "key", k)) for k in path), dim, axis))
                axis = None
            fixed.append(axis)
        return NamedSharding(mesh, PartitionSpec(*fixed))

    tree = jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return tree, dropped


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension split over every mesh axis, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Assemble each process's part of a batch into global arrays sharded over the mesh.

    A process's rows fill the batch slots of its devices in mesh order. On ``make_mesh``'s
    mesh those slots are one block per process, in process order: process ``p``'s ``B`` rows
    are rows ``p * B`` to ``(p + 1) * B - 1`` of the global batch, which is then the
    one-process batch when each process holds that block of it (``pipeline.train_dataset``).
    """
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
        for k, v in local.items()
    }


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of (abstract) arrays with their shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def device_memory_limit(device) -> int | None:
    """Bytes the allocator of an attached accelerator lets a process use; None where it does
    not say (the CPU)."""
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats()
    except jax.errors.JaxRuntimeError:  # a compile-only device (a topology's) has none
        return None
    return (stats or {}).get("bytes_limit") or None


def shard_leaf_count(tree) -> tuple[int, int]:
    """(leaves sharded over more than one device, all leaves): to check FSDP really shards."""
    leaves = jax.tree.leaves(tree)
    sharded = sum(1 for x in leaves if not x.sharding.is_fully_replicated)
    return sharded, len(leaves)


def per_device_batch(fn, *arrays: jax.Array) -> jax.Array:
    """``fn`` on each device's slice of the batch (leading axis) of ``arrays``.

    Under a mesh (``jax.set_mesh``) with more than one device, ``fn`` runs through
    ``jax.shard_map`` over the batch axes, so a kernel XLA cannot partition (a Pallas
    call) sees only the local examples instead of the whole gathered batch. Without a
    mesh, or when the batch does not split evenly over it, ``fn`` sees the whole batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn(*arrays)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    ways = int(np.prod([mesh.shape[a] for a in axes]))
    if not axes or arrays[0].shape[0] % ways:
        return fn(*arrays)
    spec = PartitionSpec(axes)
    return jax.shard_map(fn, in_specs=(spec,) * len(arrays), out_specs=spec, check_vma=False)(
        *arrays
    )
