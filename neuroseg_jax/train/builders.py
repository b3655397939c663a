"""From a run's config to the objects training uses: the loss, the outlier synthesis, the weights
of the optimised terms and the sharded state with its jitted steps (``build_trainer``)."""

import dataclasses
import functools
from typing import Any

import jax
import ml_collections

from neuroseg_jax import data as data_lib
from neuroseg_jax import losses, models
from neuroseg_jax.train import sharding as sharding_lib
from neuroseg_jax.train.optim import make_optimizer
from neuroseg_jax.train.state import TrainState, create_train_state
from neuroseg_jax.train.step import make_step_fns


def make_loss_fn(loss_config: ml_collections.ConfigDict):
    weights = dict(loss_config.terms)
    params = loss_config.params.to_dict()

    def loss_fn(logits, labels, touching_weights=None):
        return losses.hybrid_loss(logits, labels, weights=weights, params=params, touching_weights=touching_weights)

    return loss_fn


def needs_touching_weights(loss_config: ml_collections.ConfigDict) -> bool:
    """Whether batches must carry U-Net's touching-cells weights (``data.touching_cells``): only when
    the boundary term has a weight, so other runs compute no distance transforms. (The cross-entropy
    also takes them when they are there; in instance mode the touching weights are
    ``instances.touching_weight``'s band instead.)"""
    return bool(loss_config.terms.get("boundary"))


def outlier_start_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """First step of the uncertainty term: ``outliers.start_step``, else ``start_epoch`` in steps."""
    settings = config.outliers
    return int(settings.start_step or settings.start_epoch * steps_per_epoch)


def make_outlier_fns(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """(initialiser, per-step regulariser) from ``config.outliers``, or (None, None).

    Embeddings are the per-pixel logit vectors, so the buffers hold max(K, 2) classes of width K.
    The initialiser gives (buffers, extra params): the 'vos' variant's trained logistic goes into
    ``params['vos_energy']``.
    """
    settings = config.outliers
    if not settings.enabled:
        return None, None
    num_logits = int(config.model.num_classes)
    start_step = outlier_start_step(config, steps_per_epoch)

    def init():
        buffers = losses.outliers.init_buffers(max(num_logits, 2), int(settings.buffer_size), num_logits)
        return buffers, ({"vos_energy": losses.outliers.init_energy_params()} if settings.variant == "vos" else {})

    regularizer = functools.partial(
        losses.outliers.outlier_regularizer, start_step=start_step, max_per_class=int(settings.max_per_class),
        num_candidates=int(settings.num_candidates), num_selected=int(settings.num_selected),
        ridge=float(settings.ridge), beta1=float(settings.beta1), beta2=float(settings.beta2),
        variant=settings.variant, placement=settings.placement,
        dice_params=config.loss.params.get("dice", ml_collections.ConfigDict()).to_dict())
    return init, regularizer


def objective_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    """lambda of every term the train step optimises: ``config.loss.terms`` plus, with outlier
    synthesis, ``uncertainty`` weighted ``config.outliers.weight``."""
    weights = {name: float(value) for name, value in config.loss.terms.items()}
    if config.outliers.enabled:
        weights["uncertainty"] = float(config.outliers.weight)
    return weights


@dataclasses.dataclass
class Trainer:
    """Everything a run needs before its first step: a sharded state and jitted steps."""
    mesh: Any
    state: TrainState
    state_shardings: Any
    train_step: Any  # (state, global batch, rng) -> (state, metrics); state donated
    eval_step: Any  # (state, global batch with 'weight') -> sums
    step_rng: jax.Array
    steps_per_epoch: int
    total_steps: int


def step_counts(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(steps per epoch of the train split, total steps): ``train.num_steps``, else ``num_epochs``."""
    num_train = len(data_lib.build_dataset(config.data, "train"))
    steps_per_epoch = max(num_train // int(config.train.batch_size), 1)
    return steps_per_epoch, int(config.train.num_steps or config.train.num_epochs * steps_per_epoch)


def build_trainer(config: ml_collections.ConfigDict, devices=None) -> Trainer:
    """Model, optimizer, losses, outlier buffers and the sharded state for ``config`` on a mesh
    over ``devices`` (default: all)."""
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    steps_per_epoch, total_steps = step_counts(config)
    tx = make_optimizer(config.optim, total_steps)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    crop_h, crop_w = config.data.crop_size
    init_outliers, outlier_fn = make_outlier_fns(config, steps_per_epoch)
    state, state_shardings = create_train_state(
        models.build_model(config.model), tx, init_rng, (1, crop_h, crop_w, config.data.channels), mesh,
        models.sharding_rules(config.model.name), init_outliers=init_outliers, ema=config.optim.ema_decay > 0,
        fsdp=config.mesh.fsdp, fsdp_min_size=config.mesh.fsdp_min_size)
    term_start_steps = {"uncertainty": outlier_start_step(config, steps_per_epoch)} if outlier_fn else {}
    train_step, eval_step = make_step_fns(make_loss_fn(config.loss), mesh, state_shardings,
                                          loss_weights=objective_weights(config), weighting=config.loss.weighting,
                                          term_start_steps=term_start_steps, primary_term=config.loss.primary or None,
                                          outlier_fn=outlier_fn, ema_decay=float(config.optim.ema_decay))
    return Trainer(mesh=mesh, state=state, state_shardings=state_shardings, train_step=train_step,
                   eval_step=eval_step, step_rng=step_rng, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
