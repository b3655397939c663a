"""Grain transforms on elements dict(image=float32 (H, W, C) in [0, 1], mask=int32 (H, W)).

Elements may also carry `instances` (int32 (H, W) instance labels, 0 = background) when the loss
needs them. Geometric transforms move image and label maps (mask, instances) with the same
coordinate map (image: bilinear or INTER_AREA, labels: nearest, so they keep their values).
Photometric transforms touch the image only.
Random transforms draw from the per-record numpy Generator that grain passes in, so results
depend only on (loader seed, record index). Transforms never modify their input arrays (items
may come from a cache shared between records).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import cv2
import grain.python as grain
import numpy as np

from neuroseg_jax._validation import pair as _pair
from neuroseg_jax.data.weight_maps import check_touching_cells, touching_cells_weights

Element = dict[str, np.ndarray]
# Per-pixel labels that geometric transforms move like the image.
LABEL_KEYS = ("mask", "instances")


def _with(element: Element, image: np.ndarray, move_labels: Callable[[np.ndarray], np.ndarray]) -> Element:
    """Copy of `element` with a new image and every label map moved by `move_labels`; an image that
    cv2 squeezed to 2-D gets its channel back."""
    if image.ndim == 2:
        image = image[..., None]
    moved = {key: move_labels(element[key]) for key in LABEL_KEYS if key in element}
    return {**element, "image": image, **moved}


def _nearest(warp: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Label mover from a cv2 nearest-neighbour warp: int labels pass through the smallest dtype that
    cv2 accepts and that holds them exactly, and come back as int32."""

    def move(labels: np.ndarray) -> np.ndarray:
        top = int(labels.max(initial=0))
        dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.float64
        return warp(labels.astype(dtype)).astype(np.int32)

    return move


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """(H, W, C) -> (h, w, C) with INTER_AREA (anti-aliased, as in the IMSAHLO preprocessing)."""
    height, width = _pair(size)
    if image.shape[:2] == (height, width):
        return image
    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return resized[..., None] if resized.ndim == 2 else resized


def resize_pair(element: Element, size: Sequence[int]) -> Element:
    """Resize image with INTER_AREA and mask with nearest neighbour (stays binary)."""
    height, width = _pair(size)
    if element["mask"].shape == (height, width):
        return element
    move = _nearest(lambda labels: cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST))
    return _with(element, resize_image(element["image"], size), move)


def clahe(image: np.ndarray, *, clip_limit: float, tile_grid: Sequence[int], bit_depth: int = 8) -> np.ndarray:
    """CLAHE (Zuiderveld 1994) of a float image in [0, 1], channel by channel.

    OpenCV's CLAHE works on integers, so the image is quantised to `bit_depth` (8 or 16) bits,
    equalised with `tile_grid` = (rows, cols) tiles and clip limit `clip_limit`, and scaled
    back to [0, 1]. 16 bits keeps faint intensity steps but costs ~7x the time.
    """
    if bit_depth not in (8, 16):
        raise ValueError(f"clahe bit_depth={bit_depth}: expected 8 or 16")
    top = 255 if bit_depth == 8 else 65535
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    equalizer = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=tuple(int(v) for v in tile_grid))
    quantised = np.round(np.clip(image, 0.0, 1.0) * top).astype(dtype)
    channels = [equalizer.apply(np.ascontiguousarray(quantised[..., c])) for c in range(image.shape[-1])]
    return (np.stack(channels, axis=-1).astype(np.float32) / top).astype(np.float32)


def crop_or_pad(element: Element, size: Sequence[int], top: int, left: int) -> Element:
    """Window (top, left, size) of the element; parts outside the image are zero (background)."""
    height, width = _pair(size)
    image = element["image"]
    pad_y, pad_x = max(0, height - image.shape[0]), max(0, width - image.shape[1])

    def window(array: np.ndarray) -> np.ndarray:
        if pad_y or pad_x:
            array = np.pad(array, ((0, pad_y), (0, pad_x)) + ((0, 0),) * (array.ndim - 2))
        return array[top : top + height, left : left + width]

    return _with(element, window(image), window)


