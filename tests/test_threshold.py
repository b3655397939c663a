"""Decision threshold: chosen on the validation split, stored with the checkpoint, used by
evaluation and prediction; never chosen on test images."""

import json

import cv2
import numpy as np
import pytest

from conftest import tiny_train_config
from neuroseg_jax import data, inference, train

# The whole 64x64 image is one window, weighted 1: the run's probabilities are exactly one forward pass.
RUN_OVERRIDES = {"data.split.test_fraction": 0.25, "inference.window": (64, 64), "inference.blend": "constant",
                 "train.num_steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("threshold_run")
    train.train_and_evaluate(tiny_train_config(**RUN_OVERRIDES), path)
    return path


def _probabilities(workdir, split):
    """(foreground probabilities, targets) of a split, each image in one forward pass."""
    run = inference.load_run(workdir, "best")
    predict_fn = inference.make_predict_fn(run.model, run.variables)
    dataset = data.build_dataset(run.config.data, split)
    items = [dataset[index] for index in range(len(dataset))]
    assert items and all(item["image"].shape[:2] == (64, 64) for item in items)
    return [predict_fn(item["image"][None])[0, ..., 0] for item in items], [item["mask"] > 0 for item in items]


def _pooled_dice(masks, targets):
    tp = sum(int(np.sum(mask & target)) for mask, target in zip(masks, targets))
    wrong = sum(int(np.sum(mask ^ target)) for mask, target in zip(masks, targets))
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 1.0


def _record_splits(monkeypatch) -> list:
    requested = []
    build = data.build_dataset

    def recording(data_config, split, **kwargs):
        requested.append(split)
        return build(data_config, split, **kwargs)

    monkeypatch.setattr(data, "build_dataset", recording)
    return requested


def _stored_path(workdir):
    return inference.threshold_path(workdir, "best", inference.load_run(workdir, "best").step)


def test_training_ends_by_storing_the_threshold_chosen_on_validation(workdir):
    assert inference.load_config(workdir).inference.choose_threshold  # the default
    stored = json.loads(_stored_path(workdir).read_text())
    assert stored["split"] == "val" and stored["step"] == inference.load_run(workdir, "best").step
    probabilities, targets = _probabilities(workdir, "val")
    assert stored["val_dice"] == pytest.approx(_pooled_dice([p >= stored["threshold"] for p in probabilities], targets),
                                               rel=1e-12)


def test_choose_threshold_maximises_pooled_validation_dice_and_reads_only_validation(workdir, monkeypatch):
    probabilities, targets = _probabilities(workdir, "val")
    expected = {t: _pooled_dice([p >= t for p in probabilities], targets) for t in inference.THRESHOLD_CANDIDATES}
    best_dice = max(expected.values())
    best = min((t for t, dice in expected.items() if dice == best_dice), key=lambda t: abs(t - 0.5))

    requested = _record_splits(monkeypatch)
    chosen = inference.choose_threshold(workdir, "best")
    assert requested == ["val"]
    assert chosen["threshold"] == best
    assert chosen["val_dice"] == pytest.approx(best_dice, rel=1e-12)
    assert chosen["val_dice_at_0.5"] == pytest.approx(_pooled_dice([p >= 0.5 for p in probabilities], targets))
    assert {float(t): dice for t, dice in chosen["candidates"].items()} == pytest.approx(expected, rel=1e-12)
    assert json.loads(_stored_path(workdir).read_text()) == chosen


def test_evaluate_and_predict_use_the_stored_threshold_computed_on_validation(workdir, monkeypatch, tmp_path):
    _stored_path(workdir).unlink(missing_ok=True)
    config = inference.load_config(workdir)
    config.inference.choose_threshold = True
    requested = _record_splits(monkeypatch)
    results = inference.evaluate_run(workdir, split="test", config=config, tta_n=0, progress=False,
                                     output_dir=tmp_path / "first")
    assert requested == ["val", "test"]  # chosen on val first, test only scored
    stored = json.loads(_stored_path(workdir).read_text())
    assert (results["threshold"], results["threshold_source"]) == (stored["threshold"], "validation")

    # A stored threshold is reused, not recomputed: plant one whose masks differ from 0.5's.
    probabilities, targets = _probabilities(workdir, "test")
    planted = next(t for t in (0.45, 0.4, 0.55, 0.35, 0.6, 0.3)
                   if _pooled_dice([p >= t for p in probabilities], targets)
                   != _pooled_dice([p >= 0.5 for p in probabilities], targets))
    _stored_path(workdir).write_text(json.dumps({**stored, "threshold": planted}))
    requested.clear()
    results = inference.evaluate_run(workdir, split="test", config=config, tta_n=0, progress=False,
                                     output_dir=tmp_path / "second")
    assert requested == ["test"]
    assert (results["threshold"], results["threshold_source"]) == (planted, "validation")
    on_disk = json.loads((tmp_path / "second" / "metrics.json").read_text())
    assert (on_disk["threshold"], on_disk["threshold_source"]) == (planted, "validation")
    variants = results["variants"]
    assert variants["raw"]["pooled"]["dice"] == pytest.approx(
        _pooled_dice([p >= planted for p in probabilities], targets), rel=1e-12)
    post = [inference.postprocess(p, **{**inference.DEFAULT_POSTPROCESS, "threshold": planted}) for p in probabilities]
    assert variants["post"]["pooled"]["dice"] == pytest.approx(_pooled_dice(post, targets), rel=1e-12)

    # predict_run reads the run's config snapshot: 'val' asks for the stored choice explicitly.
    run = inference.load_run(workdir, "best")
    image_file = tmp_path / "inputs" / "cell.png"
    image_file.parent.mkdir()
    image = data.build_dataset(run.config.data, "test")[0]["image"]
    cv2.imwrite(str(image_file), (image[..., 0] * 255).astype(np.uint8))
    summary = inference.predict_run(workdir, str(image_file), tmp_path / "predicted", threshold="val",
                                    progress=False)
    loaded = data.load_image(image_file, run.config.data)
    probability = inference.make_predict_fn(run.model, run.variables)(loaded[None])[0, ..., 0]
    expected = inference.postprocess(probability, **{**inference.DEFAULT_POSTPROCESS, "threshold": planted})
    assert not np.array_equal(expected, inference.postprocess(probability, **inference.DEFAULT_POSTPROCESS))
    mask = cv2.imread(summary["processed"][0]["outputs"]["mask"], cv2.IMREAD_UNCHANGED)
    assert summary["settings"]["threshold"] == planted
    np.testing.assert_array_equal(mask > 0, expected)


def test_config_threshold_is_used_without_choosing(workdir, monkeypatch, tmp_path):
    path = _stored_path(workdir)
    path.unlink(missing_ok=True)
    config = inference.load_config(workdir)
    config.inference.update({"threshold": 0.35, "choose_threshold": False})
    requested = _record_splits(monkeypatch)
    results = inference.evaluate_run(workdir, split="test", config=config, tta_n=0, progress=False,
                                     output_dir=tmp_path / "eval")
    assert requested == ["test"] and not path.exists()
    assert (results["threshold"], results["threshold_source"]) == (0.35, "config")
    # threshold='config' (the runner's fixed-threshold evaluation) takes it even with choose_threshold on.
    config.inference.choose_threshold = True
    fixed = inference.evaluate_run(workdir, split="test", config=config, tta_n=0, progress=False,
                                   output_dir=tmp_path / "fixed", threshold="config")
    assert requested == ["test", "test"] and not path.exists()
    assert (fixed["threshold"], fixed["threshold_source"]) == (0.35, "config")
    probabilities, targets = _probabilities(workdir, "test")
    assert results["variants"]["raw"]["pooled"]["dice"] == pytest.approx(
        _pooled_dice([p >= 0.35 for p in probabilities], targets), rel=1e-12)


@pytest.mark.parametrize("value", [1.5, 0.0, 1.0, -0.2, float("nan")])
def test_a_threshold_outside_zero_one_is_an_error_naming_the_key(value, tmp_path):
    config = tiny_train_config()
    config.inference.threshold = value
    run = inference.Run(config=config, model=None, variables={}, step=0, meta={})
    with pytest.raises(ValueError, match=r"config\.inference\.threshold must be a probability strictly between"):
        inference.decision_threshold(run, tmp_path, "best")
    config.inference.threshold = 0.5
    for argument in (value, "high"):
        with pytest.raises(ValueError, match=r"^threshold must be a probability"):
            inference.decision_threshold(run, tmp_path, "best", threshold=argument)
