"""Topology metrics on hard masks: clDice and Betti-number errors.

clDice (Shit et al., CVPR 2021, "clDice - a novel topology-preserving loss function for tubular
structure segmentation"), evaluated on binary masks with morphological skeletons
(scikit-image `skeletonize`):
  Tprec = |S(P) & G| / |S(P)|     (topology precision: predicted centreline inside the target)
  Tsens = |S(G) & P| / |S(G)|     (topology sensitivity: target centreline covered)
  clDice = 2 Tprec Tsens / (Tprec + Tsens)
Empty policy as in `pixel`: an empty skeleton with nothing to miss scores 1, otherwise 0.

Betti numbers of a 2-D foreground with 8-connectivity (background 4-connected, the dual pairing
that makes the Euler characteristic well defined):
  b0 = number of foreground components, b1 = number of holes = b0 - euler_number.
Betti errors are |b_k(P) - b_k(G)|.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import euler_number
from skimage.morphology import skeletonize


def _fraction(numerator: int, denominator: int, errors: int) -> float:
    if denominator > 0:
        return numerator / denominator
    return 1.0 if errors == 0 else 0.0


def cldice(pred, target) -> float:
    """clDice of two 2-D binary masks (> 0 foreground) on hard skeletons."""
    pred, target = np.asarray(pred) > 0, np.asarray(target) > 0
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"cldice expects equal 2-D shapes, got {pred.shape} and {target.shape}")
    pred_skeleton, target_skeleton = skeletonize(pred), skeletonize(target)
    # An empty skeleton is harmless only when the other mask is empty too.
    topology_precision = _fraction(
        int((pred_skeleton & target).sum()), int(pred_skeleton.sum()), int(target.sum()))
    topology_sensitivity = _fraction(
        int((target_skeleton & pred).sum()), int(target_skeleton.sum()), int(pred.sum()))
    if topology_precision + topology_sensitivity == 0:
        return 0.0
    return 2 * topology_precision * topology_sensitivity / (topology_precision + topology_sensitivity)


def betti_numbers(mask) -> tuple[int, int]:
    """(b0, b1) of a 2-D binary mask: 8-connected components and 4-connected holes."""
    mask = np.asarray(mask) > 0
    b0 = int(ndimage.label(mask, structure=np.ones((3, 3), bool))[1])
    return b0, b0 - int(euler_number(mask, connectivity=2))


def topology_metrics(pred, target) -> dict:
    """clDice and Betti-0/1 numbers and errors of one prediction against its target."""
    pred_b0, pred_b1 = betti_numbers(pred)
    target_b0, target_b1 = betti_numbers(target)
    return {
        "cldice": cldice(pred, target),
        "betti0_pred": pred_b0,
        "betti0_target": target_b0,
        "betti1_pred": pred_b1,
        "betti1_target": target_b1,
        "betti0_error": abs(pred_b0 - target_b0),
        "betti1_error": abs(pred_b1 - target_b1),
    }
