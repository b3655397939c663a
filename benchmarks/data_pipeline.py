"""Throughput of the full training data pipeline at 512x768 (the IMSAHLO input size).

Pipeline: synthetic 512x768 images -> flips, rotation, affine, elastic, grid distortion ->
brightness/contrast, noise, blur -> CLAHE after augmentation -> batches of 4.
Reference in the same process: the same loader with augmentation and CLAHE off (worker_count 0),
so the ratio shows what augmentation costs. Reports images/s (median over timing windows, after
a warm-up that absorbs worker start-up) and peak resident memory of the process plus its
worker processes. Runs in well under a minute.

    python benchmarks/data_pipeline.py [--windows 3] [--batches 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import psutil

from neuroseg_jax.data import default_data_config, make_loader

BATCH_SIZE = 4
IMAGE_SIZE = (512, 768)


def pipeline_config(*, augment: bool, worker_count: int):
    config = default_data_config()
    config.synthetic.num_images = 64
    config.synthetic.image_size = IMAGE_SIZE
    config.worker_count = worker_count
    config.augment.enabled = augment
    config.clahe.enabled = augment
    for name in (
        "rotate",
        "affine",
        "elastic",
        "grid_distortion",
        "brightness_contrast",
        "gaussian_noise",
        "gaussian_blur",
    ):
        config.augment[name].p = 0.5
    return config


def _tree_rss_mb(process: psutil.Process) -> float:
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def measure(config, *, windows: int, batches: int) -> tuple[float, float]:
    """-> (median images/s over `windows` windows of `batches` batches, peak RSS MiB)."""
    process = psutil.Process()
    iterator = iter(make_loader(config, "train", batch_size=BATCH_SIZE, seed=0))
    peak = 0.0
    for _ in range(2):  # warm-up: worker start-up, first reads
        next(iterator)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
            peak = max(peak, _tree_rss_mb(process))
        rates.append(batches * BATCH_SIZE / (time.perf_counter() - start))
    del iterator
    return statistics.median(rates), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    reference, reference_rss = measure(
        pipeline_config(augment=False, worker_count=0), windows=args.windows, batches=args.batches
    )
    print(f"data pipeline, {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, batch {BATCH_SIZE}, psutil cpu count {psutil.cpu_count()}")
    print(f"{'pipeline':<30}{'workers':>8}{'images/s':>10}{'vs ref':>8}{'peak RSS MiB':>14}")
    print(f"{'reference (no aug, no CLAHE)':<30}{0:>8}{reference:>10.1f}{1.0:>8.2f}{reference_rss:>14.0f}")
    for workers in args.workers:
        rate, rss = measure(
            pipeline_config(augment=True, worker_count=workers), windows=args.windows, batches=args.batches
        )
        print(f"{'full augmentation':<30}{workers:>8}{rate:>10.1f}{rate / reference:>8.2f}{rss:>14.0f}")


if __name__ == "__main__":
    main()
