"""Metrics against references computed another way (brute force loops, pairwise distances,
hand-built cases). Small arrays only: the whole file runs in a few seconds."""

from __future__ import annotations

import itertools
from collections import deque

import jax
import numpy as np
import pytest
from scipy.spatial.distance import cdist, directed_hausdorff

from neuroseg_jax import metrics


def random_masks(seed: int, shape=(24, 20), density=0.3):
    rng = np.random.default_rng(seed)
    return rng.random(shape) < density, rng.random(shape) < density


# --------------------------------------------------------------------------- pixel metrics


def brute_force_pixel_metrics(pred: np.ndarray, target: np.ndarray) -> dict:
    """Per-class counts by explicit loops over pixels, then sklearn-style class-wise F1s."""
    per_class = {c: {"tp": 0, "fp": 0, "fn": 0} for c in (0, 1)}
    correct = 0
    for p, t in zip(pred.ravel().astype(int), target.ravel().astype(int)):
        correct += p == t
        for c in (0, 1):
            per_class[c]["tp"] += (p == c) and (t == c)
            per_class[c]["fp"] += (p == c) and (t != c)
            per_class[c]["fn"] += (p != c) and (t == c)

    def f1(counts):
        return 2 * counts["tp"] / (2 * counts["tp"] + counts["fp"] + counts["fn"])

    fg, bg = per_class[1], per_class[0]
    pooled = {k: fg[k] + bg[k] for k in ("tp", "fp", "fn")}
    recall = fg["tp"] / (fg["tp"] + fg["fn"])
    specificity = bg["tp"] / (bg["tp"] + bg["fn"])
    return {
        "accuracy": correct / pred.size,
        "precision": fg["tp"] / (fg["tp"] + fg["fp"]),
        "recall": recall,
        "specificity": specificity,
        "dice": f1(fg),
        "iou": fg["tp"] / (fg["tp"] + fg["fp"] + fg["fn"]),
        "balanced_accuracy": (recall + specificity) / 2,
        "f1_background": f1(bg),
        "macro_f1": (f1(fg) + f1(bg)) / 2,
        "micro_f1": f1(pooled),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_brute_force(seed):
    pred, target = random_masks(seed)
    result = metrics.pixel_metrics(pred, target)
    expected = brute_force_pixel_metrics(pred, target)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert result["f1"] == result["dice"]
    # Micro F1 over both classes of a single-label problem is the accuracy.
    assert result["micro_f1"] == pytest.approx(result["accuracy"])


def test_pixel_metrics_probabilities_threshold_and_validity_mask():
    target = np.array([[1, 1, 0, 0]])
    probs = np.array([[0.9, 0.4, 0.6, 0.1]], np.float32)
    counts = metrics.confusion_counts(probs, target)
    assert counts == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    masked = metrics.confusion_counts(probs, target, mask=np.array([[1, 0, 0, 1]]))
    assert masked == {"tp": 1, "fp": 0, "fn": 0, "tn": 1}


def two_squares(shape=(12, 12)):
    mask = np.zeros(shape, bool)
    mask[1:4, 1:4] = True
    mask[7:10, 6:9] = True
    return mask


def pixel_ratios(pred, target):
    result = metrics.pixel_metrics(pred, target)
    return result["precision"], result["recall"], result["dice"], result["iou"]


def object_ratios(pred, target):
    result = metrics.instance_metrics(pred, target)
    return result["precision@0.50"], result["recall@0.50"], result["f1@0.50"], result["ap@0.50"]


# (prediction, target) -> (precision, recall, dice or f1, iou or ap), the same for pixels and
# objects: 1 only when both sides are empty; nothing found, or found where there is nothing, is 0.
EMPTY_CASES = {
    "empty prediction, two true objects": ("empty", "objects", (0.0, 0.0, 0.0, 0.0)),
    "two predicted objects, empty truth": ("objects", "empty", (0.0, 0.0, 0.0, 0.0)),
    "both empty": ("empty", "empty", (1.0, 1.0, 1.0, 1.0)),
}


@pytest.mark.parametrize("case", EMPTY_CASES)
@pytest.mark.parametrize("ratios", [pixel_ratios, object_ratios], ids=["pixel", "object"])
def test_empty_policy_is_shared_by_pixel_and_object_metrics(case, ratios):
    masks = {"empty": np.zeros((12, 12), bool), "objects": two_squares()}
    pred, target, expected = EMPTY_CASES[case]
    assert ratios(masks[pred], masks[target]) == expected


def test_empty_prediction_does_not_inflate_per_image_object_means():
    # One perfect image and one where the two objects are missed: mean precision/recall 0.5.
    objects, empty = two_squares(), np.zeros((12, 12), bool)
    per_image = [metrics.instance_metrics(objects, objects), metrics.instance_metrics(empty, objects)]
    assert np.mean([r["precision@0.50"] for r in per_image]) == 0.5
    assert np.mean([r["recall@0.50"] for r in per_image]) == 0.5


def test_empty_score_overrides_every_zero_denominator():
    empty = np.zeros((4, 4), bool)
    assert np.isnan(metrics.pixel_metrics(empty, empty, empty_score=float("nan"))["dice"])
    # Training's validation passes 0.0: an empty pooled validation set scores 0, not 1.
    zero = metrics.pixel_metrics(empty, empty, empty_score=0.0)
    assert zero["dice"] == zero["precision"] == zero["recall"] == 0.0
    some = empty.copy()
    some[1:3, 1:3] = True
    assert metrics.pixel_metrics(empty, some, empty_score=0.5)["precision"] == 0.5


def test_jitted_confusion_matches_numpy_per_image_and_pooled():
    rng = np.random.default_rng(3)
    probs = rng.random((3, 8, 8)).astype(np.float32)
    labels = (rng.random((3, 8, 8)) < 0.4).astype(np.int32)
    valid = (rng.random((3, 8, 8)) < 0.8).astype(np.int32)
    pooled = jax.jit(metrics.confusion)(probs, labels, valid)
    per_image = jax.jit(lambda p, l: metrics.confusion(p, l, axis=(1, 2)))(probs, labels)
    assert {k: int(v) for k, v in pooled.items()} == metrics.confusion_counts(probs, labels, valid)
    for i in range(3):
        expected = metrics.confusion_counts(probs[i], labels[i])
        assert {k: int(v[i]) for k, v in per_image.items()} == expected
    from_jax = metrics.metrics_from_confusion(pooled)
    assert from_jax["dice"] == pytest.approx(
        metrics.pixel_metrics(probs[valid > 0], labels[valid > 0])["dice"])


def test_sum_confusions_gives_pooled_metrics():
    pairs = [random_masks(seed) for seed in range(3)]
    pooled = metrics.metrics_from_confusion(
        metrics.sum_confusions([metrics.confusion_counts(p, t) for p, t in pairs]))
    stacked = metrics.pixel_metrics(np.stack([p for p, _ in pairs]), np.stack([t for _, t in pairs]))
    assert pooled == stacked


# --------------------------------------------------------------------------- HD95


def brute_force_boundary(mask: np.ndarray) -> np.ndarray:
    """(n, 2) coordinates of foreground pixels with a 4-neighbour outside the mask (or image)."""
    points = []
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ny, nx = y + dy, x + dx
            if not (0 <= ny < height and 0 <= nx < width) or not mask[ny, nx]:
                points.append((y, x))
                break
    return np.array(points, dtype=np.float64).reshape(-1, 2)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 2.0)])
