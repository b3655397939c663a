"""Object-level metrics: connected-component instances, IoU matching, AP, F1, counting error.

Instances of a semantic mask are its 8-connected foreground components (`connected_components`).
A predicted and a target instance match at threshold t when their IoU >= t, one-to-one; for
t > 0.5 the matching is unique (two objects cannot both overlap a third by more than half of
their unions), for t <= 0.5 the one-to-one matching maximising the number of matches is found
with the Hungarian algorithm (scipy `linear_sum_assignment`).

Per threshold t: tp (matched pairs), fp (unmatched predictions), fn (unmatched targets),
  precision = tp / (tp + fp), recall = tp / (tp + fn), f1 = 2 tp / (2 tp + fp + fn),
  ap = tp / (tp + fp + fn)   - the score-free "average precision" of the 2018 Data Science Bowl
                               as used by StarDist and Cellpose for semantic/instance masks,
  instance_map = mean of ap over t in 0.50:0.05:0.95.
Empty policy: the pixel metrics' one (`pixel.safe_ratio`, see `pixel`'s docstring): a zero
denominator gives 1 only when there are no predicted AND no target objects, else 0. So nothing
predicted against k > 0 target objects scores precision 0, recall 0 (StarDist's `matching`), and
k > 0 objects predicted where there are none score precision 0, recall 0; ap/f1 are 0 in both.
Pooled (dataset) numbers sum tp/fp/fn over images first.

With per-object confidence scores (e.g. the mean foreground probability inside each predicted
object, `object_scores`) the ranked COCO-style average precision is available too
(`scored_detections` per image, `coco_average_precision` over images): detections are visited in
descending score, each matched to the unmatched target of highest IoU >= t, and AP is the
area under the interpolated precision-recall curve sampled at 101 recall points; coco_map averages
it over 0.50:0.05:0.95. With no target objects AP is 1 without detections and 0 with any.

Counting (FNC's task): count_error = n_pred - n_target (signed), abs_count_error, and
relative_count_error = |n_pred - n_target| / max(n_target, 1).

MorphoSeg's image-level scores (its Table 1 columns "IoU-0.5", "IoU-0.75", "IoU-0.9" and "mAP")
are NOT the object metrics above: IoU-t is the fraction of images whose image-level foreground
IoU is >= t, and mAP is the mean of those three columns, i.e. over t in {0.5, 0.75, 0.9} only
(every row of the paper's Table 1 satisfies it, e.g. (93.02 + 80.01 + 21.87) / 3 = 64.97, and
MorphoSeg's public evaluation code averages over the same three thresholds). Reported under the
distinct names `morphoseg_iou@t` and `morphoseg_map` (`image_level_scores`).
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from neuroseg_jax.metrics.pixel import safe_ratio

COCO_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())
REPORT_THRESHOLDS = (0.5, 0.75, 0.9)
MORPHOSEG_THRESHOLDS = (0.5, 0.75, 0.9)


def threshold_key(name: str, threshold: float) -> str:
    """Metric key for a thresholded quantity, e.g. ('ap', 0.5) -> 'ap@0.50'."""
    return f"{name}@{threshold:.2f}"


def connected_components(mask, *, connectivity: int = 8) -> np.ndarray:
    """Connected components of a 2-D binary mask (> 0 foreground) as int32 labels 0..n (0 = bg).

    connectivity: 8 (default, diagonal neighbours join) or 4.
    """
    mask = np.asarray(mask) > 0
    if mask.ndim != 2:
        raise ValueError(f"connected_components expects a 2-D mask, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, _ = ndimage.label(mask, structure=structure)
    return labels.astype(np.int32)


def as_instances(array, *, connectivity: int = 8) -> np.ndarray:
    """Instance labels from either a semantic mask or an instance-label image.

    bool arrays and arrays with a single nonzero value (0/1, 0/255 masks) are split into
    connected components; integer arrays with several nonzero values are taken as instance
    labels already (so touching instances stay separate) and relabelled to 1..n.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D mask or label image, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        raise ValueError("instance inputs must be bool or integer (threshold probabilities first)")
    values = np.unique(array)
    if array.dtype == bool or values[values != 0].size <= 1:
        return connected_components(array, connectivity=connectivity)
    _, relabelled = np.unique(array, return_inverse=True)
    relabelled = relabelled.reshape(array.shape).astype(np.int32)
    # np.unique sorts, so background 0 (if present) maps to 0; shift when there is none.
    return relabelled if values[0] == 0 else relabelled + 1


