"""Touching-cells pixel weights from instance labels (U-Net, Ronneberger et al. 2015, eq. 2).

The boundary loss weighs the contour of the binary mask (losses.boundary.contour_weights), which
knows nothing of the narrow background between two neighbouring cells: the pixels a model must get
right to keep the cells apart. U-Net adds

    w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

on background pixels x, d1 and d2 being the distances to the nearest and the second-nearest cell.
Both need one distance transform per cell, so the map is computed on the host, after the
geometric augmentation and the crop, and enters the loss as an additive weight.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# Pixels whose weight would stay below this are left at 0: it bounds how far from a cell its
# distance transform has to reach, which keeps the cost per cell independent of the image size.
NEGLIGIBLE_WEIGHT = 1e-4


def check_touching_cells(w0: float, sigma: float) -> None:
    """Raises ValueError naming the data.touching_cells key whose value cannot give weights."""
    if not w0 >= 0:
        raise ValueError(f"data.touching_cells.w0={w0} must be >= 0")
    if not sigma > 0:
        raise ValueError(f"data.touching_cells.sigma={sigma} must be > 0 (pixels)")


def touching_cells_weights(instances: np.ndarray, *, w0: float, sigma: float) -> np.ndarray:
    """float32 (H, W): w0 exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels, 0 on cells.

    Args:
      instances: int (H, W) instance labels, 0 = background. A binary mask is a single cell, so it
        gets no weight anywhere (there is no second-nearest cell).
      w0: weight of a background pixel that touches two cells at once (U-Net: 10).
      sigma: decay length in pixels (U-Net: about 5).

    d_k is the Euclidean distance to the nearest pixel of cell k (scipy's distance_transform_edt).
    Weights below NEGLIGIBLE_WEIGHT are 0: each cell's distances are computed only within the
    distance sigma sqrt(2 ln(w0 / NEGLIGIBLE_WEIGHT)) beyond which d1 + d2 makes the weight smaller.
    """
    check_touching_cells(w0, sigma)
    if instances.ndim != 2:
        raise ValueError(f"instance labels must have shape (H, W); got {instances.shape}")
    weights = np.zeros(instances.shape, np.float32)
    if w0 <= NEGLIGIBLE_WEIGHT:
        return weights
    reach = math.ceil(sigma * math.sqrt(2.0 * math.log(w0 / NEGLIGIBLE_WEIGHT)))
    nearest = np.full(instances.shape, np.inf)
    second = np.full(instances.shape, np.inf)
    for label, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        # Every pixel within `reach` of the cell lies in its bounding box grown by `reach`, and the
        # whole cell lies inside, so the distances in this window are exact.
        window = tuple(slice(max(axis.start - reach, 0), min(axis.stop + reach, size))
                       for axis, size in zip(box, instances.shape))
        distance = ndimage.distance_transform_edt(instances[window] != label)
        near, far = nearest[window], second[window]
        np.minimum(far, np.maximum(near, distance), out=far)
        np.minimum(near, distance, out=near)
    background = instances == 0
    spread = nearest[background] + second[background]
    weights[background] = w0 * np.exp(-(spread * spread) / (2.0 * sigma * sigma))
    return weights