def test_hd95_matches_pairwise_distances(seed, spacing):
    pred, target = random_masks(seed, shape=(20, 18), density=0.5)
    pred_points = brute_force_boundary(pred) * spacing
    target_points = brute_force_boundary(target) * spacing
    pairwise = cdist(pred_points, target_points)
    forward, backward = pairwise.min(axis=1), pairwise.min(axis=0)
    monai = max(np.percentile(forward, 95), np.percentile(backward, 95))
    medpy = np.percentile(np.concatenate([forward, backward]), 95)
    assert metrics.hd95(pred, target, spacing=spacing) == pytest.approx(monai)
    assert metrics.hd95(pred, target, spacing=spacing, convention="medpy") == pytest.approx(medpy)
    # The 100th percentile is the classical Hausdorff distance.
    classical = max(directed_hausdorff(pred_points, target_points)[0],
                    directed_hausdorff(target_points, pred_points)[0])
    assert metrics.hd95(pred, target, spacing=spacing, percentile=100) == pytest.approx(classical)


def test_hd95_sparse_objects_far_apart_uses_exact_crop():
    pred = np.zeros((64, 64), bool)
    target = np.zeros((64, 64), bool)
    pred[2:5, 2:5] = True
    target[50:60, 40:44] = True
    pred_points, target_points = brute_force_boundary(pred), brute_force_boundary(target)
    pairwise = cdist(pred_points, target_points)
    expected = max(np.percentile(pairwise.min(1), 95), np.percentile(pairwise.min(0), 95))
    assert metrics.hd95(pred, target) == pytest.approx(expected)


