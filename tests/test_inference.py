"""Inference: sliding window vs full-image forward, TTA inversion, post-processing, morphology,
file prediction with a bad file, dataset evaluation. Tiny images only."""

from __future__ import annotations

import csv
import json
import math
import tracemalloc

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile

from neuroseg_jax import inference, metrics

KERNEL = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 2, 1)), jnp.float32)


@jax.jit
def conv_sigmoid(images):
    """A translation-equivariant 'model': fixed 3x3 conv (zero 'SAME' padding) + sigmoid."""
    logits = jax.lax.conv_general_dilated(
        images, KERNEL, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.sigmoid(logits)


def exact_pixels(shape, window, row_starts, col_starts):
    """Pixels that lie >= 1 px inside every window covering them, except on the image border
    where the window's zero padding coincides with the full image's."""
    exact = np.ones(shape, bool)
    height, width = shape
    for top in row_starts:
        for left in col_starts:
            band = np.zeros(shape, bool)
            if top > 0:
                band[top, left:left + window] = True
            if top + window < height:
                band[top + window - 1, left:left + window] = True
            if left > 0:
                band[top:top + window, left] = True
            if left + window < width:
                band[top:top + window, left + window - 1] = True
            exact &= ~band
    return exact


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_sliding_window_equals_full_forward_away_from_window_borders(blend):
    image = np.random.default_rng(1).random((37, 53, 2)).astype(np.float32)
    result = inference.sliding_window(conv_sigmoid, image, window=(16, 16), overlap=6,
                                      batch_size=4, blend=blend)
    direct = np.asarray(conv_sigmoid(image[None]))[0]
    assert result.shape == (37, 53, 1) and result.dtype == np.float32
    # Window starts worked out by hand: stride 10, last window flush with the border.
    assert inference.window_starts(37, 16, 10) == [0, 10, 20, 21]
    assert inference.window_starts(53, 16, 10) == [0, 10, 20, 30, 37]
    exact = exact_pixels((37, 53), 16, [0, 10, 20, 21], [0, 10, 20, 30, 37])
    assert exact.mean() > 0.6
    np.testing.assert_allclose(result[exact], direct[exact], atol=1e-6)
    # Elsewhere windows disagree only through their zero padding: still close, never NaN.
    assert np.isfinite(result).all() and np.abs(result - direct).max() < 0.5


def test_sliding_window_pads_small_images_and_fixes_batch_size():
    seen_shapes = []

    def predict(windows):
        seen_shapes.append(windows.shape)
        return windows[..., :1] * 0.5

    image = np.random.default_rng(2).random((10, 12, 3)).astype(np.float32)
    result = inference.sliding_window(predict, image, window=16, overlap=4, batch_size=3)
    assert result.shape == (10, 12, 1)
    np.testing.assert_allclose(result[..., 0], image[..., 0] * 0.5, atol=1e-6)
    assert seen_shapes == [(3, 16, 16, 3)]
    with pytest.raises(ValueError):
        inference.sliding_window(predict, image, window=16, overlap=16)


def test_sliding_window_memory_does_not_grow_beyond_outputs():
    def predict(windows):
        return windows[..., :1]

    def extra_peak(size):
        image = np.zeros((size, size, 1), np.float32)
        tracemalloc.start()
        inference.sliding_window(predict, image, window=32, overlap=8, batch_size=2)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        outputs = size * size * 4 * 2  # (H, W, 1) accumulator + (H, W) weight sum, float32
        return peak - outputs

    small, large = extra_peak(64), extra_peak(256)
    assert large - small < 64 * 1024, (small, large)


def test_tta_inverts_each_augmentation():
    height, width = 6, 8
    ramp = np.arange(height * width, dtype=np.float32).reshape(1, height, width, 1)

    def position_only(images):
        # Ignores the input: the prediction is a fixed ramp, so an uninverted flip would leave it
        # flipped and a correct inverse flips it back.
        return np.repeat(ramp, len(images), axis=0)

    images = np.full((2, height, width, 1), 0.5, np.float32)
    result = inference.tta(position_only, images, n=3)
    expected = (ramp + ramp[:, :, ::-1] + ramp[:, ::-1, :]) / 3
    np.testing.assert_allclose(result, np.repeat(expected, 2, axis=0), rtol=1e-6)

    def pointwise(images):  # flip-equivariant: identity and flips agree exactly
        return images ** 2

    x = np.random.default_rng(3).random((2, height, width, 1)).astype(np.float32)
    np.testing.assert_allclose(inference.tta(pointwise, x, n=3), x ** 2, rtol=1e-6)
    brightness = inference.tta(pointwise, x, n=5, brightness_shift=0.1)
    manual = (3 * x ** 2 + np.clip(x + 0.1, 0, 1) ** 2 + np.clip(x - 0.1, 0, 1) ** 2) / 5
    np.testing.assert_allclose(brightness, manual, rtol=1e-5)
    assert [a.name for a in inference.tta_augmentations(5)] == [
        "identity", "flip_horizontal", "flip_vertical", "brightness_up", "brightness_down"]
    with pytest.raises(ValueError):
        inference.tta_augmentations(9)


def test_postprocess_threshold_closing_and_small_components():
    probs = np.zeros((30, 30), np.float32)
    probs[2:9, 2:9] = 0.9
    probs[5, 5] = 0.2           # pin-hole: closed by the 3x3 ellipse
    probs[20:22, 20:25] = 0.8   # 10 px: removed (< 15)
    probs[12:16, 20:25] = 0.5   # 20 px at exactly the threshold: kept
    mask = inference.postprocess(probs)
    assert mask[5, 5] and mask[2:9, 2:9].all()
    assert not mask[20:22, 20:25].any()
    assert mask[12:16, 20:25].all()
    assert mask.sum() == 49 + 20
    raw = inference.postprocess(probs, closing_size=0, min_size=0)
    assert not raw[5, 5] and raw[20:22, 20:25].all()
    softmax = np.stack([1 - probs, probs], axis=-1)
    np.testing.assert_array_equal(inference.postprocess(softmax), mask)


def test_morphology_table_rectangle():
    labels = np.zeros((20, 30), np.int32)
    labels[3:7, 5:15] = 4   # 4 rows x 10 columns
    image = np.zeros((20, 30, 1), np.float32)
    image[3:7, 5:15] = 0.25
    (row,) = inference.morphology_table(labels, image)
    assert row["label"] == 4 and row["area"] == 40 and row["unit"] == "pixel"
    assert (row["centroid-0"], row["centroid-1"]) == pytest.approx((4.5, 9.5))
    assert row["equivalent_diameter_area"] == pytest.approx(math.sqrt(160 / math.pi))
    # skimage's contour of the pixel squares cuts their corners: 3 x 10 between the farthest points.
    assert row["feret_diameter_max"] == pytest.approx(math.hypot(3, 10))
    assert row["feret_diameter_mean"] == pytest.approx(2 * (4 + 10) / math.pi)
    # Ellipse with the same second moments: axis = 4 sqrt(var), var of n pixels = (n^2 - 1) / 12.
    assert row["axis_major_length"] == pytest.approx(4 * math.sqrt(99 / 12), rel=1e-6)
    assert row["axis_minor_length"] == pytest.approx(4 * math.sqrt(15 / 12), rel=1e-6)
    assert row["intensity_mean"] == pytest.approx(0.25)
    scaled = inference.morphology_table(labels, image, spacing=0.5, unit="um")[0]
    assert scaled["area"] == 10 and scaled["feret_diameter_max"] == pytest.approx(row["feret_diameter_max"] / 2)
    assert scaled["feret_diameter_mean"] == pytest.approx(row["feret_diameter_mean"] / 2)


def threshold_predictor(windows):
    """Bright pixels are cells: the probability is the first channel."""
    return np.asarray(windows[..., :1], np.float32)


def test_predict_files_skips_bad_file(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    gray = np.zeros((40, 50), np.uint8)
    gray[5:15, 5:15] = 255
    gray[25:35, 30:45] = 200
    cv2.imwrite(str(inputs / "a.png"), gray)
    rgb16 = np.zeros((30, 20, 3), np.uint16)
    rgb16[10:20, 5:15] = 60000
    tifffile.imwrite(inputs / "b.tif", rgb16)
    (inputs / "c.png").write_bytes(b"this is not a png")
    summary = inference.predict_files(
        threshold_predictor, [inputs, tmp_path / "missing_*.png"], tmp_path / "out",
        window=(16, 16), overlap=4, batch_size=2, blend="constant", progress=False,
        read_options={"channels": 1, "normalize": "dtype"})
    assert [item["name"] for item in summary["processed"]] == ["a", "b"]
    failed = {entry["path"] for entry in summary["failed"]}
    assert str(inputs / "c.png") in failed and str(tmp_path / "missing_*.png") in failed
    assert [item["count"] for item in summary["processed"]] == [2, 1]
    out = tmp_path / "out"
    probability = tifffile.imread(out / "a_prob.tif")
    assert probability.dtype == np.uint16 and probability.shape == (40, 50)
    mask = cv2.imread(str(out / "a_mask.png"), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(mask)) == {0, 255}
    assert tifffile.imread(out / "a_labels.tif").max() == 2
    assert cv2.imread(str(out / "b_overlay.png")).shape == (30, 20, 3)
    with open(out / "a_cells.csv") as handle:
        cells = list(csv.DictReader(handle))
    assert sorted(float(c["area"]) for c in cells) == [100.0, 150.0]
    with open(out / "counts.csv") as handle:
        assert [row["count"] for row in csv.DictReader(handle)] == ["2", "1"]
    assert json.loads((out / "summary.json").read_text())["failed"]
    with pytest.raises(FileNotFoundError):
        inference.predict_files(threshold_predictor, tmp_path / "nothing_here", tmp_path / "o2")
    # A glob input with TTA and without post-processing: same cells (the predictor is pointwise).
    with_tta = inference.predict_files(
        threshold_predictor, str(inputs / "a*.png"), tmp_path / "tta", window=(16, 16),
        overlap=4, tta_n=5, postprocess=None, progress=False,
        read_options={"channels": 1, "normalize": "dtype"})
    assert [item["count"] for item in with_tta["processed"]] == [2] and not with_tta["failed"]


class TinyDataset:
    def __init__(self):
        rng = np.random.default_rng(5)
        self.items = []
        for _ in range(2):
            mask = np.zeros((32, 32), np.int32)
            mask[4:12, 4:14] = 1
            mask[18:28, 16:30] = 1
            image = np.clip(mask[..., None] * 0.8 + rng.normal(0, 0.2, (32, 32, 1)), 0, 1)
            self.items.append({"image": image.astype(np.float32), "mask": mask})
        self.names = ["first", "second"]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def test_evaluate_dataset_writes_reports_and_pools_counts(tmp_path):
    dataset = TinyDataset()
    result = inference.evaluate_dataset(threshold_predictor, dataset, tmp_path, tta_n=3)
    assert set(result["variants"]) == {"raw", "tta", "post", "tta+post"}
    raw = result["variants"]["raw"]
    stacked_pred = np.stack([d["image"][..., 0] >= 0.5 for d in dataset.items])
    stacked_mask = np.stack([d["mask"] for d in dataset.items])
    assert raw["pooled"]["dice"] == pytest.approx(metrics.pixel_metrics(stacked_pred, stacked_mask)["dice"])
    per_image = [metrics.pixel_metrics(p, m)["dice"] for p, m in zip(stacked_pred, stacked_mask)]
    assert raw["per_image_mean"]["dice"] == pytest.approx(np.mean(per_image))
    # Post-processing removes speckle noise: fewer false objects than raw thresholding.
    assert (result["variants"]["post"]["pooled"]["ap@0.50"] >= raw["pooled"]["ap@0.50"])
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "table.md").exists()
    with open(tmp_path / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and {row["name"] for row in rows} == {"first", "second"}
    table = (tmp_path / "table.md").read_text()
    assert "Macro F1" in table and "IoU-0.75" in table and "mAP 0.5:0.95" in table
    windowed = inference.evaluate_dataset(threshold_predictor, dataset, tmp_path / "w",
                                          window=(16, 16), overlap=4, tta_n=0, postprocess=None)
    assert set(windowed["variants"]) == {"raw"}
    assert windowed["variants"]["raw"]["pooled"]["dice"] == pytest.approx(raw["pooled"]["dice"])


class MaskPairs:
    """Images whose first channel IS the prediction (for `threshold_predictor`), with targets."""

    def __init__(self, pairs):
        self.items = [{"image": pred.astype(np.float32)[..., None], "mask": target.astype(np.int32)}
                      for pred, target in pairs]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def reference_hd95(pred, target):
    """(MONAI, medpy) HD95 from scipy: boundary = mask minus its 4-neighbour erosion, distances
    from the exact EDT of the other boundary's complement."""
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(2, 1)
    edges = [mask & ~ndimage.binary_erosion(mask, cross, border_value=0) for mask in (pred, target)]
    forward = ndimage.distance_transform_edt(~edges[1])[edges[0]]
    backward = ndimage.distance_transform_edt(~edges[0])[edges[1]]
    return (max(np.percentile(forward, 95), np.percentile(backward, 95)),
            np.percentile(np.concatenate([forward, backward]), 95))


def markdown_row(table: str, title_start: str, variant: str) -> dict:
    section = table[table.index(f"### {title_start}"):]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == variant:
            return dict(zip(header, cells))
    raise KeyError(variant)


def test_morphoseg_table_uses_medpy_hd95_and_three_threshold_map(tmp_path):
    target = np.zeros((32, 32), bool)
    target[4:14, 4:14] = True
    with_speck = target.copy()
    with_speck[26:28, 26:28] = True     # a far false speck: MONAI's max-of-P95 >> medpy's pooled P95
    shifted = np.zeros_like(target)
    shifted[4:14, 6:16] = True          # IoU 80 / 120: clears 0.5 only
    pairs = [(with_speck, target), (shifted, target)]
    result = inference.evaluate_dataset(threshold_predictor, MaskPairs(pairs), tmp_path, tta_n=0,
                                        postprocess=None)
    monai, medpy = np.mean([reference_hd95(pred, target) for pred, target in pairs], axis=0)
    assert abs(monai - medpy) > 1.0
    row = markdown_row((tmp_path / "table.md").read_text(), "MorphoSeg", "raw")
    assert float(row["HD95"]) == pytest.approx(medpy, abs=0.006)
    assert result["variants"]["raw"]["per_image_mean"]["hd95_medpy"] == pytest.approx(medpy)
    # Image IoUs 100/104 and 2/3: IoU-0.5 2/2, IoU-0.75 1/2, IoU-0.9 1/2, mAP their mean.
    assert [row[name] for name in ("IoU-0.5", "IoU-0.75", "IoU-0.9", "mAP")] == [
        "100.00", "50.00", "50.00", "66.67"]
    assert "medpy" in result["notes"]["morphoseg_table"]
    assert "exactly one empty mask: raw 0." in (tmp_path / "table.md").read_text()
