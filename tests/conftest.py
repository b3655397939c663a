"""Shared test fixtures: the real-data folder beside the repository and a tiny training config."""

import os
import pathlib
import sys

import pytest

# Test shapes are tiny, so XLA's compile time dominates every test; without LLVM optimisation it
# halves while the tiny steps stay fast. Set before JAX starts; subprocesses inherit it.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

sys.path.insert(0, str(REPO))  # lets tests import configs/*.py as modules


def shared_dataset(name: str) -> pathlib.Path:
    """Path of ``../shared/data/NAME``, or skip the test saying why."""
    path = SHARED_DATA / name
    if not (path / "images").is_dir():
        pytest.skip(f"real data {path} is absent (it lives in ../shared beside the repository)")
    return path


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Tests compile the same small steps many times (every resume, every subprocess): a
    persistent cache turns the repeats into loads."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield


def tiny_train_config(loss: str = "dice+bce", **overrides):
    """The imsahlo quick config shrunk further for unit tests: a 4-wide U-Net on 32x32 crops
    with a cheap loss (``loss`` is the config's ``loss=`` argument)."""
    from configs import imsahlo

    config = imsahlo.get_config(f"quick,model=unet,loss={loss}")
    config.data.synthetic.num_images = 12
    config.data.synthetic.image_size = (64, 64)
    config.data.crop_size = (32, 32)
    config.data.split.val_fraction = 0.25
    config.data.split.test_fraction = 0.0
    config.model.width = 4
    config.train.batch_size = 2
    config.train.num_steps = 6
    config.train.eval_every = 3
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.train.num_preview = 2
    config.inference.window = (32, 32)
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config
