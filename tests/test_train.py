"""Training system: steps, sharding equality, checkpoints and resume, guard rails, plateau."""

import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import cv2
import jax
import numpy as np
import pytest

from conftest import REPO, tiny_train_config
from neuroseg_jax import data, inference, train
from neuroseg_jax.train import builders, sharding
from neuroseg_jax.train.plateau import PlateauState, update_plateau


def _train_records(workdir: pathlib.Path) -> list[dict]:
    return [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_hybrid_run_writes_checkpoints_metrics_pictures_and_evaluates_and_predicts(tmp_path):
    config = tiny_train_config(loss="tversky+boundary+focal+cldice")
    config.loss.params.cldice.iterations = 3
    val = train.train_and_evaluate(config, tmp_path)
    assert math.isfinite(val["loss"]) and 0.0 <= val["dice"] <= 1.0
    assert (tmp_path / "checkpoints" / "latest" / "6").is_dir()
    assert any((tmp_path / "checkpoints" / "best").iterdir())
    assert (tmp_path / "plots" / "predictions.png").stat().st_size > 0
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 0
    assert (tmp_path / "plots" / "predictions_step000003.png").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "unet"
    steps = [r["step"] for r in _train_records(tmp_path)]
    assert steps == list(range(1, 7))
    assert any(p.name.startswith("events") for p in (tmp_path / "tensorboard").iterdir())

    results = inference.evaluate_run(tmp_path, checkpoint="best", tta_n=2, progress=False)
    assert {"raw", "tta", "post", "tta+post"} <= set(results["variants"])
    pooled = results["variants"]["raw"]["pooled"]
    assert all(0.0 <= pooled[key] <= 1.0 for key in ("dice", "iou", "precision", "recall", "accuracy"))
    assert (pathlib.Path(results["output_dir"]) / "metrics.json").exists()

    folder = tmp_path / "other_data"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    dataset = data.build_dataset(config.data, "val")
    for index in range(2):
        item = dataset[index]
        cv2.imwrite(str(folder / "images" / f"im{index}.png"), (item["image"][..., 0] * 255).astype(np.uint8))
        cv2.imwrite(str(folder / "masks" / f"im{index}.png"), (item["mask"] * 255).astype(np.uint8))
    on_folder = inference.evaluate_run(tmp_path, data_root=str(folder), split="all", tta_n=1, progress=False)
    assert on_folder["num_images"] == 2 and set(on_folder["variants"]) == {"raw", "post"}

    images = tmp_path / "inputs"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), (dataset[0]["image"][..., 0] * 255).astype(np.uint8))
    cv2.imwrite(str(images / "odd_size.png"), np.random.default_rng(0).integers(0, 255, (45, 70), np.uint8))
    (images / "broken.png").write_bytes(b"not an image")
    summary = inference.predict_run(tmp_path, str(images), tmp_path / "predictions", progress=False)
    assert sorted(item["name"] for item in summary["processed"]) == ["a", "odd_size"]
    assert [pathlib.Path(item["path"]).name for item in summary["failed"]] == ["broken.png"]
    mask = cv2.imread(summary["processed"][1]["outputs"]["mask"], cv2.IMREAD_UNCHANGED)
    assert mask.shape == (45, 70) and set(np.unique(mask)) <= {0, 255}


def test_loss_decreases_on_synthetic_data(tmp_path):
    config = tiny_train_config(**{"train.num_steps": 20, "train.eval_every": 20, "train.checkpoint_every": 20,
                                  "optim.lr": 1e-2})
    train.train_and_evaluate(config, tmp_path)
    losses = [r["loss"] for r in _train_records(tmp_path)]
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


def test_sigterm_saves_and_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    config = tiny_train_config(**{"optim.ema_decay": 0.9})  # the EMA must survive the resume too
    train.train_and_evaluate(config, tmp_path / "whole")
    whole = _train_records(tmp_path / "whole")

    calls = {"n": 0}
    real_global_batch = sharding.global_batch

    def batch_then_sigterm(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_global_batch(batch, mesh)

    monkeypatch.setattr(sharding, "global_batch", batch_then_sigterm)
    train.train_and_evaluate(config, tmp_path / "cut")
    assert sorted(int(p.name) for p in (tmp_path / "cut" / "checkpoints" / "latest").iterdir()
                  if p.name.isdigit())[-1] == 3
    monkeypatch.setattr(sharding, "global_batch", real_global_batch)
    other_workers = tiny_train_config(**{"optim.ema_decay": 0.9, "data.worker_count": 1})
    with pytest.raises(ValueError, match="data.worker_count=0"):
        train.train_and_evaluate(other_workers, tmp_path / "cut")
    train.train_and_evaluate(config, tmp_path / "cut")
    resumed = _train_records(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in whole], rtol=1e-6)

    whole_weights, _, _ = train.restore_weights(tmp_path / "whole", "latest")
    cut_weights, _, _ = train.restore_weights(tmp_path / "cut", "latest")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), whole_weights, cut_weights)


