"""Dataset evaluation: predict every image, score it with every metric, write JSON/CSV/markdown.

Variants: 'raw' (probabilities thresholded at `threshold`, 0.5), 'tta' (IMSAHLO TTA, n = tta_n), 'post'
(IMSAHLO post-processing) and 'tta+post'; TTA variants only when tta_n > 1, post-processing
variants only when `postprocess` is given.

Two aggregations are reported for every variant, and labelled:
  'pooled'          confusion counts (and object match counts) summed over all images, metrics
                    computed once - what a Keras-style metric accumulated over the validation set
                    gives, i.e. the most likely reading of IMSAHLO Tables II-IV (the paper does not
                    say).
  'per_image_mean'  the metric of each image averaged over images - MorphoSeg Table 1 reports
                    "average DSC" and HD95 this way.
  'image_level'     MorphoSeg's image-level IoU-t (fraction of images whose IoU >= t) and mAP (their
                    mean over t in {0.5, 0.75, 0.9}; see `metrics.instances.image_level_scores`),
                    named morphoseg_*.
The MorphoSeg table's HD95 is medpy's convention (`hd95_medpy`), the one MorphoSeg's evaluation
calls; 'hd95' (MONAI's) stays in the JSON and CSV. HD95 images where exactly one of prediction and
target is empty are scored with the image diagonal (metrics.boundary policy) and counted in
'hd95_empty_images'; none are dropped (MORPHOSEG_NOTE says how MorphoSeg's code differs).

Instance mode (`instances` with mode 'three_class', the model's (H, W, 3) background / interior /
boundary softmax): each of 'raw' and 'tta' is the seeded-watershed decode of its probabilities
(`inference.label_instances`, settings from `instances`); the object metrics (AP, F1, count errors)
match its objects to the dataset's instance labels, so touching objects count apart, and the pixel
and topology metrics score its foreground (the decoded objects' union, i.e. 1 - p_background above
foreground_threshold, without the objects under min_size). There are no 'post' variants: the decode
is the instance mode's post-processing.

Objects of a binary prediction are its connected components, or with `instances.declump` its
components split by shape (`inference.watershed.declump`). They are matched to the dataset
items' `instances` labels where the items carry them (a dataset built with `with_instances`), so that
on instance-labelled data (BBBC039) two touching nuclei are two target objects in every mode and a
merged prediction counts as the error it is; items without labels fall back to the target mask's
connected components (the same objects for masks whose objects do not touch).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from neuroseg_jax.data.config import instance_mode
from neuroseg_jax.inference.postprocess import foreground_probability, label_instances
from neuroseg_jax.inference.postprocess import postprocess as postprocess_probs
from neuroseg_jax.inference.predict import DEFAULT_POSTPROCESS, _class_probabilities, _with_progress
from neuroseg_jax.inference.sliding import PredictFn, SlidingWindow
from neuroseg_jax.metrics import (
    MORPHOSEG_THRESHOLDS,
    as_instances,
    binarize,
    boundary_metrics,
    coco_average_precision,
    confusion_counts,
    image_level_scores,
    instance_metrics_from_counts,
    match_counts,
    metrics_from_confusion,
    scored_detections,
    sum_confusions,
    sum_match_counts,
    threshold_key,
    topology_metrics,
)

PER_IMAGE_COLUMNS = (
    "accuracy", "precision", "recall", "dice", "iou", "balanced_accuracy", "macro_f1",
    "micro_f1", "hd95", "hd95_medpy", "assd", "cldice", "betti0_error", "betti1_error",
    "n_pred", "n_target", "count_error", "abs_count_error", "ap@0.50", "ap@0.75", "ap@0.90",
    "instance_map", "f1@0.50", "coco_ap@0.50", "coco_map",
)
# Markdown tables: (column header, result section, metric key).
IMSAHLO_TABLE = (("Accuracy", "pooled", "accuracy"), ("Precision", "pooled", "precision"),
                 ("Recall", "pooled", "recall"), ("F1 Score", "pooled", "f1"),
                 ("Macro F1", "pooled", "macro_f1"), ("Micro F1", "pooled", "micro_f1"),
                 ("DSC", "pooled", "dice"), ("IoU", "pooled", "iou"))
MORPHOSEG_TABLE = (("DSC", "per_image_mean", "dice"), ("HD95", "per_image_mean", "hd95_medpy"),
                   *((f"IoU-{t:g}", "image_level", threshold_key("morphoseg_iou", t))
                     for t in MORPHOSEG_THRESHOLDS),
                   ("mAP", "image_level", "morphoseg_map"))
MORPHOSEG_NOTE = (
    "HD95: medpy convention (95th percentile of the boundary distances of both directions pooled),"
    " mean over images, in pixels x spacing. Empty masks: both empty -> 0; exactly one empty -> the"
    " image diagonal (a penalty; such images are counted in hd95_empty_images). MorphoSeg's public"
    " code instead scores HD95 0 whenever either mask is empty, and DSC 0 for two empty masks and"
    " 1 for a prediction on an empty target (ours: 1 and 0); the two agree on images where both"
    " masks are non-empty. mAP = mean of IoU-0.5, IoU-0.75 and IoU-0.9.")
OBJECT_TABLE = (("AP@0.5", "pooled", "ap@0.50"), ("AP@0.75", "pooled", "ap@0.75"),
                ("AP@0.9", "pooled", "ap@0.90"), ("mAP 0.5:0.95", "pooled", "instance_map"),
                ("COCO AP@0.5", "pooled", "coco_ap@0.50"), ("COCO mAP", "pooled", "coco_map"),
                ("F1@0.5", "pooled", "f1@0.50"), ("|count err|", "per_image_mean", "abs_count_error"),
                ("clDice", "per_image_mean", "cldice"), ("Betti-0 err", "per_image_mean", "betti0_error"),
                ("Betti-1 err", "per_image_mean", "betti1_error"))


def _name(dataset: Any, index: int) -> str:
    if hasattr(dataset, "names"):
        return str(dataset.names[index])
    if hasattr(dataset, "name"):
        return str(dataset.name(index))
    return f"image_{index:05d}"


def score_image(pred_mask: np.ndarray, target: np.ndarray, probability: np.ndarray, *,
                spacing=1.0, pred_labels: np.ndarray | None = None,
                target_labels: np.ndarray | None = None) -> dict:
    """Every per-image metric of a binary prediction (H, W) against its target (H, W);
    `probability` (H, W) scores the predicted objects for the ranked (COCO-style) AP.
    Objects are the masks' connected components, or `pred_labels` / `target_labels` (instance
    label images, given together) when touching objects must count apart.

    Returns dict(row=flat metrics, confusion=counts, matches=match counts,
    detections=scored detections, empty_case=str).
    """
    if (pred_labels is None) != (target_labels is None):
        raise ValueError("score_image: give both pred_labels and target_labels, or neither")
    counts = confusion_counts(pred_mask, target)
    if pred_labels is None:
        pred_labels, target_labels = pred_mask, np.asarray(target) > 0
    matches = match_counts(pred_labels, target_labels)
    detections = scored_detections(pred_labels, target_labels, probability)
    boundary = boundary_metrics(pred_mask, target, spacing=spacing)
    row = {**metrics_from_confusion(counts), **instance_metrics_from_counts(matches),
           **coco_average_precision([detections]),
           **topology_metrics(pred_mask, target),
           **{key: value for key, value in boundary.items() if key != "empty_case"}}
    return {"row": row, "confusion": counts, "matches": matches, "detections": detections,
            "empty_case": boundary["empty_case"]}


def _aggregate(scores: Sequence[dict]) -> dict:
    rows = [score["row"] for score in scores]
    numeric_keys = [key for key, value in rows[0].items() if isinstance(value, (int, float))]
    return {
        "pooled": {**metrics_from_confusion(sum_confusions([s["confusion"] for s in scores])),
                   **instance_metrics_from_counts(sum_match_counts([s["matches"] for s in scores])),
                   **coco_average_precision([s["detections"] for s in scores])},
        "per_image_mean": {key: float(np.mean([row[key] for row in rows])) for key in numeric_keys},
        "image_level": image_level_scores([row["iou"] for row in rows]),
        "hd95_empty_images": sum(score["empty_case"] in ("pred_empty", "target_empty")
                                 for score in scores),
        "num_images": len(scores),
    }


def _markdown_table(title: str, columns, results: Mapping[str, dict], percent: bool) -> str:
    header = "| Variant | " + " | ".join(name for name, _, _ in columns) + " |"
    lines = [f"### {title}", "", header, "|" + "---|" * (len(columns) + 1)]
    for variant, result in results.items():
        cells = []
        for name, section, key in columns:
            value = result[section][key]
            scale = 100.0 if percent and name != "HD95" else 1.0
            cells.append(f"{value * scale:.2f}" if percent else f"{value:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


NOTES = {
    "pooled": "counts summed over images, metrics computed once (IMSAHLO-style)",
    "per_image_mean": "metric per image, then mean over images (MorphoSeg-style DSC/HD95)",
    "image_level": "MorphoSeg IoU-t = fraction of images with IoU >= t; mAP = mean over "
                   "t in {0.5, 0.75, 0.9}",
    "hd95": "MONAI convention (max of directed P95); hd95_medpy pools both directions; "
            "one-sided empty images scored with the image diagonal",
    "morphoseg_table": MORPHOSEG_NOTE,
    "empty_policy": "precision/recall/dice/iou/ap/f1 with a zero denominator: 1 when "
                    "prediction and truth are both empty, else 0 (metrics.pixel.safe_ratio)",
    "instance_ap": "ap@t = tp/(tp+fp+fn) of predicted objects (8-connected components, or the instance "
                   "mode's watershed decode) matched at IoU >= t to the dataset's instance labels where it "
                   "has them, else to the target mask's components; coco_ap@t ranks objects by mean "
                   "probability (101-point PR area)",
    "micro_f1": "over both classes; equals accuracy for binary single-label masks",
}


def _example(dataset: Any, index: int, require_instances: bool = False
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image (H, W, C) float32, target (H, W), instance labels (H, W) or None) of
    ``dataset[index]``, checked; the labels are required in instance mode (`require_instances`)."""
    example = dataset[index]
    if "image" not in example or "mask" not in example:
        raise ValueError(f"dataset[{index}] lacks 'image' or 'mask' (keys {sorted(example)})")
    image, target = np.asarray(example["image"], np.float32), np.asarray(example["mask"])
    if image.ndim != 3 or image.shape[:2] != target.shape:
        raise ValueError(f"dataset[{index}]: image {image.shape} and mask {target.shape} "
                         "must be (H, W, C) and (H, W)")
    if "instances" not in example:
        if require_instances:
            raise ValueError(f"dataset[{index}] has no instance labels, which instance mode scores objects "
                             "against: build the dataset with build_dataset(..., require_instance_labels=True)")
        return image, target, None
    labels = np.asarray(example["instances"])
    if labels.shape != target.shape:
        raise ValueError(f"dataset[{index}]: instance labels {labels.shape} and mask {target.shape} differ in size")
    return image, target, labels


