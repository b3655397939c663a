"""Functional, jittable segmentation losses for neuron and cell microscopy.

Every loss is ``fn(logits, labels, *, <hyper-parameters by their paper names>, mask=None)`` with logits
(B, H, W, K) (K = 1 sigmoid, K >= 2 softmax), integer labels (B, H, W) and an optional (B, H, W) mask of
pixels that count; it returns a float32 scalar (or per-image values with ``reduction='none'``).

    from neuroseg_jax import losses
    total, terms = losses.hybrid_loss(logits, labels, weights=losses.IMSAHLO_WEIGHTS)

Submodules: ``overlap`` (Dice, Tversky, focal Tversky), ``pixelwise`` (BCE/CE, focal), ``boundary``
(contour weights, boundary loss), ``topology`` (soft skeleton, clDice), ``hybrid``, ``outliers``
(virtual outlier synthesis, MorphoSeg/VOS) and ``weighting`` (balance, norm, Pareto/MGDA).
"""

from neuroseg_jax.losses import outliers, weighting
from neuroseg_jax.losses._common import probabilities
from neuroseg_jax.losses.boundary import boundary_loss, contour_map, contour_weights, erode
from neuroseg_jax.losses.hybrid import (IMSAHLO_ABLATIONS, IMSAHLO_PARAMS, IMSAHLO_WEIGHTS, LOSS_TERMS,
                                        hybrid_loss)
from neuroseg_jax.losses.overlap import dice_loss, focal_tversky_loss, tversky_index, tversky_loss
from neuroseg_jax.losses.pixelwise import bce_loss, focal_loss
from neuroseg_jax.losses.topology import (cldice_loss, dice_cldice_loss, soft_dilate, soft_erode,
                                          soft_skeleton)

__all__ = [
    "IMSAHLO_ABLATIONS", "IMSAHLO_PARAMS", "IMSAHLO_WEIGHTS", "LOSS_TERMS",
    "bce_loss", "boundary_loss", "cldice_loss", "contour_map", "contour_weights", "dice_cldice_loss",
    "dice_loss", "erode", "focal_loss", "focal_tversky_loss", "hybrid_loss", "outliers", "probabilities",
    "soft_dilate",
    "soft_erode", "soft_skeleton", "tversky_index", "tversky_loss", "weighting",
]
