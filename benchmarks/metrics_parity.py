"""Our metrics (neuroseg_jax.metrics) against the libraries users trust, on the same inputs.

Prints one agreement table per input source (seeded synthetic pairs; BBBC039 instance masks and
PFC-PN binary masks with perturbed predictions when ``--data_root`` holds them), each row being
one metric over all cases of that source: mean of ours, mean of the library's, the largest
absolute difference over cases, whether every case agrees within the stated tolerance, the number
of compared cases and the number left out because a library's empty-mask policy differs from
ours (those are listed in the empty-policy table instead).

  HD95      ours ``hd95(convention='monai')`` vs ``monai.metrics.compute_hausdorff_distance(
            percentile=95)``; ours ``convention='medpy'`` vs ``medpy.metric.binary.hd95``; both
            again with anisotropic pixels (spacing / voxelspacing).
  matching  ours ``instance_metrics`` (precision/recall/f1/ap at IoU 0.50:0.05:0.95) vs
            ``stardist.matching.matching`` (ap = StarDist's accuracy = TP / (TP + FP + FN)), or,
            without StarDist, vs a brute-force IoU matrix + Hungarian matching written here.
  clDice    ours ``topology.cldice`` (hard skeletons) vs the reference definition of Shit et al.
            (github jocpae/clDice, ``cl_score``/``clDice``) written here with skimage's
            ``skeletonize``; plus, for information only, the soft-skeleton clDice of the loss.
  Dice/IoU  ours ``pixel_metrics`` vs ``monai.metrics.DiceMetric`` / ``MeanIoU``
            (include_background=True on the single binary channel, ignore_empty=False).

Both sides get instance-label images; ours (``as_instances``) would split a label image holding a
single nonzero value into 8-connected components where StarDist keeps it as one object, so every
case here has connected objects.

    python benchmarks/metrics_parity.py [--data_root ../shared/data] [--synthetic_pairs 48]
        [--bbbc039_images 8] [--pfc_pn_images 6] [--seed 0]

Needs torch, monai and medpy (``pip install torch monai medpy``); StarDist is optional
(``pip install stardist``; its ``matching`` module imports without tensorflow).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import warnings

import cv2
import numpy as np
from absl import app, flags, logging
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.morphology import skeletonize

from neuroseg_jax import metrics
from neuroseg_jax.data.io import load_array

_DATA_ROOT = flags.DEFINE_string(
    "data_root", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"),
    "folder holding bbbc039/ and pfc_pn/ (images/ + masks/); skipped when absent")
_SYNTHETIC = flags.DEFINE_integer("synthetic_pairs", 48, "seeded synthetic (target, prediction) pairs")
_BBBC039 = flags.DEFINE_integer("bbbc039_images", 8, "BBBC039 masks to perturb (0: skip)")
_PFC_PN = flags.DEFINE_integer("pfc_pn_images", 6, "PFC-PN masks to perturb (0: skip)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the synthetic pairs and of every perturbation")

THRESHOLDS = metrics.COCO_THRESHOLDS
ANISOTROPIC = (1.0, 0.5)  # (dy, dx) pixel size of the spacing rows
# Tolerances: MONAI returns float32, our distance transform is float32 (exact squared distances,
# rounded at the square root), matching counts are integers.
TOLERANCE = {"hd95": 1e-3, "overlap": 1e-6, "matching": 1e-12, "cldice": 1e-12}
_DISK = {r: cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)) for r in range(1, 6)}


@dataclasses.dataclass
class Case:
    """One (target, prediction) pair as instance-label images (0 = background)."""
    name: str
    target: np.ndarray
    pred: np.ndarray


@dataclasses.dataclass
class Comparison:
    """Per-case values of one metric from us and from a library."""
    metric: str
    tolerance: float
    ours: list = dataclasses.field(default_factory=list)
    library: list = dataclasses.field(default_factory=list)
    cases: list = dataclasses.field(default_factory=list)
    excluded: list = dataclasses.field(default_factory=list)

    def add(self, case: str, ours: float, library: float) -> None:
        self.cases.append(case)
        self.ours.append(float(ours))
        self.library.append(float(library))


# ----------------------------------------------------------------------------- inputs


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Labels 1..n in order of first appearance of the surviving values (0 stays 0)."""
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int32)
    return inverse if labels.min() == 0 else inverse + 1


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected components (scipy, not our connected_components) as int32 labels."""
    return ndimage.label(mask > 0, structure=np.ones((3, 3), bool))[0].astype(np.int32)


def _paint_ellipses(rng, shape, count, *, radii=(5, 18), touching=False) -> np.ndarray:
    """Instance labels of `count` random ellipses; later ones never overwrite earlier ones.
    With `touching`, ellipses are placed side by side so neighbours share a border."""
    labels = np.zeros(shape, np.int32)
    height, width = shape
    centre = np.array([rng.integers(radii[1], height - radii[1]),
                       rng.integers(radii[1], width - radii[1])])
    for label in range(1, count + 1):
        axes = rng.integers(radii[0], radii[1], size=2)
        if not touching:
            centre = np.array([rng.integers(0, height), rng.integers(0, width)])
        blob = np.zeros(shape, np.uint8)
        cv2.ellipse(blob, (int(centre[1]), int(centre[0])), (int(axes[1]), int(axes[0])),
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
        labels[(blob > 0) & (labels == 0)] = label
        if touching:  # next ellipse centred just past this one's edge: they overlap, so touch
            step = rng.normal(size=2)
            centre = np.clip(centre + (axes.max() * 1.6 * step / np.linalg.norm(step)).astype(int),
                             0, np.array(shape) - 1)
    return _relabel(labels)


def _paint_tubes(rng, shape, count, *, thickness=(2, 6)) -> np.ndarray:
    """Binary mask of random thick polylines (tubular, for clDice)."""
    mask = np.zeros(shape, np.uint8)
    height, width = shape
    for _ in range(count):
        points = np.stack([rng.integers(0, width, 4), rng.integers(0, height, 4)], 1)
        cv2.polylines(mask, [points.astype(np.int32)], False, 1, int(rng.integers(*thickness)))
    return mask


def _shift(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate with zero fill (no wrap-around)."""
    out = np.zeros_like(array)
    height, width = array.shape
    src = array[max(0, -dy):height - max(0, dy), max(0, -dx):width - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def _morph(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate (radius > 0) or erode (radius < 0) a binary mask with a disk."""
    if radius == 0:
        return mask > 0
    operation = cv2.dilate if radius > 0 else cv2.erode
    return operation(mask.astype(np.uint8), _DISK[abs(radius)], borderType=cv2.BORDER_CONSTANT,
                     borderValue=0) > 0


def perturb_instances(target: np.ndarray, rng, *, drop=0.1, merges=1) -> np.ndarray:
    """A plausible instance prediction: each object kept, eroded, dilated, shifted or dropped,
    then `merges` pairs of nearest objects fused into one (joined by a bridge, so it stays one
    connected object), and one false blob added."""
    pred = np.zeros_like(target)
    boxes = ndimage.find_objects(target)
    pad = 6
    for label, box in enumerate(boxes, start=1):
        if box is None or rng.random() < drop:
            continue
        rows = slice(max(0, box[0].start - pad), min(target.shape[0], box[0].stop + pad))
        cols = slice(max(0, box[1].start - pad), min(target.shape[1], box[1].stop + pad))
        mask = target[rows, cols] == label
        operation = rng.integers(0, 4)
        if operation == 1:
            mask = _morph(mask, -int(rng.integers(1, 3)))
        elif operation == 2:
            mask = _morph(mask, int(rng.integers(1, 3)))
        elif operation == 3:
            mask = _shift(mask, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
        window = pred[rows, cols]
        window[mask & (window == 0)] = label
    present = [label for label in np.unique(pred) if label]
    for _ in range(merges):
        if len(present) < 3:
            break
        centres = np.array(ndimage.center_of_mass(pred > 0, pred, present))
        first = int(rng.integers(len(present)))
        distance = np.linalg.norm(centres - centres[first], axis=1)
        distance[first] = np.inf
        second = int(distance.argmin())
        keep, absorb = present[first], present[second]
        bridge = np.zeros(pred.shape, np.uint8)
        (y0, x0), (y1, x1) = centres[first].astype(int), centres[second].astype(int)
        cv2.line(bridge, (int(x0), int(y0)), (int(x1), int(y1)), 1, 3)
        pred[pred == absorb] = keep
        pred[(bridge > 0) & ((pred == 0) | (pred == keep))] = keep
        present.remove(absorb)
    false_blob = _paint_ellipses(rng, pred.shape, 1, radii=(4, 9))
    pred[(false_blob > 0) & (pred == 0)] = pred.max() + 1
    return _relabel(pred)


def perturb_binary(target: np.ndarray, rng) -> np.ndarray:
    """A plausible binary prediction: shifted, eroded or dilated, some components dropped,
    neurites cut, and a few false blobs added."""
    mask = target > 0
    mask = _shift(mask, int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
    mask = _morph(mask, int(rng.choice([-2, -1, 0, 1, 2])))
    components = _components(mask)
    count = int(components.max())
    if count > 1:
        dropped = rng.choice(np.arange(1, count + 1), size=max(1, count // 5), replace=False)
        mask &= ~np.isin(components, dropped)
    height, width = mask.shape
    cuts = np.zeros(mask.shape, np.uint8)
    for _ in range(4):
        y, x = int(rng.integers(height)), int(rng.integers(width))
        cv2.line(cuts, (x - 15, y - 15), (x + 15, y + 15), 1, 3)
    mask &= cuts == 0
    mask |= _paint_ellipses(rng, mask.shape, 3, radii=(4, 12)) > 0
    return mask


def synthetic_cases(count: int, seed: int, size: int = 160) -> list[Case]:
    """Seeded pairs cycling through blob, touching-object, tubular and empty-mask variants."""
    shape = (size, size)
    variants = ("blobs", "touching", "tubes", "blobs_shift", "tubes_break", "empty_pred",
                "empty_target", "both_empty", "blobs_eroded")
    cases = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        variant = variants[index % len(variants)]
        if variant in ("blobs", "blobs_shift", "blobs_eroded", "empty_pred"):
            target = _paint_ellipses(rng, shape, int(rng.integers(3, 12)))
        elif variant == "touching":
            target = _paint_ellipses(rng, shape, int(rng.integers(3, 7)), radii=(8, 16),
                                     touching=True)
        elif variant in ("tubes", "tubes_break"):
            target = _components(_paint_tubes(rng, shape, int(rng.integers(1, 4))))
        else:
            target = np.zeros(shape, np.int32)
        if variant in ("blobs", "touching"):
            pred = perturb_instances(target, rng)
        elif variant == "blobs_shift":
            pred = _shift(target, int(rng.integers(-5, 6)), int(rng.integers(-5, 6)))
        elif variant == "blobs_eroded":
            pred = _components(_morph(target > 0, -2))
        elif variant == "tubes":
            pred = _components(_morph(_shift(target > 0, 1, -2), int(rng.integers(-1, 2))))
        elif variant == "tubes_break":
            pred = _components(perturb_binary(target, rng))
        elif variant == "empty_target":
            pred = _paint_ellipses(rng, shape, 3)
        else:  # empty_pred, both_empty
            pred = np.zeros(shape, np.int32)
        cases.append(Case(f"synthetic/{index:03d}_{variant}", _relabel(target), _relabel(pred)))
    return cases


def real_cases(root: pathlib.Path, name: str, count: int, seed: int) -> list[Case]:
    """The first `count` masks (sorted by name) of root/name/masks with a perturbed prediction:
    BBBC039 masks are instance labels (objects perturbed one by one), PFC-PN masks are binary
    (perturbed as a whole; instances are their 8-connected components)."""
    folder = root / name / "masks"
    paths = sorted(folder.glob("*.png"))[:count]
    cases = []
    for index, path in enumerate(paths):
        rng = np.random.default_rng([seed, 1000 + index])
        mask = load_array(path)
        if mask.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D mask, got shape {mask.shape}")
        if name == "bbbc039":
            target = _relabel(mask.astype(np.int64))
            pred = perturb_instances(target, rng, drop=0.1, merges=2)
        else:
            target = _components(mask)
            pred = _components(perturb_binary(mask, rng))
        cases.append(Case(f"{name}/{path.stem[:40]}", target, pred))
    return cases


# ----------------------------------------------------------------------------- references


def reference_cldice(v_p: np.ndarray, v_l: np.ndarray) -> float:
    """clDice as in Shit et al.'s repository (jocpae/clDice, cldice_metric): cl_score(v, s) =
    sum(v * s) / sum(s). Its `tprec` is the paper's Tsens and vice versa; the harmonic mean is
    symmetric. Empty skeletons give 0/0 = NaN there."""
    def cl_score(v, s):
        return np.sum(v * s) / np.sum(s)

    v_p, v_l = (v_p > 0).astype(np.float64), (v_l > 0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tprec = cl_score(v_p, skeletonize(v_l > 0))
        tsens = cl_score(v_l, skeletonize(v_p > 0))
        return float(2 * tprec * tsens / (tprec + tsens))


@functools.cache
def _jitted_soft_skeleton():
    """losses.topology.soft_skeleton compiled once per shape (eagerly it dispatches op by op)."""
    import jax

    from neuroseg_jax.losses.topology import soft_skeleton

    return jax.jit(soft_skeleton, static_argnums=1)


def soft_skeleton_cldice(pred: np.ndarray, target: np.ndarray, iterations: int = 10) -> float:
    """clDice with the loss's soft skeleton (losses.topology.soft_skeleton) on the hard masks,
    without the loss's epsilon smoothing: what training optimises, for information."""
    p = (pred > 0).astype(np.float32)
    g = (target > 0).astype(np.float32)
    skeletons = np.asarray(_jitted_soft_skeleton()(np.stack([p, g])[..., None], iterations))
    skel_p, skel_g = skeletons[0, ..., 0], skeletons[1, ..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        tprec = np.sum(skel_p * g) / np.sum(skel_p)
        tsens = np.sum(skel_g * p) / np.sum(skel_g)
        return float(2 * tprec * tsens / (tprec + tsens))


def brute_force_matching(target: np.ndarray, pred: np.ndarray, threshold: float) -> dict:
    """StarDist-style matching written independently: IoU of every overlapping pair from explicit
    set operations, then the one-to-one matching with the most pairs at IoU >= threshold
    (Hungarian, for every threshold), ratios 0 on a zero denominator (StarDist's _safe_divide)."""
    target_ids = [i for i in np.unique(target) if i]
    pred_ids = [i for i in np.unique(pred) if i]
    iou = np.zeros((len(target_ids), len(pred_ids)))
    pred_index = {label: j for j, label in enumerate(pred_ids)}
    for i, label in enumerate(target_ids):
        target_mask = target == label
        for other in np.unique(pred[target_mask]):
            if other:
                pred_mask = pred == other
                iou[i, pred_index[other]] = (np.logical_and(target_mask, pred_mask).sum()
                                             / np.logical_or(target_mask, pred_mask).sum())
    eligible = (iou >= threshold).astype(np.float64)
    tp = 0
    if eligible.size:
        rows, cols = linear_sum_assignment(-eligible)
        tp = int(eligible[rows, cols].sum())
    fp, fn = len(pred_ids) - tp, len(target_ids) - tp

    def divide(a, b):
        return a / b if b else 0.0

    return {"tp": tp, "fp": fp, "fn": fn, "precision": divide(tp, tp + fp),
            "recall": divide(tp, tp + fn), "f1": divide(2 * tp, 2 * tp + fp + fn),
            "accuracy": divide(tp, tp + fp + fn)}


def stardist_matching():
    """StarDist's matching function, or None with the reason when it cannot be imported."""
    try:
        from stardist.matching import matching
    except Exception as error:  # ImportError, or tensorflow/numba failing inside the import
        return None, f"{type(error).__name__}: {error}"

    def run(target, pred, threshold):
        result = matching(target, pred, thresh=threshold, criterion="iou")
        return {key: float(getattr(result, key)) for key in
                ("tp", "fp", "fn", "precision", "recall", "f1", "accuracy")}

    return run, None


# ----------------------------------------------------------------------------- comparison


def compare(cases: list[Case], matcher, matcher_name: str, policy_rows: list) -> list[Comparison]:
    """Every metric of every case, ours against the library's (see module docstring)."""
    import torch
    from medpy.metric.binary import hd95 as medpy_hd95
    from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance

    rows = {key: Comparison(metric, TOLERANCE[kind]) for key, metric, kind in (
        ("dice", "dice vs MONAI DiceMetric", "overlap"),
        ("iou", "iou vs MONAI MeanIoU", "overlap"),
        ("hd95_monai", "hd95 (monai conv.) vs MONAI", "hd95"),
        ("hd95_medpy", "hd95 (medpy conv.) vs medpy", "hd95"),
        ("hd95_monai_spacing", f"hd95 monai, spacing {ANISOTROPIC} vs MONAI", "hd95"),
        ("hd95_medpy_spacing", f"hd95 medpy, spacing {ANISOTROPIC} vs medpy", "hd95"),
        ("counts", f"tp/fp/fn vs {matcher_name}", "matching"),
        ("precision", f"precision@.50:.95 vs {matcher_name}", "matching"),
        ("recall", f"recall@.50:.95 vs {matcher_name}", "matching"),
        ("f1", f"f1@.50:.95 vs {matcher_name}", "matching"),
        ("ap", f"ap@.50:.95 vs {matcher_name} acc.", "matching"),
        ("map", f"instance_map vs mean {matcher_name} acc.", "matching"),
        ("cldice", "cldice vs reference (skimage)", "cldice"),
        ("soft_cldice", "[info] soft-skel. clDice vs reference", "cldice"),
    )}
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    iou_metric = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    for case in cases:
        target, pred = case.target, case.pred
        target_fg, pred_fg = target > 0, pred > 0
        empty = ("both_empty" if not (target_fg.any() or pred_fg.any()) else
                 "pred_empty" if not pred_fg.any() else
                 "target_empty" if not target_fg.any() else None)

        ours = metrics.pixel_metrics(pred_fg, target_fg)
        tensor_pred = torch.from_numpy(pred_fg[None, None].astype(np.float32))
        tensor_target = torch.from_numpy(target_fg[None, None].astype(np.float32))
        monai_dice = float(dice_metric(tensor_pred, tensor_target)[0, 0])
        monai_iou = float(iou_metric(tensor_pred, tensor_target)[0, 0])
        rows["dice"].add(case.name, ours["dice"], monai_dice)
        rows["iou"].add(case.name, ours["iou"], monai_iou)

        ours_monai = metrics.hd95(pred_fg, target_fg, convention="monai", empty="nan")
        ours_medpy = metrics.hd95(pred_fg, target_fg, convention="medpy", empty="nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on empty masks; the policy table says it
            library_monai = float(compute_hausdorff_distance(
                tensor_pred, tensor_target, include_background=True, percentile=95)[0, 0])
        try:
            library_medpy = float(medpy_hd95(pred_fg, target_fg))
        except RuntimeError as error:  # medpy refuses masks without foreground
            library_medpy = f"RuntimeError '{error}'"
        if empty:
            for key in ("hd95_monai", "hd95_medpy", "hd95_monai_spacing", "hd95_medpy_spacing"):
                rows[key].excluded.append(case.name)
        else:
            rows["hd95_monai"].add(case.name, ours_monai, library_monai)
            rows["hd95_medpy"].add(case.name, ours_medpy, library_medpy)
            # Anisotropic pixels take our scipy path instead of OpenCV's distance transform.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a MONAI-internal deprecation note on spacing
                library_spacing = float(compute_hausdorff_distance(
                    tensor_pred, tensor_target, include_background=True, percentile=95,
                    spacing=list(ANISOTROPIC))[0, 0])
            rows["hd95_monai_spacing"].add(
                case.name, metrics.hd95(pred_fg, target_fg, spacing=ANISOTROPIC), library_spacing)
            rows["hd95_medpy_spacing"].add(
                case.name, metrics.hd95(pred_fg, target_fg, spacing=ANISOTROPIC, convention="medpy"),
                medpy_hd95(pred_fg, target_fg, voxelspacing=ANISOTROPIC))

        ours_objects = metrics.instance_metrics(pred, target, report_thresholds=THRESHOLDS)
        counts = metrics.match_counts(pred, target)
        library_ap = []
        for index, threshold in enumerate(THRESHOLDS):
            library = matcher(target, pred, threshold)
            library_ap.append(library["accuracy"])
            if empty == "both_empty":
                continue
            for key in ("tp", "fp", "fn"):
                rows["counts"].add(f"{case.name} t={threshold:.2f} {key}",
                                   counts[key][index], library[key])
            for key, library_key in (("precision", "precision"), ("recall", "recall"),
                                     ("f1", "f1"), ("ap", "accuracy")):
                rows[key].add(f"{case.name} t={threshold:.2f}",
                              ours_objects[metrics.threshold_key(key, threshold)],
                              library[library_key])
        if empty == "both_empty":
            for key in ("counts", "precision", "recall", "f1", "ap", "map"):
                rows[key].excluded.append(case.name)
        else:
            rows["map"].add(case.name, ours_objects["instance_map"], np.mean(library_ap))

        ours_cldice = metrics.cldice(pred, target)
        library_cldice = reference_cldice(pred, target)
        soft = soft_skeleton_cldice(pred, target)
        if np.isnan(library_cldice):
            rows["cldice"].excluded.append(case.name)
            rows["soft_cldice"].excluded.append(case.name)
        else:
            rows["cldice"].add(case.name, ours_cldice, library_cldice)
            rows["soft_cldice"].add(case.name, soft, library_cldice)

        if empty:
            policy_rows.append((case.name, empty, {
                "hd95 ours": ours_monai, "hd95 ours (default empty='diagonal')":
                    metrics.hd95(pred_fg, target_fg),
                "MONAI hd95": library_monai, "medpy hd95": library_medpy,
                "dice ours": ours["dice"], "MONAI Dice (ignore_empty=False)": monai_dice,
                "ap@0.50 ours": ours_objects["ap@0.50"], f"{matcher_name} acc.@0.50": library_ap[0],
                "cldice ours": ours_cldice, "cldice reference": library_cldice,
            }))
    return list(rows.values())


def _format(value) -> str:
    return value if isinstance(value, str) else f"{value:.6g}"


def print_table(source: str, comparisons: list[Comparison]) -> list[tuple[str, str, float, float]]:
    """Print one source's table; returns (metric, worst case, ours, library) of disagreements."""
    print(f"\n== {source}")
    print(f"{'metric':42s} {'ours (mean)':>12s} {'library':>12s} {'max |diff|':>11s} "
          f"{'tol':>7s} {'agree':>5s} {'n':>5s} {'excl.':>5s}")
    disagreements = []
    for row in comparisons:
        if not row.ours:
            print(f"{row.metric:42s} {'-':>12s} {'-':>12s} {'-':>11s} {row.tolerance:7.0e} "
                  f"{'-':>5s} {0:5d} {len(row.excluded):5d}")
            continue
        ours, library = np.asarray(row.ours), np.asarray(row.library)
        difference = np.abs(ours - library)
        worst = int(np.argmax(difference))
        informational = row.metric.startswith("[info]")
        agree = bool(np.all(difference <= row.tolerance))
        verdict = "info" if informational else ("yes" if agree else "no")
        print(f"{row.metric:42s} {ours.mean():12.6f} {library.mean():12.6f} {difference.max():11.3g} "
              f"{row.tolerance:7.0e} {verdict:>5s} {len(ours):5d} "
              f"{len(row.excluded):5d}")
        if not agree and not informational:
            disagreements.append((row.metric, row.cases[worst], ours[worst], library[worst]))
    return disagreements


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    import importlib.metadata

    import torch

    torch.set_num_threads(1)
    matcher, reason = stardist_matching()
    if matcher is None:
        print(f"stardist not installed (pip install stardist; needs tensorflow) [{reason}]: "
              "matching is compared with the brute-force IoU + Hungarian reference in this script")
        matcher, matcher_name = brute_force_matching, "brute force"
    else:
        matcher_name = "StarDist"
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}"
                         for name in ("monai", "medpy", "scikit-image", "torch"))
    print(f"libraries: {versions}; tolerances: hd95 {TOLERANCE['hd95']} px, dice/iou "
          f"{TOLERANCE['overlap']}, matching {TOLERANCE['matching']}, clDice {TOLERANCE['cldice']}")

    sources = {"synthetic (seeded blobs, touching, tubes, empty)":
               synthetic_cases(_SYNTHETIC.value, _SEED.value)}
    root = pathlib.Path(_DATA_ROOT.value)
    for name, count in (("bbbc039", _BBBC039.value), ("pfc_pn", _PFC_PN.value)):
        if count <= 0:
            continue
        if not (root / name / "masks").is_dir():
            print(f"{root / name / 'masks'} is absent: {name} skipped")
            continue
        sources[f"{name} ({count} masks, perturbed predictions)"] = real_cases(
            root, name, count, _SEED.value)

    disagreements, policy_rows = [], []
    for source, cases in sources.items():
        disagreements += print_table(source, compare(cases, matcher, matcher_name, policy_rows))

    print("\n== empty masks (left out above; each library's policy)")
    groups: dict = {}
    for name, case, values in policy_rows:
        line = ", ".join(f"{key} {_format(value)}" for key, value in values.items())
        groups.setdefault((case, line), []).append(name)
    for (case, line), names in groups.items():
        print(f"{case} ({len(names)} cases, e.g. {names[0]}): {line}")
    print("policies: ours both empty -> hd95 0, dice/iou/ap/clDice 1; one empty -> hd95 = image "
          "diagonal (empty='diagonal', default) or NaN (empty='nan'), dice/ap/clDice 0. MONAI "
          "hd95: NaN when either is empty (inf distances, and torch.quantile of inf is NaN; "
          "percentile=None gives inf). medpy hd95: RuntimeError when either is empty. "
          "MONAI Dice/MeanIoU: NaN when the target is empty by default (ignore_empty=True), "
          "1 for both empty with ignore_empty=False. StarDist: every ratio 0 when tp = 0, "
          "including both empty. clDice reference: 0/0 = NaN for an empty skeleton.")
    print("matching: both sides get the same instance-label images; ours would split an image "
          "with a single nonzero label into its 8-connected components (metrics.as_instances), "
          "StarDist would not.")
    print("clDice: ours is neuroseg_jax.metrics.cldice (topology.py), hard skimage skeletons as "
          "the reference; the loss (losses.cldice_loss) uses the soft skeleton (10 iterations, "
          "here at full resolution), whose row is information only (it is not expected to "
          "agree).")
    if disagreements:
        print("\n== disagreements (worst case per metric)")
        for metric, case, ours, library in disagreements:
            print(f"{metric}: {case}: ours {ours:.6g}, library {library:.6g}")
    else:
        print("\nall compared metrics agree within tolerance")


if __name__ == "__main__":
    app.run(main)