def _variant_scores(predict_fn: PredictFn, image: np.ndarray, target: np.ndarray, *, tiling: SlidingWindow,
                    tta_settings: Mapping[str, int], brightness_shift: float, threshold: float,
                    postprocess: Mapping | None, spacing, target_labels: np.ndarray | None = None,
                    instances: Mapping | None = None) -> dict[str, dict]:
    """`score_image` of one image for every variant (module docstring), in report order; in
    instance mode the variants are the watershed decodes of `instances`. Objects are matched to
    `target_labels` where given, else to the target mask's connected components."""
    three_class = instance_mode(instances) == "three_class"
    scores = {}
    for base, n in tta_settings.items():
        probabilities = _class_probabilities(predict_fn, image, tiling, tta_n=n, brightness_shift=brightness_shift)
        probability = foreground_probability(probabilities)
        if three_class:
            pred_labels = label_instances(probabilities, instances=instances)
            scores[base] = score_image(pred_labels > 0, target, probability, spacing=spacing,
                                       pred_labels=pred_labels, target_labels=target_labels)
            continue
        masks = {base: binarize(probability, threshold)}
        if postprocess is not None:
            masks["post" if base == "raw" else f"{base}+post"] = postprocess_probs(probability, **postprocess)
        for variant, mask in masks.items():
            scores[variant] = score_image(
                mask, target, probability, spacing=spacing, pred_labels=label_instances(mask, instances=instances),
                target_labels=as_instances(np.asarray(target) > 0 if target_labels is None else target_labels))
    return scores


