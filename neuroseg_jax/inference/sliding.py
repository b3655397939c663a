"""Sliding-window inference over images of any size (MorphoSeg Sec. 5.6: 224x224 windows with a
56-pixel overlap, window outputs combined by averaging).

The image is covered by windows of size `window` placed every `window - overlap` pixels, the last
window of each row/column flush with the image border; images smaller than the window are padded
first (`pad_mode`). Windows are predicted `batch_size` at a time and their PROBABILITIES are
accumulated with a per-pixel weight ('constant' = plain average, 'gaussian' = weight falling off
towards the window edges, as in nnU-Net, which suppresses seams from the less reliable window
borders), then divided by the accumulated weight. Peak memory is the (H, W, K) float32
accumulator, an (H, W) weight map and two batches of windows (one being predicted while the
previous one is blended) - independent of how many windows there are.

`SlidingWindow` holds these settings as one value for the functions built on `sliding_window`
(`predict_image`, `predict_files`, `evaluate_dataset`, the run-level ones): they take its fields
as keywords and construct it, so the settings and their defaults are declared once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from neuroseg_jax._validation import pair as _pair

PredictFn = Callable[[np.ndarray], np.ndarray]
BLENDS = ("constant", "gaussian")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with windows of `window` every `stride` pixels; the last
    window ends exactly at `length` (length >= window)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


def blend_weights(window: tuple[int, int], blend: str, sigma_scale: float = 0.125) -> np.ndarray:
    """(h, w) float32 weight of a window's pixels: ones ('constant') or a separable Gaussian with
    sigma = sigma_scale * window size, peak 1 (nnU-Net uses sigma_scale = 1/8), floored at 1e-3 so
    that every pixel keeps a positive weight."""
    if blend == "constant":
        return np.ones(window, np.float32)
    if blend != "gaussian":
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    profiles = []
    for size in window:
        offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        profiles.append(np.exp(-0.5 * (offsets / (sigma_scale * size)) ** 2))
    weights = np.outer(profiles[0], profiles[1])
    return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
    """The tiling of whole-image prediction (`sliding_window`'s arguments): window (h, w) or int,
    overlap in pixels (int or (oy, ox)), windows per forward pass, blend 'constant' or 'gaussian'.
    window None predicts each image in one forward pass of its own size."""

    window: int | tuple[int, int] | None = (224, 224)
    overlap: int | tuple[int, int] = 56
    batch_size: int = 8
    blend: str = "gaussian"

    def probabilities(self, predict_fn: PredictFn, image: np.ndarray) -> np.ndarray:
        """(H, W, K) probabilities of one (H, W, C) image."""
        if self.window is None:
            return sliding_window(predict_fn, image, window=np.shape(image)[:2], overlap=0, batch_size=1,
                                  blend=self.blend)
        return sliding_window(predict_fn, image, window=self.window, overlap=self.overlap,
                              batch_size=self.batch_size, blend=self.blend)


def sliding_window(
    predict_fn: PredictFn,
    image: np.ndarray,
    *,
    window=(224, 224),
    overlap=56,
    batch_size: int = 8,
    blend: str = "constant",
    sigma_scale: float = 0.125,
    pad_mode: str = "reflect",
) -> np.ndarray:
    """Probability map of a whole image from window-wise predictions.

    Args:
      predict_fn: maps (n, h, w, C) float32 windows to (n, h, w, K) probabilities (numpy or jax).
        It is always called with exactly `batch_size` windows (the last batch is padded by
        repeating windows) so a jitted function compiles once.
      image: (H, W, C) float32.
      window: (h, w) or int. overlap: pixels shared by neighbouring windows, int or (oy, ox),
        0 <= overlap < window.
      blend: 'constant' or 'gaussian' (see `blend_weights`).
      pad_mode: numpy pad mode for images smaller than the window.
    Returns:
      (H, W, K) float32 probabilities.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, C), got shape {image.shape}")
    window_hw, overlap_hw = _pair(window, "window"), _pair(overlap, "overlap")
    if min(window_hw) < 1 or batch_size < 1:
        raise ValueError(f"window {window_hw} and batch_size {batch_size} must be positive")
    if any(not 0 <= o < w for o, w in zip(overlap_hw, window_hw)):
        raise ValueError(f"overlap {overlap_hw} must satisfy 0 <= overlap < window {window_hw}")
    height, width = image.shape[:2]
    pad_h, pad_w = max(window_hw[0] - height, 0), max(window_hw[1] - width, 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode=pad_mode)
    padded_h, padded_w = image.shape[:2]

    strides = [w - o for w, o in zip(window_hw, overlap_hw)]
    corners = [
        (top, left)
        for top in window_starts(padded_h, window_hw[0], strides[0])
        for left in window_starts(padded_w, window_hw[1], strides[1])
    ]
    weights = blend_weights(window_hw, blend, sigma_scale)
    win_h, win_w = window_hw
    weight_sum = np.zeros((padded_h, padded_w), np.float32)
    accumulator: np.ndarray | None = None

    def accumulate(batch_corners, batch_probs) -> None:
        nonlocal accumulator
        probs = np.asarray(batch_probs, dtype=np.float32)
        if probs.ndim != 4 or probs.shape[:3] != (batch_size, win_h, win_w):
            raise ValueError(
                f"predict_fn must return (n, {win_h}, {win_w}, K) for n={batch_size} windows, "
                f"got {probs.shape}")
        if accumulator is None:
            accumulator = np.zeros((padded_h, padded_w, probs.shape[-1]), np.float32)
        if blend != "constant":
            probs = probs * weights[..., None]
        for (top, left), window_probs in zip(batch_corners, probs):
            accumulator[top:top + win_h, left:left + win_w] += window_probs
            weight_sum[top:top + win_h, left:left + win_w] += weights

    # One batch in flight: with JAX's asynchronous dispatch the next batch is computed while the
    # host blends the previous one (np.asarray is where the host waits).
    pending = None
    for first in range(0, len(corners), batch_size):
        batch_corners = corners[first:first + batch_size]
        windows = np.stack([image[t:t + win_h, l:l + win_w] for t, l in batch_corners])
        if len(batch_corners) < batch_size:
            repeat = np.repeat(windows[-1:], batch_size - len(batch_corners), axis=0)
            windows = np.concatenate([windows, repeat])
        launched = (batch_corners, predict_fn(windows))
        if pending is not None:
            accumulate(*pending)
        pending = launched
    accumulate(*pending)
    accumulator /= weight_sum[..., None]
    return accumulator[:height, :width]
