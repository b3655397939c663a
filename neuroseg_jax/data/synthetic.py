"""SyntheticNeurons: procedural fluorescence images of neurons with exact masks.

Image model (per pixel, in photon units), l = illumination * (background * haze + photons * signal):
  counts ~ Poisson(l) + Normal(0, read_noise^2), drawn as l + sqrt(l + read_noise^2) * Normal(0, 1)
where `signal` is the drawn cells (elliptical somata, thin branching neurites, faint cells)
blurred by a Gaussian point-spread function, `illumination` is a radial vignetting
1 - v * r^2 and `haze` a smooth random field (uneven background). The result goes through
io.normalize_intensity, the same function that FolderDataset applies to real images.

Soma sizes follow FNC Table I (mean soma area ~1206 px, major axis ~50 px at 1600x1200),
scaled by sqrt(H * W / (1600 * 1200)) unless `soma_major_axis` is given.
Every item is a pure function of (seed, index).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from neuroseg_jax.data import io

# FNC Table I (IMSAHLO paper): mean major axis of a cell body at the 1600x1200 resolution.
_FNC_MAJOR_AXIS_PX = 50.0
_FNC_PIXELS = 1600 * 1200
# Cell bodies below this size stop looking like cells at all.
_MIN_MAJOR_AXIS_PX = 6.0


class SyntheticNeurons:
    """Random-access dataset of `num_images` procedural neuron images.

    Items: dict(image=float32 (H, W, channels) in [0, 1], mask=int32 (H, W) in {0, 1}), plus
    instances=int32 (H, W) labels with `with_instances=True`. `instances(i)` gives the int32 (H, W)
    instance labels (0 = background) of the same item. Cells of a dense cluster overlap: a later
    cell covers part of an earlier one, so neighbours touch without background between them.
    """

    def __init__(
        self,
        num_images: int = 200,
        image_size: tuple[int, int] = (256, 256),
        *,
        seed: int = 0,
        channels: int = 1,
        cells: tuple[int, int] = (4, 14),
        dense_fraction: float = 0.3,
        faint_fraction: float = 0.25,
        soma_major_axis: float | None = None,
        soma_size_cv: float = 0.3,
        neurites: tuple[int, int] = (1, 4),
        neurite_in_mask: bool = True,
        photons: float = 60.0,
        read_noise: float = 2.0,
        background: float = 6.0,
        vignetting: float = 0.4,
        normalize: str = "percentile",
        percentiles: tuple[float, float] = (0.5, 99.8),
        with_instances: bool = False,
    ):
        if num_images < 1:
            raise ValueError(f"synthetic num_images={num_images} must be >= 1")
        height, width = (int(v) for v in image_size)
        if height < 16 or width < 16:
            raise ValueError(f"synthetic image_size={image_size} must be at least 16x16")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: expected 1 or 3")
        if not (0 <= cells[0] <= cells[1]) or not (0 <= neurites[0] <= neurites[1]):
            raise ValueError(f"cells={cells} and neurites={neurites} must be (min, max) with 0 <= min <= max")
        self.num_images = int(num_images)
        self.image_size = (height, width)
        self.seed = int(seed)
        self.channels = channels
        self.cells = tuple(cells)
        self.dense_fraction = float(dense_fraction)
        self.faint_fraction = float(faint_fraction)
        scale = math.sqrt(height * width / _FNC_PIXELS)
        self.major_axis = (
            float(soma_major_axis) if soma_major_axis else max(_MIN_MAJOR_AXIS_PX, _FNC_MAJOR_AXIS_PX * scale)
        )
        self.soma_size_cv = float(soma_size_cv)
        self.neurites = tuple(neurites)
        self.neurite_in_mask = bool(neurite_in_mask)
        self.photons = float(photons)
        self.read_noise = float(read_noise)
        self.background = float(background)
        self.vignetting = float(vignetting)
        self.normalize = normalize
        self.percentiles = tuple(percentiles)
        self.with_instances = bool(with_instances)
        # Radial illumination fall-off is the same for every image: compute it once.
        ys = (np.arange(height, dtype=np.float32) - (height - 1) / 2) / (height / 2)
        xs = (np.arange(width, dtype=np.float32) - (width - 1) / 2) / (width / 2)
        radius2 = (ys[:, None] ** 2 + xs[None, :] ** 2) / 2.0
        self._illumination = (1.0 - self.vignetting * radius2).astype(np.float32)

    def __len__(self) -> int:
        return self.num_images

    @property
    def names(self) -> list[str]:
        return [self.name(i) for i in range(self.num_images)]

    def name(self, index: int) -> str:
        return f"synthetic_{self.seed}_{index:06d}"

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        return index

    def _draw_neurites(self, rng, centre, axis, brightness, labels, signal, label, thickness):
        """Random-walk polylines leaving the soma, each with an optional side branch."""
        count = int(rng.integers(self.neurites[0], self.neurites[1] + 1))
        for _ in range(count):
            angle = rng.uniform(0, 2 * math.pi)
            steps = int(rng.integers(4, 10))
            step = axis * rng.uniform(0.25, 0.45)
            points = [np.array(centre, np.float64)]
            for _ in range(steps):
                angle += rng.normal(0, 0.35)
                points.append(points[-1] + step * np.array([math.cos(angle), math.sin(angle)]))
            lines = [np.array(points)]
            if rng.uniform() < 0.5 and steps > 4:
                start = int(rng.integers(2, steps - 1))
                branch_angle = angle + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
                branch = [lines[0][start]]
                for _ in range(steps - start):
                    branch_angle += rng.normal(0, 0.35)
                    branch.append(branch[-1] + step * np.array([math.cos(branch_angle), math.sin(branch_angle)]))
                lines.append(np.array(branch))
            for line in lines:
                polyline = [np.round(line).astype(np.int32).reshape(-1, 1, 2)]
                cv2.polylines(signal, polyline, False, brightness * rng.uniform(0.4, 0.8), thickness)
                if self.neurite_in_mask:
                    cv2.polylines(labels, polyline, False, label, thickness)

    def _cell_centres(self, rng) -> list[tuple[float, float]]:
        height, width = self.image_size
        count = int(rng.integers(self.cells[0], self.cells[1] + 1))
        centres = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(count)]
        if rng.uniform() < self.dense_fraction:
            # A dense cluster: centres about one soma apart, so cells touch and overlap.
            members = int(rng.integers(5, 13))
            cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
            spread = self.major_axis * 0.35 * math.sqrt(members)
            centres += [(cx + rng.normal(0, spread), cy + rng.normal(0, spread)) for _ in range(members)]
        return centres

    def _generate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (image float32 (H, W, channels), instances int32 (H, W))."""
        rng = np.random.default_rng([self.seed, index])
        height, width = self.image_size
        labels = np.zeros((height, width), np.uint16)
        signal = np.zeros((height, width), np.float32)
        thickness = max(1, int(round(self.major_axis / 25)))
        for label, (cx, cy) in enumerate(self._cell_centres(rng), start=1):
            faint = rng.uniform() < self.faint_fraction
            brightness = rng.uniform(0.1, 0.3) if faint else rng.uniform(0.6, 1.0)
            major = self.major_axis * rng.lognormal(0.0, self.soma_size_cv)
            minor = major * rng.uniform(0.55, 0.95)
            angle = rng.uniform(0, 180)
            self._draw_neurites(rng, (cx, cy), major, brightness, labels, signal, label, thickness)
            # Integer drawing at 4x sub-pixel precision (shift=2) keeps small somata round.
            centre = (int(round(cx * 4)), int(round(cy * 4)))
            axes = (max(1, int(round(major * 2))), max(1, int(round(minor * 2))))
            cv2.ellipse(labels, centre, axes, angle, 0, 360, label, -1, cv2.LINE_8, 2)
            cv2.ellipse(signal, centre, axes, angle, 0, 360, brightness, -1, cv2.LINE_8, 2)
        # Optical blur (point-spread function) of about a tenth of a soma.
        psf_sigma = max(0.7, self.major_axis / 12)
        signal = cv2.GaussianBlur(signal, (0, 0), psf_sigma)
        # Uneven background: a bicubic upsampling of a coarse random grid.
        haze = cv2.resize(
            rng.uniform(0.5, 1.5, (4, 4)).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC
        )
        expected = self._illumination * (self.background * np.maximum(haze, 0.1) + self.photons * signal)
        # Poisson-Gaussian noise in its heteroscedastic normal approximation (Foi et al. 2008):
        # Poisson(l) + N(0, s^2) ~ l + sqrt(l + s^2) * N(0, 1); 5x cheaper than exact Poisson draws.
        spread = np.sqrt(expected + np.float32(self.read_noise**2))
        counts = expected + spread * rng.standard_normal(expected.shape, dtype=np.float32)
        image = io.normalize_intensity(counts, mode=self.normalize, percentiles=self.percentiles, dtype_max=None)
        image = np.repeat(image[..., None], self.channels, axis=-1)
        return image, labels.astype(np.int32)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        image, instances = self._generate(self._check(index))
        item = {"image": image, "mask": (instances > 0).astype(np.int32)}
        return {**item, "instances": instances} if self.with_instances else item

    def instances(self, index: int) -> np.ndarray:
        """int32 (H, W) instance labels of item `index` (same pixels as its mask)."""
        return self._generate(self._check(index))[1]

    def foreground_fraction(self, index: int) -> float:
        return float((self.instances(index) > 0).mean())

    def __repr__(self) -> str:
        return f"SyntheticNeurons(num_images={self.num_images}, image_size={self.image_size}, seed={self.seed})"
