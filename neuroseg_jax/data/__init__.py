"""Data layer: readers, datasets (folder, synthetic, patches), transforms and grain loaders.

Public API: default_data_config, build_dataset, make_loader, FolderDataset, SyntheticNeurons,
PatchDataset, read_image, read_mask, read_labels, normalize_intensity, transforms,
touching_cells_weights (U-Net weights of the background between touching cells) and
load_image (an image for prediction, preprocessed exactly like the dataset images).
"""

from neuroseg_jax.data import transforms
from neuroseg_jax.data.config import default_augment_config, default_data_config
from neuroseg_jax.data.folder import FolderDataset
from neuroseg_jax.data.io import ImageReadError, normalize_intensity, read_image, read_labels, read_mask
from neuroseg_jax.data.patches import PatchDataset, patch_starts
from neuroseg_jax.data.pipeline import (
    SplitDataset,
    build_dataset,
    load_image,
    loader_transforms,
    make_loader,
    split_sizes,
)
from neuroseg_jax.data.splits import read_split_file, split_indices
from neuroseg_jax.data.synthetic import SyntheticNeurons
from neuroseg_jax.data.weight_maps import touching_cells_weights

__all__ = [
    "FolderDataset",
    "ImageReadError",
    "PatchDataset",
    "SplitDataset",
    "SyntheticNeurons",
    "build_dataset",
    "default_augment_config",
    "default_data_config",
    "load_image",
    "loader_transforms",
    "make_loader",
    "normalize_intensity",
    "patch_starts",
    "read_image",
    "read_labels",
    "read_mask",
    "read_split_file",
    "split_indices",
    "split_sizes",
    "touching_cells_weights",
    "transforms",
]
