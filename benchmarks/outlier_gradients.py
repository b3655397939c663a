"""What the uncertainty loss teaches beyond the segmentation loss: gradient cosines w.r.t. the logits.

At MorphoSeg's sizes and losses, read from configs/morphoseg.py (batch 24 of 224x224, 2 softmax
classes, buffers of 1000 per class, 100,000 candidates and 10,000 outliers per class, L_seg its CE +
Dice terms, L_unc = beta1 CE + beta2 Dice on f_out) prints, for three states of the logits, the
cosine between d L_unc / d logits and d L_seg / d logits for

  replace, all pixels   outliers take the place of their pixels' logits, loss over every pixel (the
                        public code's reading and this repository's former default)
  shift, all pixels     outliers shift their pixels' logits by v - mu_k, L_seg of that output over
                        every pixel (not a package option)
  shift, placed pixels  the same shift, loss over the shifted pixels only, in units of the logits'
                        spread (the default)
  control               L_seg itself over the same pixels, no outliers: what sparsity alone does

"same pixels" is the cosine with L_seg's gradient restricted to the pixels the outliers went to: it
separates "touches other pixels" from "asks something else of the pixels it touches" (the control
shows the value of a term that only repeats L_seg there); "grad on placed" is the share of the
gradient's norm on those pixels (0: they pass none).

Labels are the masks of synthetic neuron images; logits are a signed-distance margin
(confident inside objects and background, uncertain at their borders) plus noise, so no model runs.

    python benchmarks/outlier_gradients.py [--batch=24 --size=224] [--seeds=3]
"""

from __future__ import annotations

import pathlib
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from neuroseg_jax import losses
from neuroseg_jax.data.synthetic import SyntheticNeurons
from neuroseg_jax.losses import outliers

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not in the package
from configs import morphoseg  # noqa: E402

# state of training: (margin far from borders, border width in pixels, logit noise)
STATES = {"untrained": (0.2, 4.0, 0.3), "mid-training": (3.0, 4.0, 1.5), "trained": (8.0, 2.0, 1.0)}
VARIANTS = {"replace, all pixels": ("replace", "all"), "shift, all pixels": ("shift", "all"),
            "shift, placed pixels": ("shift", "placed"), "control: L_seg on placed": (None, "placed")}


def _labels(batch: int, size: int) -> np.ndarray:
    images = SyntheticNeurons(batch, (size, size), seed=3)
    return np.stack([images[i]["mask"] for i in range(batch)])


def _logits(labels: np.ndarray, state: str, rng: np.random.Generator) -> np.ndarray:
    margin, width, noise = STATES[state]
    signed = np.stack([cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
                       - cv2.distanceTransform(1 - m.astype(np.uint8), cv2.DIST_L2, 3) for m in labels])
    difference = margin * np.tanh((signed - 0.5) / width) + noise * rng.standard_normal(labels.shape)
    common = rng.standard_normal(labels.shape)  # the logit sum, which softmax ignores
    return np.stack([(common - difference) / 2, (common + difference) / 2], -1).astype(np.float32)


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(a * b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


_BATCH = flags.DEFINE_integer("batch", None, "Images per batch (default: configs/morphoseg.py's train.batch_size).")
_SIZE = flags.DEFINE_integer("size", None, "Square crop side (default: configs/morphoseg.py's data.crop_size).")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds to average over.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = morphoseg.get_config()
    settings = config.outliers
    batch = _BATCH.value or int(config.train.batch_size)
    size = _SIZE.value or int(config.data.crop_size[0])
    seeds = _SEEDS.value
    if set(config.loss.terms) != {"bce", "dice"} or config.model.num_classes != 2:
        raise SystemExit(f"expected CE + Dice over 2 classes in configs/morphoseg.py; got {dict(config.loss.terms)}, "
                         f"K={config.model.num_classes}")
    dice_params = config.loss.params.dice.to_dict()

    def seg_loss(logits, labels, mask=None):
        return (config.loss.terms.bce * losses.bce_loss(logits, labels, mask=mask)
                + config.loss.terms.dice * losses.dice_loss(logits, labels, mask=mask, **dice_params))

    @jax.jit
    def cosines(logits, labels, key):
        buffer_key, sample_key, place_key = jax.random.split(key, 3)
        buffers = outliers.update_buffers(outliers.init_buffers(2, settings.buffer_size, 2), logits, labels,
                                          buffer_key)
        sampled = outliers.sample_outliers(buffers, sample_key, num_candidates=settings.num_candidates,
                                           num_selected=settings.num_selected, ridge=settings.ridge)
        seg_grad = jax.grad(seg_loss)(logits, labels)
        rows = {}
        for name, (placement, region) in VARIANTS.items():
            _, placed = outliers.synthesize_output(logits, labels, sampled, place_key)
            if placement is None:
                unc_grad = jax.grad(seg_loss)(logits, labels, placed)
            elif region == "all" and placement == "shift":  # not a package option: L_seg of f_out
                unc_grad = jax.grad(lambda x: seg_loss(outliers.synthesize_output(
                    x, labels, sampled, place_key, placement="shift")[0], labels))(logits)
            else:  # the package's loss
                unc_grad = jax.grad(lambda x: outliers.uncertainty_loss(
                    x, labels, sampled, place_key, beta1=settings.beta1, beta2=settings.beta2,
                    placement=placement))(logits)
            on_placed = placed[..., None].astype(jnp.float32)
            rows[name] = (jnp.mean(placed), _cosine(unc_grad, seg_grad),
                          _cosine(unc_grad * on_placed, seg_grad * on_placed),
                          jnp.linalg.norm(unc_grad * on_placed) / jnp.linalg.norm(unc_grad))
        return rows

    labels = _labels(batch, size)
    print(f"batch {batch} x {size}x{size}, K=2, buffers {settings.buffer_size}/class, "
          f"{settings.num_candidates} -> {settings.num_selected} outliers per class, L_seg = "
          f"{config.loss.terms.bce} CE + {config.loss.terms.dice} Dice {dice_params}, L_unc = {settings.beta1} CE + "
          f"{settings.beta2} Dice; mean over {seeds} seeds (min..max)")
    print(f"{'logits':13s} {'L_unc':26s} {'placed':>7s} {'cos all':>16s} {'cos same pixels':>17s} "
          f"{'grad on placed':>15s}")
    for state in STATES:
        results = {name: [] for name in VARIANTS}
        for seed in range(seeds):
            logits = _logits(labels, state, np.random.default_rng(seed))
            for name, values in cosines(logits, labels, jax.random.PRNGKey(seed)).items():
                results[name].append([float(v) for v in values])
        for name, values in results.items():
            values = np.asarray(values)
            fraction, cos_all, cos_same, share = values.mean(0)
            same = (f"{cos_same:6.3f} ({values[:, 2].min():.2f}..{values[:, 2].max():.2f})" if share > 0
                    else f"{'-':>17s}")
            print(f"{state:13s} {name:26s} {fraction:7.2%} {cos_all:6.3f} ({values[:, 1].min():.2f}.."
                  f"{values[:, 1].max():.2f}) {same} {share:15.3f}")


if __name__ == "__main__":
    app.run(main)
