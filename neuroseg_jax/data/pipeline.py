"""build_dataset and make_loader: from `config.data` to grain data sources and loaders.

Per-image preprocessing (identical for every split, so train and test see the same scaling):
read -> percentile normalisation -> optional resize (INTER_AREA) -> optional CLAHE.
Train pipeline: geometric augmentation -> random crop -> photometric augmentation ->
optional CLAHE again (IMSAHLO re-applies it after augmentation) -> batch (drop remainder).
Val/test pipeline: center crop -> batch (keep remainder), one pass, no shuffle.
When the loss asks for them, records carry their instance labels through these steps and get the
touching-cells weights of their final crop just before batching. In instance mode
(config.instances.mode='three_class') every file's labels are checked to be instance labels when read,
and the mask of the final crop becomes its three-class targets (background / interior / boundary).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Any

import cv2
import grain.python as grain
import ml_collections
import numpy as np
from absl import flags

from neuroseg_jax.data import splits as splits_lib
from neuroseg_jax.data import transforms as T
from neuroseg_jax.data.config import instance_mode
from neuroseg_jax.data.folder import FolderDataset, LruCache
from neuroseg_jax.data.instance_targets import ThreeClassTargets, check_instance_labels
from neuroseg_jax.data.io import read_image, read_mask, resolve_channel_reduce
from neuroseg_jax.data.patches import PatchDataset
from neuroseg_jax.data.synthetic import SyntheticNeurons

SOURCES = ("synthetic", "folder")


def _size_or_none(value) -> tuple[int, int] | None:
    if value is None or value == "" or value == ():
        return None
    if isinstance(value, int):
        return value, value
    height, width = (int(v) for v in value)
    return height, width


def base_dataset(data_config: ml_collections.ConfigDict, *, with_instances: bool = False
                 ) -> FolderDataset | SyntheticNeurons:
    """The whole dataset named by `data_config.source`, before splitting; its items carry their
    instance labels with `with_instances`."""
    if data_config.source == "synthetic":
        options = data_config.synthetic
        return SyntheticNeurons(
            num_images=options.num_images,
            image_size=tuple(options.image_size),
            seed=options.seed,
            channels=data_config.channels,
            cells=tuple(options.cells),
            dense_fraction=options.dense_fraction,
            faint_fraction=options.faint_fraction,
            soma_major_axis=options.soma_major_axis,
            soma_size_cv=options.soma_size_cv,
            neurites=tuple(options.neurites),
            neurite_in_mask=options.neurite_in_mask,
            photons=options.photons,
            read_noise=options.read_noise,
            background=options.background,
            vignetting=options.vignetting,
            normalize=data_config.normalize,
            percentiles=tuple(data_config.percentiles),
            with_instances=with_instances,
        )
    if data_config.source == "folder":
        if not data_config.root:
            raise ValueError("data.source='folder' needs data.root (a folder with images/ and masks/)")
        return FolderDataset(
            data_config.root,
            layout=data_config.layout,
            channels=data_config.channels,
            channel_reduce=data_config.channel_reduce,
            normalize=data_config.normalize,
            percentiles=tuple(data_config.percentiles),
            tiff_page=data_config.tiff_page,
            mask_suffix=data_config.mask_suffix,
            on_bad_file=data_config.on_bad_file,
            with_instances=with_instances,
        )
    raise ValueError(f"data.source={data_config.source!r}: expected one of {SOURCES}")


def enhance_contrast(image: np.ndarray, clahe: ml_collections.ConfigDict | None) -> np.ndarray:
    """CLAHE preprocessing when `clahe` is enabled, else the image unchanged."""
    if clahe is None or not clahe.enabled:
        return image
    return T.clahe(image, clip_limit=clahe.clip_limit, tile_grid=clahe.tile_grid, bit_depth=clahe.bit_depth)


def load_image(path: str | os.PathLike, data_config: ml_collections.ConfigDict) -> np.ndarray:
    """Read an image for prediction -> float32 (h, w, channels) in [0, 1].

    Same steps and options as the training/test datasets (channel reduction, per-image
    percentile normalisation, resize to data.image_size with INTER_AREA, CLAHE), so predictions
    never see differently scaled inputs. Map outputs back with the original size if resized.
    """
    image = read_image(
        path,
        channels=data_config.channels,
        channel_reduce=resolve_channel_reduce(data_config.channel_reduce, data_config.layout),
        normalize=data_config.normalize,
        percentiles=tuple(data_config.percentiles),
        tiff_page=data_config.tiff_page,
    )
    image_size = _size_or_none(data_config.image_size)
    if image_size is not None:
        image = T.resize_image(image, image_size)
    return enhance_contrast(image, data_config.clahe)


class SplitDataset:
    """The items of `base` at `indices`, preprocessed (resize, CLAHE) and optionally cached.

    Items: dict(image=float32 (H, W, C) in [0, 1], mask=int32 (H, W) in {0, 1}), plus
    instances=int32 (H, W) when the base dataset was built with `with_instances`.
    `names` / `name(i)`, `instances(i)`, `mask(i)` refer to the same items.
    `require_instance_labels`: every item's labels are checked, once per process and whole file,
    to be instance labels (a binary mask raises a ValueError naming its file).
    """

    def __init__(
        self,
        base: Any,
        indices: np.ndarray,
        *,
        image_size: tuple[int, int] | None = None,
        clahe: ml_collections.ConfigDict | None = None,
        cache_size: int = 0,
        require_instance_labels: bool = False,
    ):
        if require_instance_labels and not base.with_instances:
            raise ValueError(f"require_instance_labels needs {base!r} built with with_instances=True")
        self.base = base
        self.indices = np.asarray(indices, np.int64)
        self.image_size = image_size
        self.clahe = clahe if clahe is not None and clahe.enabled else None  # None = off
        self._cache = LruCache(cache_size)
        self.require_instance_labels = require_instance_labels
        self._checked: set[int] = set()

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def with_instances(self) -> bool:
        return self.base.with_instances

    def __repr__(self) -> str:
        # Names the content (source, split members, preprocessing), never an object address, so
        # two splits or runs can be told apart in logs and error messages.
        digest = hashlib.sha1(self.indices.tobytes()).hexdigest()[:12]
        clahe = (
            None if self.clahe is None else (self.clahe.clip_limit, tuple(self.clahe.tile_grid), self.clahe.bit_depth)
        )
        return (
            f"SplitDataset({self.base!r}, images={len(self)}, indices_sha1={digest}, "
            f"image_size={self.image_size}, clahe={clahe})"
        )

    def _source(self, index: int) -> str:
        """How errors name item `index`: its mask file, else the dataset and the item's name."""
        base_index = int(self.indices[index])
        if hasattr(self.base, "mask_paths"):
            return str(self.base.mask_paths[base_index])
        return f"{self.base!r} item {self.base.name(base_index)!r}"

    def _prepare(self, index: int) -> dict[str, np.ndarray]:
        element = self.base[int(self.indices[index])]
        if self.require_instance_labels and index not in self._checked:
            # Whole files only: a crop may cut one object in two.
            check_instance_labels(element["instances"], self._source(index))
            self._checked.add(index)
        if self.image_size is not None:
            element = T.resize_pair(element, self.image_size)
        return {**element, "image": enhance_contrast(element["image"], self.clahe)}

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a split of {len(self)} images")
        return self._cache.get_or_compute(index, lambda: self._prepare(index))

    def name(self, index: int) -> str:
        return self.base.name(int(self.indices[index]))

    @property
    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def instances(self, index: int) -> np.ndarray:
        """int32 (H, W) instance labels of item `index`, resized (nearest) like the mask."""
        labels = self.base.instances(int(self.indices[index]))
        if self.image_size is not None and labels.shape != self.image_size:
            labels = cv2.resize(labels.astype(np.float32), self.image_size[::-1], interpolation=cv2.INTER_NEAREST)
        return labels.astype(np.int32)

    def mask(self, index: int) -> np.ndarray:
        """int32 (H, W) mask of item `index` (without decoding the image where possible)."""
        if self.image_size is None and hasattr(self.base, "mask_paths"):
            return read_mask(self.base.mask_paths[int(self.indices[index])])
        return self[index]["mask"]