def test_hd95_empty_policy():
    empty = np.zeros((30, 40), bool)
    some = empty.copy()
    some[3:6, 3:6] = True
    assert metrics.hd95(empty, empty) == 0.0
    assert metrics.hd95(empty, some) == pytest.approx(50.0)  # the image diagonal
    assert metrics.hd95(some, empty, spacing=0.5) == pytest.approx(25.0)
    assert np.isnan(metrics.hd95(empty, some, empty="nan"))
    assert metrics.hd95(empty, some, empty=7.0) == 7.0
    assert metrics.boundary_metrics(empty, some)["empty_case"] == "pred_empty"
    with pytest.raises(ValueError):
        metrics.hd95(some, some, convention="scipy")


# --------------------------------------------------------------------------- topology


def flood_fill_components(mask: np.ndarray, neighbours) -> list[list[tuple[int, int]]]:
    """Connected components by breadth-first search (reference for scipy/skimage labelling)."""
    seen = np.zeros_like(mask, bool)
    components = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        queue, component = deque([start]), []
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            component.append((y, x))
            for dy, dx in neighbours:
                ny, nx = y + dy, x + dx
                if (0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]
                        and not seen[ny, nx]):
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.append(component)
    return components


EIGHT = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
FOUR = [(-1, 0), (1, 0), (0, -1), (0, 1)]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_betti_numbers_match_flood_fill(seed):
    mask, _ = random_masks(seed, shape=(16, 16), density=0.55)
    b0 = len(flood_fill_components(mask, EIGHT))
    holes = [c for c in flood_fill_components(~mask, FOUR)
             if not any(y in (0, 15) or x in (0, 15) for y, x in c)]
    assert metrics.betti_numbers(mask) == (b0, len(holes))


