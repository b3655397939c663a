"""Virtual outlier synthesis for segmentation (MorphoSeg §3.2-3.3, after VOS, Du et al. 2022).

What is implemented (the paper's method):

1. Per-class FIFO queues of pixel embeddings (by default the per-pixel logit vectors, or features of
   any layer), held as an explicit pytree :class:`OutlierBuffers` in the train state and updated inside
   the jitted step with :func:`update_buffers` (fixed shapes: at most ``max_per_class`` new entries per
   class and step, chosen at random among that class's valid pixels; the oldest entries are overwritten).
2. Class means and one covariance shared by all classes (MorphoSeg eqs. 6-8, 1/N normalisation) plus a
   ridge on the diagonal that is relative (``ridge`` times the mean variance), so logits and wide
   feature embeddings of any scale are regularised alike: :func:`class_gaussians`. Where float32
   Cholesky still fails, the eigenvalues are clipped instead, inside jit, so sampling never yields NaN.
3. For every class k, ``num_candidates`` draws v ~ N(mu_k, Sigma); the ``num_selected`` with the lowest
   likelihood are kept (eq. 9 with epsilon set implicitly by the count, as in VOS):
   :func:`sample_outliers`. With Sigma = A A^T and v = mu_k + A z the likelihood decreases with
   |z|^2, so selection is a top-k on |z|^2 and costs O(N D) per class.
4. The uncertainty-enhanced output f_out (:func:`synthesize_output`): the outliers of class k are placed
   at randomly chosen valid pixels whose ground truth is k (the pixels "they were sampled for"), at most
   one outlier per pixel. Embeddings must be per pixel at label resolution; embeddings of another
   width than K need ``head_fn`` mapping (..., D) -> (..., K).
5. L_uncertainty = beta1 * CE(f_out, y) + beta2 * Dice(f_out, y) (eqs. 13-15): :func:`uncertainty_loss`.
   Also the original VOS energy regulariser (:func:`vos_energy_loss`): a logistic regression on the
   negative free energy separating inlier pixels (label 1) from outliers (label 0), whose weight and
   bias are trained with the model (:func:`init_energy_params`; the train state keeps them in
   ``params['vos_energy']``).

Where the outliers enter f_out (``placement``). The paper integrates the outliers into s(x) to give
f_out, to refine the decision boundary of each class (§3.2), and adds L_uncertainty on f_out to L_seg
(eq. 16), so L_uncertainty should ask something of the model that L_seg does not. Two readings:

- 'replace' (the public code's): the outlier vector takes the place of its pixel's logits. Those
  pixels then depend on no parameter, so the gradient of L_uncertainty comes from the other pixels,
  i.e. it is L_seg again: at MorphoSeg's sizes (1.7 % of the pixels replaced) its gradient with
  respect to the logits has cosine 0.77-0.95 with L_seg's (benchmarks/outlier_gradients.py).
- 'shift' (the default): the offset v - mu_k is added to the pixel's logits and L_uncertainty is taken
  over those pixels only. It is a margin term: a pixel pushed to the low-likelihood edge of its class
  distribution must still be classified as its class, which L_seg never asks of pixels it already
  gets right. Its CE and Dice see f_out in units of the logits' spread s (sqrt of the mean variance
  of the batch's logits about their class means): the offsets grow with the spread they are drawn
  from (the buffers hold the same logits), and since each class's distribution reaches the decision
  boundary through its border pixels, some shifted pixels always cross it. In raw logits their CE
  grows with the logit scale and keeps pushing margins outwards, which widens the distribution and
  the next offsets: on configs/morphoseg.py:quick (seed 1) the logits ran to +-150 and L_seg's CE
  from 0.1 to 6 within 1000 steps. In units of s the term does not change when the model scales its
  logits, so only a better-shaped distribution (compact, separated classes) lowers it.
  On the pixels it touches, its gradient has cosine 0.52 with L_seg's for a fitted model (L_seg
  restricted to the same pixels: 0.99), 0.67 mid-training and 0.89 at initialisation, where every
  pixel is uncertain anyway (MorphoSeg starts the term at epoch 150 of 200).

Differences from MorphoSeg's public code (trainer_vos.py), which this module does not follow: the
public code fits a single Gaussian to all pixels of the current batch (no class-conditional queues,
per-channel means), replaces pixels drawn at random over the whole batch regardless of class, and
its "Pareto" weighting re-creates its weights every step, so it is an unweighted sum (a no-op). Here
queues are per class, the covariance is shared across classes, outliers go to pixels of their own
class, and Pareto weighting is real MGDA (:mod:`neuroseg_jax.losses.weighting`).

Prediction does not use the buffers: the Mahalanobis distance of a pixel's logits to these class
Gaussians flags confident background rather than unseen artefacts, so the uncertainty map is the
predictive entropy (:func:`neuroseg_jax.inference.predictive_entropy`).

Train step (inside jit; buffers live in the train state, replicated across devices):

    loss_out, buffers = outlier_regularizer(buffers, logits, labels, rng, step=state.step,
                                            start_step=cfg.start_step, ...)

All shapes are static, so every function is jittable and works on sharded inputs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from neuroseg_jax.losses._common import check_inputs, class_indices, valid_weights
from neuroseg_jax.losses.overlap import dice_loss
from neuroseg_jax.losses.pixelwise import bce_loss


class OutlierBuffers(NamedTuple):
    """Per-class FIFO queues of embeddings.

    features: (C, S, D) float32, C classes, S entries per class, D embedding width.
    count: (C,) int32 number of filled entries (<= S); entries [0, count) are valid.
    ptr: (C,) int32 next write position (oldest entry once the queue is full).
    """
    features: jax.Array
    count: jax.Array
    ptr: jax.Array


class Outliers(NamedTuple):
    """Selected virtual outliers.

    samples: (C, M, D) float32 outliers per class.
    log_likelihood: (C, M) float32 log N(v; mu_k, Sigma) of each outlier.
    means: (C, D) float32 class means used for sampling.
    valid: (C,) bool, True where the class queue held at least 2 embeddings (else its outliers are unused).
    """
    samples: jax.Array
    log_likelihood: jax.Array
    means: jax.Array
    valid: jax.Array


def init_buffers(num_classes: int, buffer_size: int, dim: int) -> OutlierBuffers:
    """Empty queues for ``num_classes`` classes (use 2 for a K = 1 sigmoid model), each ``buffer_size`` long."""
    if num_classes < 1 or buffer_size < 1 or dim < 1:
        raise ValueError(f"init_buffers needs positive num_classes, buffer_size, dim; got "
                         f"{num_classes}, {buffer_size}, {dim}")
    return OutlierBuffers(features=jnp.zeros((num_classes, buffer_size, dim), jnp.float32),
                          count=jnp.zeros((num_classes,), jnp.int32),
                          ptr=jnp.zeros((num_classes,), jnp.int32))


def update_buffers(buffers: OutlierBuffers, embeddings: jax.Array, labels: jax.Array,
                   rng: jax.Array | None = None, *, max_per_class: int | None = None,
                   mask: jax.Array | None = None) -> OutlierBuffers:
    """Enqueues up to ``max_per_class`` embeddings per class, overwriting the oldest (FIFO).

    Args:
      buffers: current queues (C, S, D).
      embeddings: (N, D) or (..., D) embeddings (gradients are stopped).
      labels: (N,) or (...) integer class of each embedding, in [0, C); other values are ignored.
      rng: key choosing a random subset when a class has more candidates than ``max_per_class``; without
        it the first ones in order are taken.
      max_per_class: new entries per class and call (default and maximum: S).
      mask: optional (N,) or (...) validity; zero entries are never enqueued.

    Returns:
      Updated buffers. Entries are written in order of selection at ptr, ptr + 1, ... (mod S).
    """
    num_classes, size, dim = buffers.features.shape
    if embeddings.shape[-1] != dim:
        raise ValueError(f"embeddings last axis must be the buffer width {dim}; got shape {embeddings.shape}")
    flat = jax.lax.stop_gradient(embeddings.reshape(-1, dim).astype(jnp.float32))
    flat_labels = labels.reshape(-1).astype(jnp.int32)
    if flat_labels.shape[0] != flat.shape[0]:
        raise ValueError(f"labels {labels.shape} do not match embeddings {embeddings.shape}")
    count = flat.shape[0]
    valid = jnp.ones((count,), bool) if mask is None else (mask.reshape(-1) != 0)
    take = min(size if max_per_class is None else max_per_class, size, count)
    if take < 1:
        raise ValueError(f"max_per_class must be >= 1; got {max_per_class}")
    if rng is None:
        priority = count - jnp.arange(count, dtype=jnp.int32)  # earlier first, all positive
    else:
        priority = jax.random.uniform(rng, (count,), jnp.float32, minval=0.5, maxval=1.0)

    def enqueue(klass, features, ptr, filled):
        chosen = valid & (flat_labels == klass)
        scores, index = jax.lax.top_k(jnp.where(chosen, priority, 0), take)
        is_new = scores > 0
        num_new = jnp.sum(is_new, dtype=jnp.int32)
        slots = jnp.where(is_new, (ptr + jnp.arange(take, dtype=jnp.int32)) % size, size)
        features = features.at[slots].set(flat[index], mode="drop")
        return features, (ptr + num_new) % size, jnp.minimum(filled + num_new, size)

    features, ptr, filled = jax.vmap(enqueue)(jnp.arange(num_classes), buffers.features, buffers.ptr,
                                              buffers.count)
    return OutlierBuffers(features=features, count=filled, ptr=ptr)


# Covariance scale of a buffer without spread (every entry equal): keeps the ridge, and so the
# factor and the log-likelihoods, finite where the relative ridge alone would be 0.
_SCALE_FLOOR = 1e-12


def class_gaussians(buffers: OutlierBuffers, ridge: float = 1e-4) -> tuple[jax.Array, jax.Array]:
    """Class means (C, D) and shared covariance (D, D) of the buffered embeddings (MorphoSeg eqs. 7-8).

    Sigma = S + ridge * s * I with S = (1/N) sum_k sum_{i in Q_k} (x_i - mu_k)(x_i - mu_k)^T, N the total
    number of buffered entries, and s the mean diagonal of S (at least 1e-12): the ridge is relative,
    so it regularises logits and wide feature embeddings of any scale alike. Empty classes get mean 0
    and contribute nothing.
    """
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0 (it is relative to the mean variance); got {ridge}")
    num_classes, size, dim = buffers.features.shape
    filled = (jnp.arange(size)[None, :] < buffers.count[:, None]).astype(jnp.float32)[..., None]
    counts = buffers.count.astype(jnp.float32)
    means = jnp.sum(buffers.features * filled, axis=1) / jnp.maximum(counts, 1.0)[:, None]
    centred = (buffers.features - means[:, None, :]) * filled
    scatter = jnp.einsum("ksd,kse->de", centred, centred) / jnp.maximum(jnp.sum(counts), 1.0)
    scale = jnp.maximum(jnp.mean(jnp.diagonal(scatter)), _SCALE_FLOOR)
    return means, scatter + ridge * scale * jnp.eye(dim, dtype=jnp.float32)


def _square_root(covariance: jax.Array, ridge: float) -> tuple[jax.Array, jax.Array]:
    """(A with Sigma = A A^T, log |Sigma|): the Cholesky factor, or where float32 Cholesky fails (it
    returns NaN on a matrix that rounding made indefinite, e.g. wide embeddings with fewer entries
    than dimensions and a small ridge) an eigendecomposition with the eigenvalues clipped to
    ridge * (mean variance). Any square root serves: v = mu + A z has Mahalanobis distance |z|."""
    cholesky = jnp.linalg.cholesky(covariance)

    def from_cholesky(_):
        return cholesky, 2.0 * jnp.sum(jnp.log(jnp.diagonal(cholesky)))

    def from_eigenvalues(_):
        values, vectors = jnp.linalg.eigh(0.5 * (covariance + covariance.T))
        values = jnp.maximum(values, ridge * jnp.maximum(jnp.mean(jnp.diagonal(covariance)), _SCALE_FLOOR))
        return vectors * jnp.sqrt(values), jnp.sum(jnp.log(values))

    factored = jnp.all(jnp.isfinite(cholesky)) & jnp.all(jnp.diagonal(cholesky) > 0)
    return jax.lax.cond(factored, from_cholesky, from_eigenvalues, None)


def sample_outliers(buffers: OutlierBuffers, rng: jax.Array, *, num_candidates: int = 100_000,
                    num_selected: int = 10_000, ridge: float = 1e-4) -> Outliers:
    """Draws ``num_candidates`` per class from N(mu_k, Sigma) and keeps the ``num_selected`` least likely.

    Source: MorphoSeg eq. 9 / VOS. Returns :class:`Outliers` with samples (C, M, D). Degenerate buffers
    (rank-deficient, constant, wider than they are long) give finite samples and log-likelihoods
    too (see :func:`_square_root`).
    """
    if not 1 <= num_selected <= num_candidates:
        raise ValueError(f"need 1 <= num_selected <= num_candidates; got {num_selected}, {num_candidates}")
    num_classes, _, dim = buffers.features.shape
    means, covariance = class_gaussians(buffers, ridge)
    factor, log_det = _square_root(covariance, ridge)
    normal = jax.random.normal(rng, (num_classes, num_candidates, dim), jnp.float32)
    squared_distance = jnp.sum(normal * normal, axis=-1)
    farthest, index = jax.lax.top_k(squared_distance, num_selected)
    chosen = jnp.take_along_axis(normal, index[..., None], axis=1)
    samples = means[:, None, :] + chosen @ factor.T
    log_likelihood = -0.5 * (farthest + dim * math.log(2.0 * math.pi) + log_det)
    return Outliers(samples=samples, log_likelihood=log_likelihood, means=means, valid=buffers.count >= 2)


def _outlier_logits(outliers: Outliers, num_logits: int,
                    head_fn: Callable[[jax.Array], jax.Array] | None) -> tuple[jax.Array, jax.Array]:
    """(outlier logits (C, M, K), logits of the class means (C, K))."""
    if head_fn is not None:
        return head_fn(outliers.samples), head_fn(outliers.means)
    if outliers.samples.shape[-1] != num_logits:
        raise ValueError(f"outliers have width {outliers.samples.shape[-1]} but logits have {num_logits} "
                         f"channels; pass head_fn mapping embeddings to logits")
    return outliers.samples, outliers.means


def synthesize_output(logits: jax.Array, labels: jax.Array, outliers: Outliers, rng: jax.Array, *,
                      placement: str = "shift", head_fn: Callable[[jax.Array], jax.Array] | None = None,
                      mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Uncertainty-enhanced output f_out: outliers of class k placed at random valid pixels of class k.

    Args:
      logits: (B, H, W, K) float; labels: (B, H, W) int; mask: optional (B, H, W).
      outliers: from :func:`sample_outliers` with C = max(K, 2) classes.
      rng: key choosing the pixels.
      placement: 'shift' (pixel logits += outlier - class mean) or 'replace' (pixel logits := outlier).
      head_fn: maps (..., D) embeddings to (..., K) logits when D != K.

    Returns:
      (f_out (B, H, W, K) float32, placed (B, H, W) bool marking pixels that received an outlier).
    """
    check_inputs(logits, labels, mask)
    if placement not in ("replace", "shift"):
        raise ValueError(f"placement must be 'replace' or 'shift'; got {placement!r}")
    batch_shape = logits.shape[:3]
    num_logits = logits.shape[-1]
    num_classes, num_selected, _ = outliers.samples.shape
    if num_classes != max(num_logits, 2):
        raise ValueError(f"outliers have {num_classes} classes; logits with K = {num_logits} need "
                         f"{max(num_logits, 2)}")
    outlier_logits, mean_logits = _outlier_logits(outliers, num_logits, head_fn)
    flat = logits.astype(jnp.float32).reshape(-1, num_logits)
    pixel_class = class_indices(labels, num_logits).reshape(-1)
    valid = valid_weights(mask, labels).reshape(-1) > 0
    take = min(num_selected, flat.shape[0])
    priority = jax.random.uniform(rng, flat.shape[:1], jnp.float32, minval=0.5, maxval=1.0)

    def pixels_of(klass, class_valid):
        chosen = valid & (pixel_class == klass) & class_valid
        scores, index = jax.lax.top_k(jnp.where(chosen, priority, 0.0), take)
        return jnp.where(scores > 0, index, flat.shape[0])

    index = jax.vmap(pixels_of)(jnp.arange(num_classes), outliers.valid).reshape(-1)
    values = outlier_logits[:, :take].astype(jnp.float32)
    if placement == "shift":
        values = values - mean_logits[:, None, :]
        synthetic = flat.at[index].add(values.reshape(-1, num_logits), mode="drop")
    else:
        synthetic = flat.at[index].set(values.reshape(-1, num_logits), mode="drop")
    placed = jnp.zeros(flat.shape[:1], bool).at[index].set(True, mode="drop")
    return synthetic.reshape(logits.shape), placed.reshape(batch_shape)