def split_of(data_config: ml_collections.ConfigDict, base: Any) -> dict[str, np.ndarray]:
    """Indices of train/val/test in `base`: from data.split.file if set, else seeded (stratified)."""
    options = data_config.split
    if options.file:
        return splits_lib.indices_from_split_file(options.file, base.names)
    strata = [base.foreground_fraction(i) for i in range(len(base))] if options.stratify else None
    return splits_lib.split_indices(
        len(base),
        val_fraction=options.val_fraction,
        test_fraction=options.test_fraction,
        seed=options.seed,
        strata=strata,
    )


def split_sizes(data_config: ml_collections.ConfigDict) -> dict[str, int]:
    """Images in each split ('train', 'val', 'test'), empty splits included."""
    return {name: len(indices) for name, indices in split_of(data_config, base_dataset(data_config)).items()}


def build_dataset(data_config: ml_collections.ConfigDict, split: str, *,
                  with_instances: bool = False, require_instance_labels: bool = False
                  ) -> SplitDataset | PatchDataset:
    """Random-access data source of one split ('train' | 'val' | 'test' | 'all').

    Returns a SplitDataset (items as in FolderDataset) or, with data.patches.enabled, a
    PatchDataset over it; with `with_instances` the items also carry their instance labels;
    `require_instance_labels` (instance mode) also checks that they are instance labels, not a
    binary mask, naming the file that is not (see SplitDataset).
    Raises ValueError for an unknown or empty split.
    """
    if split not in splits_lib.SPLITS + ("all",):
        raise ValueError(f"split={split!r}: expected one of {splits_lib.SPLITS + ('all',)}")
    base = base_dataset(data_config, with_instances=with_instances or require_instance_labels)
    indices = np.arange(len(base)) if split == "all" else split_of(data_config, base)[split]
    if len(indices) == 0:
        raise ValueError(f"split {split!r} is empty (check data.split fractions or data.split.file)")
    dataset = SplitDataset(
        base,
        indices,
        image_size=_size_or_none(data_config.image_size),
        clahe=data_config.clahe,
        cache_size=data_config.cache_size,
        require_instance_labels=require_instance_labels,
    )
    patches = data_config.patches
    if patches.enabled:
        dataset = PatchDataset(
            dataset,
            output_size=_size_or_none(patches.output_size) or _size_or_none(data_config.crop_size),
            sizes=tuple(patches.sizes),
            overlap=patches.overlap,
            include_full=patches.include_full,
            prune_empty=patches.prune_empty,
        )
    return dataset


