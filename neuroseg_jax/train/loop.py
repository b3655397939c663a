"""``train_and_evaluate(config, workdir)``: the whole training run, callable from a Colab.

Each step trains on one batch; every ``train.eval_every`` steps a validation (``_Validation``)
scores the val split, updates the plateau schedule and keeps the best weights; every
``train.checkpoint_every`` steps, and before leaving, the full state is saved for a resume.
"""

import dataclasses
import json
import math
import pathlib
import signal
import subprocess
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from neuroseg_jax import data as data_lib
from neuroseg_jax import inference, losses, metrics
from neuroseg_jax.data.config import instance_mode
from neuroseg_jax.train import checkpoint as checkpoint_lib
from neuroseg_jax.train import metrics_log, plots
from neuroseg_jax.train import sharding as sharding_lib
from neuroseg_jax.train.builders import Trainer, build_trainer, needs_touching_weights
from neuroseg_jax.train.config import validate_config
from neuroseg_jax.train.optim import make_schedule
from neuroseg_jax.train.plateau import PlateauState, update_plateau
from neuroseg_jax.train.state import TrainState


class NonFiniteLossError(FloatingPointError):
    """Raised when a step's loss or gradient is NaN/Inf; the message names the step, the loss
    terms and the last good checkpoint (the state of the bad step is never saved)."""


def git_state(path: str | pathlib.Path | None = None) -> dict[str, Any]:
    """The git commit of the checkout holding ``path`` (default: this package) and whether tracked
    files differ from it ('unknown' outside git). results/ does not count: the experiment runner
    writes there, and it holds no code."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=path or pathlib.Path(__file__).parent).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)results")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def _write_snapshot(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    (workdir / "config.json").write_text(config.to_json(indent=2))
    git = git_state()
    (workdir / "run_info.json").write_text(json.dumps({
        "git_commit": git["commit"], "git_dirty": git["dirty"], "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
        "process_count": jax.process_count()}, indent=2))


class _StopRequest:
    """SIGTERM (a pre-empted job) asks the loop to save and leave at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some notebook kernels): no handler
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _eval_batches(data_config, batch_size: int, seed: int, num_images: int, touching_weights: bool = False,
                  instances: ml_collections.ConfigDict | None = None):
    """Padded validation batches of this process: every process yields the same number of
    batches (collectives need it); padding rows carry ``weight`` 0. ``instances``: the run's
    ``config.instances`` (its masks are three-class targets in instance mode)."""
    count = jax.process_count()
    index = jax.process_index()
    num_batches = math.ceil(math.ceil(num_images / count) / batch_size)
    loader = data_lib.make_loader(data_config, "val", batch_size=batch_size, seed=seed,
                                  process_index=index, process_count=count, num_epochs=1,
                                  touching_weights=touching_weights, instances=instances)
    batches = list(loader)
    template = batches[0]
    for position in range(num_batches):
        batch = batches[position] if position < len(batches) else {k: v[:0] for k, v in template.items()}
        real = len(batch["image"])
        padded = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)])
                  for k, v in batch.items()}
        padded["weight"] = (np.arange(batch_size) < real).astype(np.float32)
        yield padded


def validation_metrics(state: TrainState, eval_step, data_config, batch_size: int, seed: int, mesh,
                       num_images: int, touching_weights: bool = False,
                       instances: ml_collections.ConfigDict | None = None) -> dict[str, float]:
    """Validation loss (mean of per-image losses) and pooled pixel metrics (of the foreground, in
    instance mode too) over the val split of ``num_images`` images; ``touching_weights`` and
    ``instances`` as for the training batches."""
    totals: dict[str, float] = {}
    for batch in _eval_batches(data_config, batch_size, seed, num_images, touching_weights, instances):
        sums = jax.device_get(eval_step(state, sharding_lib.global_batch(batch, mesh)))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    scores = metrics.metrics_from_confusion(totals, empty_score=0.0)
    return {"loss": totals["loss_sum"] / max(totals["count"], 1.0),
            **{key: scores[key] for key in ("dice", "iou", "precision", "recall", "accuracy")}}