def _logit_spread(logits: jax.Array, labels: jax.Array, mask: jax.Array | None) -> jax.Array:
    """sqrt of the mean variance of the valid pixels' logits about their class means (gradient stopped)."""
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    weights = valid_weights(mask, labels)[..., None]
    member = jax.nn.one_hot(class_indices(labels, logits.shape[-1]), max(logits.shape[-1], 2)) * weights
    means = jnp.einsum("bhwc,bhwk->ck", member, logits) / jnp.maximum(jnp.sum(member, (0, 1, 2)), 1.0)[:, None]
    centred = (logits - jnp.einsum("bhwc,ck->bhwk", member, means)) * weights
    variance = jnp.sum(centred * centred) / jnp.maximum(jnp.sum(weights) * logits.shape[-1], 1.0)
    return jnp.sqrt(jnp.maximum(variance, _SCALE_FLOOR))


def uncertainty_loss(logits: jax.Array, labels: jax.Array, outliers: Outliers, rng: jax.Array, *,
                     beta1: float = 1.0, beta2: float = 1.0, placement: str = "shift",
                     head_fn: Callable[[jax.Array], jax.Array] | None = None,
                     dice_params: Mapping[str, Any] | None = None,
                     mask: jax.Array | None = None) -> jax.Array:
    """L_uncertainty = beta1 * CE(f_out, y) + beta2 * Dice(f_out, y) (MorphoSeg eqs. 13-15).

    f_out comes from :func:`synthesize_output`; CE is :func:`neuroseg_jax.losses.bce_loss` (eq. 14) and
    Dice the squared-denominator :func:`neuroseg_jax.losses.dice_loss` (eq. 13). With 'shift' both are
    taken over the pixels that received an outlier, on f_out divided by the spread of the logits about
    their class means (a margin term in units of that spread: see the module docstring); with
    'replace' over all valid pixels, since the replaced pixels alone carry no gradient.
    ``dice_params`` are the segmentation Dice's keyword arguments (``config.loss.params.dice``), so
    that L_uncertainty scores the outliers with the Dice the model is trained with.
    """
    synthetic, placed = synthesize_output(logits, labels, outliers, rng, placement=placement, head_fn=head_fn,
                                          mask=mask)
    if placement == "shift":
        synthetic, mask = synthetic / _logit_spread(logits, labels, mask), placed
    return (beta1 * bce_loss(synthetic, labels, mask=mask)
            + beta2 * dice_loss(synthetic, labels, mask=mask, **(dice_params or {})))


