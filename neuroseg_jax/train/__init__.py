"""Training: pure sharded steps, checkpoints and the ``train_and_evaluate`` loop."""

from neuroseg_jax.ops import reuse_freed_host_memory  # the launchers' host-memory policy
from neuroseg_jax.train.builders import Trainer, build_trainer, make_loss_fn
from neuroseg_jax.train.checkpoint import Checkpoints, restore_weights
from neuroseg_jax.train.loop import NonFiniteLossError, train_and_evaluate, validation_metrics
from neuroseg_jax.train.optim import make_optimizer, make_schedule
from neuroseg_jax.train.plateau import PlateauState, update_plateau
from neuroseg_jax.train.sharding import make_mesh
from neuroseg_jax.train.state import TrainState, create_train_state
from neuroseg_jax.train.step import eval_step, make_step_fns, train_step

__all__ = [
    "Checkpoints", "NonFiniteLossError", "PlateauState", "TrainState", "Trainer", "build_trainer",
    "create_train_state", "eval_step", "make_loss_fn", "make_mesh", "make_optimizer", "make_schedule",
    "make_step_fns", "restore_weights", "reuse_freed_host_memory", "train_and_evaluate", "train_step",
    "update_plateau", "validation_metrics",
]
