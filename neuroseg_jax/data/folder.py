"""FolderDataset: lazily read image/mask pairs from `root/images` and `root/masks`."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from neuroseg_jax.data import io

LAYOUTS = ("plain", "fnc")
# FNC v1 names its files `<stem>_y.png` (yellow collection) and ships them under
# `all_images/images` and `all_masks/masks`; the plain layout is `images/` + `masks/`.
_FNC_SUFFIX = "_y"
_IMAGE_DIRS = {"plain": ("images",), "fnc": ("images", "all_images/images", "all_images")}
_MASK_DIRS = {"plain": ("masks",), "fnc": ("masks", "all_masks/masks", "all_masks", "all_images/masks")}

# What decoding a file told us, shared by every FolderDataset of this process: training builds
# one dataset per split and per evaluation over the same folder, and decoding dominates their
# construction. Keys hold file size and mtime, so an edited file is decoded again.
_pair_problems: dict[tuple, str | None] = {}
_foreground_fractions: dict[tuple, float] = {}


class LruCache:
    """Thread-safe least-recently-used cache of at most `capacity` items (0 = disabled)."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"cache_size={capacity} must be >= 0")
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: Any, compute: Callable[[], Any]) -> Any:
        if self.capacity == 0:
            return compute()
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def __getstate__(self) -> dict:
        # Worker processes start with an empty cache and their own lock.
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _find_dir(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    raise FileNotFoundError(f"{root}: no {what} folder (looked for {', '.join(candidates)})")


def _list_images(folder: Path) -> dict[str, Path]:
    """stem -> path of the image files in `folder`; two files with one stem is an error."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in io.IMAGE_EXTENSIONS or not path.is_file():
            continue
        if path.stem in found:
            raise ValueError(f"{folder}: two files with stem {path.stem!r}: {found[path.stem].name}, {path.name}")
        found[path.stem] = path
    return found


class FolderDataset:
    """Random-access dataset over `root/images/<stem>.*` and `root/masks/<stem>.*`.

    Items are dict(image=float32 (H, W, channels) in [0, 1], mask=int32 (H, W) in {0, 1}), plus
    instances=int32 (H, W) labels as stored (see `instances`) with `with_instances=True`;
    names are available through `.names` / `name(i)` (strings cannot go into batches).
    Files are read on access (lazy); `cache_size` keeps the most recent decoded pairs.

    Pairing is checked at construction (empty folder, stem without partner, duplicate stems);
    file content (decoding, mask values, image/mask size) at read time. With
    `on_bad_file='skip'` every pair is decoded at construction (once per process: later
    datasets over unchanged files reuse the verdict) and the bad ones are dropped with a single
    warning that lists all of them.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        layout: str = "plain",
        channels: int = 1,
        channel_reduce: str = "auto",
        normalize: str = "percentile",
        percentiles: tuple[float, float] = (0.5, 99.8),
        tiff_page: int | str = "max",
        mask_suffix: str = "",
        cache_size: int = 0,
        on_bad_file: str = "error",
        with_instances: bool = False,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
        if on_bad_file not in ("error", "skip"):
            raise ValueError(f"on_bad_file={on_bad_file!r}: expected 'error' or 'skip'")
        if channels not in (1, 3):
            raise ValueError(f"channels={channels}: expected 1 or 3")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data root {self.root} does not exist")
        self.layout = layout
        self.channels = channels
        self.channel_reduce = io.resolve_channel_reduce(channel_reduce, layout)
        if normalize not in io.NORMALIZATIONS:
            raise ValueError(f"normalize={normalize!r}: expected one of {io.NORMALIZATIONS}")
        self.normalize = normalize
        self.percentiles = tuple(percentiles)
        self.tiff_page = tiff_page
        self.on_bad_file = on_bad_file
        self.with_instances = bool(with_instances)
        self._cache = LruCache(cache_size)

        image_dir = _find_dir(self.root, _IMAGE_DIRS[layout], "images")
        mask_dir = _find_dir(self.root, _MASK_DIRS[layout], "masks")
        images = _list_images(image_dir)
        masks = _list_images(mask_dir)
        if not images:
            raise FileNotFoundError(f"{image_dir}: no image files ({', '.join(io.IMAGE_EXTENSIONS)})")
        mask_by_key = {}
        for stem, path in masks.items():
            key = self._pair_key(stem[: -len(mask_suffix)] if mask_suffix and stem.endswith(mask_suffix) else stem)
            mask_by_key[key] = path
        problems: list[str] = []
        pairs: list[tuple[str, Path, Path]] = []
        for stem, path in images.items():
            mask_path = mask_by_key.pop(self._pair_key(stem), None)
            if mask_path is None:
                problems.append(f"{path}: no mask with stem {stem!r} in {mask_dir}")
            else:
                pairs.append((stem, path, mask_path))
        problems += [f"{path}: mask without image in {image_dir}" for path in mask_by_key.values()]
        if on_bad_file == "skip":
            verdicts = [self._pair_problem(image_path, mask_path) for _, image_path, mask_path in pairs]
            problems += [problem for problem in verdicts if problem is not None]
            pairs = [pair for pair, problem in zip(pairs, verdicts) if problem is None]
            if problems:
                warnings.warn(
                    f"{self.root}: skipped {len(problems)} bad file(s):\n  " + "\n  ".join(problems), stacklevel=2
                )
        elif problems:
            raise ValueError(f"{self.root}: unpaired files:\n  " + "\n  ".join(problems))
        if not pairs:
            raise FileNotFoundError(f"{self.root}: no usable image/mask pairs")
        self._names = [stem for stem, _, _ in pairs]
        self.image_paths = [image_path for _, image_path, _ in pairs]
        self.mask_paths = [mask_path for _, _, mask_path in pairs]

    def _pair_key(self, stem: str) -> str:
        if self.layout == "fnc" and stem.endswith(_FNC_SUFFIX):
            return stem[: -len(_FNC_SUFFIX)]
        return stem

    def _read_pair(self, image_path: Path, mask_path: Path) -> dict[str, np.ndarray]:
        image = io.read_image(
            image_path,
            channels=self.channels,
            channel_reduce=self.channel_reduce,
            normalize=self.normalize,
            percentiles=self.percentiles,
            tiff_page=self.tiff_page,
        )
        if self.with_instances:
            # One decode gives both; read_labels checks the mask rule like read_mask.
            labels = io.read_labels(mask_path)
            pair = {"image": image, "mask": (labels > 0).astype(np.int32), "instances": labels}
        else:
            pair = {"image": image, "mask": io.read_mask(mask_path)}
        mask = pair["mask"]
        if image.shape[:2] != mask.shape:
            raise io.ImageReadError(
                f"{image_path}: image size {image.shape[1]}x{image.shape[0]} (WxH) differs from mask "
                f"{mask_path} size {mask.shape[1]}x{mask.shape[0]}"
            )
        return pair

    def _pair_problem(self, image_path: Path, mask_path: Path) -> str | None:
        """Why the pair cannot be read, or None; decodes only pairs this process has not checked."""
        read_options = (self.channels, self.channel_reduce, self.normalize, self.percentiles, self.tiff_page)
        mask_key = _file_key(mask_path)
        key = (_file_key(image_path), mask_key, read_options)
        if key not in _pair_problems:
            try:
                pair = self._read_pair(image_path, mask_path)
            except (ValueError, OSError) as error:
                _pair_problems[key] = str(error)
            else:
                _pair_problems[key] = None
                _foreground_fractions[mask_key] = float(pair["mask"].mean())
        return _pair_problems[key]

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self._cache.get_or_compute(
            index, lambda: self._read_pair(self.image_paths[index], self.mask_paths[index])
        )

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def name(self, index: int) -> str:
        return self._names[index]

    def instances(self, index: int) -> np.ndarray:
        """int32 (H, W) instance labels of item `index` as stored (binary masks give {0, 1})."""
        return io.read_labels(self.mask_paths[index])

    def foreground_fraction(self, index: int) -> float:
        """Share of foreground pixels of mask `index` (reads only the mask, once per process)."""
        key = _file_key(self.mask_paths[index])
        if key not in _foreground_fractions:
            _foreground_fractions[key] = float(io.read_mask(self.mask_paths[index]).mean())
        return _foreground_fractions[key]

    def __repr__(self) -> str:
        return f"FolderDataset(root={str(self.root)!r}, layout={self.layout!r}, images={len(self)})"
