"""Tests of neuroseg_jax.losses (tiny shapes; references re-derived with numpy/scipy/scikit-image)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy import ndimage
from skimage.morphology import skeletonize

from neuroseg_jax import losses

SHAPE = (2, 32, 32)


def _disk_labels() -> np.ndarray:
    """Two images: a filled disk and a thin diagonal bar (plus an empty corner)."""
    yy, xx = np.mgrid[:32, :32]
    disk = ((yy - 14) ** 2 + (xx - 15) ** 2 <= 8 ** 2)
    bar = (np.abs(yy - xx) <= 2) & (yy > 3) & (yy < 28)
    return np.stack([disk, bar]).astype(np.int32)


LABELS = jnp.asarray(_disk_labels())


def _perfect_logits(labels: jax.Array, num_classes: int = 1, scale: float = 20.0) -> jax.Array:
    if num_classes == 1:
        return (scale * (2.0 * labels - 1.0))[..., None].astype(jnp.float32)
    return scale * jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _noisy_logits(num_classes: int = 1, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), SHAPE + (num_classes,), jnp.float32)


# dice_cldice is the fixed mix of two other terms (checked in its own test); leaving it out of the shared
# compiled helper saves one soft skeleton per compilation.
ALL_TERMS = sorted(set(losses.LOSS_TERMS) - {"dice_cldice"})


@jax.jit
def _terms_and_grad(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[dict, jax.Array]:
    """Every term, and the gradient of their unweighted sum w.r.t. the logits (a NaN/Inf in any term's
    gradient shows in the sum). One compiled function per shape keeps the file fast."""
    weights = {name: 1.0 for name in ALL_TERMS}
    (_, terms), grad = jax.value_and_grad(
        lambda x: losses.hybrid_loss(x, labels, weights=weights, mask=mask), has_aux=True)(logits)
    return terms, grad


def _terms(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> dict:
    mask = jnp.ones(labels.shape, jnp.int32) if mask is None else mask
    return _terms_and_grad(logits, labels, mask)[0]


@pytest.mark.parametrize("num_classes, dtype", [(1, jnp.float32), (1, jnp.bfloat16), (3, jnp.float32)])
def test_every_term_jits_with_finite_grad_and_matches_eager(num_classes, dtype):
    labels = LABELS if num_classes == 1 else LABELS * 2
    logits = _noisy_logits(num_classes).astype(dtype)
    terms, grads = _terms_and_grad(logits, labels, jnp.ones(labels.shape, jnp.int32))
    assert set(terms) == set(ALL_TERMS)
    for name in ALL_TERMS:
        assert terms[name].dtype == jnp.float32
        assert np.isfinite(float(terms[name])), name
    assert grads.dtype == dtype
    assert np.all(np.isfinite(np.asarray(grads, np.float32)))
    if num_classes == 1 and dtype == jnp.float32:  # eager dispatch compiles op by op: check cheap terms
        for name in ("dice", "tversky", "focal", "bce"):
            eager = losses.LOSS_TERMS[name](logits, labels)
            np.testing.assert_allclose(float(terms[name]), float(eager), rtol=1e-5, atol=1e-6)


EDGE_CASES = {
    "empty_gt_noisy": (jnp.zeros(SHAPE, jnp.int32), _noisy_logits()),
    "empty_gt_empty_pred": (jnp.zeros(SHAPE, jnp.int32), jnp.full(SHAPE + (1,), -1e4, jnp.float32)),
    "empty_gt_full_pred": (jnp.zeros(SHAPE, jnp.int32), jnp.full(SHAPE + (1,), 1e4, jnp.float32)),
    "all_foreground": (jnp.ones(SHAPE, jnp.int32), _noisy_logits()),
    "extreme_wrong": (LABELS, -_perfect_logits(LABELS, scale=1e4)),
    "extreme_right": (LABELS, _perfect_logits(LABELS, scale=1e4)),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_finite(case):
    labels, logits = EDGE_CASES[case]
    for num_classes in (1, 2):
        if num_classes == 2:
            logits = jnp.concatenate([jnp.zeros_like(logits[..., :1]), logits[..., :1]], axis=-1)
        values, grad = _terms_and_grad(logits, labels, jnp.ones(labels.shape, jnp.int32))
        assert np.all(np.isfinite(np.asarray(grad))), (case, num_classes)
        for name in ALL_TERMS:
            assert np.isfinite(float(values[name])), (case, name, num_classes)
            assert float(values[name]) >= -1e-6, (case, name)


def test_empty_vs_empty_is_perfect():
    labels = jnp.zeros(SHAPE, jnp.int32)
    logits = jnp.full(SHAPE + (1,), -1e4, jnp.float32)
    values = _terms(logits, labels)
    for name in ("dice", "tversky", "focal_tversky", "cldice", "boundary", "bce", "focal"):
        assert float(values[name]) < 1e-4, name


@pytest.mark.parametrize("num_classes", [1, 3])
def test_perfect_is_zero_and_worse_is_worse(num_classes):
    labels = LABELS if num_classes == 1 else LABELS * 2
    perfect = _perfect_logits(labels, num_classes)
    noisy = perfect + 25.0 * _noisy_logits(num_classes, seed=3)
    # Worst: every pixel confidently assigned to another class.
    inverted = -perfect if num_classes == 1 else _perfect_logits((labels + 1) % num_classes, num_classes)
    results = [_terms(x, labels) for x in (perfect, noisy, inverted)]
    for name in ALL_TERMS:
        best, mid, worst = (float(r[name]) for r in results)
        assert best < 1e-3, (name, best)
        assert best < mid < worst, (name, best, mid, worst)


def test_reduction_none_gives_per_image_and_mask_ignores_pixels():
    logits = _noisy_logits()
    for name in ("dice", "boundary", "focal"):
        per_image_fn = jax.jit(functools.partial(losses.LOSS_TERMS[name], reduction="none"))
        per_image = per_image_fn(logits, LABELS)
        assert per_image.shape == (2,)
        first = per_image_fn(logits[:1], LABELS[:1])
        np.testing.assert_allclose(per_image[0], first[0], rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        losses.dice_loss(logits, LABELS, reduction="sum")
    # Pixels outside the mask do not matter: change them arbitrarily.
    mask = jnp.zeros(SHAPE, jnp.int32).at[:, 8:24, 8:24].set(1)
    changed = jnp.where(mask[..., None] > 0, logits, 50.0)
    original, modified = _terms(logits, LABELS, mask), _terms(changed, LABELS, mask)
    for name in ALL_TERMS:
        np.testing.assert_allclose(float(original[name]), float(modified[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_sigmoid_k1_equals_softmax_k2_without_background():
    x = _noisy_logits()
    two = jnp.concatenate([jnp.zeros_like(x), x], axis=-1)  # softmax([0, x])[1] == sigmoid(x)
    one_channel, two_channels = _terms(x, LABELS), _terms(two, LABELS)
    for name in ALL_TERMS:
        np.testing.assert_allclose(float(one_channel[name]), float(two_channels[name]), rtol=1e-5, err_msg=name)


def test_dice_matches_numpy_and_tversky_half_equals_plain_dice():
    logits = _noisy_logits()
    p = 1 / (1 + np.exp(-np.asarray(logits[..., 0], np.float64)))
    g = np.asarray(LABELS, np.float64)
    eps = 1.0
    expected = 1 - (2 * (p * g).sum() + eps) / ((p ** 2).sum() + (g ** 2).sum() + eps)
    np.testing.assert_allclose(float(losses.dice_loss(logits, LABELS, epsilon=eps)), expected, rtol=1e-5)
    per_image = [1 - (2 * (p[i] * g[i]).sum() + eps) / (p[i].sum() + g[i].sum() + eps) for i in range(2)]
    np.testing.assert_allclose(losses.dice_loss(logits, LABELS, squared=False, reduction="none"), per_image,
                               rtol=1e-5)
    tversky = losses.tversky_loss(logits, LABELS, alpha=0.5, beta=0.5, epsilon=0.5, reduction="none")
    plain = losses.dice_loss(logits, LABELS, squared=False, epsilon=1.0, reduction="none")
    np.testing.assert_allclose(tversky, plain, rtol=1e-5)
    # alpha weighs false positives, beta false negatives.
    over = jnp.full(SHAPE + (1,), 5.0)  # everything foreground: only FPs
    fp_heavy = losses.tversky_loss(over, LABELS, alpha=0.9, beta=0.1)
    fp_light = losses.tversky_loss(over, LABELS, alpha=0.1, beta=0.9)
    assert float(fp_heavy) > float(fp_light)
    gamma = 0.75
    np.testing.assert_allclose(float(losses.focal_tversky_loss(logits, LABELS, gamma=gamma)),
                               float(losses.tversky_loss(logits, LABELS)) ** gamma, rtol=1e-5)


def test_focal_matches_numpy_formula():
    logits = _noisy_logits(seed=5) * 3
    x = np.asarray(logits[..., 0], np.float64)
    g = np.asarray(LABELS)
    p = 1 / (1 + np.exp(-x))
    pt = np.where(g == 1, p, 1 - p)
    at = np.where(g == 1, 0.8, 0.2)
    expected = np.mean(-at * (1 - pt) ** 3 * np.log(pt))
    np.testing.assert_allclose(float(losses.focal_loss(logits, LABELS, alpha=0.8, gamma=3.0)), expected, rtol=1e-5)
    # Multiclass with per-class alpha.
    logits3 = _noisy_logits(3, seed=6) * 2
    labels3 = LABELS * 2
    z = np.asarray(logits3, np.float64)
    prob = np.exp(z - z.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    pt3 = np.take_along_axis(prob, np.asarray(labels3)[..., None], -1)[..., 0]
    alpha = np.array([0.2, 0.5, 0.9])
    expected3 = np.mean(-alpha[np.asarray(labels3)] * (1 - pt3) ** 2 * np.log(pt3))
    np.testing.assert_allclose(float(losses.focal_loss(logits3, labels3, alpha=alpha.tolist(), gamma=2.0)),
                               expected3, rtol=1e-5)
    # gamma = 0 without alpha is cross-entropy.
    np.testing.assert_allclose(float(losses.focal_loss(logits, LABELS, alpha=None, gamma=0.0)),
                               float(losses.bce_loss(logits, LABELS)), rtol=1e-6)
    np.testing.assert_allclose(float(losses.bce_loss(logits, LABELS)),
                               np.mean(-np.log(pt)), rtol=1e-5)


@pytest.mark.parametrize("width", [1, 2])
def test_contour_weights_match_scipy_erosion(width):
    labels = np.array(LABELS)
    labels[1, 0:6, 0:10] = 1  # object touching the image border
    weights = losses.contour_weights(jnp.asarray(labels), width=width, w=4.0)
    expected = np.stack([
        m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3)), iterations=width, border_value=1)
        for m in labels.astype(bool)])
    np.testing.assert_array_equal(np.asarray(weights), 1.0 + 4.0 * expected)
    # Multiclass: each foreground class eroded separately.
    multi = np.zeros((1, 16, 16), np.int32)
    multi[0, 2:14, 2:8] = 1
    multi[0, 2:14, 8:14] = 2
    contour = np.asarray(losses.contour_map(jnp.asarray(multi), 3))
    expected_multi = np.zeros((16, 16), bool)
    for klass in (1, 2):
        m = multi[0] == klass
        expected_multi |= m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3)), border_value=1)
    np.testing.assert_array_equal(contour[0], expected_multi)


def test_boundary_loss_matches_numpy():
    logits = _noisy_logits(seed=7)
    w = np.asarray(losses.contour_weights(LABELS, width=1, w=5.0), np.float64)
    p = 1 / (1 + np.exp(-np.asarray(logits[..., 0], np.float64)))
    g = np.asarray(LABELS, np.float64)
    wbce = np.mean(-w * (g * np.log(p) + (1 - g) * np.log(1 - p)))
    wdice = 1 - (2 * (w * p * g).sum() + 1) / ((w * p * p).sum() + (w * g * g).sum() + 1)
    np.testing.assert_allclose(float(losses.boundary_loss(logits, LABELS)), wbce + wdice, rtol=1e-5)


def test_soft_morphology_matches_scipy_grey_morphology():
    x = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (1, 12, 14, 2)))
    cross = ndimage.generate_binary_structure(2, 1)
    eroded = np.stack([ndimage.grey_erosion(x[0, ..., c], footprint=cross, mode="nearest") for c in range(2)], -1)
    dilated = np.stack([ndimage.grey_dilation(x[0, ..., c], size=(3, 3), mode="nearest") for c in range(2)], -1)
    np.testing.assert_allclose(np.asarray(losses.soft_erode(jnp.asarray(x)))[0], eroded, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(losses.soft_dilate(jnp.asarray(x)))[0], dilated, rtol=1e-6)


def _reference_skeleton(x: jax.Array, iterations: int) -> jax.Array:
    """Shit et al.'s algorithm written plainly: pooling ops, erosion recomputed, default autodiff."""
    def erode(v):
        rows = jax.lax.reduce_window(v, jnp.inf, jax.lax.min, (1, 3, 1, 1), (1, 1, 1, 1), "SAME")
        cols = jax.lax.reduce_window(v, jnp.inf, jax.lax.min, (1, 1, 3, 1), (1, 1, 1, 1), "SAME")
        return jnp.minimum(rows, cols)

    def dilate(v):
        return jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")

    skeleton = jax.nn.relu(x - dilate(erode(x)))
    for _ in range(iterations):
        x = erode(x)
        delta = jax.nn.relu(x - dilate(erode(x)))
        skeleton = skeleton + jax.nn.relu(delta - skeleton * delta)
    return skeleton


