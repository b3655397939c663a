"""Pure train and eval steps. ``make_step_fns`` jits them with shardings over a mesh."""

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from neuroseg_jax.metrics import confusion
from neuroseg_jax.losses import weighting as weighting_lib
from neuroseg_jax.train import sharding as sharding_lib
from neuroseg_jax.train.state import TrainState

# (logits (B,H,W,K), labels (B,H,W)[, touching-cells weights (B,H,W) when the batch has them])
#   -> (total scalar, {term: scalar})
LossFn = Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]


def _apply(state: TrainState, params, images, *, train: bool, rng=None):
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    if train and state.batch_stats:
        logits, updates = state.apply_fn(variables, images, train=True, rngs={"dropout": rng},
                                         mutable=["batch_stats"])
        return logits, updates["batch_stats"]
    rngs = {"dropout": rng} if train else None
    return state.apply_fn(variables, images, train=train, rngs=rngs), state.batch_stats


OutlierFn = Callable[..., tuple[jax.Array, Any]]


def _objective_terms(state: TrainState, params, batch, rng, *, loss_fn: LossFn,
                     loss_weights: Mapping[str, float], outlier_fn: OutlierFn | None):
    """Weighted loss terms of one forward pass, with (raw terms, batch stats, outlier buffers) as aux.

    With outlier synthesis, the uncertainty loss enters as one more term, ``uncertainty``, and the
    batch's embeddings are enqueued into the per-class buffers (a pure update of the pytree).
    """
    model_rng, outlier_rng = jax.random.split(rng)
    logits, batch_stats = _apply(state, params, batch["image"], train=True, rng=model_rng)
    touching = [batch["touching_weight"]] if "touching_weight" in batch else []
    _, terms = loss_fn(logits, batch["mask"], *touching)
    buffers = state.outliers
    if outlier_fn is not None:
        uncertainty, buffers = outlier_fn(state.outliers, logits, batch["mask"], outlier_rng, step=state.step,
                                          energy_params=params.get("vos_energy"))
        terms = {**terms, "uncertainty": uncertainty}
    weighted = {name: jnp.float32(loss_weights[name]) * value for name, value in terms.items()}
    return weighted, (terms, batch_stats, buffers)


WEIGHTINGS = ("balance", "norm", "relative", "pareto")


def active_terms(step: jax.Array, names, term_start_steps: Mapping[str, int]) -> dict[str, jax.Array]:
    """{term: step >= its start step} for the terms that start late (the others are always active)."""
    return {name: jnp.asarray(step) >= start for name, start in term_start_steps.items() if name in names}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss_fn: LossFn, loss_weights: Mapping[str, float], weighting: str = "balance",
               term_start_steps: Mapping[str, int] | None = None, primary_term: str | None = None,
               outlier_fn: OutlierFn | None = None, ema_decay: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a global batch.

    The loss terms are combined by ``weighting`` (see ``losses.weighting``), ``loss_weights`` being
    the lambda_i of every scheme: 'balance' (sum_i lambda_i L_i), 'norm' (each term divided by its
    stop-gradient magnitude), 'relative' (MorphoSeg eq. 18: every term brought to the magnitude of
    ``primary_term``) or 'pareto' (MGDA: the min-norm convex combination of the per-term gradients
    of lambda_i L_i). A term named in ``term_start_steps`` takes part only from that step on (the
    uncertainty term of outlier synthesis); before, the weighting runs over the other terms alone.
    ``rng`` is folded with the step so that a resumed run draws the same random numbers. With
    ``state.ema_params`` their average moves towards the new parameters by ``1 - ema_decay``. A step
    whose loss or gradient is not finite leaves the state unchanged and reports ``finite=0``; the host
    stops the run on it (see ``loop.py``), so a bad batch never reaches a checkpoint.

    Metrics: ``loss`` is the balance total (comparable across weightings), ``loss/NAME`` the raw
    terms, ``weight/NAME`` the weight each raw term got in the optimised objective.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"config.loss.weighting: unknown weighting {weighting!r}; use one of {WEIGHTINGS}")
    step_rng = jax.random.fold_in(rng, state.step)
    terms_fn = functools.partial(_objective_terms, state, batch=batch, rng=step_rng, loss_fn=loss_fn,
                                 loss_weights=loss_weights, outlier_fn=outlier_fn)
    active = active_terms(state.step, loss_weights, term_start_steps or {})
    if weighting == "pareto":
        (_, _, mgda, aux), grads = weighting_lib.pareto_value_and_grad(
            terms_fn, has_aux=True, active=active)(state.params)
        term_weights = {name: mgda[name] * jnp.float32(loss_weights[name]) for name in mgda}
    else:
        def objective(params):
            _, aux = terms_fn(params)
            raw = aux[0]
            if weighting == "balance":
                total, used = weighting_lib.balance(raw, loss_weights, active=active)
            elif weighting == "norm":
                total, used = weighting_lib.norm(raw, loss_weights, active=active)
            else:
                total, used = weighting_lib.relative(raw, loss_weights, primary=primary_term, active=active)
            return total, (used, aux)

        (_, (term_weights, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    terms, batch_stats, buffers = aux
    loss = weighting_lib.balance(terms, loss_weights, active=active)[0]
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ema_params = state.ema_params
    if ema_params is not None:
        ema_params = jax.tree.map(lambda avg, new: ema_decay * avg + (1.0 - ema_decay) * new, ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats,
                              outliers=buffers, ema_params=ema_params)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.int32),
               **{f"loss/{name}": value for name, value in terms.items()},
               **{f"weight/{name}": value for name, value in term_weights.items()}}
    return new_state, metrics


