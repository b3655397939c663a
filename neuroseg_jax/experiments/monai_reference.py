"""Reference row ``monai_basicunet_dicece``: MONAI's BasicUNet trained with DiceCELoss in PyTorch,
on the batches of our loader for the same protocol config, scored by our metrics.

What is shared with the JAX rows, so that only the model, loss and framework differ: the training
batches (``make_loader`` of the config: crops, augmentation, order, seed), the number of steps, the
batch size, AdamW with the protocol's lr, betas, weight decay, lr schedule, global-norm clipping and
ReduceLROnPlateau/early-stopping rule, the evaluation cadence with the best checkpoint chosen by
validation loss, and the test-split evaluation (sliding window, threshold, post-processing), also
at the threshold of highest validation Dice (`inference.best_threshold`, as the JAX rows' 'val').
The best weights are kept in memory and saved to ``WORKDIR/best.pt``; an interrupted reference run
starts again from step 0.

torch and monai are imported when the row runs; where either is missing the runner skips the row.
"""

from __future__ import annotations

import copy
import math
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np

from neuroseg_jax import data as data_lib
from neuroseg_jax import inference, metrics
from neuroseg_jax.experiments.runner import ReferenceUnavailable
from neuroseg_jax.train import PlateauState, make_schedule, update_plateau
from neuroseg_jax.train.builders import step_counts
from neuroseg_jax.train.metrics_log import MetricWriter

ROW = "monai_basicunet_dicece"
TORCH_THREADS = 2


def _import_torch_monai():
    try:
        import torch
        from monai.losses import DiceCELoss
        from monai.networks.nets import BasicUNet
    except ImportError as error:
        raise ReferenceUnavailable(f"{ROW} needs torch and monai ({error})") from error
    return torch, BasicUNet, DiceCELoss


def _to_torch(torch, batch: dict) -> tuple[Any, Any]:
    """Channels-last numpy batch -> (images (B, C, H, W), foreground targets (B, 1, H, W))."""
    images = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(batch["image"], np.float32), -1, 1)))
    targets = torch.from_numpy((np.asarray(batch["mask"]) > 0).astype(np.float32)[:, None])
    return images, targets


def _validate(torch, model, loss_fn, config: ml_collections.ConfigDict, batch_size: int) -> dict[str, float]:
    """Mean per-image validation loss and pooled pixel scores, as the JAX loop's ``validation_metrics``."""
    model.eval()
    loss_sum, count, confusions = 0.0, 0, []
    with torch.no_grad():
        for batch in data_lib.make_loader(config.data, "val", batch_size=batch_size, seed=config.seed,
                                          num_epochs=1):
            images, targets = _to_torch(torch, batch)
            logits = model(images)
            loss_sum += float(loss_fn(logits, targets)) * len(images)
            count += len(images)
            confusions.append(metrics.confusion_counts(torch.sigmoid(logits).numpy()[:, 0], batch["mask"]))
    model.train()
    scores = metrics.metrics_from_confusion(metrics.sum_confusions(confusions), empty_score=0.0)
    return {"loss": loss_sum / max(count, 1), **{key: scores[key] for key in ("dice", "iou", "precision", "recall")}}


def train_and_evaluate_reference(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    """Train BasicUNet on ``config``'s protocol in ``workdir``, evaluate its best state on the test split."""
    torch, BasicUNet, DiceCELoss = _import_torch_monai()
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(int(config.seed))
    if config.optim.name != "adamw":
        raise ValueError(f"{ROW}: config.optim.name={config.optim.name!r}; the reference trains with AdamW only")
    model = BasicUNet(spatial_dims=2, in_channels=int(config.data.channels), out_channels=1)
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(config.optim.lr),
                                  betas=(float(config.optim.b1), float(config.optim.b2)),
                                  weight_decay=float(config.optim.weight_decay))

    batch_size = int(config.train.batch_size)
    train_images = data_lib.build_dataset(config.data, "train")
    steps_per_epoch = max(len(train_images) // batch_size, 1)
    num_steps = step_counts(config)[1]
    eval_every = int(config.train.eval_every or steps_per_epoch)
    eval_batch = int(config.train.eval_batch_size or batch_size)
    schedule = make_schedule(config.optim, num_steps)
    plateau_config = config.optim.plateau
    plateau = PlateauState()
    best_state, best = None, {"step": None, "val": {}}
    batches = iter(data_lib.make_loader(config.data, "train", batch_size=batch_size, seed=int(config.seed),
                                        dataset=train_images))

    # The validation curve in the JAX runs' format; a reference run always starts at step 0.
    (workdir / "metrics.jsonl").unlink(missing_ok=True)
    writer = MetricWriter(workdir)
    start = time.perf_counter()
    model.train()
    for step in range(1, num_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = float(schedule(step - 1)) * plateau.lr_scale
        images, targets = _to_torch(torch, next(batches))
        optimizer.zero_grad()
        loss = loss_fn(model(images), targets)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{ROW}: non-finite loss {loss.item()} at step {step}")
        loss.backward()
        if config.optim.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(config.optim.clip_norm))
        optimizer.step()
        if step % eval_every == 0 or step == num_steps:
            val = _validate(torch, model, loss_fn, config, eval_batch)
            writer.write(step, "train", {"loss": loss.item()})
            writer.write(step, "val", val)
            print(f"{ROW} step {step}/{num_steps}: train loss {loss.item():.4f}, val loss {val['loss']:.4f}, "
                  f"val Dice {val['dice']:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
            plateau = update_plateau(plateau, val["loss"], factor=plateau_config.factor,
                                     patience=plateau_config.patience, min_scale=plateau_config.min_scale,
                                     threshold=plateau_config.threshold,
                                     early_stop_patience=config.train.early_stop.patience)
            if plateau.evals_since_best == 0:
                best_state, best = copy.deepcopy(model.state_dict()), {"step": step, "val": val}
            if plateau.should_stop:
                break
    train_s = time.perf_counter() - start
    writer.close()
    torch.save(best_state, workdir / "best.pt")

    model.load_state_dict(best_state)
    model.eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(batch, np.float32), -1, 1))))
        return np.moveaxis(torch.sigmoid(logits).numpy(), 1, -1)

    sliding = inference.sliding_options(config.inference)  # evaluate_run's tiling of config.inference
    start = time.perf_counter()
    test_images = data_lib.build_dataset(config.data, "test", with_instances=True)  # as evaluate_run

    def evaluate(threshold: float, source: str, output_dir: pathlib.Path, **record) -> dict[str, Any]:
        results = inference.evaluate_dataset(predict, test_images, output_dir, tta_n=0, threshold=threshold,
                                             postprocess=inference.postprocess_options(config.inference, threshold),
                                             **sliding)
        results.update(threshold=threshold, threshold_source=source, **record)
        return {"results": results, "output_dir": str(output_dir)}

    chosen = inference.best_threshold(predict, data_lib.build_dataset(config.data, "val"), **sliding)
    evaluations = {
        "test": evaluate(float(config.inference.threshold), "config", workdir / "eval" / "best-test"),
        "test_val_threshold": evaluate(chosen["threshold"], "validation", workdir / "eval" / "best-test-val_threshold",
                                       threshold_choice={"split": "val", **chosen}),
    }
    return {"evaluations": evaluations, "train_s": train_s, "eval_s": time.perf_counter() - start, "best": best}
