"""Optimizers and learning-rate schedules from ``config.optim``.

The plateau rule (ReduceLROnPlateau) acts on the *validation* loss, which only the host sees
between evaluations, so it lives in ``plateau.py`` and reaches the step as ``state.lr_scale``.
"""

from typing import Mapping

import optax


def make_schedule(optim_config: Mapping, total_steps: int) -> optax.Schedule:
    name = optim_config["schedule"]
    lr = float(optim_config["lr"])
    warmup = int(optim_config["warmup_steps"])
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
    elif name == "poly":
        # TransUNet/MorphoSeg: lr * (1 - step / total) ** 0.9
        main = optax.polynomial_schedule(lr, 0.0, power=float(optim_config["poly_power"]),
                                         transition_steps=max(total_steps - warmup, 1))
    else:
        raise ValueError(f"config.optim.schedule: unknown schedule {name!r}; use constant, cosine or poly")
    if warmup > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
    return main


def make_optimizer(optim_config: Mapping, total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW or SGD with momentum on the schedule."""
    schedule = make_schedule(optim_config, total_steps)
    name = optim_config["name"]
    if name == "adamw":
        base = optax.adamw(schedule, b1=float(optim_config["b1"]), b2=float(optim_config["b2"]),
                           weight_decay=float(optim_config["weight_decay"]))
    elif name == "sgd":
        base = optax.chain(optax.add_decayed_weights(float(optim_config["weight_decay"])),
                           optax.sgd(schedule, momentum=float(optim_config["momentum"]), nesterov=False))
    else:
        raise ValueError(f"config.optim.name: unknown optimizer {name!r}; use adamw or sgd")
    clip = float(optim_config["clip_norm"])
    return optax.chain(optax.clip_by_global_norm(clip), base) if clip > 0 else base
