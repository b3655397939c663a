"""The train state pytree and its (sharded) creation."""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from neuroseg_jax.train import sharding as sharding_lib


@struct.dataclass
class TrainState:
    """Everything a step reads and writes. ``apply_fn`` and ``tx`` are static (not saved).

    ``lr_scale`` is the plateau multiplier set by the host after each validation;
    ``batch_stats`` is ``{}`` for models without BatchNorm; ``outliers`` holds the per-class
    embedding buffers of outlier synthesis (``losses.outliers.OutlierBuffers``) or ``None``;
    ``ema_params`` the exponential moving average of the parameters, or ``None`` when disabled.
    """
    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any
    lr_scale: jax.Array
    outliers: Any
    ema_params: Any
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def checkpoint_items(self) -> dict:
        """The saved part of the state (everything that is an array)."""
        items = {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                 "batch_stats": self.batch_stats, "lr_scale": self.lr_scale}
        if self.outliers is not None:
            items["outliers"] = self.outliers._asdict()
        if self.ema_params is not None:
            items["ema_params"] = self.ema_params
        return items

    @property
    def eval_params(self):
        """The weights to evaluate, save as best and predict with: the EMA when there is one."""
        return self.params if self.ema_params is None else self.ema_params

    def with_checkpoint_items(self, items: dict) -> "TrainState":
        items = dict(items)
        if "outliers" in items:
            items["outliers"] = type(self.outliers)(**items["outliers"])
        return self.replace(**items)


def _init_state(model: flax.linen.Module, tx: optax.GradientTransformation, rng: jax.Array,
                input_shape: tuple[int, ...], init_outliers: Callable[[], tuple[Any, dict]] | None,
                ema: bool) -> TrainState:
    variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(input_shape, jnp.float32), train=False)
    outliers, outlier_params = init_outliers() if init_outliers is not None else (None, {})
    clashing = sorted(set(outlier_params) & set(variables["params"]))
    if clashing:
        raise ValueError(f"outlier synthesis parameters {clashing} clash with the model's top-level params")
    # Outlier parameters (the VOS logistic) sit beside the model's top-level modules, which
    # ``model.apply`` ignores, so they are trained, averaged, checkpointed and restored like the model.
    params = {**variables["params"], **outlier_params}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      batch_stats=variables.get("batch_stats", {}), lr_scale=jnp.ones((), jnp.float32),
                      outliers=outliers,
                      ema_params=params if ema else None,
                      apply_fn=model.apply, tx=tx)


def create_train_state(model: flax.linen.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...], mesh: Mesh, param_rules=(),
                       init_outliers: Callable[[], tuple[Any, dict]] | None = None, ema: bool = False,
                       fsdp: bool = False, fsdp_min_size: int = 2**16) -> tuple[TrainState, Any]:
    """Initialise directly into its shardings (no full copy on one device first).

    ``init_outliers`` () -> (outlier buffers, {name: extra top-level params}) sets up outlier
    synthesis (``builders.make_outlier_fns``); the extra params join the model's.

    Returns the state and its sharding pytree (for ``jax.jit`` in/out shardings). Optimizer
    moments follow the sharding of the parameters they mirror because the rules match on the
    parameter path, which optax's states repeat.
    """
    init_fn = functools.partial(_init_state, model, tx, input_shape=input_shape, init_outliers=init_outliers,
                                ema=ema)
    abstract = jax.eval_shape(init_fn, rng)
    shardings = sharding_lib.tree_shardings(abstract, mesh, param_rules, fsdp=fsdp, fsdp_min_size=fsdp_min_size)
    # Initialisation runs once but is hundreds of small random-number fusions: XLA's backend
    # optimisations triple its CPU compile time (42 s -> 12 s for IMSAHLO) and buy nothing here.
    init = jax.jit(init_fn, out_shardings=shardings).lower(rng).compile(
        compiler_options={"xla_backend_optimization_level": 0})
    return init(rng), shardings
