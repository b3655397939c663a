"""Helpers for ``configs/*.py``: the ``:ARGS`` mini-language and validation before compiling.

``configs/imsahlo.py:quick,model=unet,loss=tversky+focal`` reaches ``get_config`` as
``"quick,model=unet,loss=tversky+focal"``; ``parse_config_arg`` turns it into a dict and rejects
anything the config does not declare.
"""

from typing import Mapping

import ml_collections

from neuroseg_jax._validation import probability
from neuroseg_jax.train.sharding import DATA_AXIS, mesh_shape


def parse_config_arg(arg: str | None, allowed: Mapping[str, object]) -> dict:
    """``"quick,model=unet"`` -> ``{"quick": True, "model": "unet"}``, with defaults from ``allowed``.

    Unknown names raise a ValueError that lists the allowed ones.
    """
    values = dict(allowed)
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        if key not in allowed:
            raise ValueError(f"unknown config argument {key!r}; allowed: {sorted(allowed)}")
        values[key] = value if sep else True
    return values


def default_mesh_config() -> ml_collections.ConfigDict:
    """``config.mesh``: device mesh axes (-1 = all remaining devices) and FSDP of large parameters."""
    return ml_collections.ConfigDict({"data": -1, "model": 1, "fsdp": False, "fsdp_min_size": 2**16})


def default_optim_config() -> ml_collections.ConfigDict:
    """``config.optim``: every optimizer key; the defaults switch clipping, warm-up, EMA and the
    plateau rule off, so a config states only the values its paper sets."""
    return ml_collections.ConfigDict({
        "name": "adamw",  # 'adamw' | 'sgd' (with momentum)
        "lr": 1e-3, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "momentum": 0.9,
        "clip_norm": 0.0,  # global-norm clipping; 0 = none
        "schedule": "constant",  # 'constant' | 'cosine' | 'poly' (to 0 over the run)
        "warmup_steps": 0, "poly_power": 0.9,
        "ema_decay": 0.0,  # > 0: evaluate, keep as best and predict with an EMA of the weights
        # ReduceLROnPlateau on the validation loss: after `patience` evaluations without a relative
        # improvement of `threshold`, the LR scale is multiplied by `factor` (not below min_scale); 0 = off.
        "plateau": {"factor": 1.0, "patience": 0, "min_scale": 1.0, "threshold": 1e-4},
    })


def default_train_config() -> ml_collections.ConfigDict:
    """``config.train``: batch, length, evaluation and checkpoint cadence, early stopping."""
    return ml_collections.ConfigDict({
        "batch_size": 8,  # global, over all processes
        "num_epochs": 1,
        "num_steps": 0,  # > 0 overrides num_epochs
        "eval_every": 0,  # steps; 0 = once per epoch
        "checkpoint_every": 0,  # steps; 0 = at every evaluation
        "log_every": 10,
        "keep_checkpoints": 2,
        "early_stop": {"patience": 0},  # evaluations without improvement; 0 disables
        "eval_batch_size": 0,  # 0 = batch_size
        "num_preview": 4,  # validation images drawn at each evaluation
    })


def default_outlier_config() -> ml_collections.ConfigDict:
    """``config.outliers``: virtual outlier synthesis (MorphoSeg §3.2-3.3; off unless enabled)."""
    return ml_collections.ConfigDict({
        "enabled": False,
        "start_epoch": 150,  # MorphoSeg: sampling from the 150th of 200 epochs
        "start_step": 0,  # > 0 overrides start_epoch
        "buffer_size": 1000,  # embeddings (per-pixel logit vectors) kept per class
        "max_per_class": 100,  # new embeddings per class and step
        "num_candidates": 100_000,  # drawn per class from N(mu_k, Sigma)
        "num_selected": 10_000,  # lowest-likelihood candidates kept
        # Relative: ridge * (mean variance) is added to the diagonal of the shared covariance, so it
        # regularises logits and wide embeddings of any scale alike (> 0).
        "ridge": 1e-4,
        "beta1": 0.5,  # weight of CE on the uncertainty-enhanced output
        "beta2": 0.5,  # weight of Dice on the uncertainty-enhanced output
        "weight": 1.0,  # beta of lambda L_seg + beta L_uncertainty (before config.loss.weighting)
        # 'uncertainty' (MorphoSeg eq. 15) or 'vos' (energy logistic loss; its weight and bias are
        # trained, kept in params['vos_energy'])
        "variant": "uncertainty",
        # 'shift': outliers shift their pixels' logits by v - mu_k and L_uncertainty scores those pixels
        # (a margin term); 'replace': outliers take their pixels' place and L_uncertainty scores every
        # pixel (the public code's reading; it is then almost L_seg again, see losses/outliers.py)
        "placement": "shift",
    })


