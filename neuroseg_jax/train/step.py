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

# (logits (B,H,W,K), labels (B,H,W)) -> (total scalar, {term: scalar})
LossFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]


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
    _, terms = loss_fn(logits, batch["mask"])
    buffers = state.outliers
    if outlier_fn is not None:
        uncertainty, buffers = outlier_fn(state.outliers, logits, batch["mask"], outlier_rng, step=state.step)
        terms = {**terms, "uncertainty": uncertainty}
    weighted = {name: jnp.float32(loss_weights[name]) * value for name, value in terms.items()}
    return weighted, (terms, batch_stats, buffers)


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array, *,
               loss_fn: LossFn, loss_weights: Mapping[str, float], weighting: str = "balance",
               outlier_fn: OutlierFn | None = None, ema_decay: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on a global batch.

    The weighted terms are combined by ``weighting``: 'balance' (their sum), 'norm' (each divided
    by its stop-gradient magnitude) or 'pareto' (MGDA: the min-norm convex combination of the
    per-term gradients); see ``losses.weighting``. ``rng`` is folded with the step so that a
    resumed run draws the same random numbers. With ``state.ema_params`` their average moves towards
    the new parameters by ``1 - ema_decay``. A step whose loss or gradient is not finite leaves the
    state unchanged and reports ``finite=0``; the host stops the run on it (see ``loop.py``), so a
    bad batch never reaches a checkpoint.
    """
    step_rng = jax.random.fold_in(rng, state.step)
    terms_fn = functools.partial(_objective_terms, state, batch=batch, rng=step_rng, loss_fn=loss_fn,
                                 loss_weights=loss_weights, outlier_fn=outlier_fn)
    if weighting == "pareto":
        (_, weighted, term_weights, aux), grads = weighting_lib.pareto_value_and_grad(
            terms_fn, has_aux=True)(state.params)
    elif weighting in ("balance", "norm"):
        def objective(params):
            weighted, aux = terms_fn(params)
            total = sum(weighted.values()) if weighting == "balance" else weighting_lib.norm(weighted)[0]
            return total, (weighted, aux)

        (_, (weighted, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        term_weights = {}
    else:
        raise ValueError(f"config.loss.weighting: unknown weighting {weighting!r}; use balance, norm or pareto")
    terms, batch_stats, buffers = aux
    loss = sum(weighted.values())
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
    per_image = jax.vmap(lambda lg, lb: loss_fn(lg[None], lb[None])[0])(logits, batch["mask"])
    weight = batch["weight"].astype(jnp.float32)
    pred = (logits[..., 0] > 0) if logits.shape[-1] == 1 else (jnp.argmax(logits, -1) > 0)
    pixel_weight = jnp.broadcast_to(weight[:, None, None], pred.shape)
    counts = confusion(pred, batch["mask"], mask=pixel_weight)
    return {"loss_sum": jnp.sum(per_image * weight), "count": jnp.sum(weight), **counts}


def make_step_fns(loss_fn: LossFn, mesh: Mesh, state_shardings: Any, *, loss_weights: Mapping[str, float],
                  weighting: str = "balance", outlier_fn: OutlierFn | None = None, ema_decay: float = 0.0):
    """Jitted, sharded ``train_step(state, batch, rng)`` (state donated) and ``eval_step``."""
    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = sharding_lib.replicated(mesh)
    step_fn = functools.partial(train_step, loss_fn=loss_fn, loss_weights=dict(loss_weights), weighting=weighting,
                                outlier_fn=outlier_fn, ema_decay=ema_decay)
    jitted_train = jax.jit(step_fn,
                           in_shardings=(state_shardings, batch_sharding, replicated),
                           out_shardings=(state_shardings, replicated), donate_argnums=0)
    jitted_eval = jax.jit(functools.partial(eval_step, loss_fn=loss_fn),
                          in_shardings=(state_shardings, batch_sharding), out_shardings=replicated)
    return jitted_train, jitted_eval
