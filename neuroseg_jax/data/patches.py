"""MorphoSeg multi-scale overlapping patches (MorphoSeg Sec. 4.2, "Data Augmentation").

Each image is cut into square patches of several sizes (224, 448, 1000, 1500, 2000 px) with
35 % overlap; the last patch of a row/column is aligned to the image edge so the whole image is
covered; optionally the full image is added; patches without foreground can be pruned. Every
patch is resized to the model input size (image INTER_AREA, mask nearest).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

import numpy as np

from neuroseg_jax.data.transforms import crop_or_pad, resize_pair


def patch_starts(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets of `size`-long windows covering [0, length) with the given overlap.

    stride = round(size * (1 - overlap)); the last window ends exactly at `length` (edge
    aligned), so coverage is complete. A window longer than the image gives no start.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"patch overlap={overlap} must be in [0, 1)")
    if size > length:
        return []
    stride = max(1, int(round(size * (1.0 - overlap))))
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _integral(mask: np.ndarray) -> np.ndarray:
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(mask > 0, axis=0), axis=1)
    return table


class PatchDataset:
    """Random-access dataset of multi-scale patches of `base` items.

    Patch records are (item, top, left, height, width); the index is computed on first use
    (reading every mask once), not at construction. Items: dict(image=(h, w, C), mask=(h, w)),
    plus instances=(h, w) when the base items carry them, with (h, w) = output_size.
    """

    def __init__(
        self,
        base: Any,
        *,
        output_size: Sequence[int],
        sizes: Sequence[int] = (224, 448, 1000, 1500, 2000),
        overlap: float = 0.35,
        include_full: bool = True,
        prune_empty: bool = False,
    ):
        if output_size is None:
            raise ValueError("patches need an output size: set data.patches.output_size or data.crop_size")
        self.base = base
        self.output_size = tuple(int(v) for v in output_size)
        self.sizes = tuple(int(v) for v in sizes)
        self.overlap = float(overlap)
        self.include_full = bool(include_full)
        self.prune_empty = bool(prune_empty)
        self._records: np.ndarray | None = None
        self._lock = threading.Lock()

    def _base_mask(self, item: int) -> np.ndarray:
        reader = getattr(self.base, "mask", None)
        return reader(item) if reader is not None else self.base[item]["mask"]

    def _build(self) -> np.ndarray:
        records = []
        for item in range(len(self.base)):
            mask = self._base_mask(item)
            height, width = mask.shape
            boxes = [
                (top, left, size, size)
                for size in self.sizes
                for top in patch_starts(height, size, self.overlap)
                for left in patch_starts(width, size, self.overlap)
            ]
            if self.include_full:
                boxes.append((0, 0, height, width))
            if self.prune_empty:
                table = _integral(mask)
                boxes = [
                    (t, l, h, w)
                    for t, l, h, w in boxes
                    if table[t + h, l + w] - table[t, l + w] - table[t + h, l] + table[t, l] > 0
                ]
            records += [(item, *box) for box in boxes]
        return np.array(records, np.int64).reshape(-1, 5)

    @property
    def records(self) -> np.ndarray:
        """int64 (N, 5): item, top, left, height, width of every patch."""
        if self._records is None:
            with self._lock:
                if self._records is None:
                    self._records = self._build()
        return self._records

    def __len__(self) -> int:
        return len(self.records)

    @property
    def with_instances(self) -> bool:
        return self.base.with_instances

    def __repr__(self) -> str:
        return (
            f"PatchDataset({self.base!r}, output_size={self.output_size}, sizes={self.sizes}, overlap={self.overlap}, "
            f"include_full={self.include_full}, prune_empty={self.prune_empty})"
        )

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        item, top, left, height, width = (int(v) for v in self.records[int(index)])
        patch = crop_or_pad(self.base[item], (height, width), top, left)
        return resize_pair(patch, self.output_size)

    def name(self, index: int) -> str:
        item, top, left, height, width = (int(v) for v in self.records[int(index)])
        return f"{self.base.name(item)}_y{top}_x{left}_{height}x{width}"

    @property
    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["records"] = self.records  # workers reuse the index instead of rebuilding it
        del state["_lock"], state["_records"]
        return state

    def __setstate__(self, state: dict) -> None:
        records = state.pop("records")
        self.__dict__.update(state)
        self._records = records
        self._lock = threading.Lock()
