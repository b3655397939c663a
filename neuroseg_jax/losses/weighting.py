"""Combining several loss terms: Balance, Norm, Relative and Pareto (MGDA) weighting (MorphoSeg §5.4).

- :func:`balance`: fixed weights (MorphoSeg "Original Balancing"; equal weights by default).
- :func:`norm`: each term divided by its own stop-gradient magnitude, sum_i w_i L_i / (|L_i| + eps)
  (MorphoSeg eq. 17): every term contributes value ~w_i and a gradient of relative size.
- :func:`relative`: MorphoSeg eq. 18 (which the paper calls L_pareto): the primary term as it is, every
  other term rescaled to the primary's magnitude, L_p + sum_i L_i |L_p| / |L_i|.
- :func:`pareto`: the multiple-gradient descent algorithm (MGDA) of Sener & Koltun 2018: weights
  w on the simplex minimising |sum_i w_i g_i|^2 for the per-term gradients g_i, computed from their
  Gram matrix: closed form for two terms (their Alg. 1), Frank-Wolfe for more (their Alg. 2). The
  combined gradient sum_i w_i g_i is a common descent direction for all terms (or zero at a Pareto-
  stationary point). MorphoSeg's public code only ever uses equal weights here; this is the real thing.

From a train step, either compute per-term gradients yourself and call :func:`pareto` /
:func:`mgda_weights`, or wrap a function returning the terms with :func:`pareto_value_and_grad`, which
does one forward pass, one reverse pass per term (``jax.jacrev``) and returns the combined gradient.
Everything is jittable; the number of terms is static.

Terms that are not active yet (MorphoSeg's uncertainty term before its start epoch is a constant 0 with
a zero gradient) must not take part in any weighting: MGDA's min-norm point would be that zero
gradient, and fixed weights would shrink the step of the active terms. Every function takes
``active``, a mapping from term name to a (traced) boolean; inactive terms get weight 0, and the
remaining weights are those the active terms would get on their own.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

PyTree = Any


def _active_mask(names: Sequence[str], active: Mapping[str, jax.Array] | None) -> jax.Array:
    """(n,) bool: which of ``names`` take part (all where ``active`` is None or does not name them)."""
    if active is None:
        return jnp.ones((len(names),), bool)
    unknown = sorted(set(active) - set(names))
    if unknown:
        raise ValueError(f"active names term(s) {unknown} that are not loss terms {sorted(names)}")
    return jnp.stack([jnp.asarray(active.get(name, True), bool) for name in names])


def _weighted_sum(losses: Mapping[str, jax.Array], used: Mapping[str, jax.Array]) -> jax.Array:
    return sum(used[name] * jnp.asarray(value, jnp.float32) for name, value in losses.items())


def balance(losses: Mapping[str, jax.Array], weights: Mapping[str, float] | None = None, *,
            active: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Fixed-weight sum sum_i w_i L_i; weights default to 1/n each. Returns (total, weights used).

    With inactive terms the active weights are scaled by sum_i w_i / sum_{i active} w_i, so the
    weights in use always add up to the configured total and the step size does not jump when a
    term starts.
    """
    if not losses:
        raise ValueError("balance needs at least one loss term")
    if weights is None:
        weights = {name: 1.0 / len(losses) for name in losses}
    missing = sorted(set(losses) - set(weights))
    if missing:
        raise ValueError(f"balance weights missing for term(s) {missing}; given {sorted(weights)}")
    names = list(losses)
    on = _active_mask(names, active).astype(jnp.float32)
    configured = jnp.asarray([weights[name] for name in names], jnp.float32)
    kept = configured * on
    scaled = kept * jnp.sum(configured) / jnp.maximum(jnp.sum(kept), 1e-12)
    used = {name: scaled[i] for i, name in enumerate(names)}
    return _weighted_sum(losses, used), used


