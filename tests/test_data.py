"""Tests of neuroseg_jax.data: readers, bad input, datasets, splits, transforms, patches, loaders."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import cv2
import grain
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from conftest import shared_dataset
from neuroseg_jax.data import (
    FolderDataset,
    PatchDataset,
    SyntheticNeurons,
    build_dataset,
    default_data_config,
    io,
    load_image,
    loader_transforms,
    make_loader,
    normalize_intensity,
    patch_starts,
    read_image,
    read_labels,
    read_mask,
    split_indices,
    transforms as T,
)
from neuroseg_jax.data.weight_maps import NEGLIGIBLE_WEIGHT, touching_cells_weights

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def _blob_mask(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    for _ in range(4):
        centre = (int(rng.integers(8, width - 8)), int(rng.integers(8, height - 8)))
        cv2.ellipse(
            mask, centre, (int(rng.integers(3, 8)), int(rng.integers(3, 8))), float(rng.uniform(0, 180)), 0, 360, 1, -1
        )
    return mask


def _write_pairs(root: Path, count: int = 3, *, image_ext: str = ".png", size: tuple[int, int] = (48, 64)) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        mask = _blob_mask(*size, seed=i)
        image = (mask * 180 + 30).astype(np.uint8)
        cv2.imwrite(str(root / "images" / f"img_{i}{image_ext}"), image)
        cv2.imwrite(str(root / "masks" / f"img_{i}.png"), mask * 255)
    return root


def _synthetic_config(num_images: int = 12, size: int = 48, crop: int = 32):
    config = default_data_config()
    config.synthetic.num_images = num_images
    config.synthetic.image_size = (size, size)
    config.crop_size = (crop, crop)
    return config


# ---------------------------------------------------------------- real data folders


@pytest.mark.parametrize("name", ["fnc", "bbbc039", "pfc_pn"])
def test_real_folder_loads(name):
    root = DATA_ROOT / name
    if not (root / "images").is_dir():
        pytest.skip(f"shared data folder {root} is absent")
    dataset = FolderDataset(root, layout="plain")
    assert len(dataset) > 0
    item = dataset[0]
    assert item["image"].dtype == np.float32 and item["image"].shape[-1] == 1
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["image"].max() > 0.5  # percentile scaling uses the range, whatever the bit depth
    assert item["mask"].dtype == np.int32 and set(np.unique(item["mask"])) <= {0, 1}
    assert item["mask"].shape == item["image"].shape[:2]
    assert item["mask"].mean() > 0
    assert dataset.name(0) == dataset.names[0]


# ---------------------------------------------------------------- readers


def test_formats_and_bit_depths(tmp_path):
    ramp = np.tile(np.arange(64, dtype=np.uint16), (32, 1))
    cv2.imwrite(str(tmp_path / "a8.png"), (ramp * 4).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "a16.png"), ramp * 64)  # 12-bit-like values in a 16-bit file
    tifffile.imwrite(tmp_path / "a.tif", ramp * 1000)
    stack = np.stack([ramp, ramp * 2, ramp * 3]).astype(np.uint16)  # a 3-page z-stack
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    cv2.imwrite(str(tmp_path / "a.jpg"), (ramp * 4).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 100])
    reference = read_image(tmp_path / "a8.png")
    for name in ("a16.png", "a.tif", "stack.tif"):
        np.testing.assert_allclose(read_image(tmp_path / name), reference, atol=0.02)
    assert np.abs(read_image(tmp_path / "a.jpg") - reference).mean() < 0.02
    np.testing.assert_allclose(read_image(tmp_path / "stack.tif", tiff_page=0), reference, atol=0.02)
    assert read_image(tmp_path / "a8.png", channels=3).shape == (32, 64, 3)


def test_normalization_is_bit_depth_invariant():
    rng = np.random.default_rng(0)
    image8 = rng.integers(0, 256, (40, 40)).astype(np.uint8)
    image12 = image8.astype(np.uint16) * 16
    np.testing.assert_allclose(normalize_intensity(image8), normalize_intensity(image12), atol=1e-6)
    assert normalize_intensity(np.full((8, 8), 7, np.uint8)).max() == 0.0  # flat image: no division by zero


def test_fnc_layout_and_channel_reduction(tmp_path):
    images, masks = tmp_path / "all_images" / "images", tmp_path / "all_masks" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    mask = _blob_mask()
    rgb = np.zeros(mask.shape + (3,), np.uint8)
    rgb[..., 0] = mask * 200 + 10  # red holds the signal, green a weaker copy, blue ~0
    rgb[..., 1] = mask * 120 + 10
    cv2.imwrite(str(images / "Mar01_LHr_200x_y.png"), rgb[..., ::-1])  # cv2 writes BGR
    cv2.imwrite(str(masks / "Mar01_LHr_200x_y.png"), mask * 255)
    dataset = FolderDataset(tmp_path, layout="fnc")
    item = dataset[0]
    assert dataset.channel_reduce == "max"
    assert ((item["image"][..., 0] > 0.5) == (item["mask"] > 0)).mean() > 0.99
    red = FolderDataset(tmp_path, layout="fnc", channel_reduce="blue")[0]["image"]
    assert red.max() == 0.0  # blue is empty: the reduction really picks one channel


def test_mask_encodings(tmp_path):
    base = _blob_mask()
    cv2.imwrite(str(tmp_path / "m01.png"), base)
    cv2.imwrite(str(tmp_path / "m255.png"), base * 255)
    labels = base.astype(np.uint16) * np.arange(1, base.shape[1] + 1, dtype=np.uint16)[None, :]
    cv2.imwrite(str(tmp_path / "labels.png"), labels)
    tifffile.imwrite(tmp_path / "labels.tif", labels.astype(np.int32))
    for name in ("m01.png", "m255.png", "labels.png", "labels.tif"):
        mask = read_mask(tmp_path / name)
        assert mask.dtype == np.int32
        np.testing.assert_array_equal(mask, base)
    assert read_labels(tmp_path / "labels.png").max() == labels.max()


def test_bad_mask_values_rejected(tmp_path):
    mask = _blob_mask().astype(np.uint8) * 255
    mask[0, :4] = 128  # a {0, 128, 255} mask: anti-aliased or a grey class
    cv2.imwrite(str(tmp_path / "grey.png"), mask)
    with pytest.raises(ValueError, match="grey.png"):
        read_mask(tmp_path / "grey.png")
    tifffile.imwrite(tmp_path / "soft.tif", np.full((8, 8), 0.5, np.float32))
    with pytest.raises(ValueError, match="soft.tif"):
        read_mask(tmp_path / "soft.tif")


# ---------------------------------------------------------------- bad folders


def test_corrupt_image_names_file(tmp_path):
    root = _write_pairs(tmp_path / "d")
    (root / "images" / "img_1.png").write_bytes(b"not a png at all")
    dataset = FolderDataset(root)
    with pytest.raises(ValueError, match="img_1.png"):
        dataset[1]


def test_wrong_size_mask_names_file(tmp_path):
    root = _write_pairs(tmp_path / "d")
    cv2.imwrite(str(root / "masks" / "img_2.png"), np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="img_2"):
        FolderDataset(root)[2]


def test_missing_mask_names_file(tmp_path):
    root = _write_pairs(tmp_path / "d")
    (root / "masks" / "img_0.png").unlink()
    with pytest.raises(ValueError, match="img_0"):
        FolderDataset(root)


def test_empty_folder_raises(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match="images"):
        FolderDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FolderDataset(tmp_path / "nowhere")


def test_skip_bad_files_warns_once(tmp_path):
    root = _write_pairs(tmp_path / "d", count=4)
    (root / "images" / "img_1.png").write_bytes(b"garbage")
    (root / "masks" / "img_3.png").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = FolderDataset(root, on_bad_file="skip")
    assert len(caught) == 1
    assert "img_1.png" in str(caught[0].message) and "img_3" in str(caught[0].message)
    assert dataset.names == ["img_0", "img_2"]


def test_folder_decoded_once_per_process(tmp_path, monkeypatch):
    root = _write_pairs(tmp_path / "d", count=6)
    config = default_data_config()
    config.source, config.root, config.on_bad_file = "folder", str(root), "skip"
    config.split.stratify = True
    decoded = []
    load_array = io.load_array
    monkeypatch.setattr(io, "load_array", lambda path, **kwargs: decoded.append(path) or load_array(path, **kwargs))
    build_dataset(config, "train")
    assert len(decoded) == 12  # validation decodes each image and mask once; stratifying reuses the masks
    build_dataset(config, "val")
    assert len(decoded) == 12  # nothing decoded again
    cv2.imwrite(str(root / "masks" / "img_4.png"), _blob_mask(seed=9) * 255)
    os.utime(root / "masks" / "img_4.png", ns=(1, 1))  # a new mtime whatever the clock resolution
    build_dataset(config, "test")
    assert sorted(Path(path).name for path in decoded[12:]) == ["img_4.png", "img_4.png"]  # the changed pair only


# ---------------------------------------------------------------- synthetic data and splits


def test_synthetic_deterministic_and_consistent():
    first, second = SyntheticNeurons(4, (64, 64), seed=3), SyntheticNeurons(4, (64, 64), seed=3)
    item = first[2]
    np.testing.assert_array_equal(item["image"], second[2]["image"])
    assert not np.array_equal(item["image"], SyntheticNeurons(4, (64, 64), seed=4)[2]["image"])
    np.testing.assert_array_equal(first.instances(2) > 0, item["mask"] > 0)
    assert item["image"].dtype == np.float32 and item["mask"].dtype == np.int32
    assert 0 < np.mean([first[i]["mask"].mean() for i in range(4)]) < 0.5
    assert first.instances(2).max() >= 1


def test_split_indices_disjoint_deterministic_stratified():
    parts = split_indices(40, val_fraction=0.2, test_fraction=0.1, seed=1)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(40))
    assert (len(parts["val"]), len(parts["test"])) == (8, 4)
    again = split_indices(40, val_fraction=0.2, test_fraction=0.1, seed=1)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    density = np.linspace(0, 1, 40)
    stratified = split_indices(40, val_fraction=0.25, test_fraction=0.0, seed=0, strata=density)
    assert np.ptp(density[stratified["val"]]) > 0.8  # val spans the whole density range
    with pytest.raises(ValueError, match="no training image"):
        split_indices(2, val_fraction=0.5, test_fraction=0.4, seed=0)


def test_split_file(tmp_path):
    root = _write_pairs(tmp_path / "d", count=4)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["img_0", "img_2"], "val": ["img_1"], "test": ["img_3"]}))
    config = default_data_config()
    config.source, config.root, config.split.file = "folder", str(root), str(tmp_path / "split.json")
    assert build_dataset(config, "train").names == ["img_0", "img_2"]
    (tmp_path / "split.csv").write_text("stem,split\nimg_3,train\nimg_0,val\nimg_9,test\n")
    config.split.file = str(tmp_path / "split.csv")
    with pytest.raises(ValueError, match="img_9"):
        build_dataset(config, "train")


# ---------------------------------------------------------------- transforms


def _aligned_element(size: tuple[int, int] = (48, 64)) -> dict:
    mask = _blob_mask(*size).astype(np.int32)
    return {"image": mask.astype(np.float32)[..., None], "mask": mask}


GEOMETRIC = [
    T.RandomFlip(1.0, 1.0),
    T.RandomRot90(1.0),
    T.RandomRotate(1.0, 45.0),
    T.RandomAffine(1.0),
    T.ElasticDeform(1.0, alpha=20.0, sigma=5.0),
    T.GridDistortion(1.0),
    T.RandomCrop((32, 40)),
]


@pytest.mark.parametrize("transform", GEOMETRIC, ids=lambda t: type(t).__name__)
def test_geometric_transforms_keep_alignment(transform):
    element = _aligned_element()
    out = transform.random_map(element, np.random.default_rng(0))
    assert set(np.unique(out["mask"])) <= {0, 1} and out["mask"].dtype == np.int32
    assert out["image"].shape[:2] == out["mask"].shape
    agreement = ((out["image"][..., 0] > 0.5) == (out["mask"] > 0)).mean()
    assert agreement > 0.98, agreement
    if not isinstance(transform, T.RandomCrop):
        assert not np.array_equal(out["mask"], element["mask"])  # probability 1: it did something


@pytest.mark.parametrize(
    "transform",
    [
        T.RandomRotate(0.0),
        T.ElasticDeform(0.0),
        T.GridDistortion(0.0),
        T.RandomAffine(0.0),
        T.RandomFlip(0.0, 0.0),
        T.BrightnessContrast(0.0),
        T.GaussianNoise(0.0),
        T.GaussianBlur(0.0),
    ],
    ids=lambda t: type(t).__name__,
)
def test_probability_zero_is_identity(transform):
    element = _aligned_element()
    element["image"] = element["image"] * 0.5 + 0.25
    for seed in range(5):
        out = transform.random_map(element, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["image"], element["image"])
        np.testing.assert_array_equal(out["mask"], element["mask"])


@pytest.mark.parametrize(
    "transform", [T.BrightnessContrast(1.0), T.GaussianNoise(1.0), T.GaussianBlur(1.0)], ids=lambda t: type(t).__name__
)
def test_photometric_changes_image_only(transform):
    element = _aligned_element()
    element["image"] = element["image"] * 0.5 + 0.25
    out = transform.random_map(element, np.random.default_rng(1))
    assert not np.array_equal(out["image"], element["image"])
    np.testing.assert_array_equal(out["mask"], element["mask"])
    assert out["image"].dtype == np.float32 and 0 <= out["image"].min() and out["image"].max() <= 1


def test_resize_and_clahe():
    element = _aligned_element((48, 64))
    small = T.Resize((24, 32)).map(element)
    assert small["image"].shape == (24, 32, 1) and set(np.unique(small["mask"])) <= {0, 1}
    dim = element["image"] * 0.2 + 0.1
    equalised = T.Clahe(3.0, (4, 4)).map({**element, "image": dim})["image"]
    assert equalised.dtype == np.float32 and equalised.shape == dim.shape
    assert np.ptp(equalised) > np.ptp(dim)  # local contrast enhanced
    assert 0 <= equalised.min() and equalised.max() <= 1


def test_augment_switch_off():
    config = _synthetic_config()
    config.augment.enabled = False
    names = [type(t).__name__ for t in loader_transforms(config, "train")]
    assert names == ["RandomCrop", "ToBatchable"]
    assert [type(t).__name__ for t in loader_transforms(config, "val")] == ["CenterCrop", "ToBatchable"]


# ---------------------------------------------------------------- patches


def test_patch_starts_cover_and_align():
    starts = patch_starts(1000, 224, 0.35)
    assert starts[0] == 0 and starts[-1] == 1000 - 224  # last patch aligned to the edge
    assert all(b - a <= 224 for a, b in zip(starts, starts[1:]))  # no gaps
    assert np.diff(starts)[:-1].tolist() == [146] * (len(starts) - 2)  # stride = 224 * 0.65
    assert patch_starts(224, 224, 0.35) == [0] and patch_starts(100, 224, 0.35) == []


def test_patch_dataset_counts_and_pruning():
    base = SyntheticNeurons(2, (64, 80), seed=0, cells=(1, 1), dense_fraction=0.0)
    full = PatchDataset(base, output_size=(16, 16), sizes=(16, 32), overlap=0.35, include_full=True)
    expected = 0
    for size in (16, 32):
        expected += len(patch_starts(64, size, 0.35)) * len(patch_starts(80, size, 0.35))
    assert len(full) == 2 * (expected + 1)
    item = full[len(full) - 1]  # the full image, resized
    assert item["image"].shape == (16, 16, 1) and item["mask"].shape == (16, 16)
    pruned = PatchDataset(base, output_size=(16, 16), sizes=(16, 32), overlap=0.35, prune_empty=True)
    assert 0 < len(pruned) < len(full)
    for index, (item_index, top, left, height, width) in enumerate(pruned.records):
        assert base[int(item_index)]["mask"][top : top + height, left : left + width].any()
    assert "_y" in pruned.name(0)


# ---------------------------------------------------------------- loaders


def _take(loader, count: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_loader_shapes_and_determinism():
    config = _synthetic_config()
    first = _take(make_loader(config, "train", batch_size=2, seed=5), 3)
    second = _take(make_loader(config, "train", batch_size=2, seed=5), 3)
    other = _take(make_loader(config, "train", batch_size=2, seed=6), 3)
    assert first[0]["image"].shape == (2, 32, 32, 1) and first[0]["image"].dtype == np.float32
    assert first[0]["mask"].shape == (2, 32, 32) and first[0]["mask"].dtype == np.int32
    assert set(first[0]) == {"image", "mask"}
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_eval_loader_one_pass_center_crop():
    config = _synthetic_config(num_images=20)
    dataset = build_dataset(config, "val")
    batches = list(make_loader(config, "val", batch_size=2, seed=0))
    assert sum(b["image"].shape[0] for b in batches) == len(dataset) == 3
    expected = T.CenterCrop((32, 32)).map(dataset[0])
    np.testing.assert_array_equal(batches[0]["image"][0], expected["image"])


@pytest.mark.slow
def test_batches_do_not_depend_on_worker_count():
    config = _synthetic_config(num_images=12, size=32, crop=24)  # augmented and randomly cropped
    config.split.val_fraction, config.split.test_fraction = 0.0, 0.0
    runs = {}
    for workers in (0, 2):
        config.worker_count = workers
        iterator = iter(make_loader(config, "train", batch_size=4, seed=1))
        runs[workers] = [next(iterator) for _ in range(7)]  # 3 batches per epoch: crosses two epoch ends
        iterator.close()
    for a, b in zip(runs[0], runs[2]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


def _record_index(dataset) -> dict[bytes, int]:
    """Un-augmented, uncropped image bytes -> index of the record in `dataset` (synthetic images all differ)."""
    return {dataset[i]["image"].tobytes(): i for i in range(len(dataset))}


def test_epochs_reshuffle_and_cover_every_record():
    config = _synthetic_config(num_images=12)
    config.augment.enabled = False
    config.crop_size = None
    config.split.val_fraction, config.split.test_fraction = 0.0, 0.0
    index_of = _record_index(build_dataset(config, "train"))
    order = [
        index_of[image.tobytes()]
        for batch in make_loader(config, "train", batch_size=4, seed=3, num_epochs=2)
        for image in batch["image"]
    ]
    epochs = order[:12], order[12:]
    assert len(order) == 24
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]


def test_process_shards_are_disjoint():
    config = _synthetic_config(num_images=20)
    config.augment.enabled = False
    config.crop_size = None

    def fingerprints(loader):
        return {float(x.sum()) for batch in loader for x in np.array(batch["image"])}

    shards = [
        fingerprints(make_loader(config, "train", batch_size=1, seed=0, process_index=i, process_count=2, num_epochs=1))
        for i in range(2)
    ]
    whole = fingerprints(make_loader(config, "train", batch_size=1, seed=0, num_epochs=1))
    assert shards[0].isdisjoint(shards[1])
    assert len(shards[0]) == len(shards[1])
    assert shards[0] | shards[1] == whole


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_loader_state_restore_resumes(tmp_path, workers):
    config = _synthetic_config()
    config.worker_count = workers
    iterator = iter(make_loader(config, "train", batch_size=2, seed=2))
    for _ in range(3):
        next(iterator)
    # Through the handler the training checkpoints use (the state goes through JSON).
    grain.checkpoint.CheckpointHandler().save(tmp_path, args=grain.checkpoint.CheckpointSave(iterator))
    expected = [next(iterator) for _ in range(2)]
    iterator.close()
    resumed = iter(make_loader(config, "train", batch_size=2, seed=2))
    grain.checkpoint.CheckpointHandler().restore(tmp_path, args=grain.checkpoint.CheckpointRestore(resumed))
    for a, b in zip(expected, [next(resumed) for _ in range(2)]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    resumed.close()


def test_folder_loader_with_resize(tmp_path):
    root = _write_pairs(tmp_path / "d", count=6)
    config = default_data_config()
    config.source, config.root = "folder", str(root)
    config.image_size, config.crop_size = (24, 32), (16, 16)
    config.split.stratify = True
    batch = next(iter(make_loader(config, "train", batch_size=2, seed=0)))
    assert batch["image"].shape == (2, 16, 16, 1) and set(np.unique(batch["mask"])) <= {0, 1}
    config.root = ""
    with pytest.raises(ValueError, match="data.root"):
        build_dataset(config, "train")


def test_cached_items_survive_augmentation(tmp_path):
    root = _write_pairs(tmp_path / "d", count=4)
    config = default_data_config()
    config.source, config.root, config.cache_size = "folder", str(root), 8
    config.crop_size = (32, 32)
    config.split.val_fraction, config.split.test_fraction = 0.0, 0.0
    for name in ("rotate", "affine", "elastic", "grid_distortion", "brightness_contrast", "gaussian_noise"):
        config.augment[name].p = 1.0
    dataset = build_dataset(config, "train")
    assert dataset[0] is dataset[0]  # served from the cache
    before = {key: value.copy() for key, value in dataset[0].items()}
    rng = np.random.default_rng(0)
    for _ in range(3):
        element = dataset[0]
        for transform in loader_transforms(config, "train"):
            element = transform.random_map(element, rng) if hasattr(transform, "random_map") else transform.map(element)
        assert element["image"].shape == (32, 32, 1)
    np.testing.assert_array_equal(dataset[0]["image"], before["image"])
    np.testing.assert_array_equal(dataset[0]["mask"], before["mask"])


def test_mixed_sizes_batch_error(tmp_path):
    root = _write_pairs(tmp_path / "d", count=4)
    cv2.imwrite(str(root / "images" / "img_3.png"), np.full((20, 30), 99, np.uint8))
    cv2.imwrite(str(root / "masks" / "img_3.png"), np.pad(np.ones((10, 10), np.uint8), ((5, 5), (10, 10))))
    config = default_data_config()
    config.source, config.root = "folder", str(root)
    config.split.val_fraction, config.split.test_fraction = 0.0, 0.0
    with pytest.raises(ValueError, match="crop_size"):
        list(make_loader(config, "train", batch_size=4, seed=0, num_epochs=1))


def test_patch_loader_from_config():
    config = _synthetic_config(num_images=6, size=64, crop=16)
    config.patches.enabled = True
    config.patches.sizes = (32,)
    config.patches.prune_empty = True
    dataset = build_dataset(config, "train")
    assert all(dataset[i]["mask"].any() for i in range(len(dataset)))
    batch = next(iter(make_loader(config, "val", batch_size=2, seed=0)))
    assert batch["image"].shape[1:] == (16, 16, 1)


def test_load_image_matches_dataset_preprocessing(tmp_path):
    root = _write_pairs(tmp_path / "d", count=3)
    config = default_data_config()
    config.source, config.root, config.image_size = "folder", str(root), (24, 32)
    config.clahe.enabled = True
    dataset = build_dataset(config, "all")
    index = dataset.names.index("img_1")
    np.testing.assert_array_equal(load_image(root / "images" / "img_1.png", config), dataset[index]["image"])


# ---------------------------------------------------------------- touching-cells weight maps

GAP = (24, 30)  # the one background pixel between the two disks of _touching_disks, on row 24


def _touching_disks(height: int = 48, width: int = 64, shift: int = 0) -> np.ndarray:
    """int32 labels: disks 7 and 300 (radius 9) one background pixel apart at GAP, plus cell 12."""
    yy, xx = np.mgrid[:height, :width]
    labels = np.zeros((height, width), np.int32)
    labels[(yy - 24) ** 2 + (xx - 20 - shift) ** 2 <= 81] = 7
    labels[(yy - 24) ** 2 + (xx - 40 - shift) ** 2 <= 81] = 300
    labels[40:45, 52:60] = 12
    return labels


def _reference_touching(labels: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """U-Net's w0 exp(-(d1 + d2)^2 / (2 sigma^2)) from full-image distance transforms, one per cell."""
    distances = np.sort([ndimage.distance_transform_edt(labels != cell) for cell in np.unique(labels) if cell], 0)
    return np.where(labels == 0, w0 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * sigma**2)), 0.0)