def loader_transforms(data_config: ml_collections.ConfigDict, split: str, *,
                      touching_weights: bool = False, boundary_width: int | None = None,
                      touching_band_weight: float = 0.0) -> list[grain.MapTransform]:
    """Per-record transforms of a split (everything after build_dataset, before batching);
    `touching_weights` adds the touching-cells weights of the final crop (data.touching_cells);
    a `boundary_width` (instance mode) makes its mask the three-class targets with that band, and a
    `touching_band_weight` > 0 makes its touching weights those of the touching band instead
    (instance_targets.touching_band_weights)."""
    crop_size = _size_or_none(data_config.crop_size)
    operations: list = []
    if split == "train":
        operations += T.geometric_transforms(data_config.augment)
        if crop_size is not None:
            operations.append(T.RandomCrop(crop_size))
        operations += T.photometric_transforms(data_config.augment)
        clahe = data_config.clahe
        if clahe.enabled and clahe.after_augment and data_config.augment.enabled:
            operations.append(T.Clahe(clahe.clip_limit, clahe.tile_grid, clahe.bit_depth))
    elif crop_size is not None:
        operations.append(T.CenterCrop(crop_size))
    if touching_weights:
        operations.append(T.TouchingCellsWeight(data_config.touching_cells.w0, data_config.touching_cells.sigma))
    if boundary_width is not None:
        operations.append(ThreeClassTargets(boundary_width, touching_band_weight))
    operations.append(T.ToBatchable())
    return operations


def _requires_instance_labels(dataset: SplitDataset | PatchDataset) -> bool:
    split_dataset = dataset.base if isinstance(dataset, PatchDataset) else dataset
    return split_dataset.require_instance_labels


