"""Every data key with its default value.

`default_data_config()` is the single place where data options are declared, so a typo in
`--config.data.KEY=...` fails (ConfigDict rejects unknown keys) before any work starts.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Standard augmentation strengths. The IMSAHLO paper (Sec. "Data Augmentation") lists flips,
# rotations up to +-45 degrees, random crops, elastic and grid distortions, brightness/contrast
# up to +-30 %, Gaussian noise and blur, and CLAHE (clip limit 3.0, 8x8 tiles) applied before
# and after the photometric augmentation. Probabilities are not given in the paper; the values
# below are ordinary choices.


def default_augment_config() -> ml_collections.ConfigDict:
    """Per-transform probability and strength; `enabled=False` turns every one off."""
    return ml_collections.ConfigDict(
        dict(
            enabled=True,
            hflip=0.5,  # probability
            vflip=0.5,  # probability
            rot90=0.0,  # probability of a random multiple of 90 degrees
            rotate=dict(p=0.3, max_degrees=45.0),
            affine=dict(p=0.0, scale=(0.9, 1.1), shear_degrees=10.0, translate=0.05),
            elastic=dict(p=0.0, alpha=30.0, sigma=6.0),  # alpha, sigma in pixels
            grid_distortion=dict(p=0.0, num_steps=5, limit=0.3),
            brightness_contrast=dict(p=0.5, brightness=0.3, contrast=0.3),
            gaussian_noise=dict(p=0.2, sigma=(0.01, 0.05)),  # std range, image units
            gaussian_blur=dict(p=0.1, sigma=(0.5, 1.5)),  # std range, pixels
        )
    )


INSTANCE_MODES = ("none", "three_class")


def default_instances_config() -> ml_collections.ConfigDict:
    """``config.instances``: how objects are separated (see neuroseg_jax.data.instance_targets).

    Keys:
      mode: 'none' (objects are the connected components of the binary mask) | 'three_class'
        (the masks must be instance labels; the model, with model.num_classes=3, learns background /
        interior / boundary targets and objects are decoded by seeded watershed).
      boundary_width: pixels of the boundary band of the three-class targets.
      touching_weight: extra cross-entropy weight of the boundary pixels that lie against another
        object (instance_targets.touching_band_weights; U-Net's w0 for touching cells); 0 = none.
        Three-class mode only; the batches' touching weights are then these, not data.touching_cells'.
      seed_threshold, foreground_threshold, min_seed_size, min_size: the watershed decode
        (inference.watershed.instances_from_three_class); min_size 15 as the binary post-processing.
      declump, declump_h, declump_sigma: mode 'none' only: split the binary mask's touching
        convex objects (nuclei) along its necks (inference.watershed.declump, h and sigma in
        pixels) instead of taking its connected components; a decoding choice, training is the same.
    """
    return ml_collections.ConfigDict(dict(mode="none", boundary_width=1, touching_weight=0.0, seed_threshold=0.5,
                                          foreground_threshold=0.5, min_seed_size=1, min_size=15,
                                          declump=False, declump_h=0.75, declump_sigma=1.0))


def instance_mode(instances: ml_collections.ConfigDict | None) -> str:
    """The checked ``config.instances.mode``; 'none' for configs without the block (older runs)."""
    mode = "none" if instances is None else instances.get("mode", "none")
    if mode not in INSTANCE_MODES:
        raise ValueError(f"config.instances.mode={mode!r}: expected one of {INSTANCE_MODES}")
    return mode


def default_data_config() -> ml_collections.ConfigDict:
    """Return the data ConfigDict with every key the data layer reads.

    Optional sizes are typed placeholders (None by default) so that command-line overrides such
    as --config.data.crop_size='(256, 256)' work.

    Keys:
      source: 'synthetic' | 'folder'.
      root: folder with images/ and masks/ ('' = none; required for source='folder').
      layout: 'plain' (images/<stem>, masks/<stem>) | 'fnc' (FNC release: `_y`-suffixed names,
        `all_images/images` / `all_masks/masks` accepted, red+green signal).
      mask_suffix: suffix removed from mask stems before pairing (e.g. '_mask').
      image_size: (h, w) resize of every image (INTER_AREA, masks nearest) or None.
      crop_size: (h, w) random crop for train, center crop for val/test, or None.
      channels: 1 | 3 output channels.
      channel_reduce: how an RGB image becomes 1 channel: 'auto' ('max' for fnc, 'mean'
        otherwise) | 'max' | 'mean' | 'luminance' | 'red' | 'green' | 'blue'.
      normalize: 'percentile' | 'minmax' | 'dtype' | 'none' (see io.normalize_intensity).
      percentiles: (low, high) for 'percentile'.
      tiff_page: int page index or 'max' (max projection over z/t pages of a multi-page TIFF).
      clahe: CLAHE preprocessing (all splits) and re-application after augmentation (train).
      augment: see default_augment_config().
      touching_cells: w0 and sigma (pixels) of the U-Net weights w0 exp(-(d1 + d2)^2 / (2 sigma^2))
        on the background between touching cells (d1, d2: distances to the nearest and the
        second-nearest cell), computed from instance-label masks when the loss has a boundary term
        and added to its contour weights (see weight_maps.touching_cells_weights).
      patches: MorphoSeg multi-scale overlapping patches (sizes, overlap, pruning).
      split: seeded split by image (val_fraction, test_fraction, seed, stratify, file).
      synthetic: options of SyntheticNeurons.
      cache_size: number of decoded images kept per process (0 = no cache).
      worker_count: grain worker processes (0 = in the main process).
      read_threads: grain read threads per worker, each preparing whole batches; prefetch:
        read-ahead per worker in records (rounded up to whole batches, 0 = none).
      on_bad_file: 'error' | 'skip' (skip with one warning listing all skipped files).
    """
    return ml_collections.ConfigDict(
        dict(
            source="synthetic",
            root="",
            layout="plain",
            mask_suffix="",
            image_size=config_dict.placeholder(tuple),
            crop_size=config_dict.placeholder(tuple),
            channels=1,
            channel_reduce="auto",
            normalize="percentile",
            percentiles=(0.5, 99.8),
            tiff_page="max",
            pixel_size=0.0,  # physical pixel size of files without calibration metadata (0 = unknown)
            pixel_unit="um",  # unit of pixel_size: 'um' (also 'µm', 'micron'), 'nm' or 'mm'
            clahe=dict(enabled=False, clip_limit=3.0, tile_grid=(8, 8), after_augment=True, bit_depth=8),
            augment=default_augment_config(),
            # U-Net's values (Ronneberger et al. 2015): w0 = 10, sigma ~ 5 px.
            touching_cells=dict(w0=10.0, sigma=5.0),
            patches=dict(
                enabled=False,
                sizes=(224, 448, 1000, 1500, 2000),
                overlap=0.35,
                include_full=True,
                prune_empty=False,
                output_size=config_dict.placeholder(tuple),  # (h, w); None = crop_size
            ),
            split=dict(val_fraction=0.15, test_fraction=0.15, seed=0, stratify=False, file=""),
            synthetic=dict(
                num_images=200,
                image_size=(256, 256),
                seed=0,
                cells=(4, 14),  # min, max cells per image (sparse images)
                dense_fraction=0.3,  # share of images with a dense touching cluster
                faint_fraction=0.25,  # share of cells that are faint (low SNR)
                soma_major_axis=config_dict.placeholder(float),  # pixels; None = FNC mean (50 px at 1600x1200) scaled
                soma_size_cv=0.3,  # coefficient of variation of the soma size
                neurites=(1, 4),  # min, max primary neurites per cell
                neurite_in_mask=True,
                photons=60.0,  # expected photon count of a bright soma (Poisson part)
                read_noise=2.0,  # Gaussian read noise, photon units
                background=6.0,  # mean background, photon units
                vignetting=0.4,  # relative fall-off of the illumination at the corners
            ),
            cache_size=0,
            worker_count=0,
            read_threads=2,
            prefetch=16,
            on_bad_file="error",
        )
    )