def norm(losses: Mapping[str, jax.Array], weights: Mapping[str, float] | None = None, *, epsilon: float = 1e-8,
         active: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Normalised sum sum_i w_i L_i / (stop_gradient(|L_i|) + eps) (MorphoSeg eq. 17, eps inside the ratio).

    ``weights`` (default 1) scale the normalised terms. Returns (total, effective weights w_i / (|L_i| + eps)).
    """
    if not losses:
        raise ValueError("norm needs at least one loss term")
    names = list(losses)
    on = _active_mask(names, active)
    used = {}
    for i, name in enumerate(names):
        magnitude = jax.lax.stop_gradient(jnp.abs(jnp.asarray(losses[name], jnp.float32)))
        scale = 1.0 if weights is None else weights[name]
        used[name] = jnp.where(on[i], scale / (magnitude + epsilon), 0.0)
    return _weighted_sum(losses, used), used


def relative(losses: Mapping[str, jax.Array], weights: Mapping[str, float] | None = None, *, primary: str,
             epsilon: float = 1e-8,
             active: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MorphoSeg eq. 18: L_p + sum_{i != p} L_i / |L_i / L_p| (magnitudes taken with stop_gradient).

    Every other term is brought to the primary term's magnitude, so each pulls as hard as the primary
    does whatever its own scale. ``weights`` (default 1) multiply the terms, the primary included.
    Returns (total, effective weights).
    """
    if primary not in losses:
        raise ValueError(f"relative weighting: primary term {primary!r} is not among {sorted(losses)}")
    names = list(losses)
    on = _active_mask(names, active)
    magnitude = {name: jax.lax.stop_gradient(jnp.abs(jnp.asarray(value, jnp.float32)))
                 for name, value in losses.items()}
    used = {}
    for i, name in enumerate(names):
        scale = 1.0 if weights is None else weights[name]
        ratio = 1.0 if name == primary else magnitude[primary] / (magnitude[name] + epsilon)
        used[name] = jnp.where(on[i], scale * ratio, 0.0)
    return _weighted_sum(losses, used), used


def gram_matrix(grads: Sequence[PyTree]) -> jax.Array:
    """(n, n) float32 inner products <g_i, g_j> of n gradient pytrees with the same structure."""
    flats = [jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree_util.tree_leaves(g)])
             for g in grads]
    stacked = jnp.stack(flats)
    return stacked @ stacked.T


def min_norm_two(gram: jax.Array) -> jax.Array:
    """Closed-form min-norm weights (gamma, 1 - gamma) for two gradients (Sener & Koltun 2018, Alg. 1).

    gamma = clip(<g2 - g1, g2> / |g1 - g2|^2, 0, 1) minimises |gamma g1 + (1 - gamma) g2|^2.
    """
    g11, g12, g22 = gram[0, 0], gram[0, 1], gram[1, 1]
    denominator = g11 - 2.0 * g12 + g22
    gamma = jnp.where(denominator > 1e-20, (g22 - g12) / jnp.maximum(denominator, 1e-20), 0.5)
    gamma = jnp.clip(gamma, 0.0, 1.0)
    return jnp.stack([gamma, 1.0 - gamma])


def min_norm_frank_wolfe(gram: jax.Array, *, max_iter: int = 50, active: jax.Array | None = None) -> jax.Array:
    """Min-norm point of the convex hull of n gradients by Frank-Wolfe (Sener & Koltun 2018, Alg. 2).

    Starts from uniform weights over the ``active`` gradients ((n,) bool, default all); each
    iteration moves toward the active vertex e_t with the smallest (G w)_t using the exact line
    search of the two-point problem, so inactive gradients keep weight 0. Fixed iteration count
    (jittable).
    """
    count = gram.shape[0]
    on = jnp.ones((count,), bool) if active is None else active
    weights = on.astype(jnp.float32) / jnp.maximum(jnp.sum(on), 1)

    def step(_, weights):
        gw = gram @ weights
        target = jnp.argmin(jnp.where(on, gw, jnp.inf))
        a = weights @ gw  # |v|^2 for the current point v = sum w g
        b = gw[target]  # <v, g_t>
        c = gram[target, target]  # |g_t|^2
        denominator = a - 2.0 * b + c
        gamma = jnp.where(denominator > 1e-20, (c - b) / jnp.maximum(denominator, 1e-20), 1.0)
        gamma = jnp.clip(gamma, 0.0, 1.0)
        return gamma * weights + (1.0 - gamma) * jax.nn.one_hot(target, count, dtype=jnp.float32)

    return jax.lax.fori_loop(0, max_iter, step, weights)