def stack_batch(elements: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack records into a batch; records of different sizes give a clear error."""
    shapes = {element["image"].shape for element in elements}
    if len(shapes) > 1:
        raise ValueError(
            f"records of one batch differ in size {sorted(shapes)}: set data.crop_size or data.image_size, "
            "or use batch_size=1"
        )
    return {key: np.stack([element[key] for element in elements]) for key in elements[0]}


def make_loader(
    data_config: ml_collections.ConfigDict,
    split: str,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    dataset: SplitDataset | PatchDataset | None = None,
    touching_weights: bool = False,
    instances: ml_collections.ConfigDict | None = None,
) -> grain.IterDataset:
    """Grain dataset of batches dict(image=(b, h, w, C) float32, mask=(b, h, w) int32), plus
    touching_weight=(b, h, w) float32 with `touching_weights`.

    'train': shuffled with `seed` (a new order every epoch), augmented, random crops, repeats
    forever when num_epochs is None, drops the last incomplete batch. 'val'/'test': no
    augmentation, center crop, one pass (or num_epochs), no shuffle, last batch may be smaller.
    `batch_size` is per process; process `process_index` of `process_count` reads a disjoint
    shard of the records (train: equally many per process). Batch j is always records
    j*b..(j+1)*b-1 of the shuffled stream, augmented from (seed, process_index, record
    position), so batches do not depend on data.worker_count.
    `iter(loader)` is a checkpointable iterator (get_state() / set_state()); the state's layout
    depends on data.worker_count, so resume with the worker count it was saved with.
    `dataset`: the split's data source when the caller already built it with
    `build_dataset(data_config, split)` (with `with_instances=True` for `touching_weights`);
    built here otherwise.
    `touching_weights`: U-Net weights of the background between touching cells (see
    weight_maps.touching_cells_weights with data.touching_cells.w0 and .sigma), computed from the
    instance labels after augmentation and crop; the boundary loss adds them to its contour weights.
    Binary masks hold one cell and get zeros.
    `instances`: config.instances; in 'three_class' mode the masks are the three-class targets
    (0 background, 1 interior, 2 boundary; instance_targets.three_class_targets with
    instances.boundary_width) of the final crop's instance labels, with the touching band's
    weights as `touching_weight` when instances.touching_weight > 0, and a dataset whose labels are
    a binary mask raises a ValueError naming the file (`dataset`, if given, must then come from
    `build_dataset(..., require_instance_labels=True)`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    train = split == "train"
    three_class = instance_mode(instances) == "three_class"
    if dataset is None:
        dataset = build_dataset(data_config, split, with_instances=touching_weights,
                                require_instance_labels=three_class)
    elif three_class and not _requires_instance_labels(dataset):
        raise ValueError(
            f"instance mode needs instance labels, but {dataset!r} was built without checking them: "
            "use build_dataset(..., require_instance_labels=True)"
        )
    elif touching_weights and not dataset.with_instances:
        raise ValueError(
            f"touching_weights need instance labels, but {dataset!r} was built without them: "
            "use build_dataset(..., with_instances=True)"
        )
    if train and len(dataset) // process_count < batch_size:
        raise ValueError(
            f"train split has {len(dataset)} records for {process_count} process(es): "
            f"fewer than batch_size={batch_size} each"
        )
    # Train drops the remainder so every process runs the same number of steps per epoch.
    end = len(dataset) // process_count * process_count if train else len(dataset)
    # Processes fold their index into the seed so their augmentations differ, not only their records.
    process_seed = int(np.random.SeedSequence((seed, process_index)).generate_state(1)[0])
    records = grain.MapDataset.source(dataset)[process_index:end:process_count].seed(process_seed)
    if train:
        # Before repeat, so the shuffle folds the epoch into its seed: a new order every epoch.
        records = records.shuffle()
    records = records.repeat(num_epochs if num_epochs is not None else (None if train else 1))
    # Random transforms draw from (their seed, position in the repeated stream): the same
    # whatever process of the worker pool computes the record.
    band_options = {"boundary_width": int(instances.boundary_width),
                    "touching_band_weight": float(instances.get("touching_weight", 0.0))} if three_class else {}
    transforms = loader_transforms(data_config, split, touching_weights=touching_weights, **band_options)
    batches = records.apply(transforms).batch(
        batch_size, drop_remainder=train, batch_fn=stack_batch
    )
    # data.prefetch counts records but the read-ahead buffer holds batches: round up, and let
    # every read thread work on a batch of its own.
    batches_ahead = (
        max(data_config.read_threads, math.ceil(data_config.prefetch / batch_size)) if data_config.prefetch else 0
    )
    loader = batches.to_iter_dataset(
        grain.ReadOptions(num_threads=data_config.read_threads, prefetch_buffer_size=batches_ahead)
    )
    if data_config.worker_count == 0:
        return loader
    if not flags.FLAGS.is_parsed():
        # Grain's multiprocess prefetch reads absl flags; outside an absl app (notebooks, tests)
        # nobody parsed them, so accept their defaults.
        flags.FLAGS.mark_as_parsed()
    # Workers slice whole batches (w, w + W, ...) and mp_prefetch interleaves them round-robin,
    # which restores the single-process order.
    return loader.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
