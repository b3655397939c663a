"""A config's train step timed on synthetic images of its crop size, for train_throughput.py and
data_pipeline.py: a module of its own because both scripts define a ``--batch_size`` flag, and absl
refuses a flag defined twice.
"""

import importlib
import pathlib
import resource
import statistics
import sys
import time

import jax

from neuroseg_jax import data
from neuroseg_jax.train import builders, sharding

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not in the package


def _peak_memory_mib() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_config(spec: str):
    """configs/NAME.py's config for 'NAME' or 'NAME:ARGS'."""
    name, _, arg = spec.partition(":")
    return importlib.import_module(f"configs.{name}").get_config(arg or None)


def step_flops(config, trainer, host_batch) -> float:
    """XLA's FLOP count of the train step as lowered for the host CPU, whatever the device: a GPU
    executable's count leaves out the convolutions and matrix products handed to cuDNN and cuBLAS."""
    if jax.devices()[0].platform != "cpu":
        trainer = builders.build_trainer(config, devices=jax.devices("cpu")[:1])
    batch = sharding.global_batch(host_batch, trainer.mesh)
    cost = trainer.train_step.lower(trainer.state, batch, trainer.step_rng).cost_analysis()
    return float((cost or {}).get("flops", float("nan")))


def measure_train_step(config, batch_size: int, steps: int) -> dict:
    """Median seconds of ``config``'s train step over ``steps`` steps after a warm-up (compile) step,
    on synthetic images of the config's crop size (same shapes as its real data)."""
    config.train.batch_size = batch_size
    config.data.source = "synthetic"
    config.data.synthetic.num_images = max(4 * batch_size, 8)
    config.data.synthetic.image_size = tuple(config.data.crop_size)
    config.data.patches.enabled = False
    trainer = builders.build_trainer(config)
    batches = iter(data.make_loader(config.data, "train", batch_size=batch_size, seed=0))
    host_batch = next(batches)
    flops = step_flops(config, trainer, host_batch)
    batch = sharding.global_batch(host_batch, trainer.mesh)
    state, metrics = trainer.train_step(trainer.state, batch, trainer.step_rng)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        batch = sharding.global_batch(next(batches), trainer.mesh)
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch, trainer.step_rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"size": "x".join(map(str, config.data.crop_size)), "s_per_step": seconds,
            "images_per_s": batch_size / seconds, "gflop_per_step": flops / 1e9,
            "gflop_per_s": flops / 1e9 / seconds, "peak_mib": _peak_memory_mib()}
