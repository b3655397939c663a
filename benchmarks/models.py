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

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neuroseg_jax.models import MODELS, create_model  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated registry names")
    parser.add_argument("--width", type=int, default=32, help="base width of the convolutional models")
    parser.add_argument("--transunet-width", type=int, default=None, help="ResNet width of TransUNet (default 64)")
    parser.add_argument("--flop-sizes", default="512x768,224x224", help="HxW sizes for the GFLOP columns")
    parser.add_argument("--time-size", default="224x224", help="HxW size of the timed forward / train step")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-timing", action="store_true", help="only parameters and GFLOPs (no compute)")
    parser.add_argument("--reference", default="unet", help="model whose times give the ratio column")
    args = parser.parse_args()

    names = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    if not args.no_timing and args.reference not in names:
        names.insert(0, args.reference)
    flop_sizes = [parse_size(size) for size in args.flop_sizes.split(",")]
    time_size = parse_size(args.time_size)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; conv width {args.width}; "
          f"batch {args.batch}; timed at {time_size[0]}x{time_size[1]}, median of {args.repeats}")

    header = ["model", "width", "params (M)"] + [f"GFLOPs {h}x{w}" for h, w in flop_sizes]
    if not args.no_timing:
        header += ["fwd (ms)", "train step (ms)", f"fwd / {args.reference}", f"step / {args.reference}"]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    reference_times = None
    for name in names:
        is_transunet = name.startswith("transunet")
        width = args.transunet_width if is_transunet else args.width
        kwargs = {} if width is None else {"width": width}
        model = create_model(name, **kwargs)
        channels = 3 if is_transunet else 1
        variables = random_params(model, (args.batch, 224, 224, channels))
        count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
        row = [name, str(model.width), f"{count / 1e6:.2f}"]
        row += [f"{forward_gflops(model, variables, (args.batch, h, w, channels)):.1f}" for h, w in flop_sizes]
        if not args.no_timing:
            fwd, step = time_model(model, variables, (args.batch, *time_size, channels), args.repeats)
            if name == args.reference:
                reference_times = (fwd, step)
            row += [f"{1e3 * fwd:.0f}", f"{1e3 * step:.0f}",
                    f"{fwd / reference_times[0]:.2f}", f"{step / reference_times[1]:.2f}"]
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
