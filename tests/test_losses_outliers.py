"""Tests of neuroseg_jax.losses.outliers (virtual outlier synthesis) and losses.weighting (MGDA etc.)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy.stats import multivariate_normal

from neuroseg_jax.losses import outliers, weighting


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
    np.testing.assert_allclose(cov, np.cov(centred.T, bias=True) + 0.01 * np.eye(3), rtol=1e-4, atol=1e-5)


def test_selected_samples_are_the_lowest_likelihood():
    rng = np.random.default_rng(1)
    buffers = outliers.update_buffers(outliers.init_buffers(2, 64, 2),
                                      jnp.asarray(rng.normal(size=(128, 2)), jnp.float32) * jnp.array([1.0, 3.0]),
                                      jnp.arange(128) % 2)
    key = jax.random.PRNGKey(3)
    sample = jax.jit(outliers.sample_outliers, static_argnames=("num_candidates", "num_selected", "ridge"))
    everything = sample(buffers, key, num_candidates=500, num_selected=500, ridge=1e-3)
    chosen = sample(buffers, key, num_candidates=500, num_selected=40, ridge=1e-3)
    means, cov = outliers.class_gaussians(buffers, 1e-3)
    for klass in range(2):
        density = multivariate_normal(np.asarray(means[klass]), np.asarray(cov))
        all_logpdf = density.logpdf(np.asarray(everything.samples[klass]))
        chosen_logpdf = density.logpdf(np.asarray(chosen.samples[klass]))
        np.testing.assert_allclose(chosen.log_likelihood[klass], chosen_logpdf, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.sort(chosen_logpdf), np.sort(all_logpdf)[:40], rtol=1e-4, atol=1e-4)
    assert bool(jnp.all(chosen.valid))


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


def test_uncertainty_and_vos_losses_are_finite_and_differentiable():
    labels = jnp.zeros((2, 8, 8), jnp.int32).at[:, 2:5, 2:6].set(1)
    for num_logits, placement in ((1, "replace"), (2, "shift")):
        logits = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, num_logits))
        sampled = _sampled(labels, num_logits)

        @jax.jit
        def losses_and_grads(x):
            uncertainty = jax.value_and_grad(lambda z: outliers.uncertainty_loss(
                z, labels, sampled, jax.random.PRNGKey(5), beta1=0.5, beta2=0.5, placement=placement))(x)
            return uncertainty, jax.value_and_grad(lambda z: outliers.vos_energy_loss(z, sampled))(x)

        for value, grad in losses_and_grads(logits):
            assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))
            assert float(jnp.abs(grad).sum()) > 0


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
    from neuroseg_jax import losses

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