def _negative_energy(logits: jax.Array) -> jax.Array:
    """-E(x) = logsumexp of the logits (a K = 1 sigmoid logit x is read as the pair (0, x))."""
    logits = logits.astype(jnp.float32)
    if logits.shape[-1] == 1:
        return jax.nn.softplus(logits[..., 0])
    return jax.nn.logsumexp(logits, axis=-1)


def vos_energy_loss(logits: jax.Array, outliers: Outliers, *, weight: float | jax.Array = 1.0,
                    bias: float | jax.Array = 0.0, head_fn: Callable[[jax.Array], jax.Array] | None = None,
                    mask: jax.Array | None = None) -> jax.Array:
    """VOS uncertainty regulariser (Du et al. 2022, eq. 5) on pixels.

    A logistic regression sigma(weight * (-E) + bias) on the negative free energy -E = logsumexp(logits)
    should say 1 for inlier pixels and 0 for virtual outliers. ``weight`` and ``bias`` are the trainable
    scalars of that regression (keep them in the model params to learn them). The inlier and outlier
    binary cross-entropies are averaged separately and summed (VOS averages the concatenation; with far
    more pixels than outliers that would drown the outlier term). Outliers of classes whose queue was not
    valid are ignored.

    Args:
      logits: (B, H, W, K) model logits; mask: optional (B, H, W) valid pixels.
      outliers: from :func:`sample_outliers`; head_fn maps their embeddings to logits when D != K.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (B, H, W, K); got {logits.shape}")
    outlier_logits, _ = _outlier_logits(outliers, logits.shape[-1], head_fn)
    inlier_score = weight * _negative_energy(logits) + bias
    outlier_score = weight * _negative_energy(outlier_logits) + bias
    valid = jnp.ones(logits.shape[:3], jnp.float32) if mask is None else (mask != 0).astype(jnp.float32)
    inlier_term = jnp.sum(-jax.nn.log_sigmoid(inlier_score) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    class_valid = jnp.broadcast_to(outliers.valid[:, None], outlier_score.shape).astype(jnp.float32)
    outlier_term = (jnp.sum(-jax.nn.log_sigmoid(-outlier_score) * class_valid)
                    / jnp.maximum(jnp.sum(class_valid), 1.0))
    return inlier_term + outlier_term


def init_energy_params() -> dict[str, jax.Array]:
    """Initial logistic of :func:`vos_energy_loss` (weight 1, bias 0), trained with the model's params."""
    return {"weight": jnp.ones((), jnp.float32), "bias": jnp.zeros((), jnp.float32)}