class _Previews:
    """Predictions on a fixed set of validation crops, drawn after every evaluation so a run's
    progress can be watched (``plots/predictions_step*.png``); the forward pass compiles once.
    Every process gathers the weights (a collective), process 0 draws."""

    def __init__(self, data_config, num: int, num_val: int):
        size = min(num, num_val)
        self.batch = next(iter(data_lib.make_loader(data_config, "val", batch_size=size, seed=0, num_epochs=1)))
        self._forward = None

    def save(self, state: TrainState, path: pathlib.Path) -> None:
        if self._forward is None:
            self._forward = jax.jit(lambda variables, images: losses.probabilities(
                state.apply_fn(variables, images, train=False)))
        variables = {"params": state.eval_params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        variables = multihost_utils.process_allgather(variables, tiled=True)
        if jax.process_index() != 0:
            return
        probs = np.asarray(self._forward(variables, self.batch["image"]))
        plots.save_predictions(path, self.batch["image"], self.batch["mask"],
                               np.stack([inference.foreground_probability(p) for p in probs]))


@dataclasses.dataclass
class LoopState:
    """What the loop carries from one step to the next besides the TrainState: the plateau schedule
    (LR scale, early stop), the step of the best validation loss, the last validation metrics."""
    plateau: PlateauState = dataclasses.field(default_factory=PlateauState)
    best_step: int | None = None
    last_val: dict[str, float] = dataclasses.field(default_factory=dict)


class _TrainLog:
    """The records of ``metrics.jsonl`` and TensorBoard, and the progress bar (process 0 writes).
    A train record every ``log_every`` steps carries the learning rate and the images per second
    since the previous record."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, total_steps: int, start_step: int):
        is_chief = jax.process_index() == 0
        self.writer = metrics_log.MetricWriter(workdir, enabled=is_chief)
        self.schedule = make_schedule(config.optim, total_steps)
        self.progress = tqdm(total=total_steps, initial=start_step, disable=not is_chief, dynamic_ncols=True,
                             desc="train", unit="step")
        self.log_every, self.total_steps = config.train.log_every, total_steps
        self.batch_size = int(config.train.batch_size)
        self._window_start, self._window_images = time.perf_counter(), 0

    def train(self, step: int, metrics: dict, lr_scale: float) -> None:
        self._window_images += self.batch_size
        self.progress.update(1)
        if step % self.log_every != 0 and step != self.total_steps:
            return
        elapsed = time.perf_counter() - self._window_start
        record = {k: v for k, v in metrics.items() if k != "finite"}
        record["lr"] = float(self.schedule(step - 1)) * lr_scale
        record["images_per_s"] = self._window_images / max(elapsed, 1e-9)
        self.writer.write(step, "train", record)
        self.progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", img_s=f"{record['images_per_s']:.1f}")
        self._window_start, self._window_images = time.perf_counter(), 0

    def validation(self, step: int, val: dict[str, float], lr_scale: float) -> None:
        self.writer.write(step, "val", {**val, "lr_scale": lr_scale})
        self.message(f"step {step}: " + ", ".join(f"val_{k}={v:.4f}" for k, v in val.items()))

    def message(self, text: str) -> None:
        self.progress.write(text)

    def close(self) -> None:
        self.progress.close()
        self.writer.close()


class _Validation:
    """Every ``eval_every`` steps: validation metrics, the plateau update and its LR scale, their
    log record, a preview picture and, on an improvement, the best checkpoint."""

    def __init__(self, config: ml_collections.ConfigDict, trainer: Trainer, num_val: int, touching_weights: bool,
                 workdir: pathlib.Path, checkpoints: checkpoint_lib.Checkpoints, previews: _Previews):
        self.config, self.trainer, self.num_val, self.touching_weights = config, trainer, num_val, touching_weights
        self.workdir, self.checkpoints, self.previews = workdir, checkpoints, previews
        self.batch_size = int(config.train.eval_batch_size or config.train.batch_size) // jax.process_count()

    def __call__(self, state: TrainState, step: int, loop: LoopState, log: _TrainLog) -> TrainState:
        config, plateau_config = self.config, self.config.optim.plateau
        loop.last_val = validation_metrics(state, self.trainer.eval_step, config.data, self.batch_size, config.seed,
                                           self.trainer.mesh, self.num_val, self.touching_weights,
                                           config.get("instances"))
        loop.plateau = update_plateau(loop.plateau, loop.last_val["loss"], factor=plateau_config.factor,
                                      patience=plateau_config.patience, min_scale=plateau_config.min_scale,
                                      threshold=plateau_config.threshold,
                                      early_stop_patience=config.train.early_stop.patience)
        # Built from the host value on every process: a device_put of a local array would not
        # form a valid global array across hosts.
        state = state.replace(lr_scale=jax.make_array_from_callback(
            (), self.trainer.state_shardings.lr_scale, lambda _: np.float32(loop.plateau.lr_scale)))
        log.validation(step, loop.last_val, loop.plateau.lr_scale)
        self.previews.save(state, self.workdir / "plots" / f"predictions_step{step:06d}.png")
        if loop.plateau.evals_since_best == 0:
            loop.best_step = step
            self.checkpoints.save_best(step, {"params": state.eval_params, "batch_stats": state.batch_stats},
                                       {"step": step, "val": loop.last_val})
        return state


def _prepare_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     checkpoints: checkpoint_lib.Checkpoints, train_images) -> dict:
    """The run's identity, after checking that the latest checkpoint (if any) belongs to it; then
    (process 0) ``plots/`` and the config snapshot. A refused resume leaves ``config.json`` alone."""
    names = (train_images.base if isinstance(train_images, data_lib.PatchDataset) else train_images).names
    identity = checkpoint_lib.run_identity(config, names)
    resume_step = checkpoints.latest_step()
    if resume_step is not None:
        checkpoint_lib.check_resumable(checkpoints.latest_meta(), identity, config.data.worker_count,
                                       f"{workdir}: the latest checkpoint (step {resume_step})")
    if jax.process_index() == 0:
        (workdir / "plots").mkdir(parents=True, exist_ok=True)
        _write_snapshot(config, workdir)
    return identity


def _resume(checkpoints: checkpoint_lib.Checkpoints, trainer: Trainer, train_iter,
            workdir: pathlib.Path) -> tuple[TrainState, LoopState]:
    """The latest checkpoint's state (re-sharded as ``trainer``'s), loop state and data position;
    ``metrics.jsonl`` loses the records written after it."""
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            trainer.state.checkpoint_items(), trainer.state_shardings.checkpoint_items())
    items, meta = checkpoints.restore_latest(abstract, train_iter)
    if jax.process_index() == 0:
        metrics_log.truncate_after(workdir / "metrics.jsonl", int(meta["step"]))
    return (trainer.state.with_checkpoint_items(items),
            LoopState(plateau=PlateauState.from_json(meta["plateau"]), best_step=meta.get("best_step")))


def _check_finite(metrics: dict, step: int, checkpoints: checkpoint_lib.Checkpoints, workdir: pathlib.Path) -> None:
    if metrics["finite"]:
        return
    last = checkpoints.latest_step()
    terms = {k: float(v) for k, v in metrics.items() if k.startswith("loss")}
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {step}: loss terms {terms}, gradient norm "
        f"{float(metrics['grad_norm'])}; the state was not updated and not saved; last good "
        f"checkpoint: {workdir / 'checkpoints' / 'latest' / str(last) if last is not None else 'none'}")


def _split_line(data_config: ml_collections.ConfigDict) -> str:
    """Which images the run sees: a folder's test split is held out of training even when the model
    is later evaluated on another folder, so the log says how many images that is and why."""
    split = data_config.split
    sizes = data_lib.split_sizes(data_config)
    origin = (f"split file {split.file}" if split.file else
              f"seeded split (seed {split.seed}, val_fraction {split.val_fraction}, test_fraction "
              f"{split.test_fraction})")
    return (f"data: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test images from {origin}; "
            "the test images are held out of training and model selection")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint if there is one).

    Returns the last validation metrics. Writes ``checkpoints/{latest,best}``, ``metrics.jsonl``,
    TensorBoard events, ``config.json``, ``run_info.json`` and ``plots/`` (process 0 only).
    """
    validate_config(config, jax.device_count(), jax.process_count())
    num_val = len(data_lib.build_dataset(config.data, "val"))  # an empty split raises there
    workdir = pathlib.Path(workdir)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints)
    touching_weights = needs_touching_weights(config.loss)
    train_images = data_lib.build_dataset(
        config.data, "train", with_instances=touching_weights,
        require_instance_labels=instance_mode(config.get("instances")) == "three_class")
    identity = _prepare_workdir(config, workdir, checkpoints, train_images)

    trainer = build_trainer(config)
    train_iter = iter(data_lib.make_loader(
        config.data, "train", batch_size=int(config.train.batch_size) // jax.process_count(), seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), dataset=train_images,
        touching_weights=touching_weights, instances=config.get("instances")))
    state, loop = trainer.state, LoopState()
    if checkpoints.latest_step() is not None:
        state, loop = _resume(checkpoints, trainer, train_iter, workdir)
    step = int(jax.device_get(state.step))
    previews = _Previews(config.data, int(config.train.num_preview), num_val)
    validate = _Validation(config, trainer, num_val, touching_weights, workdir, checkpoints, previews)
    stop = _StopRequest()
    log = _TrainLog(config, workdir, trainer.total_steps, step)
    log.message(_split_line(config.data))
    eval_every = int(config.train.eval_every or trainer.steps_per_epoch)
    checkpoint_every = int(config.train.checkpoint_every or eval_every)
    try:
        while step < trainer.total_steps:
            batch = sharding_lib.global_batch(next(train_iter), trainer.mesh)
            state, metrics = trainer.train_step(state, batch, trainer.step_rng)
            step += 1
            metrics = jax.device_get(metrics)
            _check_finite(metrics, step, checkpoints, workdir)
            log.train(step, metrics, loop.plateau.lr_scale)
            last_step = step == trainer.total_steps
            if step % eval_every == 0 or last_step:
                state = validate(state, step, loop, log)
            if step % checkpoint_every == 0 or last_step or stop.requested or loop.plateau.should_stop:
                checkpoints.save_latest(step, state.checkpoint_items(), train_iter, {
                    "step": step, "plateau": loop.plateau.to_json(), "best_step": loop.best_step,
                    "data_worker_count": config.data.worker_count, "run": identity})
            if stop.requested:
                log.message(f"SIGTERM: saved step {step} to {workdir / 'checkpoints'}; stopping")
                break
            if loop.plateau.should_stop:
                log.message(f"early stopping at step {step}: no improvement in "
                            f"{config.train.early_stop.patience} evaluations (best {loop.plateau.best:.4f})")
                break
    finally:
        log.close()
        checkpoints.wait()
        checkpoints.close()
        stop.restore()

    previews.save(state, workdir / "plots" / "predictions.png")
    if jax.process_index() == 0:
        plots.save_curves(workdir / "plots" / "curves.png", metrics_log.read_metrics(workdir / "metrics.jsonl"))
        if inference.chooses_threshold(config) and not stop.requested and loop.best_step is not None \
                and jax.process_count() == 1:
            # Now, while the validation images are at hand: prediction elsewhere needs only the workdir.
            # (Restoring a checkpoint is collective across processes; a multi-process run leaves the
            # choice to its first evaluate.py or predict.py.)
            chosen = inference.choose_threshold(workdir, "best")
            tqdm.write(f"decision threshold {chosen['threshold']:.2f} chosen on the validation split (pooled Dice "
                       f"{chosen['val_dice']:.4f}; {chosen['val_dice_at_0.5']:.4f} at 0.5)")
    return loop.last_val

