"""Inference and boundary-metric throughput, each beside a reference computed in the same run.

1. Sliding-window inference of a 4000x3000 single-channel image (MorphoSeg's resolution) with a
   cheap jitted 3x3-conv + sigmoid predictor, 224x224 windows, 56-px overlap, constant and
   Gaussian blending; reference: one full-image forward of the same function (the compute floor;
   the ratio is the cost of tiling, overlap and blending).
2. HD95 of a 1600x1200 mask pair (FNC's resolution, ~40 cells): ours (EDT of boundaries) vs a
   brute-force reference (chunked pairwise distances between boundary pixels, then percentiles),
   which also checks that both give the same number; scipy's directed_hausdorff (HD100 only)
   for scale.

Run: python benchmarks/inference.py [--repeats 3]. Prints a table of medians.
"""

from __future__ import annotations

import statistics
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from scipy.spatial.distance import cdist, directed_hausdorff

from neuroseg_jax.inference import sliding_window
from neuroseg_jax.metrics import boundary, hd95

_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per method (the table shows their median)")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 16, "windows per sliding-window forward call")

KERNEL = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 1, 1)), jnp.float32)


@jax.jit
def conv_predictor(images: jnp.ndarray) -> jnp.ndarray:
    logits = jax.lax.conv_general_dilated(
        images, KERNEL, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.sigmoid(logits)


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up: compilation and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cell_masks(shape=(1200, 1600), cells: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Target: random ellipses; prediction: the same cells jittered, some missed, a few false."""
    rng = np.random.default_rng(seed)
    target = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for _ in range(cells):
        center = (int(rng.integers(40, shape[1] - 40)), int(rng.integers(40, shape[0] - 40)))
        axes = (int(rng.integers(12, 30)), int(rng.integers(8, 20)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(target, center, axes, angle, 0, 360, 1, -1)
        if rng.random() < 0.9:
            shifted = (center[0] + int(rng.integers(-3, 4)), center[1] + int(rng.integers(-3, 4)))
            cv2.ellipse(pred, shifted, (axes[0] + 2, axes[1]), angle, 0, 360, 1, -1)
    for _ in range(4):
        cv2.circle(pred, (int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0]))), 6, 1, -1)
    return pred.astype(bool), target.astype(bool)


def brute_force_hd95(pred: np.ndarray, target: np.ndarray, chunk: int = 2048) -> float:
    """MONAI-convention HD95 from explicit pairwise distances (memory bounded by `chunk`)."""
    pred_points = np.argwhere(boundary(pred)).astype(np.float64)
    target_points = np.argwhere(boundary(target)).astype(np.float64)

    def directed(source, destination):
        return np.concatenate([cdist(source[i:i + chunk], destination).min(axis=1)
                               for i in range(0, len(source), chunk)])

    return max(np.percentile(directed(pred_points, target_points), 95),
               np.percentile(directed(target_points, pred_points), 95))


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # absl's INFO default would mix libraries' notes into the table
    repeats = _REPEATS.value
    image = np.random.default_rng(1).random((3000, 4000, 1)).astype(np.float32)
    megapixels = image.shape[0] * image.shape[1] / 1e6
    rows = []
    full = median_seconds(lambda: np.asarray(conv_predictor(image[None])), repeats)
    rows.append(("full-image forward (reference)", full, megapixels / full, 1.0))
    for blend in ("constant", "gaussian"):
        seconds = median_seconds(
            lambda: sliding_window(conv_predictor, image, window=(224, 224), overlap=56,
                                   batch_size=_BATCH_SIZE.value, blend=blend), repeats)
        rows.append((f"sliding_window 224/56 {blend}", seconds, megapixels / seconds, seconds / full))
    print(f"\nSliding-window inference, 4000x3000x1, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}, median of {repeats}")
    print(f"{'method':<36}{'seconds':>10}{'Mpx/s':>10}{'x reference':>13}")
    for name, seconds, rate, ratio in rows:
        print(f"{name:<36}{seconds:>10.3f}{rate:>10.2f}{ratio:>13.2f}")

    pred, target = cell_masks()
    ours_value = hd95(pred, target)
    reference_value = brute_force_hd95(pred, target)
    ours = median_seconds(lambda: hd95(pred, target), repeats)
    brute = median_seconds(lambda: brute_force_hd95(pred, target), repeats)
    pred_points = np.argwhere(boundary(pred)).astype(np.float64)
    target_points = np.argwhere(boundary(target)).astype(np.float64)
    scipy_hd = median_seconds(
        lambda: max(directed_hausdorff(pred_points, target_points)[0],
                    directed_hausdorff(target_points, pred_points)[0]), repeats)
    print(f"\nHD95 of one 1600x1200 pair ({len(pred_points)} + {len(target_points)} boundary px), "
          f"median of {repeats}")
    print(f"{'method':<44}{'ms':>10}{'value':>10}{'x ours':>9}")
    print(f"{'metrics.hd95 (EDT, MONAI convention)':<44}{ours * 1e3:>10.1f}{ours_value:>10.3f}{1.0:>9.2f}")
    print(f"{'brute-force cdist HD95 (reference)':<44}{brute * 1e3:>10.1f}"
          f"{reference_value:>10.3f}{brute / ours:>9.2f}")
    print(f"{'scipy directed_hausdorff x2 (HD100 only)':<44}{scipy_hd * 1e3:>10.1f}"
          f"{'-':>10}{scipy_hd / ours:>9.2f}")
    if not np.isclose(ours_value, reference_value):
        raise SystemExit(f"HD95 mismatch: ours {ours_value} vs brute force {reference_value}")


if __name__ == "__main__":
    app.run(main)
