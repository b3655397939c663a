"""Forward+backward time of each loss at IMSAHLO size (2, 512, 768, 1), and of the hybrid loss.

Prints a table of medians over several runs. The reference in the same process is a straightforward
soft-skeleton clDice (two erosions per iteration via lax.reduce_window, as in Shit et al.'s code and
MONAI's SoftclDiceLoss, with 3 iterations), so the clDice row can be compared with it directly.
Also times one outlier-regularizer call (enqueue + sample 100k/keep 10k per class + f_out loss).
With ``--model imsahlo`` it also times the model's own forward+backward at the same size and prints
each loss's share of a training step (model + hybrid loss).

    python benchmarks/losses.py [--repeats 5] [--height 512 --width 768] [--model imsahlo --model-width 16]
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from neuroseg_jax import losses
from neuroseg_jax.losses import outliers

_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs per loss (the table shows their median)")
_BATCH = flags.DEFINE_integer("batch", 2, "images per batch")
_HEIGHT = flags.DEFINE_integer("height", 512, "image height")
_WIDTH = flags.DEFINE_integer("width", 768, "image width")
_MODEL = flags.DEFINE_string("model", "", "also time this model's forward+backward (e.g. imsahlo)")
_MODEL_WIDTH = flags.DEFINE_integer("model-width", None, "model base width (default: its own)")


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _reference_cldice(logits: jax.Array, labels: jax.Array, iterations: int = 3) -> jax.Array:
    """Pooling-based soft clDice as in the reference implementations (erosion recomputed each step)."""
    def erode(x):
        a = jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 3, 1, 1), (1, 1, 1, 1), "SAME")
        b = jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 1, 3, 1), (1, 1, 1, 1), "SAME")
        return jnp.minimum(a, b)

    def dilate(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")

    def skel(x):
        s = jax.nn.relu(x - dilate(erode(x)))
        for _ in range(iterations):
            x = erode(x)
            delta = jax.nn.relu(x - dilate(erode(x)))
            s = s + jax.nn.relu(delta - s * delta)
        return s

    p = jax.nn.sigmoid(logits)
    g = (labels > 0).astype(jnp.float32)[..., None]
    sp, sg = skel(p), skel(g)
    tprec = (jnp.sum(sp * g) + 1.0) / (jnp.sum(sp) + 1.0)
    tsens = (jnp.sum(sg * p) + 1.0) / (jnp.sum(sg) + 1.0)
    return 1.0 - 2.0 * tprec * tsens / (tprec + tsens)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # absl's INFO default would mix libraries' notes into the table
    repeats, model_name = _REPEATS.value, _MODEL.value
    shape = (_BATCH.value, _HEIGHT.value, _WIDTH.value)
    key_logits, key_labels = jax.random.split(jax.random.PRNGKey(0))
    logits = jax.random.normal(key_logits, shape + (1,), jnp.float32)
    labels = (jax.random.uniform(key_labels, shape) > 0.8).astype(jnp.int32)

    rows: list[tuple[str, float]] = []

    def grad_of(fn):
        # Labels are an argument, not a closure constant, so XLA cannot constant-fold their skeleton.
        return jax.jit(jax.value_and_grad(fn))

    reference = _time(grad_of(_reference_cldice), logits, labels, repeats=repeats)
    rows.append(("reference clDice, 3 it (pooling)", reference))
    cases = {
        "dice": lambda x, y: losses.dice_loss(x, y),
        "bce": lambda x, y: losses.bce_loss(x, y),
        "tversky": lambda x, y: losses.tversky_loss(x, y),
        "focal_tversky": lambda x, y: losses.focal_tversky_loss(x, y),
        "focal": lambda x, y: losses.focal_loss(x, y),
        "boundary": lambda x, y: losses.boundary_loss(x, y),
        "cldice, 3 it": lambda x, y: losses.cldice_loss(x, y, iterations=3),
        "cldice, 10 it": lambda x, y: losses.cldice_loss(x, y, iterations=10),
        "hybrid (IMSAHLO, clDice 10 it)": lambda x, y: losses.hybrid_loss(x, y, weights=losses.IMSAHLO_WEIGHTS)[0],
    }
    for name, fn in cases.items():
        rows.append((name, _time(grad_of(fn), logits, labels, repeats=repeats)))

    buffers = outliers.init_buffers(2, 10_000, 1)
    buffers = outliers.update_buffers(buffers, logits, labels, jax.random.PRNGKey(1))

    @jax.jit
    def outlier_step(buffers, x, y, rng):
        return jax.value_and_grad(lambda z: outliers.outlier_regularizer(buffers, z, y, rng, step=1,
                                                                         max_per_class=1000)[0])(x)

    rows.append(("outlier regularizer (100k -> 10k / class)",
                 _time(outlier_step, buffers, logits, labels, jax.random.PRNGKey(2), repeats=repeats)))

    model_seconds = _time_model(model_name, _MODEL_WIDTH.value, logits, repeats=repeats) if model_name else None
    print(f"forward+backward, logits {shape + (1,)}, {jax.devices()[0].platform}, median of {repeats}")
    header = f"{'loss':44s} {'seconds':>9s} {'vs reference':>13s}"
    if model_seconds is not None:
        step_seconds = model_seconds + dict(rows)["hybrid (IMSAHLO, clDice 10 it)"]
        print(f"model {model_name} forward+backward: {model_seconds:.4f} s; step = model + hybrid loss: "
              f"{step_seconds:.4f} s")
        header += f" {'% of step':>10s}"
    print(header)
    for name, seconds in rows:
        line = f"{name:44s} {seconds:9.4f} {seconds / reference:12.2f}x"
        if model_seconds is not None:
            line += f" {100 * seconds / step_seconds:9.1f}%"
        print(line)


def _time_model(name: str, width: int | None, logits: jax.Array, *, repeats: int) -> float:
    """Median forward+backward time of the model on images of the benchmark size."""
    from neuroseg_jax.models import create_model  # only the benchmark needs a model; losses never import one

    kwargs = {"num_classes": 1} if width is None else {"num_classes": 1, "width": width}
    model = create_model(name, **kwargs)
    images = jax.nn.sigmoid(logits)
    params = model.init(jax.random.PRNGKey(0), images[:1])["params"]

    @jax.jit
    def model_grad(params, images):
        return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, images, train=False)))(params)

    return _time(model_grad, params, images, repeats=repeats)


if __name__ == "__main__":
    app.run(main)