def test_resume_refuses_another_config_or_training_split_and_allows_a_longer_run(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)

    def write_pair(i: int) -> None:
        cv2.imwrite(str(root / "images" / f"img_{i}.png"), rng.integers(0, 256, (64, 64), dtype=np.uint8))
        cv2.imwrite(str(root / "masks" / f"img_{i}.png"), (rng.random((64, 64)) > 0.7).astype(np.uint8) * 255)

    for i in range(8):
        write_pair(i)
    folder = {"data.source": "folder", "data.root": str(root), "train.num_steps": 2}
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_train_config(**folder), workdir)
    snapshot = (workdir / "config.json").read_text()
    with pytest.raises(ValueError, match=r"step 2\) belongs to a run with another configuration: model.width=8 "
                                         r"\(checkpoint: 4\)"):
        train.train_and_evaluate(tiny_train_config(**folder, **{"model.width": 8}), workdir)
    assert (workdir / "config.json").read_text() == snapshot  # a refused resume leaves the run's record alone
    write_pair(8)
    with pytest.raises(ValueError, match=r"another training split \(6 images, now 7"):
        train.train_and_evaluate(tiny_train_config(**folder), workdir)
    for kind in ("images", "masks"):
        (root / kind / "img_8.png").unlink()
    train.train_and_evaluate(tiny_train_config(**{**folder, "train.num_steps": 4, "train.log_every": 2}), workdir)
    assert [r["step"] for r in _train_records(workdir)] == [1, 2, 4]


