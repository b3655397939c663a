"""Which per-pixel uncertainty map flags out-of-distribution input: a measurement on tiny trained models.

Trains configs/morphoseg.py:quick (tiny TransUNet, synthetic neurons, 32 px crops) without outliers,
with the MorphoSeg uncertainty term and with the VOS energy term (from a third of the steps on; the
header line shows the last step's segmentation losses and the largest L_unc, so a run whose
outlier term diverges shows), then predicts the validation images
as they are and with an artefact never seen in training pasted in (a bright checkerboard disc, a
stripe pattern). For every candidate map it prints the mean over the clean images' foreground and
background and over each artefact, and the AUROC of artefact pixels against clean foreground and
against clean background pixels (0.5: the map does not tell them apart; 1: every artefact pixel
scores above every clean one).

Maps: entropy (``inference.predictive_entropy`` of the blended probabilities: the map
``predict_files`` writes), mahalanobis (squared distance of the logit vector to the nearest class
mean under the buffers' shared covariance, ``losses.outliers.class_gaussians``, the estimate
training samples from), relative mahalanobis (the same minus the distance to one Gaussian of all
buffered entries, Ren et al. 2021), energy (-logsumexp of the logits) and, for VOS, its learned
logistic's outlier probability.

    python benchmarks/outlier_uncertainty.py [--steps=600] [--seeds=1]
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from scipy.stats import rankdata

from neuroseg_jax import data, inference, models
from neuroseg_jax.losses import outliers
from neuroseg_jax.train import builders, sharding

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ is not in the package
from configs import morphoseg  # noqa: E402

RUNS = {"no outliers": None, "uncertainty (shift)": "uncertainty", "vos": "vos"}
MAPS = ("entropy", "mahalanobis", "relative mahal.", "energy", "vos logistic")


def artefacts(shape: tuple[int, int], rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (values (H, W), region (H, W) bool)} of artefacts to paste."""
    height, width = shape
    ys, xs = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    disc = (ys - cy) ** 2 + (xs - cx) ** 2 < (0.15 * min(shape)) ** 2
    checker = np.where((ys // 2 + xs // 2) % 2 == 0, 1.0, 0.6)
    top, left = int(rng.uniform(0.1, 0.6) * height), int(rng.uniform(0.1, 0.6) * width)
    square = np.zeros(shape, bool)
    square[top:top + height // 4, left:left + width // 4] = True
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xs + ys) / 5.0)
    return {"bright checker disc": (checker, disc), "stripes": (stripes, square)}


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a random positive > that of a random negative), ties counted half (Mann-Whitney U)."""
    ranks = rankdata(np.concatenate([positive, negative]))
    return float((ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2)
                 / (len(positive) * len(negative)))


def train(variant: str | None, steps: int, seed: int):
    config = morphoseg.get_config("quick")
    config.seed = seed
    config.train.num_steps = steps  # the learning-rate schedule's length
    config.outliers.enabled = variant is not None
    if variant is not None:
        config.outliers.variant = variant
        config.outliers.start_step = steps // 3
    trainer = builders.build_trainer(config, jax.devices()[:1])
    loader = iter(data.make_loader(config.data, "train", batch_size=config.train.batch_size, seed=seed))
    state = trainer.state
    largest_uncertainty = 0.0
    for _ in range(steps):
        state, metrics = trainer.train_step(state, sharding.global_batch(next(loader), trainer.mesh),
                                            trainer.step_rng)
        largest_uncertainty = max(largest_uncertainty, float(metrics.get("loss/uncertainty", 0.0)))
    summary = {key: float(value) for key, value in metrics.items()}
    summary["largest uncertainty"] = largest_uncertainty
    return config, jax.device_get(state), summary


def mahalanobis(logits: jax.Array, buffers: outliers.OutlierBuffers, ridge: float) -> jax.Array:
    """Squared Mahalanobis distance of each logit vector to the nearest class mean (filled queues only)."""
    means, covariance = outliers.class_gaussians(buffers, ridge)
    offsets = logits[..., None, :] - means
    distance = jnp.einsum("...kd,de,...ke->...k", offsets, jnp.linalg.inv(covariance), offsets)
    return jnp.min(jnp.where(buffers.count >= 2, distance, jnp.inf), axis=-1)


def map_fn(state, config):
    """(n, h, w, C) -> (n, h, w, K + 4): softmax probabilities, then the logit maps of MAPS[1:]."""
    model = models.build_model(config.model)
    buffers = state.outliers
    energy = state.params.get("vos_energy")
    ridge = config.outliers.ridge
    if buffers is not None:  # one Gaussian of every buffered entry, for the relative distance
        entries = np.concatenate([features[:count] for features, count in zip(buffers.features, buffers.count)])
        pooled = outliers.OutlierBuffers(features=jnp.asarray(entries)[None], count=jnp.array([len(entries)]),
                                         ptr=jnp.zeros((1,), jnp.int32))

    @jax.jit
    def maps(images):
        logits = model.apply({"params": state.params}, images, train=False)
        negative_energy = jax.nn.logsumexp(logits, -1)
        zeros = jnp.zeros_like(negative_energy)
        distance = mahalanobis(logits, buffers, ridge) if buffers is not None else zeros
        relative = distance - mahalanobis(logits, pooled, ridge) if buffers is not None else zeros
        logistic = (jax.nn.sigmoid(-(energy["weight"] * negative_energy + energy["bias"]))
                    if energy is not None else zeros)
        extra = jnp.stack([distance, relative, -negative_energy, logistic], -1)
        return jnp.concatenate([jax.nn.softmax(logits, -1), extra], -1)

    return lambda batch: np.asarray(maps(np.asarray(batch, np.float32)))


def _maps(predict, image, num_classes, options) -> np.ndarray:
    """(H, W, 2 + len(MAPS)): foreground probability, then every map of MAPS."""
    blended = inference.sliding_window(predict, image, **options)
    probs = blended[..., :num_classes]
    return np.concatenate([probs[..., 1:2], inference.predictive_entropy(probs)[..., None],
                           blended[..., num_classes:]], -1)


_STEPS = flags.DEFINE_integer("steps", 600, "Training steps of each run.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds to run.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    steps, num_seeds = _STEPS.value, _SEEDS.value
    for seed in range(num_seeds):
        for run, variant in RUNS.items():
            config, state, metrics = train(variant, steps, seed)
            predict = map_fn(state, config)
            num_classes = int(config.model.num_classes)
            options = {**inference.sliding_options(config.inference), "blend": "gaussian"}
            images = data.build_dataset(config.data, "val")
            rng = np.random.default_rng(seed)
            clean = {"fg": [], "bg": []}
            pasted: dict[str, list] = {}
            dice_terms = [0.0, 0.0]
            for index in range(len(images)):
                item = images[index]
                maps = _maps(predict, item["image"], num_classes, options)
                foreground = item["mask"] > 0
                prediction = maps[..., 0] > 0.5
                dice_terms[0] += 2 * np.sum(prediction & foreground)
                dice_terms[1] += prediction.sum() + foreground.sum()
                clean["fg"].append(maps[foreground][:, 1:])
                clean["bg"].append(maps[~foreground][:, 1:])
                for name, (values, region) in artefacts(item["image"].shape[:2], rng).items():
                    image = item["image"].copy()
                    image[region] = values[region][:, None]
                    pasted.setdefault(name, []).append(_maps(predict, image, num_classes, options)[region][:, 1:])
            clean = {key: np.concatenate(value) for key, value in clean.items()}
            print(f"\nseed {seed}, {run}: {steps} steps; last step: CE {metrics['loss/bce']:.3f}, Dice loss "
                  f"{metrics['loss/dice']:.3f}; largest L_unc {metrics['largest uncertainty']:.3f}; val Dice "
                  f"{dice_terms[0] / max(dice_terms[1], 1):.3f} on {len(images)} images")
            print(f"  {'map':15s} {'clean fg':>9s} {'clean bg':>9s} " + " ".join(
                f"{name:>20s} {'vs fg':>6s} {'vs bg':>6s}" for name in pasted))
            for column, name in enumerate(MAPS):
                if ("mahal" in name and variant is None) or (name == "vos logistic" and variant != "vos"):
                    continue
                cells = [f"{clean['fg'][:, column].mean():9.3g}", f"{clean['bg'][:, column].mean():9.3g}"]
                for values in pasted.values():
                    region = np.concatenate(values)[:, column]
                    cells.append(f"{region.mean():20.3g} {auroc(region, clean['fg'][:, column]):6.3f} "
                                 f"{auroc(region, clean['bg'][:, column]):6.3f}")
                print(f"  {name:15s} " + " ".join(cells))


if __name__ == "__main__":
    app.run(main)