def test_topology_metrics_hand_cases():
    ring = np.zeros((12, 12), bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    two_blobs = np.zeros((12, 12), bool)
    two_blobs[1:4, 1:4] = True
    two_blobs[7:10, 7:10] = True
    result = metrics.topology_metrics(two_blobs, ring)
    assert (result["betti0_target"], result["betti1_target"]) == (1, 1)
    assert (result["betti0_pred"], result["betti1_pred"]) == (2, 0)
    assert result["betti0_error"] == 1 and result["betti1_error"] == 1
    assert metrics.cldice(ring, ring) == 1.0
    assert metrics.cldice(np.zeros_like(ring), np.zeros_like(ring)) == 1.0
    far = np.zeros((12, 12), bool)
    far[0, 0:3] = True
    assert metrics.cldice(far, two_blobs) == 0.0


def test_cldice_broken_line_loses_sensitivity_only():
    line = np.zeros((9, 30), bool)
    line[3:6, 2:28] = True
    broken = line.copy()
    broken[:, 14:16] = False
    # Every predicted centreline pixel lies inside the target: precision 1. Of the target's
    # centreline, the 2 removed columns are missed: sensitivity = (n - 2) / n.
    from skimage.morphology import skeletonize
    target_skeleton = skeletonize(line)
    n = int(target_skeleton.sum())
    missed = int((target_skeleton & ~broken).sum())
    assert missed == 2
    sensitivity = (n - missed) / n
    assert metrics.cldice(broken, line) == pytest.approx(2 * sensitivity / (1 + sensitivity))


# --------------------------------------------------------------------------- instances


def square(mask, top, left, size=10):
    mask[top:top + size, left:left + size] = True


def test_instance_metrics_hand_built_case():
    target = np.zeros((40, 40), bool)
    pred = np.zeros((40, 40), bool)
    square(target, 0, 0)
    square(pred, 0, 0)          # exact match, IoU 1
    square(target, 20, 20)
    square(pred, 20, 22)        # shifted by 2 columns: IoU 80 / 120 = 0.667
    pred[35:38, 0:3] = True     # false positive
    result = metrics.instance_metrics(pred, target)
    assert result["n_pred"] == 3 and result["n_target"] == 2
    assert result["ap@0.50"] == pytest.approx(2 / 3)              # tp 2, fp 1, fn 0
    assert result["ap@0.75"] == pytest.approx(1 / 4)              # tp 1, fp 2, fn 1
    assert result["f1@0.50"] == pytest.approx(4 / 5)
    assert result["precision@0.50"] == pytest.approx(2 / 3) and result["recall@0.50"] == 1.0
    # IoU 0.667 clears t = 0.50 .. 0.65 (4 thresholds), the exact match all 10.
    assert result["instance_map"] == pytest.approx((4 * 2 / 3 + 6 * 1 / 4) / 10)
    assert result["count_error"] == 1 and result["relative_count_error"] == 0.5


def test_touching_instances_in_label_image_stay_separate():
    labels = np.zeros((10, 20), np.int32)
    labels[:, :10] = 3
    labels[:, 10:] = 7
    as_mask = labels > 0
    assert metrics.instance_metrics(labels, labels)["n_target"] == 2
    merged = metrics.instance_metrics(as_mask, labels)  # one object covering both halves
    assert merged["n_pred"] == 1
    assert merged["ap@0.50"] == 0.5   # IoU exactly 0.5 with each half: one match, one miss
    assert merged["ap@0.75"] == 0.0
    assert metrics.as_instances(np.where(as_mask, 255, 0).astype(np.uint8)).max() == 1


def test_low_threshold_matching_is_maximum_one_to_one():
    rng = np.random.default_rng(0)
    for _ in range(20):
        iou = rng.random((4, 4)) * 0.7
        threshold = 0.3
        best = max(sum(iou[i, j] >= threshold for i, j in enumerate(perm))
                   for perm in itertools.permutations(range(4)))
        assert metrics.instances.count_matches(iou, threshold) == best


def test_instance_empty_images_and_pooling():
    empty = np.zeros((8, 8), bool)
    result = metrics.instance_metrics(empty, empty)
    assert result["ap@0.50"] == 1.0 and result["instance_map"] == 1.0
    one = empty.copy()
    one[2:5, 2:5] = True
    pooled = metrics.instance_metrics_from_counts(metrics.sum_match_counts(
        [metrics.match_counts(one, one), metrics.match_counts(empty, one)]))
    assert pooled["ap@0.50"] == 0.5 and pooled["n_target"] == 2


def ious_with_fractions(at_50: int, at_75: int, at_90: int, total: int = 10000) -> np.ndarray:
    """Per-image IoUs of which `at_t` of `total` are >= t (none lies on a threshold)."""
    return np.repeat([0.97, 0.83, 0.62, 0.3],
                     [at_90, at_75 - at_90, at_50 - at_75, total - at_50])


@pytest.mark.parametrize("row", [
    # MorphoSeg Table 1: IoU-0.5, IoU-0.75, IoU-0.9 and the printed mAP (percent).
    ((93.02, 80.01, 21.87), 64.97),   # TransUNet + MorphoSeg, R50-B16 (Pareto)
    ((25.31, 12.35, 3.64), 13.77),    # Cellpose cyto3
], ids=["transunet_morphoseg_r50", "cellpose_cyto3"])
def test_morphoseg_map_reproduces_paper_table_1(row):
    columns, printed_map = row
    counts = [round(value * 100) for value in columns]
    scores = metrics.image_level_scores(ious_with_fractions(*counts))
    for value, t in zip(columns, (0.5, 0.75, 0.9)):
        assert 100 * scores[metrics.threshold_key("morphoseg_iou", t)] == pytest.approx(value)
    assert round(100 * scores["morphoseg_map"], 2) == printed_map


def test_morphoseg_map_ignores_thresholds_between_the_columns():
    # IoU 0.7 clears 0.5 only among {0.5, 0.75, 0.9}; 0.50:0.05:0.95 would also count 0.55..0.70.
    scores = metrics.image_level_scores([0.7, 0.92])
    assert scores == {"morphoseg_iou@0.50": 1.0, "morphoseg_iou@0.75": 0.5,
                      "morphoseg_iou@0.90": 0.5, "morphoseg_map": pytest.approx(2 / 3)}


def test_coco_average_precision_ranks_by_score():
    target = np.zeros((40, 40), bool)
    square(target, 0, 0)
    square(target, 20, 20)
    pred = target.copy()
    pred[35:38, 0:3] = True     # a false positive
    probability = np.where(pred, 0.6, 0.0)
    probability[35:38, 0:3] = 0.9   # ... with the highest score: P-R points (0,0) (.5,.5) (2/3,1)
    first_fp = metrics.coco_average_precision([metrics.scored_detections(pred, target, probability)])
    assert first_fp["coco_ap@0.50"] == pytest.approx(2 / 3)
    probability[35:38, 0:3] = 0.1   # ... with the lowest: both hits first, precision 1 up to recall 1
    last_fp = metrics.coco_average_precision([metrics.scored_detections(pred, target, probability)])
    assert last_fp["coco_ap@0.50"] == pytest.approx(1.0) and last_fp["coco_map"] == pytest.approx(1.0)
    # Pooled over two images where the second finds nothing: recall reaches only 1/2.
    missed = metrics.scored_detections(np.zeros_like(pred), target, np.zeros((40, 40)))
    pooled = metrics.coco_average_precision(
        [metrics.scored_detections(pred, target, probability), missed])
    assert pooled["coco_ap@0.50"] == pytest.approx(51 / 101)  # recall points 0.00 .. 0.50
    empty = metrics.scored_detections(np.zeros((8, 8), bool), np.zeros((8, 8), bool), np.zeros((8, 8)))
    assert metrics.coco_average_precision([empty])["coco_map"] == 1.0


def test_connected_components_connectivity():
    diagonal = np.eye(4, dtype=bool)
    assert metrics.connected_components(diagonal).max() == 1
    assert metrics.connected_components(diagonal, connectivity=4).max() == 4
    with pytest.raises(ValueError):
        metrics.connected_components(diagonal, connectivity=6)


def test_real_fnc_mask_hd95_and_count():
    from pathlib import Path

    masks = Path(__file__).parents[2] / "shared" / "data" / "fnc" / "masks"
    files = sorted(masks.glob("*.png")) if masks.is_dir() else []
    if not files:
        pytest.skip("shared FNC sample (../shared/data/fnc) not available")
    import cv2

    target = cv2.imread(str(files[0]), cv2.IMREAD_GRAYSCALE) > 0
    pred = np.roll(target, (3, -2), axis=(0, 1))
    pred[200:230, 300:330] = True  # one false object
    pairwise = cdist(brute_force_boundary(pred), brute_force_boundary(target))
    expected = max(np.percentile(pairwise.min(1), 95), np.percentile(pairwise.min(0), 95))
    assert metrics.hd95(pred, target) == pytest.approx(expected)
    reference_count = cv2.connectedComponents(target.astype(np.uint8), connectivity=8)[0] - 1
    result = metrics.instance_metrics(pred, target)
    assert result["n_target"] == reference_count
