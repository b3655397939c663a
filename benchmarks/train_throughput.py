"""Training throughput per config at its full input size: images/s, peak memory, FLOP rate.

    python benchmarks/train_throughput.py                       # imsahlo and morphoseg, batch 2, 3 steps
    python benchmarks/train_throughput.py --configs=imsahlo:model=unet,imsahlo --batch_size=4 --steps=5

Each row: median seconds per step over ``--steps`` timed steps after one warm-up (compile) step,
images/s, XLA's FLOP count of the step and the achieved GFLOP/s, model FLOP utilisation against
``--peak_tflops`` when given (e.g. 989 for an H100's dense bf16), and the process's peak RSS (host)
or the device's peak bytes in use (GPU), both since the process started. Host memory follows
launch/train.py's policy (`train.reuse_freed_host_memory`). The first row is the reference for the ratio column.
"""

import pathlib
import sys

import jax
from absl import app, flags

from neuroseg_jax.ops import reuse_freed_host_memory

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from step_timing import load_config, measure_train_step  # noqa: E402  (benchmarks/ is not a package)

_CONFIGS = flags.DEFINE_list("configs", ["imsahlo", "morphoseg:data=synthetic"],
                             "configs/NAME.py arguments, 'NAME:ARGS' each.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Global batch size (the papers use 16 and 24; CPUs cannot).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps after the warm-up step.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "config.model.dtype: bfloat16 = mixed precision (float32 parameters).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for model FLOP utilisation (0: skip).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
