"""Test-time augmentation (IMSAHLO Sec. IV-D: n = 5 augmented copies - flips and brightness
shifts - passed through the network and averaged).

Each augmentation is a pair (forward on images, inverse on probabilities). Flips are undone by
flipping the prediction back; brightness shifts change intensities only, so their inverse on the
probability map is the identity. Probabilities (not hard votes) are averaged.

The fixed order of augmentations (the first n are used):
  0 identity, 1 horizontal flip, 2 vertical flip, 3 brightness + delta, 4 brightness - delta,
  5 horizontal+vertical flip (180-degree rotation), 6 horizontal flip & brightness + delta,
  7 vertical flip & brightness - delta.
Brightness shifts add +-delta and clip to [0, 1] (images are normalised to [0, 1]).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from neuroseg_jax.inference.sliding import PredictFn


class Augmentation(NamedTuple):
    name: str
    forward: Callable[[np.ndarray], np.ndarray]  # (n, h, w, C) images -> augmented images
    inverse: Callable[[np.ndarray], np.ndarray]  # (n, h, w, K) probabilities -> original frame


def _identity(array: np.ndarray) -> np.ndarray:
    return array


def _flip(axes: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    def flip(array: np.ndarray) -> np.ndarray:
        return np.flip(array, axis=axes)
    return flip


def _shift(delta: float, then: Callable[[np.ndarray], np.ndarray] = _identity):
    def shift(images: np.ndarray) -> np.ndarray:
        return np.clip(then(images) + np.float32(delta), 0.0, 1.0)
    return shift


def tta_augmentations(n: int = 5, *, brightness_shift: float = 0.1) -> list[Augmentation]:
    """The first n (1..8) augmentations of the fixed order in the module docstring."""
    horizontal, vertical, both = _flip((2,)), _flip((1,)), _flip((1, 2))
    catalogue = [
        Augmentation("identity", _identity, _identity),
        Augmentation("flip_horizontal", horizontal, horizontal),
        Augmentation("flip_vertical", vertical, vertical),
        Augmentation("brightness_up", _shift(brightness_shift), _identity),
        Augmentation("brightness_down", _shift(-brightness_shift), _identity),
        Augmentation("rotate_180", both, both),
        Augmentation("flip_horizontal_brightness_up", _shift(brightness_shift, horizontal),
                     horizontal),
        Augmentation("flip_vertical_brightness_down", _shift(-brightness_shift, vertical),
                     vertical),
    ]
    if not 1 <= n <= len(catalogue):
        raise ValueError(f"TTA n must be in 1..{len(catalogue)}, got {n}")
    return catalogue[:n]


def tta_predict_fn(predict_fn: PredictFn, *, n: int = 5, brightness_shift: float = 0.1) -> PredictFn:
    """Wrap predict_fn ((n, h, w, C) -> (n, h, w, K) probabilities) so that it returns the mean of
    the de-augmented predictions of `n` augmented copies. Passed to `sliding_window`, every
    window is augmented, predicted and de-augmented before the windows are blended."""
    augmentations = tta_augmentations(n, brightness_shift=brightness_shift)

    def predict_with_tta(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        total = None
        for augmentation in augmentations:
            probs = np.asarray(predict_fn(np.ascontiguousarray(augmentation.forward(images))),
                               dtype=np.float32)
            restored = augmentation.inverse(probs)
            total = restored.copy() if total is None else total + restored
        return total / len(augmentations)

    return predict_with_tta


def tta(predict_fn: PredictFn, images: np.ndarray, *, n: int = 5,
        brightness_shift: float = 0.1) -> np.ndarray:
    """Mean de-augmented probabilities (n_images, h, w, K) of `images` (n_images, h, w, C)."""
    return tta_predict_fn(predict_fn, n=n, brightness_shift=brightness_shift)(images)