def outlier_regularizer(buffers: OutlierBuffers, logits: jax.Array, labels: jax.Array, rng: jax.Array, *,
                        step: jax.Array | int, start_step: int = 0, embeddings: jax.Array | None = None,
                        max_per_class: int | None = None, num_candidates: int = 100_000,
                        num_selected: int = 10_000, ridge: float = 1e-4, beta1: float = 1.0,
                        beta2: float = 1.0, variant: str = "uncertainty", placement: str = "shift",
                        energy_params: Mapping[str, jax.Array] | None = None,
                        head_fn: Callable[[jax.Array], jax.Array] | None = None,
                        dice_params: Mapping[str, Any] | None = None,
                        mask: jax.Array | None = None) -> tuple[jax.Array, OutlierBuffers]:
    """One train-step of outlier synthesis: enqueue this batch, then (from ``start_step``) sample and score.

    Args:
      buffers: queues from :func:`init_buffers` with C = max(K, 2) classes and width D (= K for logits).
      logits: (B, H, W, K) model output (differentiated through the loss).
      labels: (B, H, W) int; mask: optional (B, H, W).
      rng: key (split internally for enqueueing, sampling and placement).
      step: current train step (traced is fine); before ``start_step`` the loss is 0 and no sampling runs
        (``lax.cond``), but queues are still filled.
      embeddings: (B, H, W, D) embeddings to enqueue; default the logits themselves.
      variant: 'uncertainty' (MorphoSeg eq. 15, needs beta1/beta2/placement; its Dice takes
        ``dice_params``) or 'vos' (energy loss).
      energy_params: {'weight', 'bias'} of the VOS logistic (differentiated: keep them in the params,
        see :func:`init_energy_params`); None uses the initial values. Unused by 'uncertainty'.

    Returns:
      (loss float32 scalar, updated buffers).
    """
    if variant not in ("uncertainty", "vos"):
        raise ValueError(f"variant must be 'uncertainty' or 'vos'; got {variant!r}")
    check_inputs(logits, labels, mask)
    enqueue_rng, sample_rng, place_rng = jax.random.split(rng, 3)
    source = logits if embeddings is None else embeddings
    buffers = update_buffers(buffers, source, class_indices(labels, logits.shape[-1]), enqueue_rng,
                             max_per_class=max_per_class, mask=mask)
    energy = init_energy_params() if energy_params is None else energy_params

    def active(_):
        outliers = sample_outliers(buffers, sample_rng, num_candidates=num_candidates,
                                   num_selected=num_selected, ridge=ridge)
        outliers = jax.tree_util.tree_map(jax.lax.stop_gradient, outliers)
        if variant == "vos":
            return vos_energy_loss(logits, outliers, weight=energy["weight"], bias=energy["bias"], head_fn=head_fn,
                                   mask=mask)
        return uncertainty_loss(logits, labels, outliers, place_rng, beta1=beta1, beta2=beta2,
                                placement=placement, head_fn=head_fn, dice_params=dice_params, mask=mask)

    loss = jax.lax.cond(jnp.asarray(step) >= start_step, active, lambda _: jnp.zeros((), jnp.float32), None)
    return loss, buffers