@pytest.mark.parametrize("w0, sigma", [(10.0, 5.0), (3.0, 2.0)])
def test_weight_map_touching_disks_match_scipy(w0, sigma):
    labels = _touching_disks()
    weights = touching_cells_weights(labels, w0=w0, sigma=sigma)
    assert weights.dtype == np.float32 and weights.shape == labels.shape
    np.testing.assert_allclose(weights, _reference_touching(labels, w0, sigma), atol=NEGLIGIBLE_WEIGHT)
    # The gap pixel is 1 px from both disks: w0 exp(-2^2 / (2 sigma^2)), the largest weight of the map.
    assert weights[GAP] == pytest.approx(w0 * np.exp(-4.0 / (2 * sigma**2)), rel=1e-6)
    assert weights[GAP] == weights.max() and (weights[labels > 0] == 0).all()
    # A binary mask is one cell: no second-nearest cell, no weight, so the loss keeps its contour weights.
    assert not touching_cells_weights((labels > 0).astype(np.int32), w0=w0, sigma=sigma).any()
    with pytest.raises(ValueError, match="sigma"):
        touching_cells_weights(labels, w0=w0, sigma=0.0)


@pytest.mark.parametrize("transform", GEOMETRIC + [T.Resize((30, 41))], ids=lambda t: type(t).__name__)
def test_weight_map_instances_move_with_the_mask(transform):
    labels = _touching_disks()
    element = {"image": (labels > 0).astype(np.float32)[..., None], "mask": (labels > 0).astype(np.int32),
               "instances": labels}
    out = transform.random_map(element, np.random.default_rng(0)) if hasattr(transform, "random_map") \
        else transform.map(element)
    assert out["instances"].dtype == np.int32 and out["instances"].shape == out["mask"].shape
    np.testing.assert_array_equal(out["instances"] > 0, out["mask"] > 0)  # same nearest-neighbour map
    assert set(np.unique(out["instances"])) <= {0, 7, 12, 300}
    assert {7, 300} <= set(np.unique(out["instances"]))


