"""Throughput of a config's training data pipeline beside the training step it feeds.

The loader must never be the bottleneck: this prints images/s of the config's full training
pipeline (read -> augmentation -> CLAHE -> batches) with 0, 1 and 2 grain workers, peak resident
memory of the process and its workers, and, in the same table, images/s of the same config's
train step at the same batch size, with the ratio loader / step (> 1: the loader is ahead).

Default: configs/imsahlo.py (512x768 crops, CLAHE before and after augmentation, its augmentation
probabilities) on its synthetic 512x768 images. `--stress` sets every transform's probability to
0.5 (rotation, affine, elastic, grid distortion, brightness/contrast, noise, blur), the worst case.
Reference row: the same loader with augmentation and CLAHE off (0 workers), so the ratio column
shows what augmentation costs. images/s is the median over timing windows after a warm-up that
absorbs worker start-up.

    python benchmarks/data_pipeline.py                        # imsahlo, batch 2, train step too
    python benchmarks/data_pipeline.py --config imsahlo:data=fnc --config_override data.root=../shared/data/fnc
    python benchmarks/data_pipeline.py --stress --train_steps 0   # loader only
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import psutil

from neuroseg_jax.data import make_loader

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from train_throughput import load_config, measure_train_step  # noqa: E402  (benchmarks/ is not a package)

STRESS_TRANSFORMS = (
    "rotate",
    "affine",
    "elastic",
    "grid_distortion",
    "brightness_contrast",
    "gaussian_noise",
    "gaussian_blur",
)


def pipeline_config(args: argparse.Namespace, *, augment: bool, worker_count: int):
    config = load_config(args.config)
    for override in args.config_override:
        key, _, value = override.partition("=")
        key = key.removeprefix("data.")
        config.data[key] = type(config.data[key])(value)
    config.data.worker_count = worker_count
    if config.data.source == "synthetic":
        config.data.synthetic.num_images = 64
    if not augment:
        config.data.augment.enabled = False
        config.data.clahe.enabled = False
    elif args.stress:
        for name in STRESS_TRANSFORMS:
            config.data.augment[name].p = 0.5
    return config


def _tree_rss_mib(process: psutil.Process) -> float:
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 2**20


def measure_loader(config, *, batch_size: int, windows: int, batches: int) -> tuple[float, float]:
    """-> (median images/s over `windows` windows of `batches` batches, peak RSS MiB)."""
    process = psutil.Process()
    iterator = iter(make_loader(config.data, "train", batch_size=batch_size, seed=0))
    peak = 0.0
    for _ in range(2):  # warm-up: worker start-up, first reads
        next(iterator)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
            peak = max(peak, _tree_rss_mib(process))
        rates.append(batches * batch_size / (time.perf_counter() - start))
    iterator.close()
    return statistics.median(rates), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="imsahlo", help="configs/NAME.py argument, 'NAME:ARGS'")
    parser.add_argument("--config_override", nargs="*", default=[], help="data.KEY=VALUE (str/int/float keys)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--stress", action="store_true", help="every transform at probability 0.5")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_steps", type=int, default=2, help="timed train steps (0: skip the step)")
    args = parser.parse_args()
    measure = dict(batch_size=args.batch_size, windows=args.windows, batches=args.batches)
    reference, reference_rss = measure_loader(pipeline_config(args, augment=False, worker_count=0), **measure)
    rows = [("loader, no aug, no CLAHE", 0, reference, reference_rss)]
    for workers in args.workers:
        rate, rss = measure_loader(pipeline_config(args, augment=True, worker_count=workers), **measure)
        rows.append(("loader, " + ("stress aug + CLAHE" if args.stress else "config's pipeline"), workers, rate, rss))
    config = pipeline_config(args, augment=True, worker_count=0)
    print(
        f"{args.config}: crops {config.data.crop_size}, batch {args.batch_size}, source {config.data.source}, "
        f"{psutil.cpu_count()} CPUs"
    )
    step = measure_train_step(config, args.batch_size, args.train_steps) if args.train_steps else None
    print(f"{'what':<36}{'workers':>8}{'images/s':>10}{'vs ref':>8}{'vs step':>9}{'peak RSS MiB':>14}")
    for name, workers, rate, rss in rows:
        versus_step = f"{rate / step['images_per_s']:9.1f}" if step else f"{'-':>9}"
        print(f"{name:<36}{workers:>8}{rate:>10.2f}{rate / reference:>8.2f}{versus_step}{rss:>14.0f}")
    if step:
        print(
            f"{'train step (median of ' + str(args.train_steps) + ')':<36}{'-':>8}{step['images_per_s']:>10.2f}"
            f"{step['images_per_s'] / reference:>8.2f}{1.0:>9.1f}{step['peak_mib']:>14.0f}"
        )


if __name__ == "__main__":
    main()
