"""Device mesh, shardings and host-local -> global batches.

The batch is split over the mesh axis ``data``; parameters follow per-model regex rules
(``models.sharding_rules``) over the ``model`` axis and are replicated otherwise.
"""

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = ()) -> Any:
    """NamedShardings for every leaf of ``tree``: the first regex in ``rules`` that matches the
    leaf's '/'-joined path wins; unmatched leaves are replicated. A rule whose spec does not
    divide the leaf's shape on this mesh is an error, not a silent replication."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def leaf_sharding(path, leaf):
        name = _path_name(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                shape = getattr(leaf, "shape", ())
                if len(spec) > len(shape):
                    continue
                for dim, axis in zip(shape, spec):
                    if axis is not None and dim % mesh.shape[axis]:
                        raise ValueError(f"sharding rule {pattern.pattern!r} -> {spec} does not divide "
                                         f"{name} of shape {shape} on mesh {dict(mesh.shape)}")
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's slice of the batch into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()}
