"""Orbax checkpoints: ``latest`` (resume) and ``best`` (by validation loss) kept apart.

``checkpoints/latest`` holds the last ``keep`` full states with the data iterator position and
the host-side training state (plateau, best loss); ``checkpoints/best`` holds only the weights of
the best validation loss. The two managers never delete each other's steps, so keeping the best
can never remove the checkpoint a resume needs. Orbax writes into a temporary folder and renames
it when complete, so an interrupted save leaves the previous checkpoints intact.

A resume must continue the same run: ``run_identity`` (stored in every latest checkpoint's meta)
holds the configuration outside ``RESUMABLE_KEYS`` and a digest of the training split's image
names, and ``check_resumable`` refuses a different one, naming what changed.
"""

import hashlib
import json
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util

LATEST = "latest"
BEST = "best"

# Config keys (and key prefixes) a resumed run may change: run length, the cadence of evaluation,
# logging and checkpoints, early stopping, previews, inference settings, loader throughput, and
# the device mesh (the state is re-sharded on restore). Everything else defines the run.
RESUMABLE_KEYS = (
    "train.num_epochs", "train.num_steps", "train.eval_every", "train.checkpoint_every", "train.log_every",
    "train.keep_checkpoints", "train.early_stop", "train.eval_batch_size", "train.num_preview",
    "mesh", "inference", "data.worker_count", "data.read_threads", "data.prefetch", "data.cache_size",
)


def _resumable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS)


def run_identity(config, train_image_names: list[str]) -> dict:
    """What a run resuming from a checkpoint must share with the run that wrote it (JSON-able):
    every config value outside ``RESUMABLE_KEYS`` and the count and SHA-256 of the training
    split's image names (added, removed or renamed files change the split)."""
    flat = traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")
    values = {key: value for key, value in flat.items() if not _resumable(key)}
    digest = hashlib.sha256("\n".join(train_image_names).encode()).hexdigest()
    return {"config": values, "train_images": len(train_image_names), "train_names_sha256": digest}


def check_resumable(saved_meta: dict, identity: dict, worker_count: int, where: str) -> None:
    """Raises ValueError, saying what differs, unless the run described by ``identity`` (with
    ``data.worker_count`` = worker_count) may resume from the checkpoint with ``saved_meta``.
    ``where`` names the checkpoint in the message. Checkpoints older than the identity record
    only have their worker count checked."""
    saved_workers = saved_meta.get("data_worker_count", worker_count)
    if saved_workers != worker_count:
        # The data iterator's saved position is laid out per worker process.
        raise ValueError(f"{where} was saved with data.worker_count={saved_workers}; resume with "
                         f"--config.data.worker_count={saved_workers} (got {worker_count})")
    saved = saved_meta.get("run")
    if saved is None:
        return
    then, now = saved["config"], identity["config"]

    def shown(values: dict, key: str) -> str:
        return repr(values[key]) if key in values else "absent"

    changed = [f"{key}={shown(now, key)} (checkpoint: {shown(then, key)})" for key in sorted(then.keys() | now.keys())
               if key not in then or key not in now or then[key] != now[key]]
    if changed:
        raise ValueError(f"{where} belongs to a run with another configuration: {'; '.join(changed)}. "
                         "Resume with the checkpoint's values or train in a new workdir")
    if saved["train_names_sha256"] != identity["train_names_sha256"]:
        raise ValueError(f"{where} was trained on another training split ({saved['train_images']} images, now "
                         f"{identity['train_images']}, or files renamed): the dataset changed since. Restore "
                         "the dataset or train in a new workdir")


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
