"""Inference: sliding-window prediction, test-time augmentation, post-processing, per-cell
morphology, file prediction and dataset evaluation. May import metrics and data, never train."""

from neuroseg_jax.inference.evaluate import evaluate_dataset, score_image
from neuroseg_jax.inference.postprocess import (
    MORPHOLOGY_COLUMNS,
    foreground_probability,
    label_instances,
    morphology_table,
    postprocess,
    remove_small_components,
    summarize_morphology,
)
from neuroseg_jax.inference.predict import (
    DEFAULT_POSTPROCESS,
    expand_inputs,
    overlay_image,
    predict_files,
    predict_image,
    predictive_entropy,
)
from neuroseg_jax.inference.sliding import BLENDS, blend_weights, sliding_window, window_starts
from neuroseg_jax.inference.tta import Augmentation, tta, tta_augmentations, tta_predict_fn

__all__ = [
    "Augmentation",
    "BLENDS",
    "DEFAULT_POSTPROCESS",
    "MORPHOLOGY_COLUMNS",
    "blend_weights",
    "evaluate_dataset",
    "expand_inputs",
    "foreground_probability",
    "label_instances",
    "morphology_table",
    "overlay_image",
    "postprocess",
    "predict_files",
    "predict_image",
    "predictive_entropy",
    "remove_small_components",
    "score_image",
    "sliding_window",
    "summarize_morphology",
    "tta",
    "tta_augmentations",
    "tta_predict_fn",
    "window_starts",
]
