"""Hybrid loss: a weighted sum of named loss terms chosen by configuration (IMSAHLO eq. 3).

``hybrid_loss(logits, labels, weights={'tversky': .4, ...}, params={'tversky': {'alpha': .3}})``
evaluates each named term with its hyper-parameters and returns the weighted total and the unweighted
terms, so every IMSAHLO Table IV ablation is a weights dict (see ``IMSAHLO_ABLATIONS``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from neuroseg_jax.losses.boundary import boundary_loss
from neuroseg_jax.losses.overlap import dice_loss, focal_tversky_loss, tversky_loss
from neuroseg_jax.losses.pixelwise import bce_loss, focal_loss
from neuroseg_jax.losses.topology import cldice_loss, dice_cldice_loss

LossFn = Callable[..., jax.Array]

LOSS_TERMS: dict[str, LossFn] = {
    "dice": dice_loss,
    "bce": bce_loss,
    "tversky": tversky_loss,
    "focal_tversky": focal_tversky_loss,
    "focal": focal_loss,
    "boundary": boundary_loss,
    "cldice": cldice_loss,
    "dice_cldice": dice_cldice_loss,
}

# Terms that take the host-computed touching-cells weights: the boundary term adds them to its
# contour weights (boundary.boundary_loss), the cross-entropy to its per-pixel weight of 1 (U-Net eq. 2).
TOUCHING_WEIGHTED_TERMS = frozenset({"boundary", "bce"})

# IMSAHLO eq. 3 and the text below it: W1..W4 = 0.4, 0.2, 0.3, 0.1 for Tversky, boundary, focal, clDice.
# (The ablation paragraph of §IV-D lists 0.4, 0.3, 0.2, 0.1 for Tversky, contour, focal, clDice; we follow
# eq. 3.) Per-term hyper-parameters are the paper's: Tversky alpha 0.3 / beta 0.7, focal gamma 3 / alpha 0.8.
IMSAHLO_WEIGHTS: dict[str, float] = {"tversky": 0.4, "boundary": 0.2, "focal": 0.3, "cldice": 0.1}
IMSAHLO_PARAMS: dict[str, dict[str, float]] = {"tversky": {"alpha": 0.3, "beta": 0.7},
                                               "focal": {"alpha": 0.8, "gamma": 3.0}}


def imsahlo_term_weights(names: Sequence[str]) -> dict[str, float]:
    """Eq. 3 weights of the chosen terms, renormalised to sum to 1 (the paper gives no weights for its
    Table IV combinations): ``['tversky', 'focal']`` -> 0.4 / 0.7 and 0.3 / 0.7."""
    unknown = [name for name in names if name not in IMSAHLO_WEIGHTS]
    if unknown or not names:
        raise ValueError(f"IMSAHLO eq. 3 terms {list(names)}: need at least one, all among {sorted(IMSAHLO_WEIGHTS)}")
    total = sum(IMSAHLO_WEIGHTS[name] for name in names)
    return {name: IMSAHLO_WEIGHTS[name] / total for name in names}


# IMSAHLO Table IV rows as weight dicts ("contour" in the table is the boundary term).
IMSAHLO_ABLATIONS: dict[str, dict[str, float]] = {
    "tversky": imsahlo_term_weights(["tversky"]),
    "contour": imsahlo_term_weights(["boundary"]),
    "focal": imsahlo_term_weights(["focal"]),
    "cldice": imsahlo_term_weights(["cldice"]),
    "tversky+contour": imsahlo_term_weights(["tversky", "boundary"]),
    "tversky+focal": imsahlo_term_weights(["tversky", "focal"]),
    "tversky+contour+focal": imsahlo_term_weights(["tversky", "boundary", "focal"]),
    "hybrid": dict(IMSAHLO_WEIGHTS),
}


def _is_static_zero(weight: object) -> bool:
    return isinstance(weight, (int, float)) and weight == 0


def hybrid_loss(logits: jax.Array, labels: jax.Array, *, weights: Mapping[str, float | jax.Array],
                params: Mapping[str, Mapping[str, object]] | None = None,
                touching_weights: jax.Array | None = None,
                mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of loss terms: total = sum_t weights[t] * term_t (IMSAHLO eq. 3 for IMSAHLO_WEIGHTS).

    Args:
      logits: (B, H, W, K) float32 or bfloat16; labels: (B, H, W) int; mask: optional (B, H, W), passed
        to every term.
      weights: term name -> weight. Names: 'dice', 'bce', 'tversky', 'focal_tversky', 'focal', 'boundary',
        'cldice', 'dice_cldice'. Weights may be Python floats (a literal 0 skips the term entirely) or
        traced scalars (e.g. from :mod:`neuroseg_jax.losses.weighting`).
      params: optional term name -> keyword arguments of that term's function (e.g.
        {'tversky': {'alpha': 0.3, 'beta': 0.7}, 'cldice': {'iterations': 10}}); unspecified keys keep
        the function defaults. Every key must also be in ``weights``.
      touching_weights: optional (B, H, W) touching-cells weights for the terms that take them
        (``TOUCHING_WEIGHTED_TERMS``: the boundary term adds them to its contour weights, 'bce'
        weighs each pixel by 1 + touching_weights).

    Returns:
      (total float32 scalar, {term name: unweighted float32 scalar}) for the terms that were evaluated.

    Raises:
      ValueError: for an unknown term name, params for a term without a weight, or an unknown parameter.
    """
    params = dict(params or {})
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss term(s) {unknown} in weights; known terms: {sorted(LOSS_TERMS)}")
    orphan = sorted(set(params) - set(weights))
    if orphan:
        raise ValueError(f"loss params given for term(s) {orphan} that have no weight; weighted terms: "
                         f"{sorted(weights)}")
    total = jnp.zeros((), jnp.float32)
    terms: dict[str, jax.Array] = {}
    for name, weight in weights.items():
        if _is_static_zero(weight):
            continue
        kwargs = dict(params.get(name, {}))
        if {"mask", "reduction", "touching_weights", "pixel_weights"} & set(kwargs):
            raise ValueError(f"loss params for {name!r} may not set 'mask', 'reduction', 'touching_weights' or "
                             f"'pixel_weights' (hybrid_loss needs scalars and passes its own mask and weights)")
        if name in TOUCHING_WEIGHTED_TERMS and touching_weights is not None:
            if name == "bce":
                kwargs["pixel_weights"] = 1.0 + touching_weights.astype(jnp.float32)
            else:
                kwargs["touching_weights"] = touching_weights
        try:
            value = LOSS_TERMS[name](logits, labels, mask=mask, **kwargs)
        except TypeError as error:
            raise ValueError(f"bad parameters {sorted(kwargs)} for loss term {name!r}: {error}") from error
        terms[name] = value
        total = total + jnp.asarray(weight, jnp.float32) * value
    return total, terms
