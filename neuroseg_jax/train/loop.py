"""``train_and_evaluate(config, workdir)``: the whole training run, callable from a Colab."""

import dataclasses
import functools
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
from neuroseg_jax import inference, losses, metrics, models
from neuroseg_jax.train import checkpoint as checkpoint_lib
from neuroseg_jax.train import metrics_log, plots
from neuroseg_jax.train import sharding as sharding_lib
from neuroseg_jax.train.config import validate_config
from neuroseg_jax.train.optim import make_optimizer, make_schedule
from neuroseg_jax.train.plateau import PlateauState, update_plateau
from neuroseg_jax.train.state import TrainState, create_train_state
from neuroseg_jax.train.step import make_step_fns


class NonFiniteLossError(FloatingPointError):
    """Raised when a step's loss or gradient is NaN/Inf; the message names the step, the loss
    terms and the last good checkpoint (the state of the bad step is never saved)."""


def build_model(model_config: ml_collections.ConfigDict):
    """``config.model``: ``name`` picks the registered model, every other key is its argument."""
    kwargs = model_config.to_dict()
    return models.create_model(kwargs.pop("name"), **kwargs)


def make_loss_fn(loss_config: ml_collections.ConfigDict):
    weights = dict(loss_config.terms)
    params = loss_config.params.to_dict()

    def loss_fn(logits, labels, touching_weights=None):
        return losses.hybrid_loss(logits, labels, weights=weights, params=params, touching_weights=touching_weights)

    return loss_fn


def needs_touching_weights(loss_config: ml_collections.ConfigDict) -> bool:
    """Whether batches must carry the touching-cells weights (``data.touching_cells``): only when a
    term that uses them has a weight, so other runs compute no distance transforms."""
    return any(loss_config.terms.get(name) for name in losses.hybrid.TOUCHING_WEIGHTED_TERMS)


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
        variant=settings.variant, placement=settings.placement)
    return init, regularizer


def objective_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
    """lambda of every term the train step optimises: ``config.loss.terms`` plus, with outlier
    synthesis, ``uncertainty`` weighted ``config.outliers.weight``."""
    weights = {name: float(value) for name, value in config.loss.terms.items()}
    if config.outliers.enabled:
        weights["uncertainty"] = float(config.outliers.weight)
    return weights


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=pathlib.Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _write_snapshot(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    (workdir / "config.json").write_text(config.to_json(indent=2))
    (workdir / "run_info.json").write_text(json.dumps({
        "git_commit": _git_commit(), "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
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


def _eval_batches(data_config, batch_size: int, seed: int, num_images: int, touching_weights: bool = False):
    """Padded validation batches of this process: every process yields the same number of
    batches (collectives need it); padding rows carry ``weight`` 0."""
    count = jax.process_count()
    index = jax.process_index()
    num_batches = math.ceil(math.ceil(num_images / count) / batch_size)
    loader = data_lib.make_loader(data_config, "val", batch_size=batch_size, seed=seed,
                                  process_index=index, process_count=count, num_epochs=1,
                                  touching_weights=touching_weights)
    batches = list(loader)
    template = batches[0]
    for position in range(num_batches):
        batch = batches[position] if position < len(batches) else {k: v[:0] for k, v in template.items()}
        real = len(batch["image"])
        padded = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)])
                  for k, v in batch.items()}
        padded["weight"] = (np.arange(batch_size) < real).astype(np.float32)
        yield padded


def evaluate(state: TrainState, eval_step, data_config, batch_size: int, seed: int, mesh,
             num_images: int, touching_weights: bool = False) -> dict[str, float]:
    """Validation loss (mean of per-image losses) and pooled pixel metrics over the val split of
    ``num_images`` images; ``touching_weights`` as for the training batches."""
    totals: dict[str, float] = {}
    for batch in _eval_batches(data_config, batch_size, seed, num_images, touching_weights):
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


