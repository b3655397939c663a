"""Instance mode's pure pieces: three-class targets and their watershed decode."""

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from neuroseg_jax.data.instance_targets import (
    BACKGROUND, BOUNDARY, INTERIOR, check_instance_labels, three_class_targets)
from neuroseg_jax.inference.watershed import instances_from_three_class
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
