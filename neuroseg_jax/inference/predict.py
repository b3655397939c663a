"""Whole-file prediction: images on disk in, masks, probability maps, instances and tables out.

For every input image `NAME.ext` the output folder receives
  NAME_prob.tif     foreground probability, uint16 (p * 65535, rounded), (H, W)
  NAME_mask.png     binary mask, uint8 0/255 (post-processed unless postprocess=None)
  NAME_labels.tif   instance labels (8-connected components of the mask), uint16; float32 (exact
                    integers, with a warning) above 65535 objects, since ImageJ TIFFs hold no
                    32-bit integers; more than 2^24 objects is an error
  NAME_overlay.png  the image (gray or RGB) with cells tinted and their outlines drawn in red
  NAME_cells.csv    per-cell morphology (inference.postprocess.MORPHOLOGY_COLUMNS)
  NAME_uncertainty.tif  per-pixel uncertainty, float32 (H, W): the predictive entropy in nats
                    (`predictive_entropy`; unless uncertainty=False)
and the folder gets `counts.csv` (one row per processed image: cell count and mean morphology)
and `summary.json` (processed images with their pixel size, failures with their error message,
settings).

Calibration: the TIFFs are ImageJ hyperstacks, so Fiji and napari read the pixel size from them
(resolution in pixels per micrometre, unit 'um'; unit 'pixel' when unknown) and the morphology
is in micrometres. The pixel size is, in this order: `pixel_size` (the --pixel_size flag), the
file's own metadata (`data.io.read_pixel_size`), `default_pixel_size` (config.data.pixel_size),
else unknown (the table is in pixels). Outputs are at the file's resolution, so the file's pixel
size applies even when the model saw resized images.
A file that cannot be read or predicted is reported (logged, listed in summary['failed']) and
skipped; the others are still processed.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import cv2
import numpy as np
import tifffile

from neuroseg_jax.data.config import instance_mode
from neuroseg_jax.data.io import IMAGE_EXTENSIONS, read_image, read_pixel_size, to_micrometres
from neuroseg_jax.inference.postprocess import (
    MORPHOLOGY_COLUMNS,
    foreground_probability,
    label_instances,
    morphology_table,
    postprocess as postprocess_probs,
    summarize_morphology,
)
from neuroseg_jax.inference.sliding import PredictFn, SlidingWindow
from neuroseg_jax.inference.tta import tta_predict_fn
from neuroseg_jax.metrics import binarize

logger = logging.getLogger(__name__)

DEFAULT_POSTPROCESS = {"threshold": 0.5, "closing_size": 3, "min_size": 15}
PROBABILITY_SCALE = 65535  # NAME_prob.tif holds round(p * PROBABILITY_SCALE)
# float32 holds every integer up to 2^24 exactly: the largest label id a float32 TIFF keeps.
_FLOAT32_EXACT_INTEGERS = 1 << 24


def expand_inputs(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[Path], list[dict]]:
    """Files from files, folders (their image files, sorted, not recursive) and glob patterns.

    Returns (files, failures): an input that matches nothing becomes a failure entry
    {'path', 'error'} rather than an exception, so the remaining inputs are still used.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    failures: list[dict] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(entry)) if Path(p).is_file())
        if not found:
            failures.append({"path": str(entry), "error": "FileNotFoundError: no image files match"})
        files.extend(found)
    return files, failures


def _with_progress(items: Sequence, enabled: bool, description: str) -> Iterable:
    """``items``, behind a tqdm progress bar when ``enabled``."""
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=description, unit="image")


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, suffix = path.stem, 2
    while stem in used:
        stem, suffix = f"{path.stem}_{suffix}", suffix + 1
    used.add(stem)
    return stem


def overlay_image(image: np.ndarray, mask: np.ndarray, *, alpha: float = 0.35) -> np.ndarray:
    """uint8 (H, W, 3) RGB picture of an (H, W, C) [0, 1] image with the mask tinted red and its
    outlines drawn in opaque red."""
    gray_or_rgb = np.asarray(image, dtype=np.float32)
    rgb = np.repeat(gray_or_rgb[..., :1], 3, axis=-1) if gray_or_rgb.shape[-1] != 3 else gray_or_rgb
    rgb = (np.clip(rgb, 0.0, 1.0) * 255).astype(np.float32)
    red = np.array([255.0, 0.0, 0.0], np.float32)
    mask = np.asarray(mask) > 0
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * red
    outline = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    rgb[outline] = red
    return rgb.round().astype(np.uint8)


