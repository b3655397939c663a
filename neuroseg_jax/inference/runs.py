"""Trained runs as predictors: restore a workdir's checkpoint, evaluate it, predict files.

``launch/evaluate.py`` and ``launch/predict.py`` are thin wrappers around ``evaluate_run`` and
``predict_run``; a notebook calls these directly.
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
from neuroseg_jax.inference.evaluate import evaluate_dataset
from neuroseg_jax.inference.predict import DEFAULT_POSTPROCESS, predict_files
from neuroseg_jax.inference.sliding import SlidingWindow
from neuroseg_jax.models import build_model
from neuroseg_jax.train.checkpoint import restore_weights


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


def evaluate_run(workdir: str | pathlib.Path, *, checkpoint: str = "best", split: str = "val",
                 config: ml_collections.ConfigDict | None = None, data_root: str | None = None,
                 output_dir: str | pathlib.Path | None = None, tta_n: int = 5, progress: bool = True) -> dict:
    """Metrics of a checkpoint on a split, with and without TTA and post-processing.

    ``data_root`` evaluates on another images/ + masks/ folder, preprocessed as in training.
    Writes ``metrics.json``, ``per_image.csv`` and ``table.md`` to ``output_dir`` (default
    ``WORKDIR/eval/CHECKPOINT-SPLIT``) and returns the metrics dict.
    """
    config = config if config is not None else load_config(workdir)
    if data_root:
        config.data.source, config.data.root = "folder", str(data_root)
    run = load_run(workdir, checkpoint, config)
    dataset = data_lib.build_dataset(run.config.data, split)
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} of {run.config.data.source} data is empty")
    output_dir = pathlib.Path(output_dir or pathlib.Path(workdir) / "eval" / f"{checkpoint}-{split}")
    results = evaluate_dataset(
        make_predict_fn(run.model, run.variables), dataset, output_dir, tta_n=tta_n,
        postprocess=dict(DEFAULT_POSTPROCESS) if run.config.inference.postprocess else None,
        progress=progress, **sliding_options(run.config.inference))
    results.update({"checkpoint": checkpoint, "step": run.step, "split": split, "data": run.config.data.root or
                    run.config.data.source, "output_dir": str(output_dir)})
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
                tta_n: int = 0, progress: bool = True) -> dict:
    """Predict image files, folders or globs with a trained run; writes masks, probability maps,
    instance labels, overlays and a counts/morphology CSV to ``output_dir``."""
    run = load_run(workdir, checkpoint)
    postprocess = dict(DEFAULT_POSTPROCESS) if run.config.inference.postprocess else None
    return predict_files(
        make_predict_fn(run.model, run.variables), inputs, output_dir, tta_n=tta_n, postprocess=postprocess,
        load_image=_file_loader(run.config.data), progress=progress,
        **sliding_options(run.config.inference))