def test_ema_averages_the_parameters_of_every_step():
    config = tiny_train_config(**{"optim.ema_decay": 0.75})
    trainer = builders.build_trainer(config)
    batches = iter(data.make_loader(config.data, "train", batch_size=2, seed=0))
    state = trainer.state
    expected = jax.device_get(state.params)
    for _ in range(2):
        state, _ = trainer.train_step(state, sharding.global_batch(next(batches), trainer.mesh),
                                      trainer.step_rng)
        expected = jax.tree.map(lambda avg, new: 0.75 * avg + 0.25 * new, expected, jax.device_get(state.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
                 jax.device_get(state.ema_params), expected)
    assert state.eval_params is state.ema_params


def test_non_finite_loss_stops_naming_step_terms_and_checkpoint(tmp_path, monkeypatch):
    real_make_loss_fn = builders.make_loss_fn

    def poisoned(loss_config):
        loss_fn = real_make_loss_fn(loss_config)

        def nan_from_step_three(logits, labels):
            total, terms = loss_fn(logits, labels)
            # Labels are binary, so a NaN appears only where the test injects one.
            poison = jax.numpy.where(labels.max() > 1, jax.numpy.nan, 0.0)
            return total + poison, {name: value + poison for name, value in terms.items()}

        return nan_from_step_three

    monkeypatch.setattr(builders, "make_loss_fn", poisoned)
    real_global_batch = sharding.global_batch
    calls = {"n": 0}

    def bad_third_batch(batch, mesh):
        calls["n"] += 1
        if calls["n"] == 3:
            batch = dict(batch, mask=batch["mask"] * 2)
        return real_global_batch(batch, mesh)

    monkeypatch.setattr(sharding, "global_batch", bad_third_batch)
    with pytest.raises(train.NonFiniteLossError, match=r"step 3.*dice.*latest.2"):
        train.train_and_evaluate(tiny_train_config(), tmp_path)
    assert (tmp_path / "checkpoints" / "latest" / "2").is_dir()


def test_unknown_config_key_or_argument_is_named(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config=configs/imsahlo.py:quick",
         f"--workdir={tmp_path}", "--config.optim.learning_rate=0.1"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0 and "learning_rate" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()
    from configs import imsahlo
    with pytest.raises(ValueError, match="bogus"):
        imsahlo.get_config("quick,bogus")


@pytest.mark.parametrize("key, value, message", [
    ("model.name", "nope", "config.model.name"),
    ("mesh.model", 3, "config.mesh"),
    ("loss.terms", {"dice": 1.0, "tverskyy": 1.0}, "tverskyy"),
    ("data.source", "folder", "config.data.root"),
])
def test_config_validated_before_compiling(key, value, message):
    config = tiny_train_config(**{key: value})
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, "/nonexistent/never/written")


def test_plateau_and_early_stopping_on_a_scripted_sequence():
    kwargs = dict(factor=0.5, patience=2, min_scale=0.1, threshold=0.0, early_stop_patience=4)
    state = PlateauState()
    scales, stops = [], []
    for value in [1.0, 0.9, 0.95, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85]:
        state = update_plateau(state, value, **kwargs)
        scales.append(state.lr_scale)
        stops.append(state.should_stop)
    # Third bad evaluation after 0.9 exceeds patience 2 -> halve; 0.8 resets the counters.
    assert scales == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert stops == [False] * 9 + [True]
    with pytest.raises(ValueError, match="not finite"):
        update_plateau(state, float("nan"), **kwargs)


SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    import jax, numpy as np
    from conftest import tiny_train_config
    from neuroseg_jax import data
    from neuroseg_jax.train import builders, sharding

    def run(config, devices, mesh_shape, fsdp=False):
        config.mesh.data, config.mesh.model = mesh_shape
        config.mesh.fsdp, config.mesh.fsdp_min_size = fsdp, 64
        trainer = builders.build_trainer(config, devices)
        st, mesh = trainer.state, trainer.mesh
        loader = iter(data.make_loader(config.data, "train", batch_size=8, seed=0))
        losses = []
        for _ in range(2):
            st, metrics = trainer.train_step(st, sharding.global_batch(next(loader), mesh), jax.random.key(1))
            losses.append(float(metrics["loss"]))
        assert int(st.outliers.count.min()) > 0 and "loss/uncertainty" in metrics
        return losses, jax.device_get((st.params, st.outliers))

    def check(config, runs):
        single = run(config, jax.devices()[:1], (1, 1))
        for shape, fsdp in runs:
            sharded = run(config, jax.devices(), shape, fsdp)
            np.testing.assert_allclose(single[0], sharded[0], rtol=1e-5)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), single[1], sharded[1])
        return single[0]

    # SGD: updates are linear in the gradient, so summation order cannot flip an update's sign
    # the way Adam's first normalised step can; equality is then meaningful to float tolerance.
    unet = tiny_train_config(loss="tversky+boundary+focal+cldice", **{{
        "train.batch_size": 8, "optim.name": "sgd", "optim.lr": 0.1, "loss.params.cldice.iterations": 3,
        "outliers.enabled": True, "outliers.start_step": 1, "outliers.buffer_size": 32,
        "outliers.max_per_class": 8, "outliers.num_candidates": 500, "outliers.num_selected": 50}})
    unet_losses = check(unet, [((8, 1), False), ((8, 1), True), ((4, 2), False)])
    from configs import morphoseg
    transunet = morphoseg.get_config("quick")  # attention and MLP weights split over 'model'
    transunet.train.batch_size = 8
    transunet.model.dropout_rate = 0.0
    transunet.outliers.start_step = 1
    transunet_losses = check(transunet, [((4, 2), False)])
    print("SHARDED_OK", unet_losses, transunet_losses)
""")


def test_meshes_of_eight_fake_devices_match_one_device():
    script = SHARDED_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert "SHARDED_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]


def test_two_processes_on_loopback_train_and_write_one_checkpoint(tmp_path):
    with socket.socket() as probe:  # a free loopback port for the coordinator
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    overrides = ["--config.data.synthetic.num_images=12", "--config.data.synthetic.image_size=(64, 64)",
                 "--config.data.crop_size=(32, 32)", "--config.model.width=4", "--config.train.batch_size=4",
                 "--config.train.num_steps=3", "--config.train.eval_every=3", "--config.train.num_preview=1",
                 "--config.train.log_every=1"]
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen(
        [sys.executable, str(REPO / "launch" / "train.py"), "--config=configs/imsahlo.py:quick,model=unet,loss=dice+bce",
         f"--workdir={tmp_path}", "--multihost", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={index}", *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for index in range(2)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    assert [p.name for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()] == ["3"]
    records = _train_records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]  # written once, by process 0