def instance_iou(pred_labels: np.ndarray, target_labels: np.ndarray) -> np.ndarray:
    """IoU matrix (n_target, n_pred) of two label images (0 = background, 1..n dense)."""
    if pred_labels.shape != target_labels.shape:
        raise ValueError(f"shape mismatch {pred_labels.shape} vs {target_labels.shape}")
    n_pred, n_target = int(pred_labels.max(initial=0)), int(target_labels.max(initial=0))
    pair_codes = target_labels.astype(np.int64).ravel() * (n_pred + 1) + pred_labels.ravel()
    overlap = np.bincount(pair_codes, minlength=(n_target + 1) * (n_pred + 1))
    overlap = overlap.reshape(n_target + 1, n_pred + 1)
    target_area, pred_area = overlap.sum(axis=1), overlap.sum(axis=0)
    intersection = overlap[1:, 1:].astype(np.float64)
    union = target_area[1:, None] + pred_area[None, 1:] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def count_matches(iou: np.ndarray, threshold: float) -> int:
    """Size of the largest one-to-one matching among pairs with IoU >= threshold."""
    candidates = iou >= threshold
    if not candidates.any():
        return 0
    if threshold > 0.5:
        return int(candidates.sum())
    rows, cols = linear_sum_assignment(candidates, maximize=True)
    return int(candidates[rows, cols].sum())


def match_counts(
    pred, target, *, thresholds: Sequence[float] = COCO_THRESHOLDS, connectivity: int = 8
) -> dict:
    """Per-threshold tp/fp/fn and object counts of one image (inputs as in `as_instances`)."""
    pred_labels = as_instances(pred, connectivity=connectivity)
    target_labels = as_instances(target, connectivity=connectivity)
    iou = instance_iou(pred_labels, target_labels)
    n_target, n_pred = iou.shape
    tp = np.array([count_matches(iou, t) for t in thresholds], dtype=np.int64)
    return {
        "thresholds": tuple(float(t) for t in thresholds),
        "tp": tp,
        "fp": n_pred - tp,
        "fn": n_target - tp,
        "n_pred": n_pred,
        "n_target": n_target,
    }


def sum_match_counts(counts: Sequence[Mapping]) -> dict:
    """Pool `match_counts` of many images (same thresholds)."""
    if not counts:
        raise ValueError("sum_match_counts needs at least one image")
    thresholds = counts[0]["thresholds"]
    if any(tuple(c["thresholds"]) != tuple(thresholds) for c in counts):
        raise ValueError("match counts were computed at different thresholds")
    pooled = {key: sum(np.asarray(c[key]) for c in counts) for key in ("tp", "fp", "fn")}
    pooled.update(
        thresholds=thresholds,
        n_pred=sum(int(c["n_pred"]) for c in counts),
        n_target=sum(int(c["n_target"]) for c in counts),
    )
    return pooled


def instance_metrics_from_counts(
    counts: Mapping, *, report_thresholds: Sequence[float] = REPORT_THRESHOLDS
) -> dict:
    """ap/precision/recall/f1 at `report_thresholds`, instance_map over all thresholds of the
    counts, and counting errors (see module docstring)."""
    thresholds = list(counts["thresholds"])
    tp, fp, fn = (np.asarray(counts[key]) for key in ("tp", "fp", "fn"))
    n_pred, n_target = int(counts["n_pred"]), int(counts["n_target"])
    ratio = functools.partial(safe_ratio, both_empty=n_pred == 0 and n_target == 0)
    ap = [ratio(tp[i], tp[i] + fp[i] + fn[i]) for i in range(len(thresholds))]
    result: dict = {
        "n_pred": n_pred,
        "n_target": n_target,
        "count_error": n_pred - n_target,
        "abs_count_error": abs(n_pred - n_target),
        "relative_count_error": abs(n_pred - n_target) / max(n_target, 1),
        "instance_map": float(np.mean(ap)),
    }
    for t in report_thresholds:
        matches = [i for i, value in enumerate(thresholds) if abs(value - t) < 1e-9]
        if not matches:
            raise ValueError(f"report threshold {t} not among the counted thresholds {thresholds}")
        i = matches[0]
        result[threshold_key("ap", t)] = ap[i]
        result[threshold_key("precision", t)] = ratio(tp[i], tp[i] + fp[i])
        result[threshold_key("recall", t)] = ratio(tp[i], tp[i] + fn[i])
        result[threshold_key("f1", t)] = ratio(2 * tp[i], 2 * tp[i] + fp[i] + fn[i])
    return result


