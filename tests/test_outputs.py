"""Calibrated prediction outputs: pixel size read from ImageJ / OME TIFFs or given, ImageJ TIFFs
written with it, the morphology table in micrometres. A pointwise fake model, tiny images."""

from __future__ import annotations

import csv
import json
import math

import cv2
import numpy as np
import pytest
import tifffile

from neuroseg_jax import inference
from neuroseg_jax.data import ImageReadError
from neuroseg_jax.data.io import read_pixel_size
from neuroseg_jax.inference import predict as predict_module
from neuroseg_jax.inference import runs
from neuroseg_jax.metrics import connected_components

from conftest import tiny_train_config

OPTIONS = dict(window=(16, 16), overlap=4, batch_size=2, blend="constant", progress=False,
               read_options={"channels": 1, "normalize": "dtype"})


def threshold_predictor(windows):
    """Bright pixels are cells: the probability is the first channel."""
    return np.asarray(windows[..., :1], np.float32)


def two_cells() -> np.ndarray:
    """uint8 (40, 50): a 10 x 10 and a 10 x 15 bright rectangle."""
    gray = np.zeros((40, 50), np.uint8)
    gray[5:15, 5:15] = 255
    gray[25:35, 30:45] = 200
    return gray


def write_imagej(path, array, pixels_per_unit_yx, unit):
    """An ImageJ TIFF as Fiji saves it: unit in the description, (non-ASCII escaped), resolution tags."""
    tifffile.imwrite(path, array, imagej=True, resolution=(pixels_per_unit_yx[1], pixels_per_unit_yx[0]),
                     metadata={"unit": unit})


