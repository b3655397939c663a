"""Tests of neuroseg_jax.losses.outliers (virtual outlier synthesis) and losses.weighting (MGDA etc.)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import tifffile
from scipy.stats import entropy, multivariate_normal

from conftest import tiny_train_config
from neuroseg_jax import data, inference, losses, train
from neuroseg_jax.losses import outliers, weighting
from neuroseg_jax.train import builders, checkpoint, sharding


def test_buffers_fill_and_roll_fifo():
    buffers = outliers.init_buffers(2, 4, 1)
    update = jax.jit(lambda b, e, l: outliers.update_buffers(b, e, l, max_per_class=3))
    emb = jnp.arange(6, dtype=jnp.float32)[:, None]
    lab = jnp.array([0, 1, 0, 1, 0, 1])
    buffers = update(buffers, emb, lab)
    np.testing.assert_array_equal(buffers.count, [3, 3])
    np.testing.assert_array_equal(buffers.ptr, [3, 3])
    np.testing.assert_array_equal(buffers.features[0, :3, 0], [0, 2, 4])
    np.testing.assert_array_equal(buffers.features[1, :3, 0], [1, 3, 5])
    buffers = update(buffers, emb + 10, lab)  # 3 more per class: fills slot 3, wraps to slots 0, 1
    np.testing.assert_array_equal(buffers.count, [4, 4])
    np.testing.assert_array_equal(buffers.ptr, [2, 2])
    np.testing.assert_array_equal(buffers.features[0, :, 0], [12, 14, 4, 10])
    np.testing.assert_array_equal(buffers.features[1, :, 0], [13, 15, 5, 11])
    # Masked and out-of-range labels are never enqueued; a class absent from the batch is untouched.
    masked = outliers.update_buffers(buffers, emb + 100, jnp.array([0, 7, 0, 7, 0, 7]),
                                     mask=jnp.array([1, 1, 0, 1, 0, 1]))
    np.testing.assert_array_equal(masked.count, [4, 4])
    np.testing.assert_array_equal(masked.features[0, :, 0], [12, 14, 100, 10])
    np.testing.assert_array_equal(masked.features[1], buffers.features[1])
    # Random subset: the chosen embeddings all belong to the class.
    rand = outliers.update_buffers(outliers.init_buffers(2, 8, 1), jnp.arange(40.0)[:, None],
                                   jnp.arange(40) % 2, jax.random.PRNGKey(0), max_per_class=5)
    assert np.all(np.asarray(rand.features[1, :5, 0]) % 2 == 1)
    assert len(set(np.asarray(rand.features[1, :5, 0]).tolist())) == 5


def test_class_gaussians_match_numpy_cov():
    rng = np.random.default_rng(0)
    data = [rng.normal(size=(30, 3)) + 4, rng.normal(size=(12, 3)) * 2]
    buffers = outliers.init_buffers(2, 16, 3)
    embeddings = np.concatenate(data).astype(np.float32)
    labels = np.array([0] * 30 + [1] * 12)
    buffers = outliers.update_buffers(buffers, jnp.asarray(embeddings), jnp.asarray(labels))
    kept = [data[0][:16], data[1]]  # one call enqueues at most 16 (the buffer size) per class
    means, cov = outliers.class_gaussians(buffers, ridge=0.01)
    np.testing.assert_allclose(means, [k.mean(0) for k in kept], rtol=1e-5, atol=1e-5)
    centred = np.concatenate([k - k.mean(0) for k in kept])
    scatter = np.cov(centred.T, bias=True)  # 1/N over all 28 entries, each centred on its class mean
    ridge = 0.01 * np.trace(scatter) / 3  # the ridge is relative to the mean variance
    np.testing.assert_allclose(cov, scatter + ridge * np.eye(3), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="ridge"):
        outliers.class_gaussians(buffers, ridge=0.0)


def test_selected_samples_are_the_lowest_likelihood_candidates_by_scipy():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(128, 2)) @ np.array([[1.0, 1.5], [0.0, 3.0]]) + np.array([[0.5, -1.0]])  # correlated
    labels = np.arange(128) % 2
    data[labels == 1] += np.array([4.0, 2.0])
    buffers = outliers.update_buffers(outliers.init_buffers(2, 64, 2), jnp.asarray(data, jnp.float32),
                                      jnp.asarray(labels))
    # Independent reference: class means and the shared 1/N covariance of what was enqueued, in numpy.
    means = np.stack([data[labels == k].mean(0) for k in range(2)])
    centred = np.concatenate([data[labels == k] - means[k] for k in range(2)])
    scatter = centred.T @ centred / len(centred)
    cov = scatter + 1e-3 * np.trace(scatter) / 2 * np.eye(2)
    key = jax.random.PRNGKey(3)
    sample = jax.jit(outliers.sample_outliers, static_argnames=("num_candidates", "num_selected", "ridge"))
    candidates = sample(buffers, key, num_candidates=4000, num_selected=4000, ridge=1e-3)  # keeps every draw
    chosen = sample(buffers, key, num_candidates=4000, num_selected=40, ridge=1e-3)
    for klass in range(2):
        everything = np.asarray(candidates.samples[klass], np.float64)
        # The candidates are draws from N(mu_k, Sigma): their moments match numpy's to sampling error.
        np.testing.assert_allclose(everything.mean(0), means[klass], atol=0.15)
        np.testing.assert_allclose(np.cov(everything.T), cov, rtol=0.1, atol=0.1)
        logpdf = multivariate_normal(means[klass], cov).logpdf(everything)
        lowest = everything[np.argsort(logpdf)[:40]]
        picked = np.asarray(chosen.samples[klass], np.float64)
        np.testing.assert_allclose(picked[np.argsort(multivariate_normal(means[klass], cov).logpdf(picked))],
                                   lowest, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(chosen.log_likelihood[klass],
                                   multivariate_normal(means[klass], cov).logpdf(picked), rtol=1e-4, atol=1e-4)
    assert bool(jnp.all(chosen.valid))


def _line_buffer():
    """Rank-deficient: 3-D embeddings on one line through (5, 5, 5)."""
    t = np.random.default_rng(3).normal(size=(64, 1))
    return t * np.array([[1.0, 2.0, -1.0]]) + 5.0, np.array([1.0, 2.0, -1.0]) / np.sqrt(6.0)


@pytest.mark.parametrize("ridge", [1e-4, 1e-10])  # 1e-10: float32 Cholesky fails on all three
def test_sampling_is_finite_for_degenerate_and_wide_buffers(ridge):
    rng = np.random.default_rng(4)
    line, direction = _line_buffer()
    wide = rng.normal(size=(100, 8)) @ rng.normal(size=(8, 256)) * 100  # D = 256, 50 entries per class, rank 8
    cases = {"rank-deficient": (line, 32), "constant": (np.full((64, 4), 3.0), 32), "wide": (wide, 64)}
    sample = jax.jit(outliers.sample_outliers, static_argnames=("num_candidates", "num_selected", "ridge"))
    for name, (data, size) in cases.items():
        buffers = outliers.update_buffers(outliers.init_buffers(2, size, data.shape[1]),
                                          jnp.asarray(data, jnp.float32), jnp.arange(len(data)) % 2)
        chosen = sample(buffers, jax.random.PRNGKey(0), num_candidates=500, num_selected=50, ridge=ridge)
        assert np.all(np.isfinite(np.asarray(chosen.samples))), name
        assert np.all(np.isfinite(np.asarray(chosen.log_likelihood))), name
    # Where the spread is degenerate the outliers keep to it: on the line, and at the constant.
    buffers = outliers.update_buffers(outliers.init_buffers(2, 32, 3), jnp.asarray(line, jnp.float32),
                                      jnp.arange(64) % 2)
    offsets = np.asarray(sample(buffers, jax.random.PRNGKey(1), num_candidates=500, num_selected=50,
                                ridge=ridge).samples - buffers.features.mean(1, keepdims=True)).reshape(-1, 3)
    across = offsets - (offsets @ direction)[:, None] * direction
    assert np.linalg.norm(across) < 0.05 * np.linalg.norm(offsets)
    constant = outliers.update_buffers(outliers.init_buffers(2, 32, 4), jnp.full((64, 4), 3.0), jnp.arange(64) % 2)
    np.testing.assert_allclose(sample(constant, jax.random.PRNGKey(2), num_candidates=500, num_selected=50,
                                      ridge=ridge).samples, 3.0, atol=1e-3)


def _sampled(labels: jax.Array, num_logits: int, num_selected: int = 20):
    rng = np.random.default_rng(2)
    dim = num_logits
    buffers = outliers.update_buffers(outliers.init_buffers(max(num_logits, 2), 32, dim),
                                      jnp.asarray(rng.normal(size=(64, dim)), jnp.float32), jnp.arange(64) % 2)
    return outliers.sample_outliers(buffers, jax.random.PRNGKey(0), num_candidates=200, num_selected=num_selected)


@pytest.mark.parametrize("placement", ["replace", "shift"])
def test_synthesized_output_places_outliers_at_pixels_of_their_class(placement):
    labels = jnp.zeros((2, 8, 8), jnp.int32).at[0, 2:4, 2:5].set(1)  # 6 foreground pixels
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 2))
    sampled = _sampled(labels, 2)
    synthesize = jax.jit(outliers.synthesize_output, static_argnames="placement")
    f_out, placed = synthesize(logits, labels, sampled, jax.random.PRNGKey(2), placement=placement)
    placed = np.asarray(placed)
    assert placed[np.asarray(labels) == 1].sum() == 6  # fewer pixels than outliers: all of them
    assert placed[np.asarray(labels) == 0].sum() == 20
    np.testing.assert_array_equal(np.asarray(f_out)[~placed], np.asarray(logits)[~placed])
    values = np.asarray(f_out)[placed & (np.asarray(labels) == 1)]
    expected = np.asarray(sampled.samples[1])
    if placement == "shift":
        values = values - np.asarray(logits)[placed & (np.asarray(labels) == 1)] + np.asarray(sampled.means[1])
    for row in values:  # every placed vector is one of class 1's outliers
        assert np.min(np.abs(expected - row).sum(-1)) < 1e-4


def _trained_logits(labels: np.ndarray, seed: int) -> np.ndarray:
    """Two-class logits of a fitted model: confident away from object borders, uncertain at them."""
    rng = np.random.default_rng(seed)
    signed = np.stack([cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
                       - cv2.distanceTransform(1 - m.astype(np.uint8), cv2.DIST_L2, 3) for m in labels])
    difference = 8.0 * np.tanh((signed - 0.5) / 2.0) + rng.normal(size=labels.shape)
    common = rng.normal(size=labels.shape)
    return np.stack([(common - difference) / 2, (common + difference) / 2], -1).astype(np.float32)


def test_uncertainty_gradient_is_not_the_segmentation_gradient():
    """The margin term (default 'shift') asks the placed pixels something L_seg does not.

    On the pixels that received an outlier, L_seg restricted to those same pixels (a subsample of
    L_seg, which teaches nothing new) has gradient cosine 0.99 with L_seg; the margin term, which
    scores those pixels as if pushed to the low-likelihood edge of their class, has 0.44 here and
    0.52 at MorphoSeg's sizes (benchmarks/outlier_gradients.py). 0.8 separates the two.
    'replace' passes no gradient through its pixels at all.
    """
    labels = np.zeros((2, 48, 48), np.int32)
    labels[0, 8:30, 10:26] = labels[1, 20:44, 6:20] = labels[1, 4:14, 30:44] = 1
    logits = jnp.asarray(_trained_logits(labels, 0))
    labels = jnp.asarray(labels)
    buffers = outliers.update_buffers(outliers.init_buffers(2, 256, 2), logits, labels, jax.random.PRNGKey(0))
    sampled = outliers.sample_outliers(buffers, jax.random.PRNGKey(1), num_candidates=4000, num_selected=300)
    key = jax.random.PRNGKey(2)
    _, placed = outliers.synthesize_output(logits, labels, sampled, key)
    on_placed = np.asarray(placed)

    def seg_loss(x, mask=None):
        return 0.5 * losses.bce_loss(x, labels, mask=mask) + 0.5 * losses.dice_loss(x, labels, mask=mask)

    def cosine(a, b):
        a, b = np.asarray(a)[on_placed].ravel(), np.asarray(b)[on_placed].ravel()
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    seg = jax.grad(seg_loss)(logits)
    control = jax.grad(seg_loss)(logits, placed)
    margin = jax.grad(lambda x: outliers.uncertainty_loss(x, labels, sampled, key, beta1=0.5, beta2=0.5))(logits)
    replace = jax.grad(lambda x: outliers.uncertainty_loss(x, labels, sampled, key, placement="replace"))(logits)
    assert on_placed.sum() == 600
    assert np.all(np.isfinite(np.asarray(margin)))
    assert np.all(np.abs(np.asarray(margin)[on_placed]).sum(-1) > 0)  # every placed pixel passes gradient
    np.testing.assert_array_equal(np.asarray(margin)[~on_placed], 0.0)
    assert cosine(control, seg) > 0.95
    assert cosine(margin, seg) < 0.8, cosine(margin, seg)
    np.testing.assert_array_equal(np.asarray(replace)[on_placed], 0.0)


def test_margin_term_does_not_change_when_the_logits_are_scaled():
    """Outliers drawn from logits c times larger are c times larger; in units of their spread the
    margin term is then the same, so inflating the logits cannot lower (or raise) it. In raw logits
    the shifted pixels that cross the boundary would cost c times more."""
    labels = np.zeros((2, 32, 32), np.int32)
    labels[:, 6:20, 8:24] = 1
    logits = jnp.asarray(_trained_logits(labels, 1))
    labels = jnp.asarray(labels)

    def margin_loss(scale):
        buffers = outliers.update_buffers(outliers.init_buffers(2, 128, 2), logits * scale, labels,
                                          jax.random.PRNGKey(0))
        sampled = outliers.sample_outliers(buffers, jax.random.PRNGKey(1), num_candidates=2000, num_selected=200)
        return float(outliers.uncertainty_loss(logits * scale, labels, sampled, jax.random.PRNGKey(2)))

    assert margin_loss(1.0) > 0.05
    assert margin_loss(10.0) == pytest.approx(margin_loss(1.0), rel=1e-4)


def test_uncertainty_loss_scores_outliers_with_the_configured_dice():
    """MorphoSeg's Dice averages both classes with smoothing 1e-5 (config.loss.params.dice): the
    uncertainty term's Dice must be that one, not the foreground-only default."""
    labels = np.zeros((2, 16, 16), np.int32)
    labels[0, 3:9, 4:12] = labels[1, 8:14, 2:7] = 1
    logits = jnp.asarray(_trained_logits(labels, 2))
    labels = jnp.asarray(labels)
    buffers = outliers.update_buffers(outliers.init_buffers(2, 128, 2), logits, labels, jax.random.PRNGKey(0))
    sampled = outliers.sample_outliers(buffers, jax.random.PRNGKey(1), num_candidates=1000, num_selected=100)
    key = jax.random.PRNGKey(3)
    synthetic, _ = outliers.synthesize_output(logits, labels, sampled, key, placement="replace")
    shifted = np.asarray(synthetic, np.float64)
    probs = np.exp(shifted - shifted.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    target = np.eye(2)[np.asarray(labels)]
    per_class = [(2 * (probs[..., k] * target[..., k]).sum() + 1e-5)
                 / ((probs[..., k] ** 2).sum() + (target[..., k] ** 2).sum() + 1e-5) for k in (0, 1)]
    loss = jax.jit(lambda x: outliers.uncertainty_loss(
        x, labels, sampled, key, beta1=0.0, beta2=1.0, placement="replace",
        dice_params={"include_background": True, "epsilon": 1e-5}))(logits)
    assert float(loss) == pytest.approx(1.0 - np.mean(per_class), abs=1e-5)
    foreground_only = outliers.uncertainty_loss(logits, labels, sampled, key, beta1=0.0, beta2=1.0,
                                                placement="replace")
    assert abs(float(foreground_only) - float(loss)) > 1e-3


def test_vos_energy_loss_is_finite_and_learns_its_logistic():
    labels = jnp.zeros((2, 8, 8), jnp.int32).at[:, 2:5, 2:6].set(1)
    for num_logits in (1, 2):
        logits = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, num_logits))
        sampled = _sampled(labels, num_logits)
        value, grads = jax.jit(jax.value_and_grad(
            lambda x, w, b: outliers.vos_energy_loss(x, sampled, weight=w, bias=b), argnums=(0, 1, 2)))(
            logits, 1.0, 0.0)
        assert np.isfinite(float(value)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
        # The bias's gradient is mean(sigma(s_in)) - 1 + mean(sigma(s_out)) (s: the logistic's score).
        inlier = jax.nn.sigmoid(jax.nn.logsumexp(logits, -1) if num_logits == 2 else jax.nn.softplus(logits[..., 0]))
        outlier_energy = (jax.nn.logsumexp(sampled.samples, -1) if num_logits == 2
                          else jax.nn.softplus(sampled.samples[..., 0]))
        expected = float(jnp.mean(inlier) - 1 + jnp.mean(jax.nn.sigmoid(outlier_energy)))
        assert float(grads[2]) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_outlier_regularizer_in_jitted_step_respects_start_step():
    labels = jnp.zeros((2, 16, 16), jnp.int32).at[:, 4:10, 4:12].set(1)
    logits = jax.random.normal(jax.random.PRNGKey(6), (2, 16, 16, 1))
    buffers = outliers.init_buffers(2, 64, 1)

    @jax.jit
    def step(buffers, logits, rng, step):
        def loss(x):
            return outliers.outlier_regularizer(buffers, x, labels, rng, step=step, start_step=1,
                                                max_per_class=32, num_candidates=256, num_selected=16)
        return jax.value_and_grad(loss, has_aux=True)(logits)

    (loss0, buffers), grad0 = step(buffers, logits, jax.random.PRNGKey(0), 0)
    assert float(loss0) == 0.0 and float(jnp.abs(grad0).sum()) == 0.0
    np.testing.assert_array_equal(buffers.count, [32, 32])
    (loss1, buffers), grad1 = step(buffers, logits, jax.random.PRNGKey(1), 1)
    assert float(loss1) > 0 and np.isfinite(float(loss1))
    assert np.all(np.isfinite(np.asarray(grad1))) and float(jnp.abs(grad1).sum()) > 0
    np.testing.assert_array_equal(buffers.count, [64, 64])


def test_vos_train_step_trains_the_energy_logistic():
    """variant='vos' keeps the logistic's weight and bias in params['vos_energy'] and a step moves them."""
    config = tiny_train_config(**{"outliers.enabled": True, "outliers.variant": "vos", "outliers.start_epoch": 0,
                                  "outliers.buffer_size": 32, "outliers.max_per_class": 16,
                                  "outliers.num_candidates": 200, "outliers.num_selected": 20,
                                  "optim.name": "sgd", "optim.lr": 0.1})
    trainer = builders.build_trainer(config, jax.devices()[:1])
    before = jax.device_get(trainer.state.params["vos_energy"])
    assert (float(before["weight"]), float(before["bias"])) == (1.0, 0.0)
    batch = sharding.global_batch(next(iter(data.make_loader(config.data, "train", batch_size=2, seed=0))),
                                  trainer.mesh)
    state, metrics = trainer.train_step(trainer.state, batch, jax.random.key(0))
    after = jax.device_get(state.params["vos_energy"])
    assert int(metrics["finite"]) == 1 and float(metrics["loss/uncertainty"]) > 0
    assert float(after["weight"]) != 1.0 and float(after["bias"]) != 0.0
    assert set(trainer.eval_step(state, {**batch, "weight": jnp.ones((2,))})) >= {"loss_sum"}


def _intensity_predictor(num_classes: int):
    """Pointwise (so windows and their blend give exactly its values): p(cell) = sigmoid(8 (x - 0.4))."""
    def predict(windows):
        cell = 1.0 / (1.0 + np.exp(-8.0 * (np.asarray(windows[..., :1], np.float64) - 0.4)))
        return (cell if num_classes == 1 else np.concatenate([1.0 - cell, cell], -1)).astype(np.float32)

    return predict


@pytest.mark.parametrize("num_classes", [1, 2])
def test_predict_files_writes_the_predictive_entropy(tmp_path, num_classes):
    gray = np.tile(np.linspace(0, 255, 50), (40, 1)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "ramp.png"), gray)
    options = dict(window=(16, 16), overlap=4, batch_size=2, blend="constant", progress=False,
                   read_options={"channels": 1, "normalize": "dtype"})
    summary = inference.predict_files(_intensity_predictor(num_classes), tmp_path / "ramp.png", tmp_path / "out",
                                      **options)
    written = tifffile.imread(summary["processed"][0]["outputs"]["uncertainty"])
    cell = 1.0 / (1.0 + np.exp(-8.0 * (gray / 255.0 - 0.4)))
    assert written.dtype == np.float32 and written.shape == (40, 50)
    np.testing.assert_allclose(written, entropy(np.stack([1 - cell, cell]), axis=0), rtol=1e-4, atol=1e-6)
    # A model trained on resized images: the map comes back at the file's resolution.
    halved = inference.predict_files(
        _intensity_predictor(num_classes), tmp_path / "ramp.png", tmp_path / "halved",
        load_image=lambda path: (cv2.resize(gray, (25, 20))[..., None] / 255.0, (40, 50)), **options)
    assert tifffile.imread(halved["processed"][0]["outputs"]["uncertainty"]).shape == (40, 50)
    off = inference.predict_files(_intensity_predictor(num_classes), tmp_path / "ramp.png", tmp_path / "off",
                                  uncertainty=False, **options)
    assert "uncertainty" not in off["processed"][0]["outputs"] and not list((tmp_path / "off").glob("*uncert*"))