def instance_metrics(
    pred, target, *, thresholds: Sequence[float] = COCO_THRESHOLDS,
    report_thresholds: Sequence[float] = REPORT_THRESHOLDS, connectivity: int = 8,
) -> dict:
    """Object metrics of one image: pred/target are binary masks or instance-label images."""
    counts = match_counts(pred, target, thresholds=thresholds, connectivity=connectivity)
    return instance_metrics_from_counts(counts, report_thresholds=report_thresholds)


def image_level_scores(
    image_ious: Sequence[float], *, thresholds: Sequence[float] = MORPHOSEG_THRESHOLDS
) -> dict:
    """MorphoSeg's image-level scores from per-image foreground IoUs (one per image):
    morphoseg_iou@t = fraction of images with IoU >= t, for t in `thresholds`; morphoseg_map =
    the mean of those columns (MorphoSeg Table 1: t in {0.5, 0.75, 0.9})."""
    ious = np.asarray(image_ious, dtype=np.float64)
    if ious.size == 0:
        raise ValueError("image_level_scores needs at least one image IoU")
    fractions = {threshold_key("morphoseg_iou", t): float(np.mean(ious >= t)) for t in thresholds}
    return {**fractions, "morphoseg_map": float(np.mean(list(fractions.values())))}


def object_scores(labels: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """Mean of `probability` (H, W) inside each object 1..n of `labels` -> (n,) float64."""
    count = int(labels.max(initial=0))
    if count == 0:
        return np.zeros(0)
    return np.asarray(ndimage.mean(probability, labels=labels, index=np.arange(1, count + 1)))


def scored_detections(
    pred, target, probability, *, thresholds: Sequence[float] = COCO_THRESHOLDS,
    connectivity: int = 8,
) -> dict:
    """One image's detections for `coco_average_precision`: scores (n_pred,), matched
    (n_thresholds, n_pred) bool from greedy matching in descending score, n_target."""
    pred_labels = as_instances(pred, connectivity=connectivity)
    target_labels = as_instances(target, connectivity=connectivity)
    probability = np.asarray(probability, dtype=np.float64)
    if probability.shape != pred_labels.shape:
        raise ValueError(f"probability shape {probability.shape} != mask shape {pred_labels.shape}")
    scores = object_scores(pred_labels, probability)
    iou = instance_iou(pred_labels, target_labels)
    matched = np.zeros((len(thresholds), len(scores)), bool)
    order = np.argsort(-scores, kind="stable")
    for row, threshold in enumerate(thresholds):
        taken = np.zeros(iou.shape[0], bool)
        for detection in order:
            candidates = np.where(~taken & (iou[:, detection] >= threshold), iou[:, detection], -1.0)
            if iou.shape[0] and candidates.max() >= 0:
                taken[int(candidates.argmax())] = True
                matched[row, detection] = True
    return {"thresholds": tuple(float(t) for t in thresholds), "scores": scores,
            "matched": matched, "n_target": iou.shape[0]}


def coco_average_precision(
    detections: Sequence[Mapping], *, report_thresholds: Sequence[float] = REPORT_THRESHOLDS,
) -> dict:
    """Ranked AP pooled over images (`scored_detections` of each): coco_ap@t and coco_map."""
    if not detections:
        raise ValueError("coco_average_precision needs at least one image")
    thresholds = list(detections[0]["thresholds"])
    scores = np.concatenate([np.asarray(d["scores"]) for d in detections])
    matched = np.concatenate([np.asarray(d["matched"]).reshape(len(thresholds), -1)
                              for d in detections], axis=1)
    n_target = sum(int(d["n_target"]) for d in detections)
    order = np.argsort(-scores, kind="stable")
    recall_points = np.linspace(0.0, 1.0, 101)
    ap = []
    for row in range(len(thresholds)):
        if n_target == 0 or scores.size == 0:
            ap.append(1.0 if n_target == scores.size else 0.0)
            continue
        hits = matched[row, order]
        true_positives = np.cumsum(hits)
        precision = true_positives / np.arange(1, hits.size + 1)
        recall = true_positives / n_target
        # Interpolated precision: best precision at any recall >= r (monotone envelope);
        # recall levels never reached contribute 0.
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        positions = np.searchsorted(recall, recall_points, side="left")
        reached = positions < hits.size
        sampled = np.zeros_like(recall_points)
        sampled[reached] = envelope[positions[reached]]
        ap.append(float(np.mean(sampled)))
    result = {"coco_map": float(np.mean(ap))}
    for t in report_thresholds:
        index = [i for i, value in enumerate(thresholds) if abs(value - t) < 1e-9]
        if not index:
            raise ValueError(f"report threshold {t} not among the thresholds {thresholds}")
        result[threshold_key("coco_ap", t)] = ap[index[0]]
    return result
