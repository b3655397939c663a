"""Loss weighting (losses.weighting) against hand-written formulas, and in MorphoSeg's train step,
where the uncertainty term starts late and must not take part in any weighting before it does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neuroseg_jax import data, losses
from neuroseg_jax.losses import weighting
from neuroseg_jax.train import builders, sharding
from neuroseg_jax.train.config import validate_config

TERMS = {"a": jnp.float32(2.0), "b": jnp.float32(0.5), "c": jnp.float32(0.0)}
WEIGHTS = {"a": 0.3, "b": 0.3, "c": 0.4}


def test_balance_rescales_the_active_weights_to_the_configured_total():
    total, used = weighting.balance(TERMS, WEIGHTS)
    assert float(total) == pytest.approx(0.3 * 2.0 + 0.3 * 0.5)
    total, used = weighting.balance(TERMS, WEIGHTS, active={"c": jnp.bool_(False)})
    # Without c, a and b share the whole 1.0 as 0.5 / 0.5.
    assert [float(used[k]) for k in "abc"] == pytest.approx([0.5, 0.5, 0.0])
    assert float(total) == pytest.approx(0.5 * 2.0 + 0.5 * 0.5)


def test_norm_and_relative_match_the_papers_equations():
    # eq. 17: sum_i w_i L_i / |L_i| over the active terms.
    total, used = weighting.norm(TERMS, WEIGHTS, active={"c": jnp.bool_(False)})
    assert float(total) == pytest.approx(0.3 + 0.3, rel=1e-6)
    assert float(used["c"]) == 0.0
    # eq. 18: L_p + sum_{i != p} L_i / |L_i / L_p|, here with unit weights and primary a.
    terms = {"a": jnp.float32(2.0), "b": jnp.float32(0.5), "c": jnp.float32(8.0)}
    total, used = weighting.relative(terms, primary="a")
    assert float(total) == pytest.approx(2.0 + 0.5 / (0.5 / 2.0) + 8.0 / (8.0 / 2.0), rel=1e-6)
    total, _ = weighting.relative(terms, primary="a", active={"c": jnp.bool_(False)})
    assert float(total) == pytest.approx(4.0, rel=1e-6)
    # The gradient of each rescaled term is its own gradient times the stop-gradient ratio.
    grads = jax.grad(lambda x: weighting.relative({"a": x[0], "b": x[1] ** 2}, primary="a")[0])(
        jnp.array([2.0, 3.0]))
    np.testing.assert_allclose(grads, [1.0, 2.0 * 3.0 * 2.0 / 9.0], rtol=1e-6)
    with pytest.raises(ValueError, match="primary"):
        weighting.relative(terms, primary="d")


def _simplex_min_norm(vectors: np.ndarray) -> np.ndarray:
    """Min-norm convex combination by brute force over a fine simplex grid (2 or 3 vectors)."""
    steps = np.linspace(0, 1, 401)
    if len(vectors) == 2:
        candidates = np.stack([steps, 1 - steps], 1)
    else:
        a, b = np.meshgrid(steps, steps)
        keep = a + b <= 1
        candidates = np.stack([a[keep], b[keep], 1 - a[keep] - b[keep]], 1)
    return candidates[np.argmin(np.linalg.norm(candidates @ vectors, axis=1))]


@pytest.mark.parametrize("inactive", [0, 2])
def test_mgda_leaves_inactive_terms_out(inactive):
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(3, 6)).astype(np.float32)
    grads[inactive] = 0.0  # an inactive term's gradient is zero: alone it would be the min-norm point
    active = np.ones(3, bool)
    active[inactive] = False
    weights = np.asarray(weighting.mgda_weights(list(grads), active=jnp.asarray(active), max_iter=500))
    expected = _simplex_min_norm(grads[active])
    assert weights[inactive] == 0.0
    np.testing.assert_allclose(np.linalg.norm(weights @ grads), np.linalg.norm(expected @ grads[active]),
                               rtol=1e-3, atol=1e-5)
    # Two terms with one inactive: the other takes the whole weight.
    two = np.asarray(weighting.mgda_weights(list(grads[:2]), active=jnp.asarray([True, False])))
    assert two.tolist() == [1.0, 0.0]


def _morphoseg_trainer(weighting_name: str, start_step: int):
    from configs import morphoseg

    config = morphoseg.get_config(f"quick,weighting={weighting_name}")
    config.outliers.start_step = start_step
    config.model.dropout_rate = 0.0  # deterministic forward, so the test can recompute the gradients
    validate_config(config, jax.device_count(), jax.process_count())
    trainer = builders.build_trainer(config)
    batch = next(iter(data.make_loader(config.data, "train", batch_size=config.train.batch_size, seed=0)))
    return config, trainer, sharding.global_batch(batch, trainer.mesh)


@pytest.mark.parametrize("weighting_name", ["balance", "norm", "relative", "pareto"])
def test_every_weighting_learns_before_the_outliers_start(weighting_name):
    config, trainer, batch = _morphoseg_trainer(weighting_name, start_step=100)
    state, losses_seen = trainer.state, []
    for _ in range(4):
        before = jax.device_get(state.params)
        state, metrics = trainer.train_step(state, batch, trainer.step_rng)
        losses_seen.append(float(metrics["loss"]))
        assert float(metrics["grad_norm"]) > 1e-3, weighting_name
        assert float(metrics["weight/uncertainty"]) == 0.0
        moved = max(float(np.max(np.abs(a - b))) for a, b in
                    zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))))
        assert moved > 1e-5, weighting_name
    assert losses_seen[-1] < losses_seen[0], (weighting_name, losses_seen)


def test_balance_weights_add_up_to_one_before_and_after_the_start():
    config, trainer, batch = _morphoseg_trainer("balance", start_step=1)
    assert sum(config.loss.terms.values()) + config.outliers.weight == pytest.approx(1.0)
    state, first = trainer.train_step(trainer.state, batch, trainer.step_rng)
    _, second = trainer.train_step(state, batch, trainer.step_rng)
    assert [float(first[f"weight/{k}"]) for k in ("bce", "dice", "uncertainty")] == pytest.approx([0.5, 0.5, 0])
    assert [float(second[f"weight/{k}"]) for k in ("bce", "dice", "uncertainty")] == pytest.approx([0.3, 0.3, 0.4])


def test_pareto_step_uses_the_min_norm_point_of_the_segmentation_gradients():
    """The step's MGDA weights before the start equal a brute-force min-norm combination of the two
    segmentation gradients, each computed here by its own jax.grad through the model."""
    config, trainer, batch = _morphoseg_trainer("pareto", start_step=100)
    state = trainer.state
    dice_params = config.loss.params.dice.to_dict()

    def term_grad(term):
        def value(params):
            logits = state.apply_fn({"params": params}, batch["image"], train=True,
                                    rngs={"dropout": jax.random.key(0)})
            if term == "bce":
                return config.loss.terms.bce * losses.bce_loss(logits, batch["mask"])
            return config.loss.terms.dice * losses.dice_loss(logits, batch["mask"], **dice_params)

        grads = jax.grad(value)(state.params)
        return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(grads)])

    expected = _simplex_min_norm(np.stack([term_grad("bce"), term_grad("dice")]))
    _, metrics = trainer.train_step(state, batch, trainer.step_rng)  # donates the state: last
    got = np.array([float(metrics["weight/bce"]) / config.loss.terms.bce,
                    float(metrics["weight/dice"]) / config.loss.terms.dice])
    np.testing.assert_allclose(got, expected, atol=5e-3)
    assert float(metrics["weight/uncertainty"]) == 0.0
