"""Instance mode's pure pieces: three-class targets and their watershed decode."""

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from neuroseg_jax.data.instance_targets import (
    BACKGROUND, BOUNDARY, INTERIOR, check_instance_labels, three_class_targets, touching_band_weights)
from neuroseg_jax.inference.watershed import declump, instances_from_three_class
from neuroseg_jax.metrics.instances import connected_components, instance_iou, instance_metrics
from conftest import shared_dataset

CROSS = ndimage.generate_binary_structure(2, 1)


def disc(radius):
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius


def reference_targets(labels, width):
    """Per object: interior = binary erosion by the radius-`width` disc, the image edge counting as
    inside (border_value=1); the rest of the object is boundary."""
    targets = np.zeros(labels.shape, np.int32)
    for label in np.unique(labels[labels > 0]):
        obj = labels == label
        interior = ndimage.binary_erosion(obj, structure=disc(width), border_value=1)
        targets[obj] = BOUNDARY
        targets[interior] = INTERIOR
    return targets


def touching_discs(shape, centres, radius):
    """Label image of discs around `centres`; where discs overlap the nearest centre wins, so
    neighbours touch along a straight cut."""
    rows, cols = np.indices(shape)
    distances = np.stack([np.hypot(rows - r, cols - c) for r, c in centres])
    labels = np.argmin(distances, axis=0).astype(np.int32) + 1
    labels[distances.min(axis=0) > radius] = 0
    return labels


def onehot(targets):
    return np.eye(3, dtype=np.float32)[targets]


def matched_ious(pred, true):
    """IoU of each true object with its partner in the best one-to-one matching (0 if none)."""
    iou = instance_iou(pred, true)  # (n_true, n_pred)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    best = np.zeros(iou.shape[0])
    best[rows] = iou[rows, cols]
    return best


def test_two_touching_discs_by_hand():
    # Disc 1 around column 6, disc 2 around column 13, radius 4: they overlap in columns 9..10 and
    # the cut between them falls between columns 9 and 10 (equidistant column 9.5).
    labels = touching_discs((11, 20), [(5, 6), (5, 13)], radius=4)
    assert labels[5, 9] == 1 and labels[5, 10] == 2  # the contact on the centre row
    targets = three_class_targets(labels, boundary_width=1)
    np.testing.assert_array_equal(targets == BACKGROUND, labels == 0)
    # The contact line is boundary on both sides, the discs' centres are interior.
    contact_rows = [r for r in range(11) if labels[r, 9] == 1 and labels[r, 10] == 2]
    assert len(contact_rows) >= 5
    for r in contact_rows:
        assert targets[r, 9] == BOUNDARY and targets[r, 10] == BOUNDARY
    assert targets[5, 8] == INTERIOR and targets[5, 11] == INTERIOR
    assert targets[5, 6] == INTERIOR and targets[5, 13] == INTERIOR
    # Outer rim: the topmost pixel of each disc touches the background.
    assert targets[1, 6] == BOUNDARY and targets[1, 13] == BOUNDARY
    # The foreground is one component, the interiors are two, one per disc.
    assert connected_components(labels > 0).max() == 1
    interiors = connected_components(targets == INTERIOR)
    assert interiors.max() == 2
    assert set(np.unique(labels[interiors > 0])) == {1, 2}
    for width in (1, 2):
        np.testing.assert_array_equal(three_class_targets(labels, boundary_width=width),
                                      reference_targets(labels, width))


@pytest.mark.parametrize("width", [1, 2, 3])
def test_targets_match_per_object_erosion_on_random_labels(width):
    rng = np.random.default_rng(width)
    centres = rng.uniform(0, 48, size=(15, 2))
    labels = touching_discs((48, 56), centres, radius=9)  # touching, cut by the image edge
    np.testing.assert_array_equal(three_class_targets(labels, boundary_width=width),
                                  reference_targets(labels, width))
    # Ids are arbitrary: gaps and ids beyond uint16 give the same targets.
    remapped = np.where(labels > 0, labels * 70001 + 5, 0).astype(np.int64)
    np.testing.assert_array_equal(three_class_targets(remapped, boundary_width=width),
                                  reference_targets(labels, width))


