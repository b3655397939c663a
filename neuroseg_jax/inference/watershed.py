"""Objects from a model's outputs by seeded watershed: three-class probabilities, or a binary mask
declumped by shape.

Three-class (background / interior / boundary) probabilities, `instances_from_three_class`:

The model's interior class separates touching objects (`neuroseg_jax.data.instance_targets`); its
components are the seeds, and a watershed grows each seed over the boundary pixels of the
foreground until it meets a neighbour, returning every object to its full extent:

  seeds       8-connected components of p_interior > seed_threshold, those below min_seed_size
              pixels dropped (a speck of interior in a boundary band would split an object);
  foreground  1 - p_background > foreground_threshold;
  flooding    skimage's watershed of -p_interior from the seeds, within the foreground: pixels go to
              the seed whose interior probability descends to them first, so the cut between two
              objects follows the valley of p_interior, i.e. the predicted boundary;
  seedless    foreground components that no seed reaches (small objects whose predicted interior
              vanished) become objects of their own rather than being lost;
  min_size    objects with fewer pixels are removed; the rest are numbered 1..n.

Defaults: both thresholds 0.5 (a class holding the majority of the probability; with one-hot targets
any value in (0, 1) decodes the same); min_seed_size 1 and min_size 1 keep every object, which is
what the ceiling on exact targets measures. For model outputs, min_size around 15 (the
post-processing default for binary masks) removes speckle, and min_seed_size of a few pixels keeps
noise in a boundary band from splitting an object; both are decoding choices to tune on validation.

A binary mask, `declump` (CellProfiler's "declump by shape"): where two round objects touch, the
mask narrows to a neck, and its distance transform has one peak per object. The seeds are the
h-maxima of the distance transform (smoothed by a Gaussian of `sigma` pixels): a peak counts when
the saddle to every peak at least as high lies h pixels or more below it; the watershed of the
negated distances within the mask splits it along the necks; components left without a seed (thin
ones, when h exceeds their peak) stay whole. It needs no instance labels and no retraining, and
suits convex objects such as nuclei; a neuron's soma and neurites would be cut apart, so it is off
unless config.instances.declump is set.
Defaults h = 0.75 px and sigma = 1 px: chosen on the BBBC039 validation split with the binary U-Net
(`benchmarks/declump_sweep.py`: AP@0.5:0.95 0.68 to 0.70 for h from 0.5 to 1.5 and sigma 1 or 1.5,
against 0.57 for connected components; the count error grows with h: 0.75 keeps both near their best).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import watershed

from neuroseg_jax.data.config import default_instances_config

_EIGHT_CONNECTED = np.ones((3, 3), bool)


def _check_threshold(value: float, name: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r} must lie in [0, 1)")
    return float(value)


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Zero the ids of `labels` (0..n) holding fewer than min_size pixels."""
    if min_size <= 1:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def _keep_seedless(labels: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """`labels` with each foreground component that no seed reached added as an object of its own."""
    seedless, _ = ndimage.label(foreground & (labels == 0), structure=_EIGHT_CONNECTED)
    return np.where(seedless > 0, seedless + labels.max(initial=0), labels)


def instances_from_three_class(
    probabilities, *, seed_threshold: float = 0.5, foreground_threshold: float = 0.5,
    min_seed_size: int = 1, min_size: int = 1,
) -> np.ndarray:
    """int32 (H, W) instance labels 1..n (0 = background) from (H, W, 3) class probabilities.

    probabilities: softmax outputs, channels background, interior, boundary (class ids of
    `instance_targets`). Thresholds and sizes as in the module docstring.
    """
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.ndim != 3 or probabilities.shape[-1] != 3:
        raise ValueError(f"probabilities must have shape (H, W, 3) (background, interior, boundary), "
                         f"got {probabilities.shape}")
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities contain NaN or infinite values")
    seed_threshold = _check_threshold(seed_threshold, "seed_threshold")
    foreground_threshold = _check_threshold(foreground_threshold, "foreground_threshold")
    for value, name in ((min_seed_size, "min_seed_size"), (min_size, "min_size")):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r} must be an int >= 0 (pixels)")

    interior = probabilities[..., 1]
    foreground = 1.0 - probabilities[..., 0] > foreground_threshold
    seeds, _ = ndimage.label((interior > seed_threshold) & foreground, structure=_EIGHT_CONNECTED)
    seeds = _drop_small(seeds, min_seed_size)
    labels = _keep_seedless(watershed(-interior, markers=seeds, mask=foreground), foreground)
    labels = _drop_small(labels, min_size)
    # Consecutive ids 1..n in the order of the surviving ids.
    kept, consecutive = np.unique(labels, return_inverse=True)
    consecutive = consecutive.reshape(labels.shape)
    return (consecutive if kept[0] == 0 else consecutive + 1).astype(np.int32)


def declump(mask, *, h: float = 0.75, sigma: float = 1.0) -> np.ndarray:
    """int32 (H, W) instance labels 1..n (0 = background) of a binary (H, W) mask, touching convex
    objects split along the necks of the mask (module docstring)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"declump takes a binary (H, W) mask, got shape {mask.shape}")
    if not h > 0:
        raise ValueError(f"declump h={h!r} must be > 0 (pixels)")
    if not sigma >= 0:
        raise ValueError(f"declump sigma={sigma!r} must be >= 0 (pixels)")
    mask = mask > 0
    distance = ndimage.distance_transform_edt(mask)
    if sigma > 0:
        distance = ndimage.gaussian_filter(distance, sigma)
    # The h-maxima as regional maxima of the reconstruction of distance - h under distance, whose
    # plateaus count once: skimage's h_maxima marks each of two equally high peaks (common in a
    # distance transform) even when the saddle between them is less than h below.
    domes = reconstruction(distance - h, distance, method="dilation")
    seeds, _ = ndimage.label(local_maxima(domes, connectivity=2) & mask, structure=_EIGHT_CONNECTED)
    return _keep_seedless(watershed(-distance, markers=seeds, mask=mask), mask).astype(np.int32)


DECODE_KEYS = ("seed_threshold", "foreground_threshold", "min_seed_size", "min_size")


def instances_from_probabilities(probabilities, instances=None) -> np.ndarray:
    """`instances_from_three_class` with the decode settings of `instances` (a run's
    config.instances; None: `data.config.default_instances_config()`)."""
    settings = default_instances_config() if instances is None else instances
    missing = [key for key in DECODE_KEYS if key not in settings]
    if missing:
        raise ValueError(f"config.instances lacks {missing}: see data.config.default_instances_config()")
    return instances_from_three_class(probabilities, **{key: settings[key] for key in DECODE_KEYS})


__all__ = ["DECODE_KEYS", "declump", "instances_from_probabilities", "instances_from_three_class"]