def test_vos_run_checkpoints_and_predicts_an_uncertainty_map(tmp_path):
    """A run with the VOS variant saves its logistic with the params, restores and predicts with it."""
    config = tiny_train_config(**{"outliers.enabled": True, "outliers.variant": "vos", "outliers.start_epoch": 0,
                                  "outliers.start_step": 2, "outliers.buffer_size": 32, "outliers.max_per_class": 16,
                                  "outliers.num_candidates": 200, "outliers.num_selected": 20,
                                  "train.num_steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4})
    train.train_and_evaluate(config, tmp_path)
    variables, _, _ = checkpoint.restore_weights(tmp_path, "best")
    assert set(variables["params"]["vos_energy"]) == {"weight", "bias"}
    assert float(variables["params"]["vos_energy"]["bias"]) != 0.0  # trained from step 2
    image = data.build_dataset(config.data, "val")[0]["image"][..., 0]
    cv2.imwrite(str(tmp_path / "a.png"), (image * 255).astype(np.uint8))
    summary = inference.predict_run(tmp_path, str(tmp_path / "a.png"), tmp_path / "predictions", progress=False)
    uncertainty = tifffile.imread(summary["processed"][0]["outputs"]["uncertainty"])
    assert uncertainty.dtype == np.float32 and np.all((uncertainty >= 0) & (uncertainty <= np.log(2) + 1e-6))


SHARDING_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from neuroseg_jax.losses import outliers
    assert jax.device_count() == 8, jax.devices()
    labels = (jax.random.uniform(jax.random.PRNGKey(0), (8, 16, 16)) > 0.6).astype(jnp.int32)
    logits = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 2))
    def run(logits, labels):
        buffers = outliers.init_buffers(2, 128, 2)
        loss, buffers = outliers.outlier_regularizer(buffers, logits, labels, jax.random.PRNGKey(2), step=1,
                                                     max_per_class=64, num_candidates=512, num_selected=64)
        return loss, buffers
    single = jax.jit(run)(logits, labels)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, P("data"))
    sharded = jax.jit(run)(jax.device_put(logits, shard), jax.device_put(labels, shard))
    for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print("OK")
