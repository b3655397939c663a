"""Evaluation metrics on host arrays (numpy/scipy/scikit-image) plus jittable confusion counts.

Imports nothing from models, train, inference or launch. See each module for formulas:
`pixel` (confusion-based overlap metrics), `boundary` (HD95, surface distances), `topology`
(clDice, Betti errors), `instances` (object matching, AP, counting, MorphoSeg image-level scores).
"""

from neuroseg_jax.metrics.boundary import (
    HD_CONVENTIONS,
    boundary,
    boundary_metrics,
    hd95,
    surface_distance_report,
)
from neuroseg_jax.metrics.instances import (
    COCO_THRESHOLDS,
    MORPHOSEG_THRESHOLDS,
    REPORT_THRESHOLDS,
    as_instances,
    coco_average_precision,
    connected_components,
    image_level_scores,
    instance_iou,
    instance_metrics,
    instance_metrics_from_counts,
    match_counts,
    object_scores,
    scored_detections,
    sum_match_counts,
    threshold_key,
)
from neuroseg_jax.metrics.pixel import (
    CONFUSION_KEYS,
    PIXEL_METRIC_KEYS,
    binarize,
    confusion,
    confusion_counts,
    metrics_from_confusion,
    pixel_metrics,
    sum_confusions,
)
from neuroseg_jax.metrics.topology import betti_numbers, cldice, topology_metrics

__all__ = [
    "CONFUSION_KEYS",
    "COCO_THRESHOLDS",
    "HD_CONVENTIONS",
    "MORPHOSEG_THRESHOLDS",
    "PIXEL_METRIC_KEYS",
    "REPORT_THRESHOLDS",
    "as_instances",
    "betti_numbers",
    "binarize",
    "boundary",
    "boundary_metrics",
    "cldice",
    "coco_average_precision",
    "confusion",
    "confusion_counts",
    "connected_components",
    "hd95",
    "image_level_scores",
    "instance_iou",
    "instance_metrics",
    "instance_metrics_from_counts",
    "match_counts",
    "metrics_from_confusion",
    "object_scores",
    "pixel_metrics",
    "scored_detections",
    "sum_confusions",
    "sum_match_counts",
    "surface_distance_report",
    "threshold_key",
    "topology_metrics",
]