def validate_config(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
    """Checks that need no compilation, so a bad key or value fails in seconds, naming itself."""
    from neuroseg_jax import losses, models  # deferred: keeps configs cheap to import

    if config.model.name not in models.MODELS:
        raise ValueError(f"config.model.name={config.model.name!r} is not a registered model; "
                         f"known: {sorted(models.MODELS)}")
    unknown = sorted(set(config.loss.terms) - set(losses.LOSS_TERMS))
    if unknown:
        raise ValueError(f"config.loss.terms: unknown loss term(s) {unknown}; known: {sorted(losses.LOSS_TERMS)}")
    unknown = sorted(set(config.loss.params) - set(losses.LOSS_TERMS))
    if unknown:
        raise ValueError(f"config.loss.params: unknown loss term(s) {unknown}; known: {sorted(losses.LOSS_TERMS)}")
    from neuroseg_jax.train.step import WEIGHTINGS  # deferred like the imports above

    if config.loss.weighting not in WEIGHTINGS:
        raise ValueError(f"config.loss.weighting={config.loss.weighting!r}; use one of {WEIGHTINGS}")
    if config.loss.weighting == "relative" and config.loss.primary not in config.loss.terms:
        raise ValueError(f"config.loss.primary={config.loss.primary!r} must name one of config.loss.terms "
                         f"{sorted(config.loss.terms)} when config.loss.weighting='relative'")
    if config.outliers.enabled and config.outliers.num_selected > config.outliers.num_candidates:
        raise ValueError("config.outliers.num_selected must not exceed config.outliers.num_candidates")
    if not config.loss.terms:
        raise ValueError("config.loss.terms is empty: give at least one loss term and its weight")
    from neuroseg_jax.data.config import instance_mode  # deferred like the imports above

    instances = config.get("instances", ml_collections.ConfigDict())
    three_class = instance_mode(instances) == "three_class"
    if three_class and int(config.model.num_classes) != 3:
        raise ValueError(f"config.instances.mode='three_class' needs config.model.num_classes=3 (background, "
                         f"interior, boundary), got {config.model.num_classes}")
    if instances.get("declump", False):
        if three_class:
            raise ValueError("config.instances.declump splits a binary mask's objects by shape; in three_class mode "
                             "the boundary class separates them: set one of the two")
        if not instances.declump_h > 0 or not instances.declump_sigma >= 0:
            raise ValueError(f"config.instances.declump_h={instances.declump_h!r} must be > 0 and "
                             f"config.instances.declump_sigma={instances.declump_sigma!r} >= 0 (pixels)")
    touching_weight = instances.get("touching_weight", 0.0)
    if not touching_weight >= 0:
        raise ValueError(f"config.instances.touching_weight={touching_weight!r} must be >= 0")
    if touching_weight > 0 and not three_class:
        raise ValueError("config.instances.touching_weight weighs the three-class targets' touching band: it needs "
                         "config.instances.mode='three_class'")
    if touching_weight > 0 and not any(config.loss.terms.get(name) for name in losses.hybrid.TOUCHING_WEIGHTED_TERMS):
        raise ValueError(f"config.instances.touching_weight={touching_weight} has no effect: no term that takes "
                         f"touching weights ({sorted(losses.hybrid.TOUCHING_WEIGHTED_TERMS)}) is in config.loss.terms")
    probability(config.inference.get("threshold", 0.5), "config.inference.threshold")
    batch = config.train.batch_size
    data_axis = mesh_shape(config.mesh, num_devices)[DATA_AXIS]
    if batch % data_axis or batch % process_count:
        raise ValueError(f"config.train.batch_size={batch} must be divisible by the {data_axis} devices of the "
                         f"'data' mesh axis and by the {process_count} processes")
    if config.data.source == "folder" and not config.data.root:
        raise ValueError("config.data.source='folder' needs config.data.root=DIR (with images/ and masks/)")
    crop = config.data.crop_size
    if crop is None:
        raise ValueError("config.data.crop_size must be set: training batches need one size")
    if config.train.num_steps <= 0 and config.train.num_epochs <= 0:
        raise ValueError("set config.train.num_steps or config.train.num_epochs to a positive number")