def _write_instance_pairs(root: Path, count: int = 4) -> Path:
    """Folder of uint16 instance-label masks: two touching disks (and a small cell) per image."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        labels = _touching_disks(shift=i % 2)
        cv2.imwrite(str(root / "images" / f"img_{i}.png"), ((labels > 0) * 180 + 30).astype(np.uint8))
        cv2.imwrite(str(root / "masks" / f"img_{i}.png"), labels.astype(np.uint16))
    return root


def _check_touching_batch(batch: dict) -> None:
    """Weights only on background; a weight above w0 / 2 = 5 (sigma 5) needs d1 + d2 < 5 sqrt(2 ln 2),
    so d1 < 3: such pixels lie within 3 px of the cells of the batch's own mask."""
    weights, masks = batch["touching_weight"], batch["mask"]
    assert weights.dtype == np.float32 and weights.shape == masks.shape
    for weight, mask in zip(weights, masks):
        assert (weight[mask > 0] == 0).all()
        assert weight.max() > 5.0
        near_cells = ndimage.distance_transform_edt(mask == 0) < 3
        assert near_cells[weight > 5.0].all()


def test_weight_map_pipeline_instance_and_binary_folders(tmp_path):
    config = default_data_config()
    config.source, config.root = "folder", str(_write_instance_pairs(tmp_path / "instances"))
    config.crop_size = (40, 56)
    config.split.val_fraction, config.split.test_fraction = 0.5, 0.0
    config.augment.rot90, config.augment.rotate.p, config.augment.affine.p = 1.0, 1.0, 1.0
    train = list(make_loader(config, "train", batch_size=2, seed=0, num_epochs=2, touching_weights=True))
    assert len(train) == 2 and set(train[0]) == {"image", "mask", "touching_weight"}
    for batch in train:
        _check_touching_batch(batch)
    # No augmentation: the centre crop starts at (4, 4), so the gap pixel lands at GAP - 4.
    val = next(iter(make_loader(config, "val", batch_size=2, seed=0, touching_weights=True)))
    _check_touching_batch(val)
    gap_weights = val["touching_weight"][:, GAP[0] - 4, GAP[1] - 4 : GAP[1] - 2]
    assert max(gap_weights[0].max(), gap_weights[1].max()) == pytest.approx(10 * np.exp(-4 / 50), rel=1e-6)
    # Multi-scale patches carry the instance labels too.
    config.patches.enabled, config.patches.sizes, config.crop_size = True, (32,), (32, 32)
    patches = list(make_loader(config, "val", batch_size=2, seed=0, touching_weights=True))
    for batch in patches:
        assert batch["touching_weight"].shape == (len(batch["mask"]), 32, 32)
        assert (batch["touching_weight"][batch["mask"] > 0] == 0).all()
    assert max(batch["touching_weight"].max() for batch in patches) > 5.0
    with pytest.raises(ValueError, match="with_instances"):
        make_loader(config, "train", batch_size=1, seed=0, dataset=build_dataset(config, "train"),
                    touching_weights=True)
    # Binary masks: zero touching weights, so the boundary term keeps exactly its contour weights.
    config.patches.enabled = False
    config.root = str(_write_pairs(tmp_path / "binary", count=4))
    batch = next(iter(make_loader(config, "train", batch_size=2, seed=0, touching_weights=True)))
    assert not batch["touching_weight"].any() and batch["mask"].any()
    assert "touching_weight" not in next(iter(make_loader(config, "train", batch_size=2, seed=0)))


def test_weight_map_bbbc039_gaps_between_nuclei():
    root = shared_dataset("bbbc039")
    labels = FolderDataset(root, with_instances=True)[0]["instances"]
    assert len(np.unique(labels)) > 3  # instance labels, not a binary mask
    window = labels[:160, :200]
    np.testing.assert_allclose(touching_cells_weights(window, w0=10.0, sigma=5.0),
                               _reference_touching(window, 10.0, 5.0), atol=NEGLIGIBLE_WEIGHT)
    config = default_data_config()
    config.source, config.root, config.crop_size = "folder", str(root), (256, 256)
    loader = iter(make_loader(config, "train", batch_size=4, seed=0, touching_weights=True))
    batches = [next(loader) for _ in range(2)]
    for batch in batches:
        weights, masks = batch["touching_weight"], batch["mask"]
        assert (weights[masks > 0] == 0).all()
    # Nuclei that nearly touch leave background pixels within a few pixels of two of them.
    assert max(float(batch["touching_weight"].max()) for batch in batches) > 5.0
