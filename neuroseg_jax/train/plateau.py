"""Host-side ReduceLROnPlateau and early stopping on the validation loss.

Both are pure functions of a small JSON-serialisable state, saved with every checkpoint, so a
resumed run makes the same decisions as an uninterrupted one.
"""

import dataclasses
import math
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class PlateauState:
    best: float = math.inf
    evals_since_best: int = 0
    evals_since_reduce: int = 0
    lr_scale: float = 1.0
    should_stop: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping) -> "PlateauState":
        return cls(**data)


def update_plateau(state: PlateauState, val_loss: float, *, factor: float, patience: int,
                   min_scale: float, threshold: float, early_stop_patience: int) -> PlateauState:
    """One validation result in, the next state out.

    An improvement is ``val_loss < best * (1 - threshold)`` (relative, as in PyTorch's default
    'rel' mode). After ``patience`` evaluations without one, the LR scale is multiplied by
    ``factor`` (never below ``min_scale``) and the patience counter restarts. After
    ``early_stop_patience`` evaluations without improvement (0 disables), ``should_stop`` is set.
    """
    if not math.isfinite(val_loss):
        raise ValueError(f"validation loss is not finite: {val_loss}")
    if val_loss < state.best * (1.0 - threshold) or state.best == math.inf:
        return dataclasses.replace(state, best=val_loss, evals_since_best=0, evals_since_reduce=0)
    since_best = state.evals_since_best + 1
    since_reduce = state.evals_since_reduce + 1
    lr_scale = state.lr_scale
    if patience > 0 and since_reduce > patience:
        lr_scale = max(lr_scale * factor, min_scale)
        since_reduce = 0
    should_stop = early_stop_patience > 0 and since_best >= early_stop_patience
    return PlateauState(best=state.best, evals_since_best=since_best, evals_since_reduce=since_reduce,
                        lr_scale=lr_scale, should_stop=should_stop)
