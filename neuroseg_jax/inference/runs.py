"""Trained runs as predictors: restore a workdir's checkpoint, evaluate it, predict files.

``launch/evaluate.py`` and ``launch/predict.py`` are thin wrappers around ``evaluate_run`` and
``predict_run``; a notebook calls these directly.

Masks are the foreground probability at a threshold: ``config.inference.threshold``, or, with
``config.inference.choose_threshold``, the one of highest pooled Dice on the validation split
(`choose_threshold`, as nnU-Net chooses its post-processing on validation data), stored with the
checkpoint so that evaluation on the test split and prediction reuse it and never see test labels.
"""

import dataclasses
import json
import pathlib
from typing import Any, Callable

import flax
import jax
import ml_collections
import numpy as np

from neuroseg_jax import data as data_lib
from neuroseg_jax import losses
from neuroseg_jax._validation import probability
from neuroseg_jax.data.config import default_instances_config, instance_mode
from neuroseg_jax.inference.evaluate import evaluate_dataset
from neuroseg_jax.inference.predict import DEFAULT_POSTPROCESS, pixel_size_micrometres, predict_files, predict_image
from neuroseg_jax.inference.sliding import SlidingWindow
from neuroseg_jax.metrics import confusion_counts, metrics_from_confusion, sum_confusions
from neuroseg_jax.models import build_model
from neuroseg_jax.train.checkpoint import restore_weights

THRESHOLD_CANDIDATES = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2).tolist())
THRESHOLD_FILE = "threshold.json"  # in the checkpoint's step folder


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict
    model: flax.linen.Module
    variables: dict
    step: int
    meta: dict


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config snapshot a training run wrote (``config.json``), tuples restored."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def _tuples(value):
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def load_run(workdir: str | pathlib.Path, checkpoint: str = "best",
             config: ml_collections.ConfigDict | None = None) -> Run:
    """Model and weights of ``workdir`` at ``checkpoint`` ('best', 'latest' or a step)."""
    config = config if config is not None else load_config(workdir)
    model = build_model(config.model)
    variables, meta, step = restore_weights(workdir, checkpoint)
    return Run(config=config, model=model, variables=variables, step=step, meta=meta)


def make_predict_fn(model: flax.linen.Module, variables: dict) -> Callable[[np.ndarray], np.ndarray]:
    """(n, h, w, C) float32 -> (n, h, w, K) probabilities: sigmoid for one output channel,
    softmax otherwise. Jitted once per window shape."""

    @jax.jit
    def probabilities(batch):
        return losses.probabilities(model.apply(variables, batch, train=False))

    return lambda batch: np.asarray(probabilities(np.asarray(batch, np.float32)))