def build_trainer(config: ml_collections.ConfigDict, devices=None) -> Trainer:
    """Model, optimizer, losses, outlier buffers and the sharded state for ``config`` on a mesh
    over ``devices`` (default: all)."""
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    num_train = len(data_lib.build_dataset(config.data, "train"))
    steps_per_epoch = max(num_train // int(config.train.batch_size), 1)
    total_steps = int(config.train.num_steps or config.train.num_epochs * steps_per_epoch)
    tx = make_optimizer(config.optim, total_steps)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    crop_h, crop_w = config.data.crop_size
    init_outliers, outlier_fn = make_outlier_fns(config, steps_per_epoch)
    state, state_shardings = create_train_state(
        build_model(config.model), tx, init_rng, (1, crop_h, crop_w, config.data.channels), mesh,
        models.sharding_rules(config.model.name), init_outliers=init_outliers, ema=config.optim.ema_decay > 0,
        fsdp=config.mesh.fsdp, fsdp_min_size=config.mesh.fsdp_min_size)
    term_start_steps = {"uncertainty": outlier_start_step(config, steps_per_epoch)} if outlier_fn else {}
    train_step, eval_step = make_step_fns(make_loss_fn(config.loss), mesh, state_shardings,
                                          loss_weights=objective_weights(config), weighting=config.loss.weighting,
                                          term_start_steps=term_start_steps, primary_term=config.loss.primary or None,
                                          outlier_fn=outlier_fn, ema_decay=float(config.optim.ema_decay))
    return Trainer(mesh=mesh, state=state, state_shardings=state_shardings, train_step=train_step,
                   eval_step=eval_step, step_rng=step_rng, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint if there is one).

    Returns the last validation metrics. Writes ``checkpoints/{latest,best}``, ``metrics.jsonl``,
    TensorBoard events, ``config.json``, ``run_info.json`` and ``plots/`` (process 0 only).
    """
    validate_config(config, jax.device_count(), jax.process_count())
    num_val = len(data_lib.build_dataset(config.data, "val"))
    if num_val == 0:
        raise ValueError("the validation split is empty: raise config.data.split.val_fraction or add images")
    workdir = pathlib.Path(workdir)
    is_chief = jax.process_index() == 0
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints)
    touching_weights = needs_touching_weights(config.loss)
    train_images = data_lib.build_dataset(config.data, "train", with_instances=touching_weights)
    identity = checkpoint_lib.run_identity(
        config, (train_images.base if isinstance(train_images, data_lib.PatchDataset) else train_images).names)
    resume_step = checkpoints.latest_step()
    if resume_step is not None:
        checkpoint_lib.check_resumable(checkpoints.latest_meta(), identity, config.data.worker_count,
                                       f"{workdir}: the latest checkpoint (step {resume_step})")
    if is_chief:  # after the resume check, so a refused resume leaves the run's config.json as it was
        (workdir / "plots").mkdir(parents=True, exist_ok=True)
        _write_snapshot(config, workdir)

    trainer = build_trainer(config)
    mesh, state, state_shardings = trainer.mesh, trainer.state, trainer.state_shardings
    train_step, eval_step, total_steps = trainer.train_step, trainer.eval_step, trainer.total_steps
    global_batch = int(config.train.batch_size)
    local_batch = global_batch // jax.process_count()
    eval_batch = int(config.train.eval_batch_size or global_batch) // jax.process_count()
    eval_every = int(config.train.eval_every or trainer.steps_per_epoch)
    checkpoint_every = int(config.train.checkpoint_every or eval_every)
    step_rng = trainer.step_rng

    train_iter = iter(data_lib.make_loader(config.data, "train", batch_size=local_batch, seed=config.seed,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count(), dataset=train_images,
                                           touching_weights=touching_weights))
    plateau = PlateauState()
    best_step = None
    if resume_step is not None:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state.checkpoint_items(), state_shardings.checkpoint_items())
        items, meta = checkpoints.restore_latest(abstract, train_iter)
        state = state.with_checkpoint_items(items)
        plateau = PlateauState.from_json(meta["plateau"])
        best_step = meta.get("best_step")
        if is_chief:
            metrics_log.truncate_after(workdir / "metrics.jsonl", int(meta["step"]))
    start_step = int(jax.device_get(state.step))
    writer = metrics_log.MetricWriter(workdir, enabled=is_chief)
    stop = _StopRequest()
    plateau_config = config.optim.plateau
    last_val: dict[str, float] = {}
    schedule = make_schedule(config.optim, total_steps)
    previews = _Previews(config.data, int(config.train.num_preview), num_val)

    def save_latest(step: int) -> None:
        checkpoints.save_latest(step, state.checkpoint_items(), train_iter,
                                {"step": step, "plateau": plateau.to_json(), "best_step": best_step,
                                  "data_worker_count": config.data.worker_count, "run": identity})

    progress = tqdm(total=total_steps, initial=start_step, disable=not is_chief, dynamic_ncols=True,
                    desc="train", unit="step")
    window_start, window_images = time.perf_counter(), 0
    step = start_step
    try:
        while step < total_steps:
            batch = sharding_lib.global_batch(next(train_iter), mesh)
            state, metrics = train_step(state, batch, step_rng)
            step += 1
            window_images += global_batch
            metrics = jax.device_get(metrics)
            if not metrics["finite"]:
                last = checkpoints.latest_step()
                terms = {k: float(v) for k, v in metrics.items() if k.startswith("loss")}
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {step}: loss terms {terms}, gradient norm "
                    f"{float(metrics['grad_norm'])}; the state was not updated and not saved; last good "
                    f"checkpoint: {workdir / 'checkpoints' / 'latest' / str(last) if last is not None else 'none'}")
            progress.update(1)
            if step % config.train.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {k: v for k, v in metrics.items() if k != "finite"}
                record["lr"] = float(schedule(step - 1)) * plateau.lr_scale
                record["images_per_s"] = window_images / max(elapsed, 1e-9)
                writer.write(step, "train", record)
                progress.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                                     img_s=f"{record['images_per_s']:.1f}")
                window_start, window_images = time.perf_counter(), 0
            if step % eval_every == 0 or step == total_steps:
                last_val = evaluate(state, eval_step, config.data, eval_batch, config.seed, mesh, num_val,
                                    touching_weights)
                plateau = update_plateau(plateau, last_val["loss"], factor=plateau_config.factor,
                                         patience=plateau_config.patience, min_scale=plateau_config.min_scale,
                                         threshold=plateau_config.threshold,
                                         early_stop_patience=config.train.early_stop.patience)
                improved = plateau.evals_since_best == 0
                # Built from the host value on every process: a device_put of a local array
                # would not form a valid global array across hosts.
                state = state.replace(lr_scale=jax.make_array_from_callback(
                    (), state_shardings.lr_scale, lambda _: np.float32(plateau.lr_scale)))
                writer.write(step, "val", {**last_val, "lr_scale": plateau.lr_scale})
                progress.write(f"step {step}: " + ", ".join(f"val_{k}={v:.4f}" for k, v in last_val.items()))
                previews.save(state, workdir / "plots" / f"predictions_step{step:06d}.png")
                if improved:
                    best_step = step
                    checkpoints.save_best(step, {"params": state.eval_params, "batch_stats": state.batch_stats},
                                          {"step": step, "val": last_val})
            if step % checkpoint_every == 0 or step == total_steps or stop.requested or plateau.should_stop:
                save_latest(step)
            if stop.requested:
                progress.write(f"SIGTERM: saved step {step} to {workdir / 'checkpoints'}; stopping")
                break
            if plateau.should_stop:
                progress.write(f"early stopping at step {step}: no improvement in "
                               f"{config.train.early_stop.patience} evaluations (best {plateau.best:.4f})")
                break
    finally:
        progress.close()
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        stop.restore()

    previews.save(state, workdir / "plots" / "predictions.png")
    if is_chief:
        plots.save_curves(workdir / "plots" / "curves.png", metrics_log.read_metrics(workdir / "metrics.jsonl"))
    return last_val
