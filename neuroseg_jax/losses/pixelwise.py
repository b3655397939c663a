"""Per-pixel losses: (binary) cross-entropy and focal loss, both computed from logits.

Log-probabilities come from ``jax.nn.log_sigmoid`` / ``jax.nn.log_softmax`` of float32 logits, so
logits of +-1e4 give finite values and gradients (no log(0)).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neuroseg_jax.losses._common import (check_inputs, check_reduction, class_indices, reduce_pixels,
                                         valid_weights)


def log_prob_of_label(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log p_t, log(1 - p_t)) per pixel, each (B, H, W) float32, p_t the probability of the true class.

    For K = 1, p_t = sigmoid(z_t) with z_t = x for foreground and -x for background, so both logs are
    exact log-sigmoids. For K >= 2, log(1 - p_t) = log1p(-exp(log p_t)) clamped away from log(0).
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    target = class_indices(labels, num_classes)
    if num_classes == 1:
        signed = jnp.where(target == 1, logits[..., 0], -logits[..., 0])
        return jax.nn.log_sigmoid(signed), jax.nn.log_sigmoid(-signed)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    log_pt = jnp.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0]
    log_one_minus = jnp.log(jnp.maximum(-jnp.expm1(log_pt), 1e-30))
    return log_pt, log_one_minus


def bce_loss(logits: jax.Array, labels: jax.Array, *, pixel_weights: jax.Array | None = None,
             reduction: str = "mean", mask: jax.Array | None = None) -> jax.Array:
    """Cross-entropy from logits: binary (sigmoid) for K = 1, categorical (softmax) for K >= 2.

    L = -(1/N) sum_i w_i log p_t,i over the N valid pixels (IMSAHLO eq. 7 when weighted; MorphoSeg
    eq. 11). ``pixel_weights`` (B, H, W) multiplies each pixel's term (default 1); the mean still divides
    by the number of valid pixels, as in eq. 7.

    Args:
      logits: (B, H, W, K) float32 or bfloat16.
      labels: (B, H, W) integer classes (K = 1: label > 0 is foreground).
      pixel_weights: optional (B, H, W) per-pixel weights.
      reduction: 'mean' / 'global' (mean over all valid pixels of the batch) or 'none' ((B,) per image).
      mask: optional (B, H, W); zero entries are ignored.
    """
    check_inputs(logits, labels, mask)
    check_reduction(reduction)
    log_pt, _ = log_prob_of_label(logits, labels)
    per_pixel = -log_pt
    if pixel_weights is not None:
        per_pixel = per_pixel * pixel_weights.astype(jnp.float32)
    return reduce_pixels(per_pixel, valid_weights(mask, labels), reduction)


def focal_loss(logits: jax.Array, labels: jax.Array, *, alpha: float | Sequence[float] | None = 0.8,
               gamma: float = 3.0, reduction: str = "mean", mask: jax.Array | None = None) -> jax.Array:
    """Focal loss -(1/N) sum_i alpha_t (1 - p_t)^gamma log p_t (Lin et al. 2017; IMSAHLO eq. 9).

    IMSAHLO uses gamma = 3 and alpha = 0.8. ``alpha`` as a float weighs foreground classes (label >= 1)
    by alpha and background by 1 - alpha (Lin et al.'s alpha_t); a sequence gives one weight per class
    (length max(K, 2)); None means no class weighting. The modulating factor is computed as
    exp(gamma * log(1 - p_t)) from logits, so it stays finite for any gamma and extreme logits.

    Arguments as in :func:`bce_loss`.
    """
    check_inputs(logits, labels, mask)
    check_reduction(reduction)
    num_classes = logits.shape[-1]
    log_pt, log_one_minus_pt = log_prob_of_label(logits, labels)
    per_pixel = -jnp.exp(gamma * log_one_minus_pt) * log_pt
    if alpha is not None:
        target = class_indices(labels, num_classes)
        if np.ndim(alpha) == 0:
            alpha_t = jnp.where(target >= 1, alpha, 1.0 - alpha)
        else:
            class_alpha = jnp.asarray(alpha, jnp.float32)
            if class_alpha.shape != (max(num_classes, 2),):
                raise ValueError(f"focal_loss alpha sequence needs {max(num_classes, 2)} entries (one per class); "
                                 f"got shape {class_alpha.shape}")
            alpha_t = class_alpha[target]
        per_pixel = per_pixel * alpha_t
    return reduce_pixels(per_pixel, valid_weights(mask, labels), reduction)