def mgda_weights(grads: Sequence[PyTree], *, normalize: str | None = None,
                 losses: Sequence[jax.Array] | None = None, max_iter: int = 50,
                 active: jax.Array | None = None) -> jax.Array:
    """MGDA simplex weights (n,) for n per-term gradient pytrees (Sener & Koltun 2018).

    Args:
      grads: per-term gradients, same pytree structure.
      normalize: None, 'l2' (each g_i / |g_i|) or 'loss' (each g_i / L_i, needs ``losses``), the gradient
        normalisations of Sener & Koltun §3.3. The returned weights apply to the normalised gradients;
        :func:`pareto` folds the scale into the weights of the raw terms.
      max_iter: Frank-Wolfe iterations for n > 2.
      active: optional (n,) bool; inactive gradients get weight 0 and the others share the simplex.
    """
    if len(grads) < 1:
        raise ValueError("mgda_weights needs at least one gradient")
    gram = gram_matrix(grads)
    scale = _normalization(gram, normalize, losses)
    gram = gram / (scale[:, None] * scale[None, :])
    if len(grads) == 1:
        return jnp.ones((1,), jnp.float32)
    if len(grads) == 2:
        weights = min_norm_two(gram)
        if active is None:
            return weights
        # With one of the two inactive, the other takes all the weight.
        return jnp.where(jnp.all(active), weights, active.astype(jnp.float32) / jnp.maximum(jnp.sum(active), 1))
    return min_norm_frank_wolfe(gram, max_iter=max_iter, active=active)


def _normalization(gram: jax.Array, normalize: str | None, losses: Sequence[jax.Array] | None) -> jax.Array:
    count = gram.shape[0]
    if normalize is None:
        return jnp.ones((count,), jnp.float32)
    if normalize == "l2":
        return jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 1e-20))
    if normalize == "loss":
        if losses is None or len(losses) != count:
            raise ValueError("normalize='loss' needs one loss value per gradient")
        return jnp.maximum(jnp.abs(jnp.stack([jnp.asarray(v, jnp.float32) for v in losses])), 1e-20)
    raise ValueError(f"normalize must be None, 'l2' or 'loss'; got {normalize!r}")


def pareto(losses: Mapping[str, jax.Array], grads: Mapping[str, PyTree], *, normalize: str | None = None,
           max_iter: int = 50,
           active: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MGDA-weighted sum of loss terms: total = sum_i stop_gradient(w_i) L_i.

    The weights are the min-norm weights of the per-term gradients ``grads[name]`` (same keys as
    ``losses``), divided by the normalisation scale when ``normalize`` is set, so that
    grad(total) = sum_i w_i g_i is the MGDA direction. Returns (total, weights).
    """
    names = list(losses)
    if sorted(names) != sorted(grads):
        raise ValueError(f"pareto needs gradients for exactly the loss terms {sorted(names)}; got {sorted(grads)}")
    grad_list = [grads[name] for name in names]
    loss_list = [losses[name] for name in names]
    raw = mgda_weights(grad_list, normalize=normalize, losses=loss_list, max_iter=max_iter,
                       active=_active_mask(names, active))
    scale = _normalization(gram_matrix(grad_list), normalize, loss_list)
    weights = jax.lax.stop_gradient(raw / scale)
    used = {name: weights[i] for i, name in enumerate(names)}
    return _weighted_sum(losses, used), used


def combine_grads(grads: Sequence[PyTree], weights: jax.Array) -> PyTree:
    """sum_i weights[i] * grads[i] for gradient pytrees of one structure."""
    return jax.tree_util.tree_map(lambda *leaves: sum(w * leaf for w, leaf in zip(weights, leaves)), *grads)


def pareto_value_and_grad(terms_fn: Callable[..., Mapping[str, jax.Array]], *, normalize: str | None = None,
                          max_iter: int = 50, has_aux: bool = False,
                          active: Mapping[str, jax.Array] | None = None) -> Callable[..., tuple]:
    """Wraps ``terms_fn(params, *args) -> {name: scalar}`` (or (terms, aux) with has_aux) for a train step.

    Returns ``fn(params, *args) -> ((total, terms, weights[, aux]), grads)`` where grads is the MGDA-
    combined gradient sum_i w_i dL_i/dparams over the ``active`` terms and total = sum_i w_i L_i. One
    forward pass and one reverse pass per term (``jax.jacrev``).
    """
    def wrapped(params: PyTree, *args: Any) -> tuple:
        def stacked(p):
            result = terms_fn(p, *args)
            terms, aux = result if has_aux else (result, None)
            names = sorted(terms)
            return jnp.stack([jnp.asarray(terms[n], jnp.float32) for n in names]), (terms, aux)

        jacobian, (terms, aux) = jax.jacrev(stacked, has_aux=True)(params)
        names = sorted(terms)
        grad_list = [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], jacobian) for i in range(len(names))]
        total, weights = pareto({n: terms[n] for n in names}, dict(zip(names, grad_list)),
                                normalize=normalize, max_iter=max_iter, active=active)
        grads = combine_grads(grad_list, jnp.stack([weights[n] for n in names]))
        values = (total, dict(terms), weights) + ((aux,) if has_aux else ())
        return values, grads

    return wrapped