def _warp(element: Element, map_x: np.ndarray, map_y: np.ndarray) -> Element:
    """Sample image (bilinear) and label maps (nearest) at (map_x, map_y); reflected borders."""
    image = cv2.remap(element["image"], map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    move = _nearest(
        lambda labels: cv2.remap(labels, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101)
    )
    return _with(element, image, move)


def _warp_affine(element: Element, matrix: np.ndarray) -> Element:
    height, width = element["mask"].shape
    image = cv2.warpAffine(
        element["image"], matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    move = _nearest(
        lambda labels: cv2.warpAffine(
            labels, matrix, (width, height), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101
        )
    )
    return _with(element, image, move)


class Resize(grain.MapTransform):
    """Resize to (h, w): image INTER_AREA, mask nearest."""

    def __init__(self, size: Sequence[int]):
        self.size = _pair(size)

    def map(self, element: Element) -> Element:
        return resize_pair(element, self.size)


class Clahe(grain.MapTransform):
    """Contrast-limited adaptive histogram equalisation of the image (see `clahe`)."""

    def __init__(self, clip_limit: float = 3.0, tile_grid: Sequence[int] = (8, 8), bit_depth: int = 8):
        self.clip_limit, self.tile_grid, self.bit_depth = clip_limit, tuple(tile_grid), bit_depth

    def map(self, element: Element) -> Element:
        image = clahe(element["image"], clip_limit=self.clip_limit, tile_grid=self.tile_grid, bit_depth=self.bit_depth)
        return {**element, "image": image}


class CenterCrop(grain.MapTransform):
    """Central (h, w) window; zero padding when the image is smaller."""

    def __init__(self, size: Sequence[int]):
        self.size = _pair(size)

    def map(self, element: Element) -> Element:
        height, width = element["mask"].shape
        top, left = max(0, (height - self.size[0]) // 2), max(0, (width - self.size[1]) // 2)
        return crop_or_pad(element, self.size, top, left)


class RandomCrop(grain.RandomMapTransform):
    """Uniformly placed (h, w) window; zero padding when the image is smaller."""

    def __init__(self, size: Sequence[int]):
        self.size = _pair(size)

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        height, width = element["mask"].shape
        top = int(rng.integers(0, max(0, height - self.size[0]) + 1))
        left = int(rng.integers(0, max(0, width - self.size[1]) + 1))
        return crop_or_pad(element, self.size, top, left)


class RandomFlip(grain.RandomMapTransform):
    """Horizontal flip with probability `horizontal`, vertical flip with probability `vertical`."""

    def __init__(self, horizontal: float = 0.5, vertical: float = 0.5):
        self.horizontal, self.vertical = horizontal, vertical

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        flip_x, flip_y = rng.uniform() < self.horizontal, rng.uniform() < self.vertical

        def flip(array: np.ndarray) -> np.ndarray:
            return array[:: -1 if flip_y else 1, :: -1 if flip_x else 1]

        return _with(element, flip(element["image"]), flip)


class RandomRot90(grain.RandomMapTransform):
    """Rotation by k * 90 degrees, k uniform in {1, 2, 3}, with probability p (may swap H and W)."""

    def __init__(self, p: float):
        self.p = p

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.uniform() >= self.p:
            return element
        turns = int(rng.integers(1, 4))
        return _with(element, np.rot90(element["image"], turns), lambda array: np.rot90(array, turns))


class RandomRotate(grain.RandomMapTransform):
    """Rotation about the centre by an angle uniform in [-max_degrees, max_degrees], probability p."""

    def __init__(self, p: float, max_degrees: float = 45.0):
        self.p, self.max_degrees = p, max_degrees

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.uniform() >= self.p:
            return element
        height, width = element["mask"].shape
        angle = rng.uniform(-self.max_degrees, self.max_degrees)
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, 1.0)
        return _warp_affine(element, matrix)


class RandomAffine(grain.RandomMapTransform):
    """Scale in `scale` range, shear up to `shear_degrees`, shift up to `translate` x size."""

    def __init__(
        self, p: float, scale: Sequence[float] = (0.9, 1.1), shear_degrees: float = 10.0, translate: float = 0.05
    ):
        self.p, self.scale, self.shear_degrees, self.translate = p, tuple(scale), shear_degrees, translate

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.uniform() >= self.p:
            return element
        height, width = element["mask"].shape
        zoom = rng.uniform(*self.scale)
        shear = math.tan(math.radians(rng.uniform(-self.shear_degrees, self.shear_degrees)))
        shift = rng.uniform(-self.translate, self.translate, 2) * (width, height)
        centre = np.array([(width - 1) / 2, (height - 1) / 2])
        linear = zoom * np.array([[1.0, shear], [0.0, 1.0]])
        # x' = A (x - c) + c + t
        matrix = np.concatenate([linear, (centre - linear @ centre + shift)[:, None]], axis=1)
        return _warp_affine(element, matrix)


class ElasticDeform(grain.RandomMapTransform):
    """Elastic deformation (Simard et al. 2003): displacement = alpha * Gaussian(sigma)-smoothed
    uniform noise in [-1, 1], applied with probability p; alpha and sigma in pixels."""

    def __init__(self, p: float, alpha: float = 30.0, sigma: float = 6.0):
        self.p, self.alpha, self.sigma = p, alpha, sigma

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.uniform() >= self.p:
            return element
        height, width = element["mask"].shape
        # The smoothed field has no detail finer than sigma, so draw it on a grid `factor` times
        # coarser and upsample (~10x faster). Blurring n-times coarser white noise leaves
        # n-times more amplitude, hence the division by `factor`.
        factor = max(1, int(self.sigma // 2))
        coarse = (height // factor + 2, width // factor + 2)
        displacement = []
        for _ in range(2):
            noise = rng.uniform(-1.0, 1.0, coarse).astype(np.float32)
            smooth = cv2.GaussianBlur(noise, (0, 0), self.sigma / factor) * (self.alpha / factor)
            displacement.append(cv2.resize(smooth, (width, height), interpolation=cv2.INTER_LINEAR))
        grid_x = np.arange(width, dtype=np.float32)[None, :] + displacement[0]
        grid_y = np.arange(height, dtype=np.float32)[:, None] + displacement[1]
        return _warp(element, grid_x, grid_y)


class GridDistortion(grain.RandomMapTransform):
    """Separable grid distortion: the image is cut into `num_steps` strips per axis and each strip
    is stretched by a factor in [1 - limit, 1 + limit] (piecewise-linear map), probability p."""

    def __init__(self, p: float, num_steps: int = 5, limit: float = 0.3):
        self.p, self.num_steps, self.limit = p, int(num_steps), limit

    def _axis_map(self, length: int, rng: np.random.Generator) -> np.ndarray:
        widths = 1.0 + rng.uniform(-self.limit, self.limit, self.num_steps)
        nodes_out = np.concatenate([[0.0], np.cumsum(widths)]) / widths.sum() * (length - 1)
        nodes_in = np.linspace(0.0, length - 1, self.num_steps + 1)
        return np.interp(np.arange(length), nodes_out, nodes_in).astype(np.float32)

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.uniform() >= self.p:
            return element
        height, width = element["mask"].shape
        source_x, source_y = self._axis_map(width, rng), self._axis_map(height, rng)
        map_x = np.broadcast_to(source_x[None, :], (height, width)).copy()
        map_y = np.broadcast_to(source_y[:, None], (height, width)).copy()
        return _warp(element, map_x, map_y)


class BrightnessContrast(grain.RandomMapTransform):
    """x' = clip(((x - m) * c + m) * b, 0, 1), c ~ 1 + U(-contrast, contrast),
    b ~ 1 + U(-brightness, brightness), m = image mean; probability p."""

    def __init__(self, p: float, brightness: float = 0.3, contrast: float = 0.3):
        self.p, self.brightness, self.contrast = p, brightness, contrast

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.uniform() >= self.p:
            return element
        image = element["image"]
        gain = 1.0 + rng.uniform(-self.contrast, self.contrast)
        level = 1.0 + rng.uniform(-self.brightness, self.brightness)
        mean = image.mean()
        adjusted = np.clip(((image - mean) * gain + mean) * level, 0.0, 1.0).astype(np.float32)
        return {**element, "image": adjusted}


class GaussianNoise(grain.RandomMapTransform):
    """Additive N(0, s^2) noise, s ~ U(sigma), clipped to [0, 1]; probability p."""

    def __init__(self, p: float, sigma: Sequence[float] = (0.01, 0.05)):
        self.p, self.sigma = p, tuple(sigma)

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.uniform() >= self.p:
            return element
        image = element["image"]
        noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(*self.sigma))
        return {**element, "image": np.clip(image + noise, 0.0, 1.0)}


class GaussianBlur(grain.RandomMapTransform):
    """Gaussian blur with standard deviation ~ U(sigma) pixels; probability p."""

    def __init__(self, p: float, sigma: Sequence[float] = (0.5, 1.5)):
        self.p, self.sigma = p, tuple(sigma)

    def random_map(self, element: Element, rng: np.random.Generator) -> Element:
        if rng.uniform() >= self.p:
            return element
        blurred = cv2.GaussianBlur(element["image"], (0, 0), rng.uniform(*self.sigma))
        return {**element, "image": blurred[..., None] if blurred.ndim == 2 else blurred}


class TouchingCellsWeight(grain.MapTransform):
    """Adds `touching_weight`: float32 (H, W) U-Net weights of the background between neighbouring
    cells (see weight_maps.touching_cells_weights), from the element's instance labels. Runs after
    the crop, so the distances are those of the pixels the model sees."""

    def __init__(self, w0: float, sigma: float):
        check_touching_cells(w0, sigma)
        self.w0, self.sigma = float(w0), float(sigma)

    def map(self, element: Element) -> Element:
        if "instances" not in element:
            raise ValueError("touching-cells weights need instance labels: build the dataset with with_instances=True")
        weights = touching_cells_weights(element["instances"], w0=self.w0, sigma=self.sigma)
        return {**element, "touching_weight": weights}


class ToBatchable(grain.MapTransform):
    """Keep only image (float32, C-contiguous), mask (int32) and, when computed, touching_weight
    (float32); names and instance labels never enter batches."""

    def map(self, element: Element) -> Element:
        batchable = {
            "image": np.ascontiguousarray(element["image"], np.float32),
            "mask": np.ascontiguousarray(element["mask"], np.int32),
        }
        if "touching_weight" in element:
            batchable["touching_weight"] = np.ascontiguousarray(element["touching_weight"], np.float32)
        return batchable


def geometric_transforms(augment) -> list[grain.RandomMapTransform]:
    """Flips, rotations, affine, elastic and grid distortion from the `augment` config (empty when disabled);
    transforms whose probability is 0 are left out."""
    if not augment.enabled:
        return []
    candidates = [
        (max(augment.hflip, augment.vflip), lambda: RandomFlip(augment.hflip, augment.vflip)),
        (augment.rot90, lambda: RandomRot90(augment.rot90)),
        (augment.rotate.p, lambda: RandomRotate(augment.rotate.p, augment.rotate.max_degrees)),
        (
            augment.affine.p,
            lambda: RandomAffine(
                augment.affine.p, augment.affine.scale, augment.affine.shear_degrees, augment.affine.translate
            ),
        ),
        (augment.elastic.p, lambda: ElasticDeform(augment.elastic.p, augment.elastic.alpha, augment.elastic.sigma)),
        (
            augment.grid_distortion.p,
            lambda: GridDistortion(
                augment.grid_distortion.p, augment.grid_distortion.num_steps, augment.grid_distortion.limit
            ),
        ),
    ]
    return [make() for probability, make in candidates if probability > 0]


def photometric_transforms(augment) -> list[grain.RandomMapTransform]:
    """Brightness/contrast, noise, blur from the `augment` config (empty when disabled)."""
    if not augment.enabled:
        return []
    bc, noise, blur = augment.brightness_contrast, augment.gaussian_noise, augment.gaussian_blur
    candidates = [
        (bc.p, lambda: BrightnessContrast(bc.p, bc.brightness, bc.contrast)),
        (noise.p, lambda: GaussianNoise(noise.p, noise.sigma)),
        (blur.p, lambda: GaussianBlur(blur.p, blur.sigma)),
    ]
    return [make() for probability, make in candidates if probability > 0]
