"""One device mesh with axes ("data", "fsdp"), and the shardings the trainer puts on it.

The batch is split over both axes (every device sees its own examples); parameters and
optimiser state follow one rule: arrays of at least ``fsdp_min_size`` elements are split along
their largest dimension that the fsdp size divides, everything else is replicated. With
``fsdp=1`` this is plain data parallelism. The code path is the same on 1 device and on N.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the leading (example) dimension is split over both axes


class MeshConfigError(ValueError):
    """The ``mesh`` config group does not describe a mesh over the available devices."""


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves (data, fsdp) with at most one -1 ("fill the rest") against ``num_devices``."""
    sizes = {"data": int(data), "fsdp": int(fsdp)}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise MeshConfigError(f"mesh.{name}={size}: sizes must be positive or -1 (fill)")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MeshConfigError(f"mesh: only one axis may be -1, got data={data}, fsdp={fsdp}")
    if fill:
        known = math.prod(size for size in sizes.values() if size != -1)
        if num_devices % known:
            raise MeshConfigError(
                f"mesh: {num_devices} devices cannot be split with "
                f"data={data}, fsdp={fsdp} ({num_devices} is not a multiple of {known})"
            )
        sizes[fill[0]] = num_devices // known
    if sizes["data"] * sizes["fsdp"] != num_devices:
        raise MeshConfigError(
            f"mesh: data={sizes['data']} x fsdp={sizes['fsdp']} = "
            f"{sizes['data'] * sizes['fsdp']} devices, but {num_devices} are available"
        )
    return sizes["data"], sizes["fsdp"]


def make_mesh(mesh_config: Mapping[str, Any], devices=None) -> Mesh:
    """Builds the ("data", "fsdp") mesh from ``config.mesh`` (fields ``data``, ``fsdp``).

    Axes are ``Auto`` so that Linen's logical constraints shard rather than assert.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_config["data"], mesh_config["fsdp"], len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """PartitionSpec of one array under the FSDP rule.

    Arrays with at least ``min_size`` elements are split along their largest dimension that
    ``fsdp_size`` divides (the first such dimension on ties); all others are replicated.
    """
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return P()
    _, neg_axis = max(candidates)
    spec = [None] * len(shape)
    spec[-neg_axis] = "fsdp"
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, min_size: int) -> Any:
    """NamedSharding for every array leaf of ``tree`` (abstract or concrete) by the FSDP rule."""
    fsdp_size = mesh.shape["fsdp"]

    def leaf_sharding(leaf):
        return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp_size, min_size))

    return jax.tree.map(leaf_sharding, tree)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``abstract_tree`` carrying ``shardings`` (a restore target)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        shardings,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of scalars and anything every device holds in full."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (example) dimension over ("data", "fsdp"); the rest unsplit."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(sharding: NamedSharding, local_batch: Mapping[str, np.ndarray]) -> dict:
    """Host-local numpy batch -> global jax arrays split over the batch axes.

    ``local_batch``: dict of arrays ``[local_batch, ...]``; the local batch must divide evenly
    over this process's devices. The global batch is ``local_batch * process_count``.
    """
    local_devices = len(sharding.addressable_devices)
    arrays = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[0] % local_devices:
            raise ValueError(
                f"batch field {key!r} has shape {value.shape}: its leading dimension must be a "
                f"multiple of the {local_devices} local devices"
            )
        arrays[key] = jax.make_array_from_process_local_data(sharding, value)
    return arrays


def fetch(tree: Any) -> Any:
    """Replicated device outputs (metrics) -> host: Python floats/ints for scalars, else numpy.

    Reads each array's first local shard, which works on every process of a multi-host run
    (a replicated array spans devices that one process cannot address).
    """

    def to_host(x):
        if isinstance(x, jax.Array):
            if not x.is_fully_replicated:
                raise ValueError(f"fetch expects replicated arrays, got sharding {x.sharding}")
            x = np.asarray(x.addressable_data(0))
        return x.item() if np.ndim(x) == 0 else np.asarray(x)

    return jax.tree.map(to_host, tree)


HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def use_cpu_cores(count: int | None = None) -> int | None:
    """Splits the host CPU into ``count`` jax devices (default: the cores this process may use)
    and returns the number set, or None when it left things as they were.

    XLA:CPU runs each program's batched matrix-vector products (the attention over a decode
    cache, the DiT's attention) on one thread; with one device per core, work split over a mesh
    (``sampler.LatentSampler``, ``decoding.greedy_decode(devices=...)``) runs one program per
    core at once. Entry points call this before any jax computation; it does nothing when
    ``XLA_FLAGS`` already sets the host device count (tests set 8), when ``count`` is 1, or when
    jax's backends are already initialised (an in-process caller keeps its devices). Devices of
    an accelerator backend are not affected.
    """
    if count is None:
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not count or count <= 1 or HOST_DEVICE_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError:  # backends initialised: too late to change the host devices
        return None
    return int(count)
