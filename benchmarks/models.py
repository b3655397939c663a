"""Model size / cost / speed table for every registered model.

Columns: parameters, forward GFLOPs per image from XLA's cost analysis at 512x768 (the IMSAHLO
input size) and 224x224 (the TransUNet input size), and median wall time of a jitted forward pass
and of a jitted training step (BCE loss, gradient, AdamW update) on this machine, plus the
time ratio against the reference model (`--reference`, default unet) measured in the same process.

Conv nets run at `--width` (default 32 base channels); TransUNet variants keep their published
sizes (R50 width 64, ViT-B/L) unless `--transunet-width` is given. Parameters are random (drawn with
numpy from the shapes of `model.init`), which does not change the cost of any operation.

Examples:
  python benchmarks/models.py --models unet,imsahlo --no-timing         # sizes and FLOPs only
  python benchmarks/models.py --models unet,imsahlo,transunet --time-size 224x224 --repeats 3
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuroseg_jax.models import MODELS, create_model  # noqa: E402

_MODELS = flags.DEFINE_string("models", ",".join(MODELS), "comma-separated registry names")
_WIDTH = flags.DEFINE_integer("width", 32, "base width of the convolutional models")
_TRANSUNET_WIDTH = flags.DEFINE_integer("transunet-width", None, "ResNet width of TransUNet (default 64)")
_FLOP_SIZES = flags.DEFINE_string("flop-sizes", "512x768,224x224", "HxW sizes for the GFLOP columns")
_TIME_SIZE = flags.DEFINE_string("time-size", "224x224", "HxW size of the timed forward / train step")
_BATCH = flags.DEFINE_integer("batch", 1, "images per batch")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per model (the table shows their median)")
_NO_TIMING = flags.DEFINE_bool("no-timing", False, "only parameters and GFLOPs (no compute)")
_REFERENCE = flags.DEFINE_string("reference", "unet", "model whose times give the ratio column")


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.lower().partition("x")
    return int(height), int(width)


def random_params(model, image_shape: tuple[int, ...], seed: int = 0):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(image_shape, jnp.float32))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.normal(size=s.shape), s.dtype), shapes)


def forward_gflops(model, variables, image_shape: tuple[int, ...]) -> float:
    """XLA's FLOP count per image of the forward pass, lowered for the host CPU whatever the device
    (a GPU executable's count leaves out what cuDNN and cuBLAS compute)."""
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu),
                          (variables, jnp.zeros(image_shape, jnp.float32)))
    cost = jax.jit(lambda v, x: model.apply(v, x)).lower(*shapes).cost_analysis()
    return float((cost or {}).get("flops", float("nan"))) / 1e9 / image_shape[0]


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_model(model, variables, image_shape, repeats: int) -> tuple[float, float]:
    images = jax.random.uniform(jax.random.key(0), image_shape)
    labels = (images[..., 0] > 0.5).astype(jnp.float32)[..., None]
    forward = jax.jit(lambda v, x: model.apply(v, x))
    optimizer = optax.adamw(3e-4, weight_decay=1e-4)
    params = variables["params"]
    opt_state = optimizer.init(params)

    def loss_fn(params, x):
        logits = model.apply({**variables, "params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[..., :1], labels))

    @jax.jit
    def train_step(params, opt_state, x):
        grads = jax.grad(loss_fn)(params, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return median_time(forward, variables, images, repeats=repeats), median_time(
        train_step, params, opt_state, images, repeats=repeats
    )


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # absl's INFO default would mix libraries' notes into the table
    timing, reference, batch = not _NO_TIMING.value, _REFERENCE.value, _BATCH.value
    names = [name.strip() for name in _MODELS.value.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise app.UsageError(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    if timing and reference not in names:
        names.insert(0, reference)
    flop_sizes = [parse_size(size) for size in _FLOP_SIZES.value.split(",")]
    time_size = parse_size(_TIME_SIZE.value)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; conv width {_WIDTH.value}; "
          f"batch {batch}; timed at {time_size[0]}x{time_size[1]}, median of {_REPEATS.value}")

    header = ["model", "width", "params (M)"] + [f"GFLOPs {h}x{w}" for h, w in flop_sizes]
    if timing:
        header += ["fwd (ms)", "train step (ms)", f"fwd / {reference}", f"step / {reference}"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    reference_times = None
    for name in names:
        is_transunet = name.startswith("transunet")
        width = _TRANSUNET_WIDTH.value if is_transunet else _WIDTH.value
        kwargs = {} if width is None else {"width": width}
        model = create_model(name, **kwargs)
        channels = 3 if is_transunet else 1
        variables = random_params(model, (batch, 224, 224, channels))
        count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
        row = [name, str(model.width), f"{count / 1e6:.2f}"]
        row += [f"{forward_gflops(model, variables, (batch, h, w, channels)):.1f}" for h, w in flop_sizes]
        if timing:
            fwd, step = time_model(model, variables, (batch, *time_size, channels), _REPEATS.value)
            if name == reference:
                reference_times = (fwd, step)
            row += [f"{1e3 * fwd:.0f}", f"{1e3 * step:.0f}",
                    f"{fwd / reference_times[0]:.2f}", f"{step / reference_times[1]:.2f}"]
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    app.run(main)