def reference_touching_band(labels, width):
    """Object pixels with another object's id at distance <= width, found pixel by pixel."""
    band = np.zeros(labels.shape, bool)
    height, width_px = labels.shape
    for row, col in zip(*np.nonzero(labels)):
        for dr in range(-width, width + 1):
            for dc in range(-width, width + 1):
                r, c = row + dr, col + dc
                if dr * dr + dc * dc <= width * width and 0 <= r < height and 0 <= c < width_px \
                        and labels[r, c] not in (0, labels[row, col]):
                    band[row, col] = True
    return band


@pytest.mark.parametrize("width", [1, 2])
def test_touching_band_matches_a_pixel_by_pixel_search(width):
    rng = np.random.default_rng(width)
    labels = touching_discs((48, 40), rng.uniform(0, 48, size=(9, 2)), radius=6)
    labels[labels == 3] = 0  # a gap: its former neighbours touch only the background there
    labels = np.where(labels > 0, labels * 9001 + 70000, 0)  # gaps in the ids and ids above 65535
    band = reference_touching_band(labels, width)
    assert 0 < band.sum() < (three_class_targets(labels, boundary_width=width) == BOUNDARY).sum()
    weights = touching_band_weights(labels, boundary_width=width, weight=10.0)
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(weights, np.where(band, 10.0, 0.0))
    # Two objects apart by more than the width, or one object on the image edge: no band.
    apart = np.zeros((12, 20), np.int32)
    apart[:, :8], apart[:, 8 + width + 1:] = 1, 2
    assert not touching_band_weights(apart, boundary_width=width, weight=10.0).any()
    with pytest.raises(ValueError, match="touching weight"):
        touching_band_weights(apart, weight=-1.0)


def test_image_edge_is_not_boundary():
    labels = np.zeros((6, 6), np.uint8)
    labels[:, :3] = 7  # an object filling the left half, cut by three image edges
    targets = three_class_targets(labels)
    np.testing.assert_array_equal(targets[:, :2], INTERIOR)
    np.testing.assert_array_equal(targets[:, 2], BOUNDARY)
    np.testing.assert_array_equal(targets[:, 3:], BACKGROUND)


def test_round_trip_of_twenty_touching_discs():
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(5), indexing="ij"), -1).reshape(-1, 2)
    centres = 14 + grid * 22 + rng.uniform(-3, 3, size=grid.shape)
    labels = touching_discs((100, 122), centres, radius=13)
    assert labels.max() == 20
    # The test is about touching objects: their binary mask merges them.
    assert connected_components(labels > 0).max() < 10
    for width in (1, 2):
        decoded = instances_from_three_class(onehot(three_class_targets(labels, boundary_width=width)))
        assert decoded.max() == 20
        assert decoded.dtype == np.int32 and set(np.unique(decoded)) == set(range(21))
        assert matched_ious(decoded, labels).min() > 0.9
        np.testing.assert_array_equal(decoded > 0, labels > 0)  # boundary pixels re-assigned


def test_decode_of_blurred_probabilities():
    rng = np.random.default_rng(1)
    grid = np.stack(np.meshgrid(np.arange(3), np.arange(3), indexing="ij"), -1).reshape(-1, 2)
    centres = 14 + grid * 22 + rng.uniform(-2, 2, size=grid.shape)
    labels = touching_discs((64, 64), centres, radius=13)
    soft = ndimage.gaussian_filter(onehot(three_class_targets(labels, boundary_width=2)),
                                   sigma=(1.0, 1.0, 0))
    decoded = instances_from_three_class(soft / soft.sum(-1, keepdims=True))
    assert decoded.max() == labels.max()
    assert matched_ious(decoded, labels).min() > 0.85


def test_seedless_objects_kept_and_small_objects_removed():
    labels = np.zeros((20, 20), np.int32)
    labels[2:4, 2:4] = 1      # 2x2: all boundary, no seed
    labels[8:18, 8:18] = 2    # 10x10 with an interior
    probabilities = onehot(three_class_targets(labels))
    decoded = instances_from_three_class(probabilities)
    assert decoded.max() == 2
    assert matched_ious(decoded, labels).min() == 1.0
    big_only = instances_from_three_class(probabilities, min_size=5)
    np.testing.assert_array_equal(big_only, (labels == 2).astype(np.int32))  # renumbered to 1
    assert instances_from_three_class(np.eye(3, dtype=np.float32)[np.zeros((5, 5), int)]).max() == 0