def eval_step(state: TrainState, batch: Mapping[str, jax.Array], *, loss_fn: LossFn) -> dict[str, jax.Array]:
    """Sums over the batch of per-image loss and pixel confusion counts.

    The loss is computed per image so that the validation loss does not depend on the batch
    size; ``batch['weight']`` (1 real, 0 padding) removes the images that pad the last batch.
    """
    logits, _ = _apply(state, state.eval_params, batch["image"], train=False)
    touching = [batch["touching_weight"]] if "touching_weight" in batch else []
    per_image = jax.vmap(lambda lg, lb, *tw: loss_fn(lg[None], lb[None], *(t[None] for t in tw))[0])(
        logits, batch["mask"], *touching)
    weight = batch["weight"].astype(jnp.float32)
    pred = (logits[..., 0] > 0) if logits.shape[-1] == 1 else (jnp.argmax(logits, -1) > 0)
    pixel_weight = jnp.broadcast_to(weight[:, None, None], pred.shape)
    counts = confusion(pred, batch["mask"], mask=pixel_weight)
    return {"loss_sum": jnp.sum(per_image * weight), "count": jnp.sum(weight), **counts}


def make_step_fns(loss_fn: LossFn, mesh: Mesh, state_shardings: Any, *, loss_weights: Mapping[str, float],
                  weighting: str = "balance", term_start_steps: Mapping[str, int] | None = None,
                  primary_term: str | None = None, outlier_fn: OutlierFn | None = None, ema_decay: float = 0.0):
    """Jitted, sharded ``train_step(state, batch, rng)`` (state donated) and ``eval_step``."""
    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = sharding_lib.replicated(mesh)
    step_fn = functools.partial(train_step, loss_fn=loss_fn, loss_weights=dict(loss_weights), weighting=weighting,
                                term_start_steps=dict(term_start_steps or {}), primary_term=primary_term,
                                outlier_fn=outlier_fn, ema_decay=ema_decay)
    jitted_train = jax.jit(step_fn,
                           in_shardings=(state_shardings, batch_sharding, replicated),
                           out_shardings=(state_shardings, replicated), donate_argnums=0)
    jitted_eval = jax.jit(functools.partial(eval_step, loss_fn=loss_fn),
                          in_shardings=(state_shardings, batch_sharding), out_shardings=replicated)
    return jitted_train, jitted_eval