def test_soft_skeleton_and_custom_gradient_match_reference():
    x = jax.random.uniform(jax.random.PRNGKey(2), (1, 12, 14, 2))  # no ties: gradients are unique
    weights = jax.random.normal(jax.random.PRNGKey(3), x.shape)

    @jax.jit
    def values_and_grads(v):
        ours = jax.value_and_grad(lambda u: jnp.sum(losses.soft_skeleton(u, 2) * weights))(v)
        reference = jax.value_and_grad(lambda u: jnp.sum(_reference_skeleton(u, 2) * weights))(v)
        return ours, reference, losses.soft_skeleton(v, 2), _reference_skeleton(v, 2)

    (value, grad), (value_ref, grad_ref), skeleton, skeleton_ref = values_and_grads(x)
    np.testing.assert_allclose(skeleton, skeleton_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_soft_skeleton_hard_limit_is_thin_and_inside_mask():
    masks = np.asarray(LABELS).astype(bool)
    skeleton = np.asarray(losses.soft_skeleton(jnp.asarray(masks, jnp.float32)[..., None], iterations=10))[..., 0]
    assert skeleton.min() >= 0 and skeleton.max() <= 1 + 1e-6
    for mask, skel in zip(masks, skeleton):
        on = skel > 0.5
        assert on.any()
        assert not (on & ~mask).any(), "skeleton leaves the mask"
        assert on.sum() < 0.35 * mask.sum(), "skeleton is not thin"
        reference = skeletonize(mask)
        # Every scikit-image skeleton pixel lies within 2 pixels of the soft skeleton, and vice versa.
        near_soft = ndimage.binary_dilation(on, iterations=2)
        near_reference = ndimage.binary_dilation(reference, iterations=2)
        assert (reference & near_soft).sum() >= 0.8 * reference.sum()
        assert (on & near_reference).sum() >= 0.8 * on.sum()


def test_cldice_single_channel_and_topology_sensitivity():
    labels = jnp.asarray(_disk_labels()[1:])  # thin bar
    perfect = _perfect_logits(labels)
    broken = perfect.at[0, 14:17, :, 0].set(-20.0)  # cut the bar: small area, broken topology
    thinner = jnp.where(ndimage.binary_erosion(np.asarray(labels[0]))[None, ..., None], perfect, -20.0)
    loss = lambda x: float(losses.cldice_loss(x, labels, iterations=5))
    assert loss(perfect) < 1e-3
    assert loss(broken) > 0.02
    dice = lambda x: float(losses.dice_loss(x, labels))
    # clDice penalises the cut more than the thinning relative to Dice.
    assert loss(broken) / dice(broken) > loss(thinner) / max(dice(thinner), 1e-6)


def test_dice_cldice_is_the_mix_of_dice_and_cldice():
    logits = _noisy_logits(seed=9)
    mixed, dice, cldice = jax.jit(lambda x: (losses.dice_cldice_loss(x, LABELS, alpha=0.3, iterations=4),
                                             losses.dice_loss(x, LABELS),
                                             losses.cldice_loss(x, LABELS, iterations=4)))(logits)
    np.testing.assert_allclose(float(mixed), 0.7 * float(dice) + 0.3 * float(cldice), rtol=1e-6)


def test_hybrid_total_params_and_errors():
    logits = _noisy_logits()
    total, terms = losses.hybrid_loss(logits, LABELS, weights=losses.IMSAHLO_WEIGHTS,
                                      params={"tversky": {"alpha": 0.5, "beta": 0.5}, "cldice": {"iterations": 3}})
    expected = sum(losses.IMSAHLO_WEIGHTS[n] * float(terms[n]) for n in terms)
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
    np.testing.assert_allclose(float(terms["tversky"]),
                               float(losses.tversky_loss(logits, LABELS, alpha=0.5, beta=0.5)), rtol=1e-6)
    np.testing.assert_allclose(float(terms["cldice"]), float(losses.cldice_loss(logits, LABELS, iterations=3)),
                               rtol=1e-6)
    _, skipped = losses.hybrid_loss(logits, LABELS, weights={"dice": 1.0, "bce": 0.0})
    assert set(skipped) == {"dice"}
    for name, weights in losses.IMSAHLO_ABLATIONS.items():
        assert abs(sum(weights.values()) - 1.0) < 1e-6, name
    with pytest.raises(ValueError, match="unknown loss term"):
        losses.hybrid_loss(logits, LABELS, weights={"diceee": 1.0})
    with pytest.raises(ValueError, match="no weight"):
        losses.hybrid_loss(logits, LABELS, weights={"dice": 1.0}, params={"focal": {"gamma": 2.0}})
    with pytest.raises(ValueError, match="bad parameters"):
        losses.hybrid_loss(logits, LABELS, weights={"dice": 1.0}, params={"dice": {"gamma": 2.0}})
    with pytest.raises(ValueError, match="labels must have shape"):
        losses.dice_loss(logits, LABELS[0])


# ---------------------------------------------------------------- boundary term: touching-cells weights


def _reference_boundary_loss(logits: np.ndarray, labels: np.ndarray, touching: np.ndarray) -> float:
    """IMSAHLO eqs. 6-8 in float64 with w = 1 + 5 * (mask minus its 3x3 erosion, border 1) + touching."""
    masks = labels.astype(bool)
    contour = np.stack([m & ~ndimage.binary_erosion(m, structure=np.ones((3, 3)), border_value=1) for m in masks])
    w = 1.0 + 5.0 * contour + touching
    p = 1 / (1 + np.exp(-logits[..., 0].astype(np.float64)))
    g = labels.astype(np.float64)
    wbce = np.mean(-w * (g * np.log(p) + (1 - g) * np.log(1 - p)))
    wdice = 1 - (2 * (w * p * g).sum() + 1) / ((w * p * p).sum() + (w * g * g).sum() + 1)
    return wbce + wdice


def test_boundary_loss_adds_touching_weights_like_numpy():
    labels = np.zeros((1, 6, 7), np.int32)
    labels[0, 1:5, 1:3] = 1  # two cells with a one-pixel background column between them
    labels[0, 1:5, 4:6] = 1
    touching = np.zeros((1, 6, 7), np.float32)
    touching[0, 1:5, 3] = 9.23
    touching[0, 0, 3] = 4.0
    logits = np.asarray(jax.random.normal(jax.random.PRNGKey(11), (1, 6, 7, 1)), np.float32)
    loss = jax.jit(losses.boundary_loss)(jnp.asarray(logits), jnp.asarray(labels),
                                        touching_weights=jnp.asarray(touching))
    np.testing.assert_allclose(float(loss), _reference_boundary_loss(logits, labels, touching), rtol=1e-5)
    without = float(losses.boundary_loss(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(without, _reference_boundary_loss(logits, labels, 0 * touching), rtol=1e-5)
    assert abs(float(loss) - without) > 1e-3
    with pytest.raises(ValueError, match="touching_weights must have"):
        losses.boundary_loss(jnp.asarray(logits), jnp.asarray(labels), touching_weights=jnp.asarray(touching[0]))


def test_hybrid_routes_touching_weights_to_the_boundary_term_and_the_cross_entropy():
    logits = _noisy_logits(seed=4)
    touching = jax.random.uniform(jax.random.PRNGKey(5), SHAPE) * 10.0 * (LABELS == 0)
    weights = {"boundary": 0.5, "bce": 0.5, "dice": 0.25}
    _, plain = losses.hybrid_loss(logits, LABELS, weights=weights)
    total, terms = losses.hybrid_loss(logits, LABELS, weights=weights, touching_weights=touching)
    np.testing.assert_allclose(float(terms["dice"]), float(plain["dice"]), rtol=1e-6)
    p = 1 / (1 + np.exp(-np.asarray(logits[..., 0], np.float64)))
    g = np.asarray(LABELS, np.float64)
    weighted_bce = np.mean(-(1 + np.asarray(touching, np.float64)) * (g * np.log(p) + (1 - g) * np.log(1 - p)))
    np.testing.assert_allclose(float(terms["bce"]), weighted_bce, rtol=1e-5)
    expected = _reference_boundary_loss(np.asarray(logits), np.asarray(LABELS), np.asarray(touching, np.float64))
    np.testing.assert_allclose(float(terms["boundary"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(total), 0.5 * float(terms["boundary"]) + 0.5 * float(terms["bce"])
                               + 0.25 * float(terms["dice"]), rtol=1e-6)
    for term in ("touching_weights", "pixel_weights"):
        with pytest.raises(ValueError, match=term):
            losses.hybrid_loss(logits, LABELS, weights=weights, params={"bce": {term: touching}})


@pytest.mark.parametrize("case", ["objects", "empty"])
def test_three_class_cross_entropy_with_touching_weights(case):
    """Softmax CE weighted by 1 + touching weights (instance mode), against numpy's log-softmax."""
    labels = jax.random.randint(jax.random.PRNGKey(6), SHAPE, 0, 3) if case == "objects" \
        else jnp.zeros(SHAPE, jnp.int32)
    touching = 10.0 * (jax.random.uniform(jax.random.PRNGKey(7), SHAPE) > 0.8) * (labels == 2)
    logits = 3.0 * jax.random.normal(jax.random.PRNGKey(8), SHAPE + (3,))
    value, grad = jax.jit(jax.value_and_grad(lambda x: losses.hybrid_loss(
        x, labels, weights={"bce": 1.0}, touching_weights=touching)[0]))(logits)
    shifted = np.asarray(logits, np.float64) - np.asarray(logits, np.float64).max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    log_pt = np.take_along_axis(log_softmax, np.asarray(labels)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(value), np.mean(-(1 + np.asarray(touching)) * log_pt), rtol=1e-5)
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("case", ["cells", "empty"])
def test_boundary_loss_with_touching_weights_jit_grad_finite(case):
    labels = LABELS if case == "cells" else jnp.zeros(SHAPE, jnp.int32)
    touching = 10.0 * jax.random.uniform(jax.random.PRNGKey(2), SHAPE) * (labels == 0)
    mask = jnp.ones(SHAPE, jnp.int32).at[:, :4].set(0)
    for logits in (_noisy_logits(seed=1), jnp.full(SHAPE + (1,), -1e4), jnp.full(SHAPE + (1,), 1e4)):
        value, grad = jax.jit(jax.value_and_grad(
            lambda x: losses.boundary_loss(x, labels, touching_weights=touching, mask=mask)))(logits)
        assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all(), case


def test_boundary_training_run_feeds_touching_weights(tmp_path, monkeypatch):
    from conftest import tiny_train_config
    from neuroseg_jax import train
    from neuroseg_jax.train import builders, sharding

    config = tiny_train_config(loss="tversky+boundary", **{"train.num_steps": 2, "train.eval_every": 2,
                                                          "data.synthetic.dense_fraction": 1.0})
    assert builders.needs_touching_weights(config.loss) and not builders.needs_touching_weights(
        tiny_train_config().loss)
    seen = []
    real_global_batch = sharding.global_batch

    def recording(batch, mesh):
        seen.append(batch)
        return real_global_batch(batch, mesh)

    monkeypatch.setattr(sharding, "global_batch", recording)
    val = train.train_and_evaluate(config, tmp_path)
    assert np.isfinite(val["loss"])
    train_batches, val_batches = [b for b in seen if "weight" not in b], [b for b in seen if "weight" in b]
    assert len(train_batches) == 2 and val_batches
    assert all("touching_weight" in batch for batch in seen)
    assert max(float(batch["touching_weight"].max()) for batch in train_batches) > 1.0
