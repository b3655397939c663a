"""Shared input handling for the loss functions.

Every loss takes ``logits`` of shape (B, H, W, K) (K = 1: sigmoid/binary, K >= 2: softmax), integer
``labels`` of shape (B, H, W) and an optional ``mask`` of shape (B, H, W) whose non-zero entries mark
the pixels that count. Everything is computed in float32 whatever the logits dtype (bfloat16 logits
would otherwise lose the small differences that Dice-type ratios are made of).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCTIONS = ("mean", "none", "global")


def check_inputs(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> None:
    """Raises ValueError when shapes or dtypes do not follow the (B, H, W, K) / (B, H, W) convention."""
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (B, H, W, K); got shape {logits.shape}")
    if labels.shape != logits.shape[:3]:
        raise ValueError(f"labels must have shape {logits.shape[:3]} (B, H, W) to match logits {logits.shape}; "
                         f"got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer) and labels.dtype != jnp.bool_:
        raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if mask is not None and mask.shape != logits.shape[:3]:
        raise ValueError(f"mask must have shape {logits.shape[:3]} (B, H, W); got {mask.shape}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def probabilities(logits: jax.Array) -> jax.Array:
    """Float32 class probabilities (B, H, W, K): sigmoid for K = 1, softmax over the last axis otherwise."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)


def one_hot_targets(labels: jax.Array, num_classes: int) -> jax.Array:
    """Float32 targets (B, H, W, K): for K = 1 the foreground indicator (label > 0), else one-hot of labels."""
    if num_classes == 1:
        return (labels > 0).astype(jnp.float32)[..., None]
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def class_indices(labels: jax.Array, num_classes: int) -> jax.Array:
    """Integer class per pixel in [0, max(K, 2)): binarised (label > 0) for K = 1, unchanged otherwise."""
    if num_classes == 1:
        return (labels > 0).astype(jnp.int32)
    return labels.astype(jnp.int32)


def valid_weights(mask: jax.Array | None, labels: jax.Array) -> jax.Array:
    """Float32 (B, H, W) with 1 where a pixel counts and 0 where it is ignored."""
    if mask is None:
        return jnp.ones(labels.shape, jnp.float32)
    return (mask != 0).astype(jnp.float32)


def region_channels(num_classes: int, include_background: bool) -> slice:
    """Channels that region losses average over: the single channel for K = 1, classes 1.. unless told."""
    if num_classes == 1 or include_background:
        return slice(0, num_classes)
    return slice(1, num_classes)


def spatial_sum(values: jax.Array, reduction: str) -> jax.Array:
    """Sums (B, H, W, C) over pixels: per image (B, C), or over the whole batch (1, C) for 'global'."""
    sums = jnp.sum(values, axis=(1, 2))
    if reduction == "global":
        return jnp.sum(sums, axis=0, keepdims=True)
    return sums


def reduce_region(per_item: jax.Array, reduction: str) -> jax.Array:
    """Reduces region-loss values (B,) or (1,) ('global') to the requested result."""
    if reduction == "none":
        return per_item
    return jnp.mean(per_item)


def reduce_pixels(values: jax.Array, weights: jax.Array, reduction: str) -> jax.Array:
    """Mean of per-pixel values (B, H, W) over weighted valid pixels.

    'mean' and 'global' average over every valid pixel of the batch; 'none' gives one mean per image.
    ``weights`` is the validity mask (0/1); the denominator is clamped to 1 so that an all-ignored
    input gives 0 instead of NaN.
    """
    if reduction == "none":
        return jnp.sum(values * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1.0)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def region_inputs(logits: jax.Array, labels: jax.Array, mask: jax.Array | None, include_background: bool,
                  reduction: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validated (probs, target, valid) for region losses, zeroed outside the mask.

    probs and target are (B, H, W, C) over the channels chosen by :func:`region_channels`; valid is
    (B, H, W, 1).
    """
    check_inputs(logits, labels, mask)
    check_reduction(reduction)
    num_classes = logits.shape[-1]
    channels = region_channels(num_classes, include_background)
    valid = valid_weights(mask, labels)[..., None]
    probs = probabilities(logits)[..., channels] * valid
    target = one_hot_targets(labels, num_classes)[..., channels] * valid
    return probs, target, valid
