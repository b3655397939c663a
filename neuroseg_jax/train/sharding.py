"""Device mesh, shardings and host-local -> global batches.

The batch is split over the mesh axis ``data``; parameters follow per-model regex rules
(``models.sharding_rules``) over the ``model`` axis and are replicated otherwise, or split over
``data`` too with ``config.mesh.fsdp``.
"""

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from neuroseg_jax.models import partition_specs

DATA_AXIS = "data"
MODEL_AXIS = "model"


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """``{data, model}`` sizes for ``num_devices``; an axis of size -1 takes all remaining devices."""
    sizes = {DATA_AXIS: int(mesh_config[DATA_AXIS]), MODEL_AXIS: int(mesh_config[MODEL_AXIS])}
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}")
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if fixed <= 0 or num_devices % fixed:
        raise ValueError(f"config.mesh {sizes} does not divide the {num_devices} available devices")
    if fill:
        sizes[fill[0]] = num_devices // fixed
    if sizes[DATA_AXIS] * sizes[MODEL_AXIS] != num_devices:
        raise ValueError(f"config.mesh {sizes} uses {sizes[DATA_AXIS] * sizes[MODEL_AXIS]} devices, "
                         f"but {num_devices} are available; use -1 to fill an axis")
    return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D ``(data, model)`` mesh over ``devices`` (default: all); see ``mesh_shape``."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh((sizes[DATA_AXIS], sizes[MODEL_AXIS]), (DATA_AXIS, MODEL_AXIS),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ``data``; every other axis whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = (), *, fsdp: bool = False,
                   fsdp_min_size: int = 2**16) -> Any:
    """NamedShardings for every leaf of ``tree`` from ``models.partition_specs``: the first regex
    in ``rules`` matching the leaf's path wins, unmatched leaves are replicated or, with ``fsdp``,
    those of at least ``fsdp_min_size`` elements are split over ``data`` (fully sharded data
    parallelism)."""
    specs = partition_specs(tree, rules, axis_sizes=dict(mesh.shape), fsdp_axis=DATA_AXIS if fsdp else None,
                            fsdp_min_size=fsdp_min_size)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's slice of the batch into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}