def read_cells(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_imagej_calibrated_input_gives_calibrated_tiffs_and_micrometre_table(tmp_path):
    write_imagej(tmp_path / "cal.tif", two_cells(), (2.0, 2.0), "\\u00B5m")  # 0.5 um pixels, Fiji's escape
    summary = inference.predict_files(threshold_predictor, tmp_path / "cal.tif", tmp_path / "out", **OPTIONS)
    (entry,) = summary["processed"]
    assert entry["pixel_size"] == {"y": 0.5, "x": 0.5, "source": "file", "unit": "um"}
    for key in ("labels", "probability", "uncertainty"):
        with tifffile.TiffFile(entry["outputs"][key]) as tif:
            assert tif.is_imagej and tif.imagej_metadata["unit"] == "um", key
            assert tif.pages.first.resolution == pytest.approx((2.0, 2.0)), key
    labels = tifffile.imread(entry["outputs"]["labels"])
    assert labels.dtype == np.uint16 and labels.shape == (40, 50)
    with tifffile.TiffFile(entry["outputs"]["probability"]) as tif:
        assert "value / 65535" in tif.imagej_metadata["Info"]
        assert tif.asarray()[7, 7] == 65535 and tif.asarray()[0, 0] == 0
    cells = read_cells(entry["outputs"]["cells"])
    pixel_counts = np.bincount(labels.ravel())
    assert sorted(int(c["num_pixels"]) for c in cells) == [100, 150]
    for cell in cells:
        assert cell["unit"] == "um"
        assert float(cell["area"]) == pytest.approx(pixel_counts[int(cell["label"])] * 0.25)
    square = next(c for c in cells if int(c["num_pixels"]) == 100)
    # Hand-computed: a 10 x 10 px square of 0.5 um pixels; mean caliper = hull perimeter / pi.
    assert float(square["feret_diameter_mean"]) == pytest.approx(4 * 5.0 / math.pi)
    assert float(square["equivalent_diameter_area"]) == pytest.approx(math.sqrt(4 * 25.0 / math.pi))
    assert (float(square["centroid-0"]), float(square["centroid-1"])) == pytest.approx((4.75, 4.75))
    with open(tmp_path / "out" / "counts.csv") as handle:
        (count_row,) = list(csv.DictReader(handle))
    assert count_row["unit"] == "um" and float(count_row["mean_area"]) == pytest.approx((25.0 + 37.5) / 2)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["settings"]["probability_scale"] == 65535


def test_uncalibrated_input_writes_pixel_unit(tmp_path):
    cv2.imwrite(str(tmp_path / "plain.png"), two_cells())
    summary = inference.predict_files(threshold_predictor, tmp_path / "plain.png", tmp_path / "out", **OPTIONS)
    (entry,) = summary["processed"]
    with tifffile.TiffFile(entry["outputs"]["labels"]) as tif:
        assert tif.imagej_metadata["unit"] == "pixel"
    assert sorted(float(c["area"]) for c in read_cells(entry["outputs"]["cells"])) == [100.0, 150.0]
    assert {c["unit"] for c in read_cells(entry["outputs"]["cells"])} == {"pixel"}


@pytest.mark.parametrize("unit, size, expected", [("nm", 250.0, 0.25), (None, 0.8, 0.8), ("mm", 0.002, 2.0)])
def test_ome_physical_size_is_converted_to_micrometres(tmp_path, unit, size, expected):
    units = {} if unit is None else {"PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}  # OME default: µm
    tifffile.imwrite(tmp_path / "a.ome.tif", two_cells(),
                     metadata={"axes": "YX", "PhysicalSizeX": size, "PhysicalSizeY": size, **units})
    assert read_pixel_size(tmp_path / "a.ome.tif") == pytest.approx((expected, expected, "um"))
    summary = inference.predict_files(threshold_predictor, tmp_path / "a.ome.tif", tmp_path / "out", **OPTIONS)
    with tifffile.TiffFile(summary["processed"][0]["outputs"]["labels"]) as tif:
        assert tif.pages.first.resolution == pytest.approx((1 / expected, 1 / expected))


def test_pixel_size_absent_for_png_and_uncalibrated_tiff(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), two_cells())
    tifffile.imwrite(tmp_path / "plain.tif", two_cells())
    write_imagej(tmp_path / "uncalibrated.tif", two_cells(), (1.0, 1.0), "pixel")
    assert [read_pixel_size(tmp_path / name) for name in ("a.png", "plain.tif", "uncalibrated.tif")] == [None] * 3


def test_unsupported_unit_fails_that_file_naming_it(tmp_path):
    write_imagej(tmp_path / "timed.tif", two_cells(), (2.0, 2.0), "sec")
    cv2.imwrite(str(tmp_path / "good.png"), two_cells())
    with pytest.raises(ImageReadError, match=r"timed\.tif.*'sec'"):
        read_pixel_size(tmp_path / "timed.tif")
    summary = inference.predict_files(threshold_predictor, [tmp_path / "timed.tif", tmp_path / "good.png"],
                                      tmp_path / "out", **OPTIONS)
    assert [entry["name"] for entry in summary["processed"]] == ["good"]
    (failure,) = summary["failed"]
    assert failure["path"] == str(tmp_path / "timed.tif") and "'sec'" in failure["error"]
    assert not list((tmp_path / "out").glob("timed*"))
    with pytest.raises(ValueError, match=r"--pixel_size.*'furlong'"):
        predict_module.pixel_size_micrometres(0.5, "furlong", source="--pixel_size")


def test_anisotropic_pixels_fail_naming_the_file(tmp_path):
    write_imagej(tmp_path / "stretched.tif", two_cells(), (1.0, 2.0), "um")  # 1 um high, 0.5 um wide
    assert read_pixel_size(tmp_path / "stretched.tif") == (1.0, 0.5, "um")
    summary = inference.predict_files(threshold_predictor, tmp_path / "stretched.tif", tmp_path / "out", **OPTIONS)
    (failure,) = summary["failed"]
    assert "stretched.tif" in failure["error"] and "square pixels" in failure["error"]
    # A given pixel size replaces the file's and makes the morphology possible.
    forced = inference.predict_files(threshold_predictor, tmp_path / "stretched.tif", tmp_path / "forced",
                                     pixel_size=0.5, **OPTIONS)
    assert forced["processed"][0]["pixel_size"]["source"] == "pixel_size"


def test_label_ids_with_gaps_are_kept():
    labels = np.zeros((12, 20), np.int32)
    labels[1:4, 1:5] = 1     # 12 px
    labels[6:11, 2:4] = 5    # 10 px
    labels[2:9, 10:19] = 9   # 63 px
    rows = inference.morphology_table(labels, spacing=0.5, unit="um")
    assert [row["label"] for row in rows] == [1, 5, 9]
    assert [row["area"] for row in rows] == pytest.approx([12 * 0.25, 10 * 0.25, 63 * 0.25])
    assert all(math.isnan(row["intensity_mean"]) for row in rows)
    assert list(rows[0]) == list(inference.MORPHOLOGY_COLUMNS)


def test_label_ids_above_uint16_are_written_as_exact_float32(tmp_path, monkeypatch, caplog):
    cv2.imwrite(str(tmp_path / "many.png"), two_cells())
    monkeypatch.setattr(predict_module, "label_instances",
                        lambda mask, *args, **kwargs: connected_components(mask) * 70001)
    summary = inference.predict_files(threshold_predictor, tmp_path / "many.png", tmp_path / "out", **OPTIONS)
    (entry,) = summary["processed"]
    with tifffile.TiffFile(entry["outputs"]["labels"]) as tif:
        labels = tif.asarray()
        assert tif.is_imagej and labels.dtype == np.float32
    assert set(np.unique(labels).tolist()) == {0.0, 70001.0, 140002.0}
    assert sorted(int(c["label"]) for c in read_cells(entry["outputs"]["cells"])) == [70001, 140002]
    assert "exceed uint16" in caplog.text
    # Past 2^24 float32 loses integers: the file fails with a message, nothing half-written.
    monkeypatch.setattr(predict_module, "label_instances",
                        lambda mask, *args, **kwargs: connected_components(mask) * (1 << 24))
    summary = inference.predict_files(threshold_predictor, tmp_path / "many.png", tmp_path / "huge", **OPTIONS)
    assert not summary["processed"] and "2^24" in summary["failed"][0]["error"]
    assert not list((tmp_path / "huge").glob("many*"))


def test_given_pixel_size_overrides_the_file_and_the_default_fills_in(tmp_path):
    write_imagej(tmp_path / "cal.tif", two_cells(), (2.0, 2.0), "um")
    cv2.imwrite(str(tmp_path / "plain.png"), two_cells())
    inputs = [tmp_path / "cal.tif", tmp_path / "plain.png"]

    def areas(summary):
        return {entry["name"]: sorted(float(c["area"]) for c in read_cells(entry["outputs"]["cells"]))
                for entry in summary["processed"]}

    filled = inference.predict_files(threshold_predictor, inputs, tmp_path / "filled", default_pixel_size=0.1,
                                     **OPTIONS)
    assert areas(filled)["cal"] == pytest.approx([25.0, 37.5])
    assert areas(filled)["plain"] == pytest.approx([1.0, 1.5])
    forced = inference.predict_files(threshold_predictor, inputs, tmp_path / "forced", pixel_size=0.25,
                                     default_pixel_size=0.1, **OPTIONS)
    assert areas(forced)["cal"] == areas(forced)["plain"] == pytest.approx([6.25, 9.375])
    with tifffile.TiffFile(forced["processed"][0]["outputs"]["probability"]) as tif:
        assert tif.pages.first.resolution == pytest.approx((4.0, 4.0))


def test_predict_run_passes_the_flag_and_the_config_pixel_size(tmp_path, monkeypatch):
    """predict_run's pixel_size / pixel_unit (the --pixel_size / --pixel_unit flags) and
    config.data.pixel_size reach the outputs; a bad flag unit fails before the run is loaded."""
    config = tiny_train_config()
    config.data.update({"pixel_size": 500.0, "pixel_unit": "nm", "normalize": "dtype", "image_size": None})
    config.inference.update({"postprocess": True, "choose_threshold": False})
    loaded = []

    def fake_load_run(workdir, checkpoint="best", config_=None):
        loaded.append(workdir)
        return runs.Run(config=config, model=None, variables={}, step=0, meta={})

    monkeypatch.setattr(runs, "load_run", fake_load_run)
    monkeypatch.setattr(runs, "make_predict_fn", lambda model, variables: threshold_predictor)
    cv2.imwrite(str(tmp_path / "plain.png"), two_cells())

    def cell_areas(summary):
        return sorted(float(c["area"]) for c in read_cells(summary["processed"][0]["outputs"]["cells"]))

    from_config = runs.predict_run("RUN", tmp_path / "plain.png", tmp_path / "config", progress=False)
    assert cell_areas(from_config) == pytest.approx([25.0, 37.5])
    from_flag = runs.predict_run("RUN", tmp_path / "plain.png", tmp_path / "flag", progress=False,
                                 pixel_size=2.0, pixel_unit="micron")
    assert cell_areas(from_flag) == pytest.approx([400.0, 600.0])
    with pytest.raises(ValueError, match=r"--pixel_size.*'parsec'"):
        runs.predict_run("BAD", tmp_path / "plain.png", tmp_path / "bad", pixel_size=1.0, pixel_unit="parsec")
    assert loaded == ["RUN", "RUN"]


def test_declump_flag_splits_touching_nuclei_in_predict_run(tmp_path, monkeypatch):
    """--declump (predict_run's declump) splits two touching discs that the binary mask merges;
    a three-class run refuses it."""
    config = tiny_train_config()
    config.data.update({"normalize": "dtype", "image_size": None})
    config.inference.choose_threshold = False
    monkeypatch.setattr(runs, "load_run", lambda workdir, checkpoint="best", config_=None: runs.Run(
        config=config, model=None, variables={}, step=0, meta={}))
    monkeypatch.setattr(runs, "make_predict_fn", lambda model, variables: threshold_predictor)
    rows, cols = np.indices((40, 50))
    discs = (np.hypot(rows - 20, cols - 17) <= 8) | (np.hypot(rows - 20, cols - 30) <= 8)
    cv2.imwrite(str(tmp_path / "pair.png"), np.where(discs, 255, 0).astype(np.uint8))

    def count(**kwargs):
        summary = runs.predict_run("RUN", tmp_path / "pair.png", tmp_path / str(kwargs), progress=False, **kwargs)
        return summary["processed"][0]["count"]

    assert count() == count(declump=False) == 1
    assert count(declump=True) == 2
    config.instances.mode = "three_class"
    with pytest.raises(ValueError, match="three_class instance mode"):
        runs.object_settings(config, declump=True)