def _write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def _write_png(path: Path, array: np.ndarray) -> None:
    """PNG via OpenCV (BGR order for colour) with an error that names the file."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path}")


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """(H, W) entropy in nats of each pixel's predicted class distribution, from (H, W, K)
    probabilities (K = 1: the sigmoid's two outcomes): 0 when certain, up to log(max(K, 2)).

    Why this map: on tiny trained models (benchmarks/outlier_uncertainty.py) it scores artefacts
    never seen in training above clean background in every run, with or without outlier synthesis,
    and slightly above real cells; the Mahalanobis distance of the logits to the outlier buffers'
    class Gaussians, the energy and VOS's learned logistic each failed in some run (confident
    background lies far from its class mean, so Mahalanobis can score it above the artefacts).
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ValueError(f"probabilities must be (H, W, K), got shape {probs.shape}")
    if probs.shape[-1] == 1:
        probs = np.concatenate([1.0 - probs, probs], axis=-1)
    return -np.sum(probs * np.log(np.clip(probs, np.finfo(np.float32).tiny, None)), axis=-1)


def _class_probabilities(predict_fn: PredictFn, image: np.ndarray, tiling: SlidingWindow, *, tta_n: int,
                         brightness_shift: float) -> np.ndarray:
    """(H, W, K) probabilities of one (H, W, C) image: sliding window, optional TTA."""
    if tta_n > 1:
        predict_fn = tta_predict_fn(predict_fn, n=tta_n, brightness_shift=brightness_shift)
    return tiling.probabilities(predict_fn, image)


def predict_image(predict_fn: PredictFn, image: np.ndarray, *, tta_n: int = 0, brightness_shift: float = 0.1,
                  **sliding) -> np.ndarray:
    """(H, W) foreground probability of one (H, W, C) image: sliding window (keywords window,
    overlap, batch_size, blend: see `SlidingWindow`), optional TTA (tta_n = 0 or 1 disables it)."""
    return foreground_probability(_class_probabilities(
        predict_fn, image, SlidingWindow(**sliding), tta_n=tta_n, brightness_shift=brightness_shift))


def _read_file(path: Path, read_options: Mapping) -> tuple[np.ndarray, tuple[int, int]]:
    image = read_image(path, **read_options)
    return image, image.shape[:2]


