"""Every config builds, validates and takes a real training step in its quick form."""

import importlib

import jax
import numpy as np
import pytest

from neuroseg_jax import data, losses, models
from neuroseg_jax.train import loop, sharding
from neuroseg_jax.train.config import validate_config


@pytest.mark.parametrize("name, arg, dtype", [("imsahlo", "quick", "float32"),
                                              ("morphoseg", "quick,weighting=pareto", "bfloat16")])
def test_quick_config_takes_one_finite_step(name, arg, dtype):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    config.model.dtype = dtype  # bfloat16: mixed precision with float32 parameters
    config.outliers.start_step = config.outliers.start_epoch = 0  # sample outliers in this one step
    validate_config(config, jax.device_count(), jax.process_count())
    trainer = loop.build_trainer(config)
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
