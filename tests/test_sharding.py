"""make_mesh on simulated multi-host slices: each host's batch rows are one block, in process
order (what the input pipeline's per-host blocks need), and on one host jax.make_mesh's mesh."""

import dataclasses
import itertools

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from signnet_jax import sharding


@dataclasses.dataclass(frozen=True)
class Device:
    """Stands in for a jax.Device: the attributes mesh_utils and make_mesh read."""

    id: int
    platform: str
    device_kind: str
    process_index: int
    coords: tuple = ()
    core_on_chip: int = 0
    slice_index: int = 0


def tpu_slice(kind: str, bounds: tuple, host: tuple) -> list[Device]:
    """A TPU slice of ``bounds`` chips (x, y, z), hosts owning ``host`` blocks of them, in
    jax.devices() order: process by process, each host's chips z, y, x-minor."""
    hosts: dict[tuple, list] = {}
    for z, y, x in itertools.product(*(range(b) for b in reversed(bounds))):
        key = tuple(c // h for c, h in zip((x, y, z), host, strict=True))
        hosts.setdefault(key, []).append((x, y, z))
    order = sorted(hosts, key=lambda k: tuple(reversed(k)))  # process index: x-minor hosts
    chips = [(p, c) for p, key in enumerate(order) for c in hosts[key]]
    return [Device(i, "tpu", kind, p, c) for i, (p, c) in enumerate(chips)]


def gpu_nodes(nodes: int, per_node: int) -> list[Device]:
    return [
        Device(i, "gpu", "NVIDIA H100 80GB HBM3", i // per_node) for i in range(nodes * per_node)
    ]


SLICES = {
    "v5e 4x4": tpu_slice("TPU v5 lite", (4, 4, 1), (2, 2, 1)),  # 4 hosts of 2x2 chips
    "v6e 4x4": tpu_slice("TPU v6 lite", (4, 4, 1), (2, 2, 1)),
    "v4 2x2x4": tpu_slice("TPU v4", (2, 2, 4), (2, 2, 1)),  # 4 hosts, one z plane each
    "v5p 2x4x4": tpu_slice("TPU v5p", (2, 4, 4), (2, 2, 1)),  # 8 hosts
    "gpu 2x8": gpu_nodes(2, 8),
}


def per_host(devices) -> int:
    return len(devices) // len({d.process_index for d in devices})


def check_host_blocks(mesh, devices):
    """Slot k of the batch is host k // per_host's; host p's rows of a batch are one block."""
    n, flat = per_host(devices), list(mesh.devices.flat)
    assert sorted(flat, key=lambda d: d.id) == sorted(devices, key=lambda d: d.id)
    assert [d.process_index for d in flat] == [k // n for k in range(len(flat))]
    # what global_batch's make_array_from_process_local_data fills from each host's rows
    rows = 4 * len(devices)
    owned: dict[int, set] = {}
    for d, (index, _) in sharding.batch_sharding(mesh, 2).devices_indices_map((rows, 3)).items():
        owned.setdefault(d.process_index, set()).update(range(rows)[index])
    block = rows // len(owned)
    assert owned == {p: set(range(p * block, (p + 1) * block)) for p in owned}


@pytest.mark.parametrize("name", SLICES)
@pytest.mark.parametrize("fsdp", [1, 4])
def test_each_host_owns_one_block_of_the_batch_and_its_fsdp_groups(name, fsdp):
    devices = SLICES[name]
    mesh = sharding.make_mesh(fsdp, devices)
    assert dict(mesh.shape) == {"data": len(devices) // fsdp, "fsdp": fsdp}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    check_host_blocks(mesh, devices)
    for group in mesh.devices:  # one fsdp group: FSDP's all-gathers stay within a host
        assert len({d.process_index for d in group}) == 1


@pytest.mark.parametrize("name", SLICES)
def test_every_host_in_the_order_make_mesh_gives_it_alone(name):
    devices = SLICES[name]
    n = per_host(devices)
    mesh = sharding.make_mesh(1, devices)
    hosts = np.asarray(list(mesh.devices.flat), dtype=object).reshape(-1, n)
    alone = jax.make_mesh((n, 1), ("a", "b"), devices=list(hosts[0])).devices.reshape(-1)
    assert list(hosts[0]) == list(alone)  # host 0 sits at the slice's corner

    def relative(host):
        if not host[0].coords:
            return [d.id - host[0].id for d in host]
        corner = np.min([d.coords for d in host], axis=0)
        return [tuple(np.subtract(d.coords, corner)) for d in host]

    assert all(relative(h) == relative(hosts[0]) for h in hosts)


def test_v5e_hosts_are_rings_where_make_mesh_scatters_them():
    devices = SLICES["v5e 4x4"]
    ring = [(0, 0), (1, 0), (1, 1), (0, 1)]
    flat = list(sharding.make_mesh(1, devices).devices.flat)
    for p in range(4):
        host = flat[4 * p : 4 * p + 4]
        corner = min(d.coords for d in host)
        assert [(d.coords[0] - corner[0], d.coords[1] - corner[1]) for d in host] == ring
    # the review's finding: jax.make_mesh's ring crosses hosts, so a host's rows are scattered
    physical = jax.make_mesh((16, 1), sharding.BATCH_AXES, devices=devices).devices.flat
    assert [d.process_index for d in physical] != sorted(d.process_index for d in devices)


@pytest.mark.parametrize("name", ["v5e 4x4", "v4 2x2x4", "gpu 2x8"])
def test_fsdp_over_several_hosts_takes_whole_consecutive_hosts(name):
    devices = SLICES[name]
    n = per_host(devices)
    mesh = sharding.make_mesh(2 * n, devices)
    check_host_blocks(mesh, devices)
    for r, group in enumerate(mesh.devices):
        assert [d.process_index for d in group] == [2 * r] * n + [2 * r + 1] * n


def test_fsdp_neither_dividing_nor_multiple_of_a_host_takes_blocks_of_one_host():
    devices = gpu_nodes(6, 4)  # fsdp 6: gcd 2, pairs of one host
    mesh = sharding.make_mesh(6, devices)
    check_host_blocks(mesh, devices)
    pairs = np.vectorize(lambda d: d.process_index)(mesh.devices).reshape(-1, 2)
    assert (pairs[:, 0] == pairs[:, 1]).all()
    assert not all(len({d.process_index for d in group}) == 1 for group in mesh.devices)


def test_devices_spread_unevenly_over_processes_are_refused():
    devices = SLICES["gpu 2x8"][:12]  # 8 of process 0, 4 of process 1
    with pytest.raises(ValueError, match=r"evenly over the processes .*\{0: 8, 1: 4\}"):
        sharding.make_mesh(1, devices)
    with pytest.raises(ValueError, match="must divide the number of devices"):
        sharding.make_mesh(3, SLICES["gpu 2x8"])


ONE_HOST = {
    "v5e 2x4": tpu_slice("TPU v5 lite", (2, 4, 1), (2, 4, 1)),
    "v4 2x2x2": tpu_slice("TPU v4", (2, 2, 2), (2, 2, 2)),
    "gpu 8": gpu_nodes(1, 8),
}


@pytest.mark.parametrize("name", ONE_HOST)
@pytest.mark.parametrize("fsdp", [1, 2, 4, 8])
def test_one_host_gets_jax_make_mesh_s_mesh(name, fsdp):
    devices = ONE_HOST[name]
    auto = (AxisType.Auto, AxisType.Auto)
    want = jax.make_mesh((8 // fsdp, fsdp), sharding.BATCH_AXES, auto, devices=devices)
    assert sharding.make_mesh(fsdp, devices) == want


@pytest.mark.parametrize("fsdp", [1, 2, 4, 8])
def test_cpu_mesh_is_jax_make_mesh_s(fsdp):
    auto = (AxisType.Auto, AxisType.Auto)
    mesh = sharding.make_mesh(fsdp)
    assert mesh == jax.make_mesh((8 // fsdp, fsdp), sharding.BATCH_AXES, auto)
    assert list(mesh.devices.flat) == jax.devices()  # the CPU's devices as they come
