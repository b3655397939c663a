"""Training throughput per config at its full input size: images/s, peak memory, FLOP rate.

    python benchmarks/train_throughput.py                       # imsahlo and morphoseg, batch 2, 3 steps
    python benchmarks/train_throughput.py --configs=imsahlo:model=unet,imsahlo --batch_size=4 --steps=5

Each row: median seconds per step over ``--steps`` timed steps after one warm-up (compile) step,
images/s, XLA's FLOP count of the step and the achieved GFLOP/s, model FLOP utilisation against
``--peak_tflops`` when given (e.g. 989 for an H100's dense bf16), and the process's peak RSS (host)
or the device's peak bytes in use (GPU), both since the process started. Host memory follows
launch/train.py's policy (`train.reuse_freed_host_memory`). The first row is the reference for the ratio column.
"""

import importlib
import pathlib
import resource
import statistics
import sys
import time

import jax
from absl import app, flags

from neuroseg_jax import data
from neuroseg_jax.train import loop, reuse_freed_host_memory, sharding

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not in the package

_CONFIGS = flags.DEFINE_list("configs", ["imsahlo", "morphoseg:data=synthetic"],
                             "configs/NAME.py arguments, 'NAME:ARGS' each.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Global batch size (the papers use 16 and 24; CPUs cannot).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after the warm-up step.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "config.model.dtype: bfloat16 = mixed precision (float32 parameters).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for model FLOP utilisation (0: skip).")


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
        trainer = loop.build_trainer(config, devices=jax.devices("cpu")[:1])
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
    trainer = loop.build_trainer(config)
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


def main(argv):
    del argv
    reuse_freed_host_memory()  # as launch/train.py does
    rows = []
    for spec in _CONFIGS.value:
        config = load_config(spec)
        config.model.dtype = _DTYPE.value
        rows.append({"config": spec, **measure_train_step(config, _BATCH.value, _STEPS.value)})
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, {_DTYPE.value}, batch {_BATCH.value}, "
          f"median of {_STEPS.value} steps")
    header = f"{'config':34} {'size':>9} {'s/step':>8} {'img/s':>7} {'GFLOP/step':>11} {'GFLOP/s':>8} " \
             f"{'MFU':>6} {'peak MiB':>9} {'vs first':>8}"
    print(header)
    for row in rows:
        mfu = row["gflop_per_s"] / (_PEAK.value * 1e3) if _PEAK.value else float("nan")
        print(f"{row['config']:34} {row['size']:>9} {row['s_per_step']:8.3f} {row['images_per_s']:7.2f} "
              f"{row['gflop_per_step']:11.1f} {row['gflop_per_s']:8.1f} {mfu:6.3f} {row['peak_mib']:9.0f} "
              f"{row['s_per_step'] / rows[0]['s_per_step']:8.2f}")


if __name__ == "__main__":
    app.run(main)
