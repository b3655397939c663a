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

import pathlib
import statistics
import sys
import time

import psutil
from absl import app, flags, logging

from neuroseg_jax.data import make_loader

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from step_timing import load_config, measure_train_step  # noqa: E402  (benchmarks/ is not a package)

STRESS_TRANSFORMS = (
    "rotate",
    "affine",
    "elastic",
    "grid_distortion",
    "brightness_contrast",
    "gaussian_noise",
    "gaussian_blur",
)

_CONFIG = flags.DEFINE_string("config", "imsahlo", "configs/NAME.py argument, 'NAME:ARGS'")
_CONFIG_OVERRIDE = flags.DEFINE_multi_string("config_override", [], "data.KEY=VALUE (str/int/float keys)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "batch size of the loader and of the train step")
_STRESS = flags.DEFINE_bool("stress", False, "every transform at probability 0.5")
_WINDOWS = flags.DEFINE_integer("windows", 3, "timing windows per loader (images/s is their median)")
_BATCHES = flags.DEFINE_integer("batches", 3, "batches per timing window")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to measure")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 2, "timed train steps (0: skip the step)")
flags.register_validator("workers", lambda values: all(value.isdigit() for value in values),
                         message="--workers takes non-negative integers, e.g. 0,1,2")


def pipeline_config(*, augment: bool, worker_count: int):
    config = load_config(_CONFIG.value)
    for override in _CONFIG_OVERRIDE.value:
        key, _, value = override.partition("=")
        key = key.removeprefix("data.")
        config.data[key] = type(config.data[key])(value)
    config.data.worker_count = worker_count
    if config.data.source == "synthetic":
        config.data.synthetic.num_images = 64
    if not augment:
        config.data.augment.enabled = False
        config.data.clahe.enabled = False
    elif _STRESS.value:
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


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # absl's INFO default would mix libraries' notes into the table
    batch_size, train_steps, stress = _BATCH_SIZE.value, _TRAIN_STEPS.value, _STRESS.value
    measure = dict(batch_size=batch_size, windows=_WINDOWS.value, batches=_BATCHES.value)
    reference, reference_rss = measure_loader(pipeline_config(augment=False, worker_count=0), **measure)
    rows = [("loader, no aug, no CLAHE", 0, reference, reference_rss)]
    for workers in map(int, _WORKERS.value):
        rate, rss = measure_loader(pipeline_config(augment=True, worker_count=workers), **measure)
        rows.append(("loader, " + ("stress aug + CLAHE" if stress else "config's pipeline"), workers, rate, rss))
    config = pipeline_config(augment=True, worker_count=0)
    print(
        f"{_CONFIG.value}: crops {config.data.crop_size}, batch {batch_size}, source {config.data.source}, "
        f"{psutil.cpu_count()} CPUs"
    )
    step = measure_train_step(config, batch_size, train_steps) if train_steps else None
    print(f"{'what':<36}{'workers':>8}{'images/s':>10}{'vs ref':>8}{'vs step':>9}{'peak RSS MiB':>14}")
    for name, workers, rate, rss in rows:
        versus_step = f"{rate / step['images_per_s']:9.1f}" if step else f"{'-':>9}"
        print(f"{name:<36}{workers:>8}{rate:>10.2f}{rate / reference:>8.2f}{versus_step}{rss:>14.0f}")
    if step:
        print(
            f"{'train step (median of ' + str(train_steps) + ')':<36}{'-':>8}{step['images_per_s']:>10.2f}"
            f"{step['images_per_s'] / reference:>8.2f}{1.0:>9.1f}{step['peak_mib']:>14.0f}"
        )


if __name__ == "__main__":
    app.run(main)
