"""Parameter sharding rules: regex over '/'-joined parameter paths -> PartitionSpec.

`sharding_rules(name)` lists (regex, PartitionSpec) pairs for a registered model; the first rule
whose regex `re.search`-matches a path wins, unmatched parameters are replicated (PartitionSpec()).
Convolutional models replicate everything; TransUNet shards ViT attention heads and the MLP hidden
dimension over a 'model' mesh axis (Megatron-style: column-parallel query/key/value and Dense_0,
row-parallel out and Dense_1). `partition_specs(params, rules, ...)` applies the rules to a pytree,
drops any axis whose mesh size does not divide the dimension, and can add FSDP sharding of the
remaining replicated large parameters over a data axis.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

from neuroseg_jax.models.registry import MODELS
from neuroseg_jax.models.transunet import TransUNet

MODEL_AXIS = "model"

_VIT_RULES: list[tuple[str, PartitionSpec]] = [
    (r"MultiHeadDotProductAttention_1/(query|key|value)/kernel$", PartitionSpec(None, MODEL_AXIS, None)),
    (r"MultiHeadDotProductAttention_1/(query|key|value)/bias$", PartitionSpec(MODEL_AXIS, None)),
    (r"MultiHeadDotProductAttention_1/out/kernel$", PartitionSpec(MODEL_AXIS, None, None)),
    (r"MlpBlock_3/Dense_0/kernel$", PartitionSpec(None, MODEL_AXIS)),
    (r"MlpBlock_3/Dense_0/bias$", PartitionSpec(MODEL_AXIS)),
    (r"MlpBlock_3/Dense_1/kernel$", PartitionSpec(MODEL_AXIS, None)),
]


def sharding_rules(name: str) -> list[tuple[str, PartitionSpec]]:
    """Rules for registered model `name`; empty list (replicate all) for convolutional models."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return list(_VIT_RULES) if issubclass(MODELS[name].module, TransUNet) else []


def _path_name(path: Sequence[Any]) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], axis_sizes: Mapping[str, int]) -> PartitionSpec:
    """Replicates dims whose mesh axis size does not divide them (and pads the spec to the rank)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    if len(entries) > len(shape):
        return PartitionSpec()
    fitted = []
    for dim, axis in zip(shape, entries):
        size = axis_sizes.get(axis, 1) if isinstance(axis, str) else 1
        fitted.append(axis if axis is not None and dim % size == 0 else None)
    return PartitionSpec(*fitted) if any(axis is not None for axis in fitted) else PartitionSpec()


def partition_specs(
    params: Any,
    rules: Sequence[tuple[str, PartitionSpec]],
    *,
    axis_sizes: Mapping[str, int] | None = None,
    fsdp_axis: str | None = None,
    fsdp_min_size: int = 2**16,
) -> Any:
    """PartitionSpec pytree with the structure of `params` (arrays or ShapeDtypeStructs).

    axis_sizes: mesh axis name -> size (e.g. dict(mesh.shape)); used to keep every spec valid.
    fsdp_axis: when set (e.g. 'data'), a parameter left replicated by the rules and with at least
    `fsdp_min_size` elements is sharded over that axis along its largest divisible dimension.
    """
    axis_sizes = dict(axis_sizes or {})
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def spec_for(path: Sequence[Any], leaf: Any) -> PartitionSpec:
        name, shape = _path_name(path), tuple(leaf.shape)
        spec = next((spec for pattern, spec in compiled if pattern.search(name)), PartitionSpec())
        spec = _fit(spec, shape, axis_sizes)
        if fsdp_axis is None or any(axis is not None for axis in spec) or leaf.size < fsdp_min_size:
            return spec
        size = axis_sizes.get(fsdp_axis, 1)
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % size == 0:
                entries = [None] * len(shape)
                entries[dim] = fsdp_axis
                return PartitionSpec(*entries)
        return spec

    return jax.tree_util.tree_map_with_path(spec_for, params)
