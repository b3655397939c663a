"""Every config builds, validates and takes a real training step in its quick form; the protocols on
../shared/data build, split by their committed files and preprocess as documented."""

import importlib
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from neuroseg_jax import data, losses, models
from conftest import SHARED_DATA, shared_dataset
from neuroseg_jax.data import splits
from neuroseg_jax.train import builders, sharding
from neuroseg_jax.train.config import validate_config


@pytest.mark.parametrize("name, arg, dtype", [("imsahlo", "quick", "float32"),
                                              ("morphoseg", "quick,weighting=pareto", "bfloat16")])
def test_quick_config_takes_one_finite_step(name, arg, dtype):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    config.model.dtype = dtype  # bfloat16: mixed precision with float32 parameters
    config.outliers.start_step = config.outliers.start_epoch = 0  # sample outliers in this one step
    validate_config(config, jax.device_count(), jax.process_count())
    trainer = builders.build_trainer(config)
    batch = next(iter(data.make_loader(config.data, "train", batch_size=config.train.batch_size, seed=0)))
    before = jax.device_get(trainer.state.params)
    state, metrics = trainer.train_step(trainer.state, sharding.global_batch(batch, trainer.mesh),
                                        trainer.step_rng)
    assert int(metrics["finite"]) == 1 and np.isfinite(float(metrics["loss"]))
    assert set(config.loss.terms) <= {key.split("/", 1)[1] for key in metrics if key.startswith("loss/")}
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, jax.device_get(state.params))
    assert all(jax.tree.leaves(changed))
    if config.loss.weighting == "pareto":  # MGDA's simplex weights, times each term's lambda
        lambdas = {**config.loss.terms, "uncertainty": config.outliers.weight}
        weights = [float(metrics[f"weight/{name}"]) / value for name, value in lambdas.items()]
        assert abs(sum(weights) - 1) < 1e-3, weights


@pytest.mark.parametrize("model", sorted(models.MODELS))
def test_imsahlo_config_accepts_every_registered_model(model):
    from configs import imsahlo

    config = imsahlo.get_config(f"quick,model={model}")
    validate_config(config, 1, 1)


@pytest.mark.parametrize("ablation", sorted(losses.IMSAHLO_ABLATIONS))
def test_table_iv_ablations_are_configs(ablation):
    from configs import imsahlo

    config = imsahlo.get_config(f"loss={ablation}")
    assert dict(config.loss.terms) == pytest.approx(losses.IMSAHLO_ABLATIONS[ablation])
    assert sum(config.loss.terms.values()) == pytest.approx(1.0)


def test_imsahlo_defaults_are_the_papers():
    from configs import imsahlo

    config = imsahlo.get_config()
    assert tuple(config.data.crop_size) == (512, 768) and config.train.batch_size == 16
    assert (config.optim.name, config.optim.lr, config.optim.weight_decay, config.optim.clip_norm) == (
        "adamw", 3e-4, 1e-4, 1.0)
    assert (config.train.num_epochs, config.optim.plateau.factor, config.optim.plateau.patience,
            config.train.early_stop.patience) == (50, 0.5, 5, 15)
    assert dict(config.loss.terms) == {"tversky": 0.4, "boundary": 0.2, "focal": 0.3, "cldice": 0.1}
    assert (config.loss.params.tversky.alpha, config.loss.params.tversky.beta) == (0.3, 0.7)
    assert (config.loss.params.focal.gamma, config.loss.params.focal.alpha) == (3.0, 0.8)


@pytest.mark.parametrize("weighting", ["balance", "norm", "relative", "pareto"])
def test_morphoseg_defaults_are_the_papers(weighting):
    from configs import morphoseg

    config = morphoseg.get_config(f"weighting={weighting}")
    assert config.model.name == "transunet_r50_b16" and config.model.hidden_size == 768
    assert (config.optim.name, config.optim.lr, config.optim.momentum, config.optim.weight_decay,
            config.optim.schedule) == ("sgd", 0.01, 0.9, 1e-4, "poly")
    assert (config.train.num_epochs, config.outliers.start_epoch, config.outliers.num_candidates,
            config.outliers.num_selected) == (200, 150, 100_000, 10_000)
    assert tuple(config.data.patches.sizes) == (224, 448, 1000, 1500, 2000) and config.data.patches.overlap == 0.35
    assert config.loss.weighting == weighting