def test_declump_splits_touching_discs_along_the_neck():
    centres = [(12, 12), (12, 24), (32, 14), (34, 26)]  # two touching pairs: overlapping discs
    labels = touching_discs((48, 56), centres, radius=7)
    labels[5:8, 44:54] = 5  # a bar 3 px thick: no h-maximum, kept whole
    labels[40:47, 2:9] = 6  # a square alone
    mask = labels > 0
    assert connected_components(mask).max() == 4
    split = declump(mask)
    assert split.dtype == np.int32 and split.max() == 6 and set(np.unique(split)) == set(range(7))
    np.testing.assert_array_equal(split > 0, mask)
    assert matched_ious(split, labels).min() > 0.85
    # Same objects whatever the ids and with a blank margin; an empty mask has none.
    padded = np.pad(mask, 5)
    assert declump(padded).max() == 6
    assert declump(np.zeros((8, 8), bool)).max() == 0
    # A larger h needs deeper necks: the touching pairs stay merged.
    assert declump(mask, h=5.0).max() == 4
    with pytest.raises(ValueError, match="h=0"):
        declump(mask, h=0)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        declump(np.zeros((2, 4, 4), bool))


def test_real_bbbc039_ceiling():
    """Decoding the exact targets of real masks: the representation's ceiling (the numbers over all
    148 masks: mean |count error| 0.05, AP@0.5:0.95 0.998 at width 1)."""
    from neuroseg_jax.data.io import read_labels

    root = shared_dataset("bbbc039")
    files = sorted((root / "masks").glob("*.png"))
    files = files[:: max(1, len(files) // 10)][:10]
    merged_somewhere = False
    for path in files:
        labels = read_labels(path)
        check_instance_labels(labels, str(path))
        decoded = instances_from_three_class(onehot(three_class_targets(labels, name=str(path))))
        metrics = instance_metrics(decoded, labels)
        assert metrics["abs_count_error"] <= 2, path
        assert metrics["ap@0.50"] >= 0.95, (path, metrics["ap@0.50"])
        n_true = len(np.unique(labels[labels > 0]))
        merged_somewhere |= connected_components(labels > 0).max() < n_true
    assert merged_somewhere  # some of these masks have touching nuclei


def test_bad_inputs_named():
    binary = np.zeros((12, 12), np.uint8)
    binary[1:4, 1:4] = 255
    binary[6:10, 6:10] = 255
    with pytest.raises(ValueError, match=r"instance labels.*masks/a\.png holds a binary mask"):
        check_instance_labels(binary, "masks/a.png")
    with pytest.raises(ValueError, match="binary mask"):
        check_instance_labels((binary > 0).astype(np.int32), "b")
    # No object, or one id on one object: the same targets either way, accepted.
    check_instance_labels(np.zeros((4, 4), np.uint16), "empty")
    check_instance_labels(np.pad(np.ones((2, 2), np.uint8), 1), "single")
    with pytest.raises(ValueError, match="f.png.*integers.*float"):
        three_class_targets(np.zeros((4, 4), np.float32), name="f.png")
    with pytest.raises(ValueError, match="integers.*bool"):
        check_instance_labels(np.zeros((4, 4), bool), "bool mask")
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        three_class_targets(np.zeros((2, 4, 4), np.int32))
    with pytest.raises(ValueError, match=">= 0"):
        three_class_targets(-np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match="boundary_width"):
        three_class_targets(np.zeros((4, 4), np.int32), boundary_width=0)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        instances_from_three_class(np.zeros((4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="seed_threshold"):
        instances_from_three_class(np.zeros((4, 4, 3), np.float32), seed_threshold=1.5)


# Instance mode end to end: loader targets, the binary-mask error, training and evaluation.

LABEL_LEVEL = 20  # image = label * LABEL_LEVEL / 255: the labels survive flips, rot90 and crops exactly


def write_instance_folder(root, label_images, *, binary=False):
    """images/ + masks/ of uint8 PNGs; the image encodes the labels (LABEL_LEVEL per id), the mask
    holds the labels, or with `binary` a {0, 255} mask."""
    import cv2

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index, labels in enumerate(label_images):
        cv2.imwrite(str(root / "images" / f"img{index}.png"), (labels * LABEL_LEVEL).astype(np.uint8))
        mask = np.where(labels > 0, 255, 0) if binary else labels
        cv2.imwrite(str(root / "masks" / f"img{index}.png"), mask.astype(np.uint8 if binary else np.uint16))
    return root


def touching_pairs(count, shape=(40, 40), radius=8):
    """`count` label images of two touching discs each, at seeded random places."""
    rng = np.random.default_rng(7)
    images = []
    for _ in range(count):
        top, left = rng.integers(radius + 1, shape[0] - 3 * radius - 2, size=2)
        images.append(touching_discs(shape, [(top + radius, left), (top + radius, left + int(1.5 * radius))],
                                     radius))
    return images


def labels_from_image(image):
    return np.rint(np.asarray(image)[..., 0] * 255 / LABEL_LEVEL).astype(np.int32)


def instance_data_config(root):
    from neuroseg_jax.data.config import default_data_config

    config = default_data_config()
    config.update({"source": "folder", "root": str(root), "normalize": "dtype", "crop_size": (24, 24),
                   "read_threads": 1, "prefetch": 0})
    config.split.update({"val_fraction": 0.25, "test_fraction": 0.25})
    # Geometric augmentation that moves pixels without interpolating them, nothing photometric.
    config.augment.update({"hflip": 0.5, "vflip": 0.5, "rot90": 0.5})
    config.augment.rotate.p = 0.0
    for name in ("brightness_contrast", "gaussian_noise", "gaussian_blur"):
        config.augment[name].p = 0.0
    return config


def three_class_mode(boundary_width=1, touching_weight=0.0):
    from neuroseg_jax.data.config import default_instances_config

    instances = default_instances_config()
    instances.update({"mode": "three_class", "boundary_width": boundary_width, "touching_weight": touching_weight})
    return instances


@pytest.mark.parametrize("width", [1, 2])
def test_loader_masks_are_three_class_targets_of_the_augmented_crop(tmp_path, width):
    from neuroseg_jax.data import make_loader

    rng = np.random.default_rng(3)
    label_images = [touching_discs((40, 40), rng.uniform(4, 36, size=(6, 2)), radius=7) for _ in range(8)]
    config = instance_data_config(write_instance_folder(tmp_path / "data", label_images))
    loader = make_loader(config, "train", batch_size=2, seed=0, instances=three_class_mode(width))
    batches = [batch for batch, _ in zip(loader, range(3))]
    crops_differ_from_originals = False
    for batch in batches:
        assert batch["mask"].shape == (2, 24, 24) and batch["mask"].dtype == np.int32
        for image, mask in zip(batch["image"], batch["mask"]):
            labels = labels_from_image(image)  # the labels after flips, rot90 and the random crop
            np.testing.assert_array_equal(mask, reference_targets(labels, width))
            crops_differ_from_originals |= not any(
                np.array_equal(labels, original[r:r + 24, c:c + 24])
                for original in label_images for r in range(17) for c in range(17))
    assert crops_differ_from_originals  # the augmentation did move pixels
    # Validation: centre crop, no augmentation.
    val = next(iter(make_loader(config, "val", batch_size=2, seed=0, instances=three_class_mode(width))))
    for image, mask in zip(val["image"], val["mask"]):
        np.testing.assert_array_equal(mask, reference_targets(labels_from_image(image), width))
    assert "touching_weight" not in val
    # Mode 'none' keeps the binary masks.
    binary = next(iter(make_loader(config, "val", batch_size=2, seed=0)))
    np.testing.assert_array_equal(binary["mask"], (val["mask"] > 0).astype(np.int32))
    # A touching weight adds the touching band of the augmented crop.
    weighted = make_loader(config, "train", batch_size=2, seed=0, instances=three_class_mode(width, 10.0))
    for batch in (batch for batch, _ in zip(weighted, range(2))):
        for image, touching in zip(batch["image"], batch["touching_weight"]):
            np.testing.assert_array_equal(touching, np.where(reference_touching_band(labels_from_image(image), width),
                                                             10.0, 0.0))


def test_binary_masks_in_instance_mode_name_the_file(tmp_path):
    from configs import imsahlo
    from neuroseg_jax.data import build_dataset, make_loader
    from neuroseg_jax.train.config import validate_config

    labels = np.zeros((40, 40), np.int32)
    labels[2:10, 2:10] = 1
    labels[20:30, 20:30] = 2
    config = instance_data_config(write_instance_folder(tmp_path / "data", [labels] * 4, binary=True))
    loader = make_loader(config, "train", batch_size=1, seed=0, instances=three_class_mode())
    with pytest.raises(ValueError, match=r"instance mode needs instance labels.*masks/img\d\.png holds a binary"):
        next(iter(loader))
    with pytest.raises(ValueError, match="require_instance_labels"):
        make_loader(config, "val", batch_size=1, seed=0, dataset=build_dataset(config, "val", with_instances=True),
                    instances=three_class_mode())
    next(iter(make_loader(config, "val", batch_size=1, seed=0)))  # binary mode reads them
    model_config = imsahlo.get_config("quick,model=unet,instances=three_class")
    model_config.model.num_classes = 1
    with pytest.raises(ValueError, match="num_classes=3"):
        validate_config(model_config, 1, 1)
    with pytest.raises(ValueError, match="instances='bogus'"):
        imsahlo.get_config("quick,instances=bogus")


@pytest.mark.parametrize("mode, declump_h, message", [
    ("three_class", 0.75, "declump splits a binary mask's objects by shape"),
    ("none", 0.0, "declump_h=0.0 must be > 0"),
])
def test_declump_config_errors(mode, declump_h, message):
    from configs import imsahlo
    from neuroseg_jax.train.config import validate_config

    config = imsahlo.get_config(f"quick,model=unet,instances={mode}")
    config.instances.update({"declump": True, "declump_h": declump_h})
    with pytest.raises(ValueError, match=message):
        validate_config(config, 1, 1)


@pytest.mark.parametrize("mode, weight, terms, message", [
    ("none", 10.0, {"bce": 1.0}, "needs config.instances.mode='three_class'"),
    ("three_class", 10.0, {"dice": 1.0}, "touching_weight=10.0 has no effect"),
    ("three_class", -1.0, {"bce": 1.0}, "touching_weight=-1.0 must be >= 0"),
])
def test_touching_weight_config_errors(mode, weight, terms, message):
    from configs import imsahlo
    from neuroseg_jax.train.config import validate_config

    config = imsahlo.get_config(f"quick,model=unet,instances={mode}")
    config.instances.touching_weight = weight
    config.loss.terms = terms
    config.loss.params = {}
    with pytest.raises(ValueError, match=message):
        validate_config(config, 1, 1)


def test_synthetic_instance_mode_targets():
    from neuroseg_jax.data import build_dataset, make_loader
    from neuroseg_jax.data.config import default_data_config

    config = default_data_config()
    config.synthetic.update({"num_images": 4, "image_size": (48, 48)})
    config.split.update({"val_fraction": 0.5, "test_fraction": 0.0})
    config.update({"read_threads": 1, "prefetch": 0})
    batch = next(iter(make_loader(config, "val", batch_size=2, seed=0, instances=three_class_mode())))
    dataset = build_dataset(config, "val", require_instance_labels=True)
    for index, mask in enumerate(batch["mask"]):
        np.testing.assert_array_equal(mask, reference_targets(dataset.instances(index), 1))


def perfect_three_class_predictor(batch):
    """(n, h, w, C) images that encode their labels -> one-hot three-class probabilities."""
    return np.stack([onehot(three_class_targets(labels_from_image(image))) for image in batch])


def test_instance_mode_trains_and_evaluates_objects_from_the_watershed(tmp_path, monkeypatch):
    from configs import imsahlo
    from neuroseg_jax import inference, train
    from neuroseg_jax.inference import runs
    from neuroseg_jax.train import loop

    label_images = touching_pairs(8)
    assert all(connected_components(labels > 0).max() == 1 and labels.max() == 2 for labels in label_images)
    root = write_instance_folder(tmp_path / "data", label_images)
    config = imsahlo.get_config("quick,model=unet,data=folder,instances=three_class")
    assert dict(config.loss.terms) == {"bce": 0.5, "dice": 0.5} and config.model.num_classes == 3
    config.data.update({"root": str(root), "image_size": None, "crop_size": (32, 32), "normalize": "dtype"})
    config.data.split.update({"val_fraction": 0.25, "test_fraction": 0.25})
    config.model.width = 4
    config.train.update({"batch_size": 2, "num_steps": 2, "eval_every": 2, "log_every": 1, "num_preview": 1})
    config.inference.update({"window": (40, 40), "batch_size": 1})
    config.instances.touching_weight = 10.0  # the cross-entropy weighs the cut between each pair

    loaders = []
    make_loader = loop.data_lib.make_loader

    def recording_loader(data_config, split, **kwargs):
        loader = make_loader(data_config, split, **kwargs)
        if kwargs.get("instances") is not None and kwargs["instances"].mode == "three_class":
            loaders.append(split)
        return loader

    monkeypatch.setattr(loop.data_lib, "make_loader", recording_loader)
    train.train_and_evaluate(config, tmp_path / "run")
    assert {"train", "val"} <= set(loaders)  # training and validation batches were three-class

    monkeypatch.setattr(runs, "make_predict_fn", lambda model, variables: perfect_three_class_predictor)
    results = inference.evaluate_run(tmp_path / "run", split="test", tta_n=0, progress=False,
                                     output_dir=tmp_path / "eval")
    assert results["instances"] == "three_class" and set(results["variants"]) == {"raw"}
    pooled = results["variants"]["raw"]["pooled"]
    assert pooled["n_target"] == pooled["n_pred"] == 4  # 2 test images x 2 touching discs
    assert pooled["f1@0.50"] == 1.0 and results["variants"]["raw"]["per_image_mean"]["abs_count_error"] == 0
    assert pooled["dice"] == 1.0

    # The same perfect foreground as a binary mask merges each pair: connected components count 1.
    binary_config = runs.load_config(tmp_path / "run")
    binary_config.instances.mode = "none"
    test_images = loop.data_lib.build_dataset(binary_config.data, "test")
    binary = inference.evaluate_dataset(
        lambda batch: 1.0 - perfect_three_class_predictor(batch)[..., :1], test_images, tmp_path / "binary",
        tta_n=0, postprocess=None, window=(40, 40), overlap=0, batch_size=1)
    assert binary["instances"] == "none"
    assert binary["variants"]["raw"]["pooled"]["n_pred"] == binary["variants"]["raw"]["pooled"]["n_target"] == 2
    assert binary["variants"]["raw"]["pooled"]["dice"] == 1.0
    # Items with instance labels (as evaluate_run builds them): the merged pairs are scored against the
    # 4 discs, so the binary mode's count error shows, as the instance mode's absence of one does.
    labelled = inference.evaluate_dataset(
        lambda batch: 1.0 - perfect_three_class_predictor(batch)[..., :1],
        loop.data_lib.build_dataset(binary_config.data, "test", with_instances=True), tmp_path / "labelled",
        tta_n=0, postprocess=None, window=(40, 40), overlap=0, batch_size=1)["variants"]["raw"]
    assert (labelled["pooled"]["n_pred"], labelled["pooled"]["n_target"]) == (2, 4)
    assert labelled["per_image_mean"]["abs_count_error"] == 1 and labelled["pooled"]["dice"] == 1.0
    # Declumped by shape, the same binary masks give both discs of each pair back.
    declumped = inference.evaluate_dataset(
        lambda batch: 1.0 - perfect_three_class_predictor(batch)[..., :1],
        loop.data_lib.build_dataset(binary_config.data, "test", with_instances=True), tmp_path / "declumped",
        tta_n=0, postprocess=None, window=(40, 40), overlap=0, batch_size=1,
        instances={**binary_config.instances, "declump": True})["variants"]["raw"]
    assert (declumped["pooled"]["n_pred"], declumped["pooled"]["n_target"]) == (4, 4)
    assert declumped["pooled"]["f1@0.50"] == 1.0
    # label_instances dispatches: binary mask -> components, three-class probabilities -> watershed.
    targets = three_class_targets(label_images[0])
    assert inference.label_instances(targets > 0).max() == 1
    assert inference.label_instances(onehot(targets), instances=config.instances).max() == 2
    assert inference.label_instances(targets > 0, instances={"declump": True, "declump_h": 0.75,
                                                             "declump_sigma": 1.0}).max() == 2

    # predict_run writes the watershed's labels: both discs of every pair, each with its own id.
    summary = inference.predict_run(tmp_path / "run", str(root / "images"), tmp_path / "predicted", progress=False)
    assert [entry["count"] for entry in summary["processed"]] == [2] * len(label_images)
    written = tifffile.imread(tmp_path / "predicted" / "img0_labels.tif")
    assert np.array_equal(np.unique(written), [0, 1, 2])
    assert float(instance_metrics(written, label_images[0])["f1@0.50"]) == 1.0