""")


def test_buffers_agree_under_8_device_sharding():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, cwd=repo, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def _tree_grads(vectors):
    return [{"a": jnp.asarray(v[:2]), "b": {"c": jnp.asarray(v[2:])}} for v in vectors]


def test_mgda_two_task_closed_form_vs_grid_search():
    rng = np.random.default_rng(5)
    for _ in range(5):
        g1, g2 = rng.normal(size=(2, 5))
        weights = np.asarray(weighting.mgda_weights(_tree_grads([g1, g2])))
        grid = np.linspace(0, 1, 20001)
        norms = np.linalg.norm(grid[:, None] * g1 + (1 - grid[:, None]) * g2, axis=1)
        best = grid[np.argmin(norms)]
        assert abs(weights[0] - best) < 1e-3 and abs(weights.sum() - 1) < 1e-6
        # Frank-Wolfe on the same two gradients agrees with the closed form.
        fw = np.asarray(weighting.min_norm_frank_wolfe(weighting.gram_matrix(_tree_grads([g1, g2])), max_iter=200))
        np.testing.assert_allclose(np.linalg.norm(fw @ np.stack([g1, g2])), norms.min(), rtol=1e-4, atol=1e-6)


def test_mgda_three_tasks_vs_simplex_grid():
    rng = np.random.default_rng(6)
    grads = rng.normal(size=(3, 4))
    weights = np.asarray(weighting.mgda_weights(_tree_grads(grads), max_iter=500))
    steps = np.linspace(0, 1, 201)
    a, b = np.meshgrid(steps, steps)
    keep = a + b <= 1
    simplex = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1)
    best = np.min(np.linalg.norm(simplex @ grads, axis=1))
    assert np.all(weights >= -1e-6) and abs(weights.sum() - 1) < 1e-5
    assert np.linalg.norm(weights @ grads) <= best + 1e-3


def test_balance_norm_pareto_and_value_and_grad():
    terms = {"x": jnp.float32(2.0), "y": jnp.float32(0.5)}
    total, used = weighting.balance(terms)
    assert float(total) == pytest.approx(1.25)
    total, used = weighting.norm(terms)
    assert float(total) == pytest.approx(2.0, rel=1e-6)
    with pytest.raises(ValueError):
        weighting.balance(terms, {"x": 1.0})

    def terms_fn(params, target):
        return {"first": jnp.sum((params["w"] - target) ** 2), "second": jnp.sum((params["w"] + target) ** 2)}

    params = {"w": jnp.array([0.3, -0.2])}
    target = jnp.array([1.0, 1.0])
    (total, values, weights), grads = jax.jit(weighting.pareto_value_and_grad(terms_fn))(params, target)
    g1 = jax.grad(lambda p: terms_fn(p, target)["first"])(params)["w"]
    g2 = jax.grad(lambda p: terms_fn(p, target)["second"])(params)["w"]
    expected = np.asarray(weighting.mgda_weights([g1, g2]))
    np.testing.assert_allclose([weights["first"], weights["second"]], expected, rtol=1e-5)
    np.testing.assert_allclose(grads["w"], expected[0] * g1 + expected[1] * g2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(total), expected[0] * values["first"] + expected[1] * values["second"],
                               rtol=1e-5)
    # The combined direction does not increase either term (MGDA descent property).
    assert float(jnp.dot(grads["w"], g1)) >= -1e-6 and float(jnp.dot(grads["w"], g2)) >= -1e-6
    # normalize='l2' folds the scale into the raw-term weights.
    total, used = weighting.pareto(values, {"first": g1, "second": g2}, normalize="l2")
    combined = used["first"] * g1 + used["second"] * g2
    assert float(jnp.dot(combined, g1)) >= -1e-6 and float(jnp.dot(combined, g2)) >= -1e-6


def test_pareto_through_hybrid_terms_with_skeleton():
    """MGDA over real loss terms (jacrev through the custom-gradient soft skeleton), as a train step does."""
    labels = jnp.zeros((1, 16, 16), jnp.int32).at[0, 4:12, 6:9].set(1)
    base = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 1))

    def terms_fn(params):
        logits = params["scale"] * base + params["shift"]
        _, terms = losses.hybrid_loss(logits, labels, weights={"tversky": 1.0, "cldice": 1.0},
                                      params={"cldice": {"iterations": 3}})
        return terms

    params = {"scale": jnp.float32(0.5), "shift": jnp.float32(-0.3)}
    (total, terms, weights), grads = jax.jit(weighting.pareto_value_and_grad(terms_fn))(params)
    assert np.isfinite(float(total)) and abs(float(sum(weights.values())) - 1) < 1e-5
    assert all(np.isfinite(float(g)) for g in jax.tree_util.tree_leaves(grads))