# ---------------------------------------------------------------- protocols on ../shared/data

PROTOCOL_SPLITS = {"pfc_pn": (60, 10, 18), "bbbc039": (100, 18, 30), "fnc": (2, 1, 1)}  # train, val, test


def _protocol_config(config_name: str, protocol: str):
    return importlib.import_module(f"configs.{config_name}").get_config(f"data={protocol}")


@pytest.mark.parametrize("config_name", ["imsahlo", "morphoseg"])
@pytest.mark.parametrize("protocol", sorted(PROTOCOL_SPLITS))
def test_protocol_configs_build_beside_the_repository(config_name, protocol):
    config = _protocol_config(config_name, protocol)
    validate_config(config, 1, 1)
    assert config.data.source == "folder"
    assert pathlib.Path(config.data.root) == SHARED_DATA / protocol
    assert pathlib.Path(config.data.split.file) == pathlib.Path(__file__).parents[1] / "configs" / "splits" / (
        protocol + ".json")
    assert pathlib.Path(config.data.split.file).is_file()
    assert config.model.width == 16
    assert config.train.batch_size == (2 if protocol == "fnc" else 8)
    assert config.train.eval_every == (10 if protocol == "fnc" else 50) and config.train.num_steps > 0
    crop = {"pfc_pn": (224, 224), "bbbc039": (256, 256), "fnc": (256, 256)}[protocol]
    if config_name == "morphoseg":  # patches resized to the transformer's input
        crop = (224, 224)
        assert config.outliers.start_step == config.train.num_steps * 3 // 4 > 0  # epoch 150 of 200
        assert config.data.patches.enabled and max(config.data.patches.sizes) <= min(
            config.data.image_size or (520, 696))
    assert tuple(config.data.crop_size) == crop and tuple(config.inference.window) == crop
    assert config.inference.overlap == 0.25


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_SPLITS))
def test_protocol_split_file_holds_every_image_once(protocol):
    root = shared_dataset(protocol)
    stems = sorted(os.path.splitext(name)[0] for name in os.listdir(root / "images") if not name.startswith("."))
    split = json.loads((pathlib.Path(__file__).parents[1] / "configs" / "splits" / f"{protocol}.json").read_text())
    assert sorted(split) == ["test", "train", "val"]
    assert tuple(len(split[name]) for name in ("train", "val", "test")) == PROTOCOL_SPLITS[protocol]
    listed = split["train"] + split["val"] + split["test"]
    assert sorted(listed) == stems and len(set(listed)) == len(listed)


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_SPLITS))
def test_protocol_split_file_is_what_its_command_writes(protocol, tmp_path):
    """The committed file is the seeded, foreground-stratified split of the folder: a stale or
    hand-edited file fails here."""
    from configs import protocols
    root = shared_dataset(protocol)
    dataset = data.FolderDataset(root, layout="fnc" if protocol == "fnc" else "plain")
    num_val, num_test = protocols.SPLIT_SIZES[protocol]
    written = splits.write_split_file(tmp_path / "split.json", dataset.names, num_val=num_val, num_test=num_test,
                                      seed=protocols.SPLIT_SEED,
                                      strata=[dataset.foreground_fraction(i) for i in range(len(dataset))])
    assert written == json.loads(protocols.split_file(protocol).read_text())
    fractions = {name: dataset.foreground_fraction(i) for i, name in enumerate(dataset.names)}
    everything = sorted(fractions.values())
    for part in ("val", "test"):  # stratified: a held-out split of 3+ images spans the foreground fractions
        values = sorted(fractions[name] for name in written[part])
        assert len(values) < 3 or values[0] <= everything[len(everything) // 3] and values[-1] >= everything[-len(everything) // 3]


def test_write_split_file_gives_exact_counts_and_reads_back(tmp_path):
    names = [f"img_{i:02d}" for i in range(12)]
    path = tmp_path / "split.json"
    written = splits.write_split_file(path, names, num_val=3, num_test=3, seed=1, strata=list(range(12)))
    assert [len(written[name]) for name in ("train", "val", "test")] == [6, 3, 3]
    assert sorted(written["train"] + written["val"] + written["test"]) == names
    assert splits.read_split_file(path) == written
    for part in ("val", "test"):  # strata 0..11 sampled every 4th: one pick in each third
        assert sorted(names.index(name) // 4 for name in written[part]) == [0, 1, 2]
    with pytest.raises(ValueError, match="12 images"):
        splits.write_split_file(path, names, num_val=6, num_test=6, seed=1)


@pytest.mark.parametrize("protocol, image_shape", [("pfc_pn", (240, 320, 1)), ("bbbc039", (520, 696, 1)),
                                                   ("fnc", (512, 768, 1))])
def test_protocol_datasets_preprocess_and_split_from_the_file(protocol, image_shape):
    shared_dataset(protocol)
    config = _protocol_config("imsahlo", protocol)
    sizes = tuple(len(data.build_dataset(config.data, split)) for split in ("train", "val", "test"))
    assert sizes == PROTOCOL_SPLITS[protocol]
    test = data.build_dataset(config.data, "test")
    assert test.names == json.loads(pathlib.Path(config.data.split.file).read_text())["test"]
    item = test[0]
    assert item["image"].shape == image_shape and item["mask"].shape == image_shape[:2]
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0 and item["image"].std() > 0.01
    assert set(np.unique(item["mask"])) <= {0, 1} and item["mask"].any()


def test_protocol_root_is_overridable_and_a_missing_root_names_itself(tmp_path):
    from absl import flags
    from ml_collections import config_flags

    missing = tmp_path / "no_such_set"
    config_file = pathlib.Path(__file__).parents[1] / "configs" / "imsahlo.py"
    argv = ["train.py", f"--config={config_file}:data=bbbc039", f"--config.data.root={missing}"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.data.root == str(missing) and config.data.split.file.endswith("bbbc039.json")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        data.build_dataset(config.data, "train")


def test_imsahlo_ablation_weights_renormalise_eq3():
    from configs import imsahlo

    # Eq. 3: 0.4 Tversky, 0.2 boundary, 0.3 focal, 0.1 clDice; a subset divides by its own sum.
    assert losses.hybrid.imsahlo_term_weights(["tversky", "focal"]) == pytest.approx(
        {"tversky": 0.4 / 0.7, "focal": 0.3 / 0.7})
    assert losses.IMSAHLO_ABLATIONS["tversky+contour+focal"] == pytest.approx(
        {"tversky": 4 / 9, "boundary": 2 / 9, "focal": 3 / 9})
    assert losses.IMSAHLO_ABLATIONS["contour"] == pytest.approx({"boundary": 1.0})
    assert dict(imsahlo.get_config("loss=boundary+cldice").loss.terms) == pytest.approx(
        {"boundary": 2 / 3, "cldice": 1 / 3})
    assert dict(imsahlo.get_config("loss=tversky+focal").loss.terms) == pytest.approx(
        {"tversky": 4 / 7, "focal": 3 / 7})
    assert dict(imsahlo.get_config("loss=dice+bce").loss.terms) == pytest.approx({"dice": 0.5, "bce": 0.5})
    with pytest.raises(ValueError, match="dice"):
        losses.hybrid.imsahlo_term_weights(["tversky", "dice"])


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, float("nan")])
def test_a_decision_threshold_outside_zero_one_fails_before_training(threshold):
    config = importlib.import_module("configs.imsahlo").get_config("quick")
    config.inference.threshold = threshold
    with pytest.raises(ValueError, match=r"config\.inference\.threshold must be a probability"):
        validate_config(config, 1, 1)