def _write_reports(output: Path, metrics: dict, csv_rows: Sequence[dict]) -> None:
    """metrics.json, per_image.csv and table.md."""
    results = metrics["variants"]
    with open(output / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    with open(output / "per_image.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    tables = [
        "# Evaluation\n",
        _markdown_table("IMSAHLO Table II columns (pooled over pixels)", IMSAHLO_TABLE, results,
                        percent=False),
        _markdown_table("MorphoSeg Table 1 columns (percent; HD95 in pixels x spacing)",
                        MORPHOSEG_TABLE, results, percent=True),
        MORPHOSEG_NOTE + " Images with exactly one empty mask: " + ", ".join(
            f"{variant} {result['hd95_empty_images']}" for variant, result in results.items())
        + ".\n",
        _markdown_table("Objects and topology", OBJECT_TABLE, results, percent=False),
    ]
    with open(output / "table.md", "w") as handle:
        handle.write("\n".join(tables))


def evaluate_dataset(
    predict_fn: PredictFn,
    dataset: Any,
    output_dir: str | os.PathLike,
    *,
    tta_n: int = 5,
    brightness_shift: float = 0.1,
    threshold: float = 0.5,
    postprocess: Mapping | None = DEFAULT_POSTPROCESS,
    spacing=1.0,
    progress: bool = False,
    instances: Mapping | None = None,
    **sliding,
) -> dict:
    """Evaluate predict_fn on every image of `dataset` and write metrics.json, per_image.csv and
    table.md to output_dir.

    Args:
      predict_fn: (n, h, w, C) float32 -> (n, h, w, K) probabilities.
      dataset: len() and [i] -> dict(image=(H, W, C) float32, mask=(H, W) int, and optionally
        instances=(H, W) int labels that objects are matched to); names from `.names` or `.name(i)`
        when present.
      tta_n: TTA augmentations for the 'tta' variants (<= 1: no TTA variants).
      threshold: foreground probability threshold of the variants without post-processing.
      postprocess: `inference.postprocess` keyword arguments for the 'post' variants (None: none).
      spacing: pixel size for HD95/ASSD.
      instances: the run's config.instances; mode 'three_class' scores the watershed decode of
        (H, W, 3) probabilities against the dataset items' `instances` labels (module docstring;
        `postprocess` is then unused). None or mode 'none': binary masks (objects declumped by
        shape with `instances.declump`).
      **sliding: window, overlap, batch_size, blend (see `SlidingWindow`); window None (the
        default here) = one forward pass of the whole image.
    Returns:
      dict(variants={variant: {pooled, per_image_mean, image_level, hd95_empty_images,
      num_images}}, num_images, notes).
    """
    if len(dataset) == 0:
        raise ValueError("evaluate_dataset: the dataset is empty")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tiling = SlidingWindow(**{"window": None, **sliding})
    tta_settings = {"raw": 0, **({"tta": tta_n} if tta_n > 1 else {})}
    three_class = instance_mode(instances) == "three_class"
    scores: dict[str, list[dict]] = {}
    csv_rows: list[dict] = []
    for index in _with_progress(range(len(dataset)), progress, "evaluate"):
        image, target, target_labels = _example(dataset, index, require_instances=three_class)
        name = _name(dataset, index)
        variants = _variant_scores(predict_fn, image, target, tiling=tiling, tta_settings=tta_settings,
                                   brightness_shift=brightness_shift, threshold=threshold,
                                   postprocess=postprocess, spacing=spacing, target_labels=target_labels,
                                   instances=instances)
        for variant, score in variants.items():
            scores.setdefault(variant, []).append(score)
            csv_rows.append({"variant": variant, "name": name, "hd95_empty_case": score["empty_case"],
                             **{key: score["row"][key] for key in PER_IMAGE_COLUMNS}})
    metrics = {"num_images": len(dataset), "instances": instance_mode(instances),
               "variants": {variant: _aggregate(variant_scores) for variant, variant_scores in scores.items()},
               "notes": dict(NOTES)}
    _write_reports(output, metrics, csv_rows)
    return metrics


__all__ = ["evaluate_dataset", "score_image"]