def _resize_to(size: tuple[int, int], image: np.ndarray, probability: np.ndarray,
               uncertainty_map: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Image, probability and uncertainty at the file's (H, W), for a model fed resized images."""
    if probability.shape == tuple(size):
        return image, probability, uncertainty_map
    size_xy = (int(size[1]), int(size[0]))
    probability = cv2.resize(probability, size_xy, interpolation=cv2.INTER_LINEAR)
    if uncertainty_map is not None:
        uncertainty_map = cv2.resize(uncertainty_map, size_xy, interpolation=cv2.INTER_LINEAR)
    image = cv2.resize(image, size_xy, interpolation=cv2.INTER_LINEAR).reshape(tuple(size) + image.shape[2:])
    return image, probability, uncertainty_map


@dataclasses.dataclass(frozen=True)
class PixelSize:
    """Physical size of a file's pixels in micrometres, and where it came from: 'pixel_size' (the
    argument / flag), 'file' (its metadata) or 'config' (default_pixel_size); `PixelSize.unknown()`
    for uncalibrated images."""

    y: float | None
    x: float | None
    source: str | None

    @classmethod
    def unknown(cls) -> "PixelSize":
        return cls(None, None, None)

    @property
    def unit(self) -> str:
        return "pixel" if self.x is None else "um"

    @property
    def spacing(self) -> tuple[float, float]:
        return (1.0, 1.0) if self.x is None else (self.y, self.x)


def pixel_size_micrometres(size: float | None, unit: str, *, source: str) -> float | None:
    """A declared pixel size (flag or config key ``source``) in micrometres; None for 0 or None
    (unknown). An unknown unit raises a ValueError naming ``source`` and the unit."""
    return to_micrometres(size, unit, source=source) if size else None


def _write_imagej_tiff(path: Path, array: np.ndarray, pixel_size: PixelSize, info: str | None = None) -> None:
    """A TIFF that Fiji opens calibrated (and napari / tifffile read the same way): resolution in
    pixels per micrometre and unit 'um', or unit 'pixel' when the size is unknown."""
    metadata = {"unit": pixel_size.unit}
    if info:
        metadata["Info"] = info
    resolution = None if pixel_size.x is None else (1.0 / pixel_size.x, 1.0 / pixel_size.y)
    tifffile.imwrite(path, array, imagej=True, resolution=resolution, metadata=metadata)


def _label_image_for_imagej(labels: np.ndarray, path: Path) -> np.ndarray:
    """uint16 labels, or float32 (exact up to 2^24) with a warning when the ids exceed 65535: the
    ImageJ TIFF format has no 32-bit integer type."""
    largest = int(labels.max(initial=0))
    if largest <= np.iinfo(np.uint16).max:
        return labels.astype(np.uint16)
    if largest > _FLOAT32_EXACT_INTEGERS:
        raise ValueError(f"{path}: label id {largest} exceeds 2^24, the largest id a float32 ImageJ TIFF keeps exactly")
    logger.warning("%s: label ids up to %d exceed uint16; writing float32 labels (convert with astype(np.uint32) "
                   "before napari's add_labels)", path, largest)
    return labels.astype(np.float32)


def _write_image_outputs(output: Path, stem: str, image: np.ndarray, probability: np.ndarray, mask: np.ndarray,
                         labels: np.ndarray, rows: Sequence[Mapping], uncertainty_map: np.ndarray | None,
                         pixel_size: PixelSize) -> dict[str, Path]:
    """One image's files (module docstring) in ``output``; returns their paths."""
    outputs = {
        "probability": output / f"{stem}_prob.tif",
        "mask": output / f"{stem}_mask.png",
        "labels": output / f"{stem}_labels.tif",
        "overlay": output / f"{stem}_overlay.png",
        "cells": output / f"{stem}_cells.csv",
    }
    label_image = _label_image_for_imagej(labels, outputs["labels"])
    if uncertainty_map is not None:
        outputs["uncertainty"] = output / f"{stem}_uncertainty.tif"
        _write_imagej_tiff(outputs["uncertainty"], uncertainty_map.astype(np.float32), pixel_size,
                           "predictive entropy in nats")
    _write_imagej_tiff(outputs["probability"],
                       np.round(np.clip(probability, 0, 1) * PROBABILITY_SCALE).astype(np.uint16), pixel_size,
                       f"foreground probability = value / {PROBABILITY_SCALE}")
    _write_png(outputs["mask"], mask.astype(np.uint8) * 255)
    _write_imagej_tiff(outputs["labels"], label_image, pixel_size, "instance labels, 0 = background")
    _write_png(outputs["overlay"], overlay_image(image, mask))
    _write_csv(outputs["cells"], rows, MORPHOLOGY_COLUMNS)
    return outputs


@dataclasses.dataclass(frozen=True)
class _FilePredictor:
    """Everything `predict_files` applies to each file: the model, how files are read, the tiling,
    TTA, post-processing and the pixel size (micrometres; `pixel_size` overrides the file's metadata,
    `default_pixel_size` fills in for files without it)."""

    predict_fn: PredictFn
    load_image: Callable[[Path], tuple[np.ndarray, tuple[int, int]]]
    tiling: SlidingWindow
    tta_n: int
    brightness_shift: float
    postprocess: Mapping | None
    threshold: float
    pixel_size: float | None
    default_pixel_size: float | None
    uncertainty: bool
    instances: Mapping | None = None

    def _pixel_size(self, path: Path) -> PixelSize:
        if self.pixel_size:
            return PixelSize(self.pixel_size, self.pixel_size, "pixel_size")
        from_file = read_pixel_size(path)
        if from_file is not None:
            return PixelSize(from_file[0], from_file[1], "file")
        if self.default_pixel_size:
            return PixelSize(self.default_pixel_size, self.default_pixel_size, "config")
        return PixelSize.unknown()

    def __call__(self, path: Path, output: Path, used_stems: set[str]) -> tuple[dict, dict]:
        """Predicts ``path`` and writes its outputs; returns (counts.csv row, processed entry)."""
        pixel_size = self._pixel_size(path)
        image, size = self.load_image(path)
        probs = _class_probabilities(self.predict_fn, image, self.tiling, tta_n=self.tta_n,
                                     brightness_shift=self.brightness_shift)
        image, probability, uncertainty_map = _resize_to(
            size, image, foreground_probability(probs), predictive_entropy(probs) if self.uncertainty else None)
        if instance_mode(self.instances) == "three_class":
            if probs.shape[:2] != tuple(size):
                probs = cv2.resize(probs, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)
            labels = label_instances(probs, instances=self.instances)
            mask = labels > 0
        else:
            mask = (binarize(probability, self.threshold) if self.postprocess is None
                    else postprocess_probs(probability, **self.postprocess))
            labels = label_instances(mask, instances=self.instances)
        try:
            rows = morphology_table(labels, image, spacing=pixel_size.spacing, unit=pixel_size.unit)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        stem = _unique_stem(path, used_stems)
        outputs = _write_image_outputs(output, stem, image, probability, mask, labels, rows, uncertainty_map,
                                       pixel_size)
        count_row = {"name": stem, "path": str(path), "foreground_fraction": float(mask.mean()),
                     "unit": pixel_size.unit, **summarize_morphology(rows)}
        return count_row, {"name": stem, "path": str(path), "count": len(rows),
                           "pixel_size": dataclasses.asdict(pixel_size) | {"unit": pixel_size.unit},
                           "outputs": {key: str(value) for key, value in outputs.items()}}


def predict_files(
    predict_fn: PredictFn,
    inputs: str | os.PathLike | Iterable[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    tta_n: int = 0,
    brightness_shift: float = 0.1,
    postprocess: Mapping | None = DEFAULT_POSTPROCESS,
    threshold: float = 0.5,
    read_options: Mapping | None = None,
    load_image: Callable[[Path], tuple[np.ndarray, tuple[int, int]]] | None = None,
    pixel_size: float | None = None,
    default_pixel_size: float | None = None,
    uncertainty: bool = True,
    instances: Mapping | None = None,
    progress: bool = True,
    **sliding,
) -> dict:
    """Predict every image of `inputs` and write the outputs listed in the module docstring.

    Args:
      predict_fn: (n, h, w, C) float32 -> (n, h, w, K) probabilities.
      inputs: file, folder or glob, or a list of them.
      tta_n: number of TTA augmentations (IMSAHLO: 5); 0 or 1 = none.
      postprocess: keyword arguments of `inference.postprocess` (threshold, closing_size,
        min_size); None = plain `threshold`, no morphology.
      threshold: foreground probability threshold of the masks without post-processing (the
        post-processed ones use postprocess['threshold']).
      read_options: keyword arguments of `neuroseg_jax.data.io.read_image` (channels, normalize,
        ...) - must match how the model was trained. Ignored when `load_image` is given.
      load_image: path -> (model-ready (h, w, C) image, (H, W) size of the file's image); the
        prediction is resized back to (H, W) before thresholding, so a model trained on resized
        images writes masks at the file's resolution. Default: `read_image(path, **read_options)`.
      pixel_size: micrometres per pixel for every file, over the files' own metadata; None = read it
        from each file (`data.io.read_pixel_size`).
      default_pixel_size: micrometres per pixel of files without metadata; None = unknown (TIFFs
        with unit 'pixel', morphology in pixels).
      uncertainty: write NAME_uncertainty.tif, the predictive entropy of the blended (and
        test-time averaged) probabilities, at the file's resolution.
      instances: the run's config.instances; in mode 'three_class' the labels are the seeded
        watershed of the (H, W, 3) probabilities (`label_instances`) and the mask their
        foreground (threshold and post-processing do not apply); in mode 'none' with declump the
        mask's objects are split by shape.
      **sliding: window, overlap, batch_size, blend: see `SlidingWindow`.
    Returns:
      dict(processed=[{name, path, count, pixel_size, outputs}], failed=[{path, error}], output_dir,
      settings).
    """
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    files, failed = expand_inputs(inputs)
    if not files:
        raise FileNotFoundError(f"no image files found in {inputs!r}")
    for failure in failed:
        logger.warning("skipping %s: %s", failure["path"], failure["error"])
    read_options = dict(read_options or {})
    tiling = SlidingWindow(**sliding)
    predict_file = _FilePredictor(
        predict_fn=predict_fn, load_image=load_image or functools.partial(_read_file, read_options=read_options),
        tiling=tiling, tta_n=tta_n, brightness_shift=brightness_shift, postprocess=postprocess, threshold=threshold,
        pixel_size=pixel_size, default_pixel_size=default_pixel_size, uncertainty=uncertainty, instances=instances)
    processed, count_rows, used_stems = [], [], set()
    for path in _with_progress(files, progress, "predict"):
        try:
            count_row, entry = predict_file(path, output, used_stems)
        except (OSError, ValueError) as error:
            message = f"{type(error).__name__}: {error}"
            logger.warning("skipping %s: %s", path, message)
            failed.append({"path": str(path), "error": message})
            continue
        count_rows.append(count_row)
        processed.append(entry)
    if count_rows:
        _write_csv(output / "counts.csv", count_rows, list(count_rows[0]))
    settings = {"window": list(np.atleast_1d(tiling.window).tolist()),
                "overlap": list(np.atleast_1d(tiling.overlap).tolist()), "blend": tiling.blend,
                "tta_n": tta_n, "postprocess": dict(postprocess) if postprocess else None,
                "threshold": postprocess["threshold"] if postprocess else threshold,
                "read_options": read_options, "pixel_size_um": pixel_size, "default_pixel_size_um": default_pixel_size,
                "probability_scale": PROBABILITY_SCALE, "uncertainty": uncertainty}
    summary = {"output_dir": str(output), "processed": processed, "failed": failed, "settings": settings}
    with open(output / "summary.json", "w") as handle:
        json.dump(summary, handle, indent=2)
    return summary
