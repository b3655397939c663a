"""Pixel-level confusion counts and the overlap metrics derived from them.

Everything here is binary foreground-vs-background: labels > 0 are foreground. All metrics are
computed from ONE confusion computation (tp, fp, fn, tn), so pooled (dataset-level) metrics are
obtained by summing the counts of many images and calling `metrics_from_confusion` once, while
per-image metrics call it per image and average the results.

Definitions (standard; e.g. Taha & Hanbury 2015, "Metrics for evaluating 3D medical image
segmentation"):
  accuracy          = (tp + tn) / (tp + fp + fn + tn)
  precision         = tp / (tp + fp)
  recall            = tp / (tp + fn)                       (sensitivity)
  specificity       = tn / (tn + fp)
  dice = f1         = 2 tp / (2 tp + fp + fn)              (DSC, foreground F1)
  iou               = tp / (tp + fp + fn)                  (Jaccard)
  balanced_accuracy = (recall + specificity) / 2
  f1_background     = 2 tn / (2 tn + fn + fp)              (F1 with background as positive class)
  macro_f1          = (f1 + f1_background) / 2             (IMSAHLO: mean of the two class F1s)
  micro_f1          = sum_c tp_c / (sum_c tp_c + (sum_c fp_c + sum_c fn_c) / 2) over both classes;
                      for a single-label two-class problem every error is one fp of one class and
                      one fn of the other, so micro_f1 == accuracy exactly (reported anyway because
                      IMSAHLO Table II lists it as a column).

Empty policy (explicit, never NaN by default; the same for pixel and object metrics, both use
`safe_ratio`): a ratio whose denominator is zero is 1.0 when prediction and truth are BOTH empty
for the class it measures (nothing to find, nothing found) and 0.0 otherwise. So nothing predicted
against a non-empty truth is precision 0 and recall 0; something predicted against an empty truth
is precision 0 (0/k) and recall 0; dice/iou/precision/recall of two empty masks are 1.0. The
background-class ratios (specificity, f1_background) apply the rule to the background. This is
StarDist's `matching` convention (every ratio is 0 unless tp > 0) except for the both-empty case,
where StarDist gives 0 and we give 1 so that an empty image left empty is not counted as a miss in
per-image means. Pass `empty_score=float('nan')` to get NaN for every zero denominator instead and
handle those images yourself (or 0.0 to score them all as misses).
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax.numpy as jnp
import numpy as np

CONFUSION_KEYS = ("tp", "fp", "fn", "tn")
PIXEL_METRIC_KEYS = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "dice",
    "f1",
    "iou",
    "balanced_accuracy",
    "f1_background",
    "macro_f1",
    "micro_f1",
)


def binarize(pred, threshold: float = 0.5) -> np.ndarray:
    """Foreground mask of a prediction: floating arrays are probabilities (>= threshold is
    foreground), integer/bool arrays are labels (> 0 is foreground). Host numpy, any shape."""
    pred = np.asarray(pred)
    if np.issubdtype(pred.dtype, np.floating):
        return pred >= threshold
    return pred > 0


def confusion(pred, labels, mask=None, *, threshold: float = 0.5, axis=None) -> dict:
    """Jittable confusion counts in jnp.

    Args:
      pred: predicted foreground, any shape; floating => probability thresholded at `threshold`
        (>=), integer/bool => > 0 is foreground.
      labels: ground truth, same shape, > 0 is foreground.
      mask: optional validity mask (same shape, nonzero = counted); e.g. padding of a crop.
      axis: axes to reduce (None = all). `axis=(1, 2)` on (B, H, W) gives per-image counts (B,).
    Returns:
      dict tp, fp, fn, tn of int32 arrays. int32 holds 2**31 pixels per call (~900 images of
      1600x1200); accumulate larger totals on the host in Python ints.
    """
    pred = jnp.asarray(pred)
    if jnp.issubdtype(pred.dtype, jnp.floating):
        pred_fg = pred >= threshold
    else:
        pred_fg = pred > 0
    true_fg = jnp.asarray(labels) > 0
    valid = jnp.ones_like(true_fg) if mask is None else jnp.asarray(mask) != 0

    def count(selection):
        return jnp.sum(selection & valid, axis=axis, dtype=jnp.int32)

    return {
        "tp": count(pred_fg & true_fg),
        "fp": count(pred_fg & ~true_fg),
        "fn": count(~pred_fg & true_fg),
        "tn": count(~pred_fg & ~true_fg),
    }


def confusion_counts(pred, target, mask=None, *, threshold: float = 0.5) -> dict[str, int]:
    """Host (numpy) confusion counts as Python ints; same conventions as `confusion`."""
    pred_fg = binarize(pred, threshold)
    true_fg = np.asarray(target) > 0
    if pred_fg.shape != true_fg.shape:
        raise ValueError(f"pred shape {pred_fg.shape} != target shape {true_fg.shape}")
    if mask is not None:
        valid = np.asarray(mask) != 0
        if valid.shape != true_fg.shape:
            raise ValueError(f"mask shape {valid.shape} != target shape {true_fg.shape}")
        pred_fg, true_fg = pred_fg[valid], true_fg[valid]
    # One pass: code = 2 * truth + prediction -> 0 tn, 1 fp, 2 fn, 3 tp.
    codes = np.bincount((2 * true_fg.astype(np.uint8) + pred_fg).ravel(), minlength=4)
    return {"tp": int(codes[3]), "fp": int(codes[1]), "fn": int(codes[2]), "tn": int(codes[0])}


def safe_ratio(
    numerator: float, denominator: float, *, both_empty: bool, empty_score: float | None = None
) -> float:
    """numerator / denominator under the module's empty policy: a zero denominator gives
    `empty_score` when one is given, else 1.0 if `both_empty` (prediction and truth hold nothing of
    the measured class) and 0.0 otherwise."""
    if denominator > 0:
        return float(numerator) / float(denominator)
    if empty_score is not None:
        return float(empty_score)
    return 1.0 if both_empty else 0.0


def metrics_from_confusion(counts: Mapping, *, empty_score: float | None = None) -> dict[str, float]:
    """All pixel metrics (PIXEL_METRIC_KEYS) plus the counts themselves from tp/fp/fn/tn.

    `counts` values may be Python ints, numpy or jax scalars (e.g. summed `confusion` output).
    `empty_score=None` applies the both-empty => 1, else 0 policy; a float replaces it for every
    zero denominator.
    """
    missing = [key for key in CONFUSION_KEYS if key not in counts]
    if missing:
        raise ValueError(f"confusion counts lack keys {missing}")
    tp, fp, fn, tn = (int(np.asarray(counts[key])) for key in CONFUSION_KEYS)
    total = tp + fp + fn + tn
    no_foreground = tp + fp + fn == 0
    no_background = tn + fp + fn == 0
    ratio = functools.partial(safe_ratio, empty_score=empty_score)
    precision = ratio(tp, tp + fp, both_empty=no_foreground)
    recall = ratio(tp, tp + fn, both_empty=no_foreground)
    specificity = ratio(tn, tn + fp, both_empty=no_background)
    dice = ratio(2 * tp, 2 * tp + fp + fn, both_empty=no_foreground)
    f1_background = ratio(2 * tn, 2 * tn + fp + fn, both_empty=no_background)
    accuracy = ratio(tp + tn, total, both_empty=total == 0)
    # Micro F1 pools tp/fp/fn of both classes: class-1 (tp, fp, fn) + class-0 (tn, fn, fp).
    micro_tp, micro_errors = tp + tn, 2 * (fp + fn)
    micro_f1 = ratio(2 * micro_tp, 2 * micro_tp + micro_errors, both_empty=total == 0)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "dice": dice,
        "f1": dice,
        "iou": ratio(tp, tp + fp + fn, both_empty=no_foreground),
        "balanced_accuracy": (recall + specificity) / 2.0,
        "f1_background": f1_background,
        "macro_f1": (dice + f1_background) / 2.0,
        "micro_f1": micro_f1,
    }


def pixel_metrics(
    pred, target, mask=None, *, threshold: float = 0.5, empty_score: float | None = None
) -> dict[str, float]:
    """Pixel metrics of one prediction (or of a stack, pooled over every pixel of it).

    Args:
      pred: (..., H, W) probabilities (>= threshold is foreground) or labels/bool.
      target: same shape, > 0 is foreground.
      mask: optional validity mask of the same shape.
    Returns:
      dict with tp, fp, fn, tn and PIXEL_METRIC_KEYS (see module docstring for formulas).
    """
    return metrics_from_confusion(
        confusion_counts(pred, target, mask, threshold=threshold), empty_score=empty_score
    )


def sum_confusions(counts: list[Mapping]) -> dict[str, int]:
    """Pool confusion counts of many images (Python ints: no overflow)."""
    return {key: sum(int(np.asarray(c[key])) for c in counts) for key in CONFUSION_KEYS}
