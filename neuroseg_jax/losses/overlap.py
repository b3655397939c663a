"""Region-overlap losses: Dice, Tversky and focal Tversky.

All three are ratios of soft counts over the pixels of each image (or of the whole batch with
``reduction='global'``, which is how IMSAHLO writes eqs. 4 and 8: one sum over all N pixels).
Soft counts for class c: TP = sum p*g, FP = sum p*(1-g), FN = sum (1-p)*g, with p the predicted
probability and g the one-hot target, restricted to valid (mask) pixels. ``epsilon`` is added to
numerator and denominator, so empty ground truth with an empty prediction scores a perfect 0 loss and
no ratio can be 0/0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neuroseg_jax.losses._common import reduce_region, region_inputs, spatial_sum


def dice_loss(logits: jax.Array, labels: jax.Array, *, epsilon: float = 1.0, squared: bool = True,
              include_background: bool = False, reduction: str = "global",
              mask: jax.Array | None = None) -> jax.Array:
    """Soft Dice loss, 1 - (2 sum p g + eps) / (sum p^2 + sum g^2 + eps), averaged over classes.

    Source: Milletari et al. 2016 (V-Net, squared denominators), IMSAHLO eq. 8 with w = 1 and MorphoSeg
    eq. 10; ``squared=False`` gives the plain form with sum p + sum g (Sudre et al. 2017 without weights).

    Args:
      logits: (B, H, W, K) float32 or bfloat16.
      labels: (B, H, W) integer classes (for K = 1, label > 0 is foreground).
      epsilon: smoothing constant in numerator and denominator.
      squared: squared (p^2, g^2) or plain (p, g) denominator.
      include_background: for K >= 2, also average over class 0 (K = 1 always uses its one channel).
      reduction: 'global' (one ratio over all batch pixels), 'mean' (mean of per-image losses) or
        'none' (per-image losses, shape (B,)).
      mask: optional (B, H, W); pixels where it is 0 are ignored.

    Returns:
      Scalar float32 loss in [0, 1] (or (B,) for reduction='none').
    """
    probs, target, _ = region_inputs(logits, labels, mask, include_background, reduction)
    intersection = spatial_sum(probs * target, reduction)
    if squared:
        denominator = spatial_sum(probs * probs, reduction) + spatial_sum(target * target, reduction)
    else:
        denominator = spatial_sum(probs, reduction) + spatial_sum(target, reduction)
    dice = (2.0 * intersection + epsilon) / (denominator + epsilon)
    return reduce_region(1.0 - jnp.mean(dice, axis=-1), reduction)


def tversky_index(logits: jax.Array, labels: jax.Array, *, alpha: float = 0.3, beta: float = 0.7,
                  epsilon: float = 1.0, include_background: bool = False, reduction: str = "global",
                  mask: jax.Array | None = None) -> jax.Array:
    """Tversky index (TP + eps) / (TP + alpha FP + beta FN + eps) per item, averaged over classes.

    Source: Salehi et al. 2017; IMSAHLO eq. 4. Naming follows Salehi and the IMSAHLO text under eq. 4:
    ``alpha`` weighs false positives and ``beta`` false negatives, so the IMSAHLO setting alpha = 0.3,
    beta = 0.7 penalises missed foreground more. (IMSAHLO's eq. 4 and its §IV-C write the weights the
    other way round; the intent, FN weighted 0.7, is what we implement.) Adding eps to the denominator
    (eq. 4 has it only in the numerator) keeps empty-vs-empty at index 1 instead of 0/0.

    Returns (B,) per image, or (1,) for reduction='global'.
    """
    probs, target, _ = region_inputs(logits, labels, mask, include_background, reduction)
    true_pos = spatial_sum(probs * target, reduction)
    false_pos = spatial_sum(probs * (1.0 - target), reduction)
    false_neg = spatial_sum((1.0 - probs) * target, reduction)
    index = (true_pos + epsilon) / (true_pos + alpha * false_pos + beta * false_neg + epsilon)
    return jnp.mean(index, axis=-1)


def tversky_loss(logits: jax.Array, labels: jax.Array, *, alpha: float = 0.3, beta: float = 0.7,
                 epsilon: float = 1.0, include_background: bool = False, reduction: str = "global",
                 mask: jax.Array | None = None) -> jax.Array:
    """Tversky loss 1 - TI (IMSAHLO eq. 5; Salehi et al. 2017). alpha weighs FP, beta weighs FN.

    With alpha = beta = 0.5 this equals the plain Dice loss with smoothing 2 * epsilon.
    Shapes and arguments as in :func:`dice_loss`; returns a scalar (or (B,) for reduction='none').
    """
    index = tversky_index(logits, labels, alpha=alpha, beta=beta, epsilon=epsilon,
                          include_background=include_background, reduction=reduction, mask=mask)
    return reduce_region(1.0 - index, reduction)


def focal_tversky_loss(logits: jax.Array, labels: jax.Array, *, alpha: float = 0.3, beta: float = 0.7,
                       gamma: float = 0.75, epsilon: float = 1.0, include_background: bool = False,
                       reduction: str = "global", mask: jax.Array | None = None) -> jax.Array:
    """Focal Tversky loss (1 - TI)^gamma (Abraham & Khan 2019, who use exponent 1/(4/3) = 0.75).

    1 - TI is clamped at a tiny positive value before the power so that gamma < 1 has a finite gradient
    for a perfect prediction. Arguments as in :func:`tversky_loss`.
    """
    index = tversky_index(logits, labels, alpha=alpha, beta=beta, epsilon=epsilon,
                          include_background=include_background, reduction=reduction, mask=mask)
    return reduce_region(jnp.maximum(1.0 - index, 1e-12) ** gamma, reduction)
