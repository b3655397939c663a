"""Boundary distances: HD95 (95th-percentile Hausdorff distance) and average surface distance.

Boundary pixels of a binary mask are the foreground pixels with at least one 4-connected
background neighbour (pixels outside the image count as background), i.e. mask XOR erosion(mask)
with the cross structuring element - the definition used by both MONAI (`get_mask_edges`) and
medpy (`__surface_distances`). Distances from one boundary to the other are read off an exact
Euclidean distance transform (OpenCV's DIST_MASK_PRECISE for square pixels, ~8x faster than
scipy's `distance_transform_edt`, which handles anisotropic `spacing`), so the cost is O(H*W)
rather than O(|A| * |B|) pairwise distances.

Two conventions for HD95 (both offered, `convention=`):
  'monai': max(P95(d(A->B)), P95(d(B->A)))   - MONAI `compute_hausdorff_distance(percentile=95)`.
  'medpy': P95(concat(d(A->B), d(B->A)))      - medpy `hd95` pools both directions.
P95 is numpy's linear-interpolation percentile, as in both libraries.

Empty policy (explicit, `empty=`): both masks empty -> 0.0 (perfect agreement). Exactly one empty
-> the distance is undefined; `empty='diagonal'` (default) returns the image diagonal in physical
units (the largest possible distance, so the image is penalised, not dropped), `empty='nan'`
returns NaN, a float returns that float. `surface_distance_report` says which case occurred so
evaluation code can count such images.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
from scipy import ndimage

HD_CONVENTIONS = ("monai", "medpy")
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def boundary(mask) -> np.ndarray:
    """Boundary pixels (bool, same shape) of a 2-D binary mask; see module docstring."""
    mask = np.asarray(mask) > 0
    if mask.ndim != 2:
        raise ValueError(f"boundary expects a 2-D mask, got shape {mask.shape}")
    eroded = cv2.erode(mask.astype(np.uint8), _CROSS, borderType=cv2.BORDER_CONSTANT,
                       borderValue=0)
    return mask & (eroded == 0)


def _spacing(spacing) -> tuple[float, float]:
    values = (float(spacing),) * 2 if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"spacing must be a positive scalar or (dy, dx), got {spacing!r}")
    return values


def directed_boundary_distances(
    source_edges: np.ndarray, target_edges: np.ndarray, spacing=1.0
) -> np.ndarray:
    """Distance from every source boundary pixel to the nearest target boundary pixel (1-D).

    Both edge maps must be non-empty. The EDT is computed on the bounding box of both edge sets
    only: the nearest target pixel of any source pixel lies inside that box, so cropping is exact.
    """
    rows, cols = np.nonzero(source_edges | target_edges)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    distances = _distance_to_features(target_edges[box], _spacing(spacing))
    return distances[source_edges[box]].astype(np.float64)


def _distance_to_features(features: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of `features` (non-empty)."""
    if spacing[0] == spacing[1]:
        # OpenCV measures the distance to the nearest zero pixel; exact with DIST_MASK_PRECISE.
        distances = cv2.distanceTransform(
            (~features).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return distances * np.float32(spacing[0])
    return ndimage.distance_transform_edt(~features, sampling=spacing)


def surface_distance_report(pred, target, *, spacing=1.0) -> dict:
    """Directed boundary distances both ways plus the empty case.

    Returns dict(case='both_empty'|'pred_empty'|'target_empty'|'ok', pred_to_target=array,
    target_to_pred=array) (arrays empty unless case == 'ok').
    """
    pred_edges, target_edges = boundary(pred), boundary(target)
    if pred_edges.shape != target_edges.shape:
        raise ValueError(f"pred shape {pred_edges.shape} != target shape {target_edges.shape}")
    pred_any, target_any = pred_edges.any(), target_edges.any()
    empty = np.zeros(0)
    if not pred_any or not target_any:
        case = "both_empty" if not (pred_any or target_any) else (
            "pred_empty" if not pred_any else "target_empty")
        return {"case": case, "pred_to_target": empty, "target_to_pred": empty}
    return {
        "case": "ok",
        "pred_to_target": directed_boundary_distances(pred_edges, target_edges, spacing),
        "target_to_pred": directed_boundary_distances(target_edges, pred_edges, spacing),
    }


def _empty_value(empty, shape: Sequence[int], spacing) -> float:
    if empty == "diagonal":
        dy, dx = _spacing(spacing)
        return float(np.hypot(shape[0] * dy, shape[1] * dx))
    if empty == "nan":
        return float("nan")
    if isinstance(empty, (int, float)):
        return float(empty)
    raise ValueError(f"empty must be 'diagonal', 'nan' or a number, got {empty!r}")


def hausdorff_from_report(
    report: dict, shape: Sequence[int], *, percentile: float = 95.0, convention: str = "monai",
    spacing=1.0, empty="diagonal",
) -> float:
    """Percentile Hausdorff distance from a `surface_distance_report` (reuse it for several
    conventions/percentiles without recomputing the distance transforms)."""
    if convention not in HD_CONVENTIONS:
        raise ValueError(f"convention must be one of {HD_CONVENTIONS}, got {convention!r}")
    if report["case"] == "both_empty":
        return 0.0
    if report["case"] != "ok":
        return _empty_value(empty, shape, spacing)
    forward, backward = report["pred_to_target"], report["target_to_pred"]
    if convention == "monai":
        return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))
    return float(np.percentile(np.concatenate([forward, backward]), percentile))


def hd95(
    pred, target, *, spacing=1.0, convention: str = "monai", empty="diagonal",
    percentile: float = 95.0,
) -> float:
    """95th-percentile Hausdorff distance between the boundaries of two 2-D binary masks.

    Args:
      pred, target: (H, W) masks (> 0 is foreground).
      spacing: pixel size, scalar or (dy, dx), distances are returned in these units.
      convention: 'monai' (max of directed P95s) or 'medpy' (P95 of pooled distances).
      empty: policy when exactly one mask is empty: 'diagonal' | 'nan' | float.
      percentile: 95 by default; 100 gives the classical Hausdorff distance.
    """
    report = surface_distance_report(pred, target, spacing=spacing)
    return hausdorff_from_report(
        report, np.shape(pred), percentile=percentile, convention=convention, spacing=spacing,
        empty=empty,
    )


def boundary_metrics(pred, target, *, spacing=1.0, empty="diagonal") -> dict:
    """HD95 in both conventions, HD (max), and average symmetric surface distance (ASSD), from
    one pair of distance transforms. `empty_case` reports which empty case applied."""
    report = surface_distance_report(pred, target, spacing=spacing)
    shape = np.shape(pred)
    kwargs = dict(spacing=spacing, empty=empty)
    if report["case"] == "ok":
        assd = float(np.concatenate([report["pred_to_target"], report["target_to_pred"]]).mean())
    else:
        assd = 0.0 if report["case"] == "both_empty" else _empty_value(empty, shape, spacing)
    return {
        "hd95": hausdorff_from_report(report, shape, convention="monai", **kwargs),
        "hd95_medpy": hausdorff_from_report(report, shape, convention="medpy", **kwargs),
        "hausdorff": hausdorff_from_report(report, shape, percentile=100.0, **kwargs),
        "assd": assd,
        "empty_case": report["case"],
    }