def sliding_options(inference_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`SlidingWindow`'s keywords from ``config.inference``, whose overlap is a fraction of the
    window (< 1) or pixels (>= 1)."""
    window, overlap = tuple(inference_config.window), inference_config.overlap
    tiling = SlidingWindow(window=window, batch_size=int(inference_config.batch_size), blend=inference_config.blend,
                           overlap=tuple(int(round(overlap * size)) if overlap < 1 else int(overlap) for size in window))
    return dataclasses.asdict(tiling)


def threshold_path(workdir: str | pathlib.Path, checkpoint: str, step: int) -> pathlib.Path:
    """Where the threshold chosen for a checkpoint is stored: inside the checkpoint's own step
    folder, so it is copied with the checkpoint and deleted with it when a better one replaces it
    (a retrained run can never inherit a stale threshold)."""
    series = "best" if str(checkpoint) == "best" else "latest"  # as in restore_weights
    folder = pathlib.Path(workdir) / "checkpoints" / series / str(step)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} not found (checkpoint {checkpoint!r}, step {step})")
    return folder / THRESHOLD_FILE


def best_threshold(predict_fn: Callable[[np.ndarray], np.ndarray], dataset, candidates=THRESHOLD_CANDIDATES,
                   **sliding) -> dict:
    """The candidate threshold of highest pooled Dice over ``dataset`` (a validation split).

    Every image is predicted once (whole image through the sliding window, no TTA); the confusion
    counts of each candidate are summed over the images and Dice computed once per candidate; ties go
    to the candidate closest to 0.5, the threshold the loss was trained for. Any predictor works (a
    reference model's too). Returns dict(num_images, threshold, val_dice, val_dice_at_0.5,
    candidates={str(t): dice}).
    """
    candidates = sorted({probability(value, "threshold candidate") for value in candidates})
    if not candidates:
        raise ValueError("best_threshold: no candidate thresholds given")
    if len(dataset) == 0:
        raise ValueError("best_threshold: the validation dataset is empty (config.data.split)")
    scored = sorted(set(candidates) | {0.5})
    pooled = {threshold: {"tp": 0, "fp": 0, "fn": 0, "tn": 0} for threshold in scored}
    for index in range(len(dataset)):
        example = dataset[index]
        foreground = predict_image(predict_fn, np.asarray(example["image"], np.float32), **sliding)
        for threshold in scored:  # every threshold from the same probabilities
            pooled[threshold] = sum_confusions(
                [pooled[threshold], confusion_counts(foreground, example["mask"], threshold=threshold)])
    dice = {threshold: metrics_from_confusion(counts)["dice"] for threshold, counts in pooled.items()}
    chosen = max(candidates, key=lambda threshold: (dice[threshold], -abs(threshold - 0.5)))
    return {"num_images": len(dataset), "threshold": chosen, "val_dice": dice[chosen], "val_dice_at_0.5": dice[0.5],
            "candidates": {str(threshold): dice[threshold] for threshold in candidates}}


def _choose(run: Run, workdir: str | pathlib.Path, checkpoint: str, candidates) -> dict:
    """`choose_threshold` for a loaded run."""
    if instance_mode(run.config.get("instances")) == "three_class":
        raise ValueError("choose_threshold: in instance mode (config.instances.mode='three_class') masks come from "
                         "the watershed decode with config.instances' thresholds, not config.inference.threshold")
    dataset = data_lib.build_dataset(run.config.data, "val")  # an empty split raises there
    chosen = best_threshold(make_predict_fn(run.model, run.variables), dataset, candidates,
                            **sliding_options(run.config.inference))
    record = {"checkpoint": str(checkpoint), "step": int(run.step), "split": "val", **chosen}
    path = threshold_path(workdir, checkpoint, run.step)
    partial = path.with_suffix(".partial")  # renamed when complete: never a half-written file
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)
    return record


def choose_threshold(workdir: str | pathlib.Path, checkpoint: str = "best", *,
                     config: ml_collections.ConfigDict | None = None, candidates=THRESHOLD_CANDIDATES) -> dict:
    """The foreground threshold of highest pooled Dice on the validation split (`best_threshold`
    with the run's sliding window), stored with the checkpoint (`threshold_path`) for `evaluate_run`
    and `predict_run`. Returns (and stores) `best_threshold`'s dict plus checkpoint, step and split.
    """
    return _choose(load_run(workdir, checkpoint, config), workdir, checkpoint, candidates)


def chooses_threshold(config: ml_collections.ConfigDict) -> bool:
    """Whether a run's masks use the threshold chosen on validation: config.inference.choose_threshold,
    for binary masks (instance mode's decode has thresholds of its own)."""
    return bool(config.inference.get("choose_threshold", False)) and \
        instance_mode(config.get("instances")) != "three_class"


def decision_threshold(run: Run, workdir: str | pathlib.Path, checkpoint: str,
                       threshold: float | str | None = None) -> tuple[float, str]:
    """(threshold, source) of a run's masks: ``threshold`` when given ('val', 'config' or a
    probability, source 'argument'), else with config.inference.choose_threshold the checkpoint's
    stored validation choice, chosen first when absent (source 'validation'), else
    config.inference.threshold (source 'config'). 'config' takes config.inference.threshold even
    when choose_threshold is on."""
    inference_config = run.config.inference
    configured = probability(inference_config.get("threshold", 0.5), "config.inference.threshold")
    if threshold is not None and threshold not in ("val", "config"):
        return probability(threshold, "threshold"), "argument"
    if threshold == "config" or (threshold is None and not chooses_threshold(run.config)):
        return configured, "config"
    path = threshold_path(workdir, checkpoint, run.step)
    if path.exists():
        return probability(json.loads(path.read_text()).get("threshold"), f"'threshold' of {path}"), "validation"
    return _choose(run, workdir, checkpoint, THRESHOLD_CANDIDATES)["threshold"], "validation"


def postprocess_options(inference_config: ml_collections.ConfigDict, threshold: float) -> dict | None:
    """The morphological post-processing of ``config.inference`` at a decision threshold (None: off)."""
    return {**DEFAULT_POSTPROCESS, "threshold": threshold} if inference_config.postprocess else None


def object_settings(config: ml_collections.ConfigDict, declump: bool | None = None) -> ml_collections.ConfigDict:
    """The run's ``config.instances`` (the defaults for runs without it), with ``declump`` set when
    given: splitting by shape is a decoding choice, so a binary run can be scored or predicted both ways."""
    instances = ml_collections.ConfigDict((config.get("instances") or default_instances_config()).to_dict())
    if declump is None:
        return instances
    if declump and instance_mode(instances) == "three_class":
        raise ValueError("declump: this run is in three_class instance mode, whose objects come from its boundary "
                         "class; declumping splits binary masks")
    missing = {key: value for key, value in default_instances_config().items() if key not in instances}
    instances.update({**missing, "declump": bool(declump)})
    return instances


def evaluate_run(workdir: str | pathlib.Path, *, checkpoint: str = "best", split: str = "val",
                 config: ml_collections.ConfigDict | None = None, data_root: str | None = None,
                 output_dir: str | pathlib.Path | None = None, tta_n: int = 5, progress: bool = True,
                 threshold: float | str | None = None, declump: bool | None = None) -> dict:
    """Metrics of a checkpoint on a split, with and without TTA and post-processing.

    ``data_root`` evaluates on another images/ + masks/ folder, preprocessed as in training.
    ``threshold``: see `decision_threshold` (None: the config decides); ``declump``: see
    `object_settings` (None: config.instances.declump). Writes ``metrics.json``,
    ``per_image.csv`` and ``table.md`` to ``output_dir`` (default ``WORKDIR/eval/CHECKPOINT-SPLIT``)
    and returns the metrics dict, with the threshold and its source.
    """
    config = config if config is not None else load_config(workdir)
    run = load_run(workdir, checkpoint, config)
    # Resolved before data_root replaces the data: a chosen threshold comes from the run's own validation split.
    threshold, threshold_source = decision_threshold(run, workdir, checkpoint, threshold)
    if data_root:
        config.data.source, config.data.root = "folder", str(data_root)
    instances = object_settings(run.config, declump)  # instance mode: objects from the watershed decode
    # Instance labels where the masks carry them: objects are matched to them (evaluate_dataset).
    dataset = data_lib.build_dataset(run.config.data, split, with_instances=True,
                                     require_instance_labels=instance_mode(instances) == "three_class")
    output_dir = pathlib.Path(output_dir or pathlib.Path(workdir) / "eval" / f"{checkpoint}-{split}")
    results = evaluate_dataset(
        make_predict_fn(run.model, run.variables), dataset, output_dir, tta_n=tta_n,
        threshold=threshold, postprocess=postprocess_options(run.config.inference, threshold),
        progress=progress, instances=instances, **sliding_options(run.config.inference))
    results.update({"checkpoint": checkpoint, "step": run.step, "split": split, "data": run.config.data.root or
                    run.config.data.source, "output_dir": str(output_dir), "threshold": threshold,
                    "threshold_source": threshold_source})
    (output_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    return results


def _file_loader(data_config: ml_collections.ConfigDict):
    """path -> (image preprocessed as in training, (H, W) of the file), for ``predict_files``."""
    native_config = ml_collections.ConfigDict(data_config.to_dict())
    native_config.image_size = None

    def load(path):
        if data_config.image_size is None:
            image = data_lib.load_image(path, data_config)
            return image, image.shape[:2]
        return data_lib.load_image(path, data_config), data_lib.load_image(path, native_config).shape[:2]

    return load


def predict_run(workdir: str | pathlib.Path, inputs, output_dir: str | pathlib.Path, *, checkpoint: str = "best",
                tta_n: int = 0, progress: bool = True, pixel_size: float = 0.0, pixel_unit: str = "um",
                threshold: float | str | None = None, declump: bool | None = None) -> dict:
    """Predict image files, folders or globs with a trained run; writes masks, probability maps,
    instance labels, overlays and a counts/morphology CSV to ``output_dir``. ``threshold``: see
    `decision_threshold` (None: the config decides); ``declump``: see `object_settings`.

    ``pixel_size`` (in ``pixel_unit``; 0 = none) overrides the files' own calibration; files
    without one use the run's config.data.pixel_size (0 = unknown: outputs in pixels)."""
    override = pixel_size_micrometres(pixel_size, pixel_unit, source="--pixel_size")
    run = load_run(workdir, checkpoint)
    declared = pixel_size_micrometres(run.config.data.get("pixel_size", 0.0), run.config.data.get("pixel_unit", "um"),
                                      source="config.data.pixel_size")
    threshold, _ = decision_threshold(run, workdir, checkpoint, threshold)
    return predict_files(
        make_predict_fn(run.model, run.variables), inputs, output_dir, tta_n=tta_n, threshold=threshold,
        postprocess=postprocess_options(run.config.inference, threshold), load_image=_file_loader(run.config.data),
        progress=progress, pixel_size=override, default_pixel_size=declared,
        instances=object_settings(run.config, declump),
        **sliding_options(run.config.inference))
