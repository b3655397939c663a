"""Orbax checkpoints: ``latest`` (resume) and ``best`` (by validation loss) kept apart.

``checkpoints/latest`` holds the last ``keep`` full states with the data iterator position and
the host-side training state (plateau, best loss); ``checkpoints/best`` holds only the weights of
the best validation loss. The two managers never delete each other's steps, so keeping the best
can never remove the checkpoint a resume needs. Orbax writes into a temporary folder and renames
it when complete, so an interrupted save leaves the previous checkpoints intact.
"""

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

LATEST = "latest"
BEST = "best"


def _manager(directory: pathlib.Path, keep: int, item_names: tuple[str, ...], handlers: dict | None = None):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=item_names,
                                 item_handlers=handlers)


class Checkpoints:
    """The two checkpoint series of one workdir."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2):
        root = pathlib.Path(workdir) / "checkpoints"
        self.latest = _manager(root / LATEST, keep, ("state", "data", "meta"),
                               {"state": ocp.StandardCheckpointHandler(),
                                "data": grain.checkpoint.CheckpointHandler(),
                                "meta": ocp.JsonCheckpointHandler()})
        self.best = _manager(root / BEST, 1, ("weights", "meta"))

    def save_latest(self, step: int, state_items: dict, data_iterator, meta: dict) -> None:
        self.latest.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_items),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(meta)), force=True)

    def save_best(self, step: int, weights: dict, meta: dict) -> None:
        self.best.save(step, args=ocp.args.Composite(weights=ocp.args.StandardSave(weights),
                                                     meta=ocp.args.JsonSave(meta)), force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def latest_meta(self) -> dict:
        """The host-side metadata of the latest checkpoint, without restoring its state."""
        step = self.latest.latest_step()
        return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, abstract_state_items: dict, data_iterator) -> tuple[dict, dict]:
        """Restores into ``abstract_state_items``' shapes and shardings and moves ``data_iterator``
        to the saved position. Returns (state items, meta)."""
        step = self.latest.latest_step()
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state_items),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_weights(workdir: str | pathlib.Path, checkpoint: str = BEST) -> tuple[dict, dict, int]:
    """Weights for inference: ``checkpoint`` is 'best', 'latest' or a step number of 'latest'.

    Returns (variables for ``model.apply``, meta, step). Arrays come back on the default device.
    """
    root = pathlib.Path(workdir) / "checkpoints"
    series = BEST if checkpoint == BEST else LATEST
    directory = (root / series).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no {series!r} checkpoints in {root}")
    item = "weights" if series == BEST else "state"
    manager = ocp.CheckpointManager(directory, item_names=(item, "meta"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    if checkpoint in (BEST, LATEST):
        step = manager.latest_step()
    else:
        try:
            step = int(checkpoint)
        except ValueError:
            raise ValueError(f"--checkpoint must be 'best', 'latest' or a step number, got {checkpoint!r}") from None
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found in {directory}; "
                                f"saved steps: {sorted(manager.all_steps())}")
    restored = manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(),
                                                                "meta": ocp.args.JsonRestore()}))
    manager.close()
    weights = restored[item]
    # A run with an EMA evaluates and predicts with the average (best already holds it).
    variables: dict[str, Any] = {"params": weights.get("ema_params") or weights["params"]}
    if weights.get("batch_stats"):
        variables["batch_stats"] = weights["batch_stats"]
    return jax.device_get(variables), restored["meta"], step
