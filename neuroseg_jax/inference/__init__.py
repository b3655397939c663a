"""Inference: sliding-window prediction, test-time augmentation, post-processing, per-cell
morphology, file prediction, dataset evaluation, and trained runs (`evaluate_run`, `predict_run`).

May import data, models and metrics. From train it imports one name, `restore_weights` of
`neuroseg_jax.train.checkpoint`: the checkpoint format belongs to the code that writes it, so a run's
weights are read where they are saved rather than by a second reader that could drift from it.
"""

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
from neuroseg_jax.inference.runs import (
    THRESHOLD_CANDIDATES,
    Run,
    best_threshold,
    choose_threshold,
    chooses_threshold,
    decision_threshold,
    evaluate_run,
    load_config,
    load_run,
    make_predict_fn,
    postprocess_options,
    predict_run,
    sliding_options,
    threshold_path,
)
from neuroseg_jax.inference.sliding import BLENDS, SlidingWindow, blend_weights, sliding_window, window_starts
from neuroseg_jax.inference.tta import Augmentation, tta, tta_augmentations, tta_predict_fn

__all__ = [
    "Augmentation",
    "BLENDS",
    "DEFAULT_POSTPROCESS",
    "MORPHOLOGY_COLUMNS",
    "Run",
    "SlidingWindow",
    "THRESHOLD_CANDIDATES",
    "best_threshold",
    "blend_weights",
    "choose_threshold",
    "chooses_threshold",
    "decision_threshold",
    "evaluate_dataset",
    "evaluate_run",
    "expand_inputs",
    "foreground_probability",
    "label_instances",
    "load_config",
    "load_run",
    "make_predict_fn",
    "morphology_table",
    "overlay_image",
    "postprocess",
    "postprocess_options",
    "predict_files",
    "predict_image",
    "predict_run",
    "predictive_entropy",
    "remove_small_components",
    "score_image",
    "sliding_options",
    "sliding_window",
    "summarize_morphology",
    "threshold_path",
    "tta",
    "tta_augmentations",
    "tta_predict_fn",
    "window_starts",
]
