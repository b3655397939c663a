"""Experiment runner and results report on the 2-run ``tiny`` grid of configs/experiments.py."""

import dataclasses
import json
import math
import shlex
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO
from neuroseg_jax import experiments
from neuroseg_jax.experiments import monai_reference, runner

GRIDS_MODULE = experiments.load_module(REPO / "configs" / "experiments.py")
TINY = GRIDS_MODULE.GRIDS["tiny"]
REQUIRED_KEYS = {"schema", "set", "row", "seed", "grid", "trainer", "config_flags", "commands", "git", "workdir",
                 "wall_s", "resumed_from_step", "best", "test", "metric_keys", "config"}
POOLED_KEYS = {"dice", "iou", "precision", "recall", "coco_map", "instance_map", "f1@0.50", "count_error"}
PER_IMAGE_KEYS = {"dice", "iou", "precision", "recall", "hd95", "cldice", "betti0_error", "betti1_error",
                  "coco_map", "f1@0.50", "abs_count_error"}


def _broken_run():
    """The tiny row with a config key that does not exist: fails before training."""
    good = experiments.expand_grid("tiny", TINY)[0]
    return dataclasses.replace(good, row="broken", overrides={**good.overrides, "model.no_such_key": 1})


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    runs = experiments.expand_grid("tiny", TINY)
    lines = []
    report = experiments.run_experiments([_broken_run(), *runs], results_dir=root / "results",
                                         work_dir=root / "runs", log=lines.append)
    return root, runs, report, lines


def _parse_config_flags(argv):
    """A run's --config flags parsed by absl config_flags, as launch/train.py parses them."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv, lock_config=False)
    flag_values(argv)
    return flag_values.config


def _as_json(value):
    return json.loads(json.dumps(value))


def test_runner_writes_one_metrics_json_per_run_and_reports_the_failure(tiny_results, monkeypatch):
    root, runs, report, lines = tiny_results
    assert report.written == [f"synthetic/{run.name}" for run in runs]
    assert report.failed == ["synthetic/broken-seed0"] and not report.ok
    assert any("broken-seed0: FAILED" in line and "no_such_key" in line for line in lines)
    assert not (root / "results" / "synthetic" / "broken-seed0").exists()

    monkeypatch.chdir(REPO)  # the recorded commands run from the repository root
    for run in runs:
        record = json.loads(run.result_path(root / "results").read_text())
        assert REQUIRED_KEYS <= set(record)
        assert (record["set"], record["row"], record["seed"], record["trainer"]) == (
            "synthetic", "unet_tiny", run.seed, "neuroseg_jax")
        assert len(record["git"]["commit"]) == 40 and isinstance(record["git"]["dirty"], bool)
        assert record["wall_s"]["train"] > 0 and record["wall_s"]["eval"] > 0

        # The recorded train command, parsed as launch/train.py parses it, gives the recorded config.
        train_argv = shlex.split(record["commands"]["train"])
        assert train_argv[:2] == ["python", "launch/train.py"]
        assert train_argv[-1] == f"--workdir={run.workdir(root / 'runs')}"
        parsed = _parse_config_flags(["train", *train_argv[2:-1]])
        assert parsed.seed == run.seed and parsed.train.num_steps == 4 and parsed.data.crop_size == (32, 32)
        assert _as_json(parsed.to_dict()) == record["config"]
        assert shlex.split(record["commands"]["evaluate"])[2:] == [
            f"--workdir={run.workdir(root / 'runs')}", "--checkpoint=best", "--split=test", "--tta=0"]

        # Best step: the evaluation with the lowest validation loss in the run's metrics.jsonl.
        val = [json.loads(line) for line in (run.workdir(root / "runs") / "metrics.jsonl").read_text().splitlines()]
        val = [r for r in val if r["split"] == "val"]
        assert [r["step"] for r in val] == [2, 4]
        best = min(val, key=lambda r: r["loss"])
        assert record["best"]["step"] == best["step"]
        assert record["best"]["val"]["loss"] == pytest.approx(best["loss"])

        # The held-out test split (3 of the 12 synthetic images), not the validation split.
        test = record["test"]
        test_names = _split_names(parsed, "test")
        assert test["images"] == test_names and test["num_images"] == 3
        assert set(_split_names(parsed, "val")).isdisjoint(test_names)
        assert (test["split"], test["checkpoint"], test["tta_n"]) == ("test", "best", 0)
        assert test["version"] == record["test_val_threshold"]["version"] == runner.EVALUATION_VERSION
        assert set(test["variants"]) == {"raw", "post"}  # the quick config post-processes
        for variant in test["variants"].values():
            assert POOLED_KEYS <= set(variant["pooled"]) and PER_IMAGE_KEYS <= set(variant["per_image_mean"])
            assert len(variant["per_image_dice"]) == 3
            assert np.mean(variant["per_image_dice"]) == pytest.approx(variant["per_image_mean"]["dice"])
        assert "coco_map" in record["metric_keys"]["ap@0.5:0.95"]

        # The same test images again at the threshold of highest pooled validation Dice.
        assert test["threshold"] == 0.5 and test["threshold_source"] == "config"
        at_val = record["test_val_threshold"]
        choice = at_val["threshold_choice"]
        assert at_val["images"] == test_names and at_val["threshold_source"] == "validation"
        assert at_val["threshold"] == choice["threshold"] and choice["split"] == "val"
        assert choice["step"] == record["best"]["step"]
        assert choice["val_dice"] == max(choice["candidates"].values()) >= choice["val_dice_at_0.5"]


def _split_names(config, split):
    from neuroseg_jax import data

    return data.build_dataset(config.data, split).names


def test_second_invocation_skips_finished_runs_and_resumes_unfinished(tiny_results):
    root, runs, _, _ = tiny_results
    first, second = (run.result_path(root / "results") for run in runs)
    first_text, second_before = first.read_text(), json.loads(second.read_text())
    second.unlink()  # trained to its last step, but without results: resumes, trains nothing, evaluates
    lines = []
    report = experiments.run_experiments(runs, results_dir=root / "results", work_dir=root / "runs", log=lines.append)
    assert report.skipped == [f"synthetic/{runs[0].name}"] and report.written == [f"synthetic/{runs[1].name}"]
    assert report.ok and first.read_text() == first_text
    resumed = json.loads(second.read_text())
    assert resumed["resumed_from_step"] == 4
    assert resumed["wall_s"]["train"] > second_before["wall_s"]["train"]  # both invocations' training time
    report = experiments.run_experiments(runs, results_dir=root / "results", work_dir=root / "runs", log=lines.append)
    assert report.skipped == [f"synthetic/{run.name}" for run in runs] and not report.written


def _leaves(tree, prefix=""):
    """{'a.b[0]': value} of a JSON tree, for comparisons with a tolerance."""
    if isinstance(tree, dict):
        return {key: value for name, child in tree.items() for key, value in _leaves(child, f"{prefix}.{name}").items()}
    if isinstance(tree, list):
        return {key: value for index, child in enumerate(tree)
                for key, value in _leaves(child, f"{prefix}[{index}]").items()}
    return {prefix: tree}


def test_a_finished_run_missing_an_evaluation_gets_it_from_its_best_checkpoint(tiny_results):
    root, runs, _, _ = tiny_results
    path = runs[0].result_path(root / "results")
    complete = json.loads(path.read_text())
    older = {key: value for key, value in complete.items() if key != "test_val_threshold"}
    path.write_text(json.dumps(older))  # as an older runner wrote it
    lines = []
    report = experiments.run_experiments(runs[:1], results_dir=root / "results", work_dir=root / "runs",
                                         log=lines.append)
    assert report.ok and report.skipped == [f"synthetic/{runs[0].name}"] and not report.written
    assert any("evaluated again: ['test_val_threshold']" in line for line in lines)
    completed = json.loads(path.read_text())
    assert json.dumps({key: value for key, value in completed.items() if key != "test_val_threshold"},
                      sort_keys=True) == json.dumps(older, sort_keys=True)
    added = completed.pop("test_val_threshold")
    assert len(added.pop("git")["commit"]) == 40 and added.pop("eval_s") > 0
    # Same checkpoint, same stored threshold: the same metrics (distances to float rounding).
    got, expected = _leaves(added), _leaves(complete["test_val_threshold"])
    assert set(got) == set(expected)
    numbers = [key for key, value in expected.items() if isinstance(value, float)]
    assert [got[key] for key in numbers] == pytest.approx([expected[key] for key in numbers], rel=1e-6, nan_ok=True)
    assert {key: got[key] for key in set(got) - set(numbers)} == {key: expected[key] for key in set(got) - set(numbers)}

    # An evaluation of an older version of the scoring (no version field) is redone too.
    old_scoring = {**complete, "test": {k: v for k, v in complete["test"].items() if k != "version"}}
    path.write_text(json.dumps(old_scoring))
    report = experiments.run_experiments(runs[:1], results_dir=root / "results", work_dir=root / "runs",
                                         log=lines.append)
    assert report.ok and "evaluated again: ['test']" in lines[-2]
    redone = json.loads(path.read_text())
    assert redone["test"]["version"] == runner.EVALUATION_VERSION and "git" in redone["test"]
    assert "git" not in redone["test_val_threshold"]  # current: left alone

    path.write_text(json.dumps(older))
    workdir = runs[0].workdir(root / "runs")
    hidden = workdir.with_name(workdir.name + "-moved")
    workdir.rename(hidden)
    try:
        report = experiments.run_experiments(runs[:1], results_dir=root / "results", work_dir=root / "runs",
                                             log=lines.append)
    finally:
        hidden.rename(workdir)
        path.write_text(json.dumps(complete))
    assert report.failed == [f"synthetic/{runs[0].name}"] and "holds no best checkpoint" in lines[-2]


def _table_rows(section: str, row: str) -> list[list[str]]:
    """The row's cells in each table of the section, in order."""
    lines = [line for line in section.splitlines() if line.startswith(f"| {row} |")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_report_shows_mean_and_sample_sd_over_seeds(tiny_results, tmp_path):
    root, runs, _, _ = tiny_results
    records = [json.loads(run.result_path(root / "results").read_text()) for run in runs]
    grid = {"tiny": [*TINY, ("synthetic", "never_trained", "configs/imsahlo.py:quick", {}, (0, 1, 2))],
            "later": [("synthetic", "not_yet", "configs/imsahlo.py:quick", {}, (0,))]}
    output = tmp_path / "section.md"
    written = experiments.write_report(grid, root / "results", output=output)
    section = output.read_text()

    def by_hand(values, decimals):  # two seeds: sample sd = |a - b| / sqrt(2)
        a, b = values
        return f"{(a + b) / 2:.{decimals}f} ± {abs(a - b) / math.sqrt(2):.{decimals}f}"

    configured, at_val = _table_rows(section, "unet_tiny")  # configured and validation-chosen threshold
    for evaluation, cells in (("test", configured), ("test_val_threshold", at_val)):
        raw = [record[evaluation]["variants"]["raw"] for record in records]
        assert cells[1] == "2 of 2"
        assert cells[2] == by_hand([record[evaluation]["threshold"] for record in records], 2)
        assert cells[3] == by_hand([r["per_image_mean"]["dice"] for r in raw], 3)
        assert cells[4] == by_hand([r["pooled"]["dice"] for r in raw], 3)
        assert cells[5] == by_hand([r["pooled"]["precision"] for r in raw], 3)
        assert cells[7] == by_hand([r["per_image_mean"]["hd95"] for r in raw], 1)
        assert cells[10] == by_hand([r["pooled"]["coco_map"] for r in raw], 3)
        assert cells[11] == by_hand([r["pooled"]["instance_map"] for r in raw], 3)
        assert cells[14] == by_hand([r["wall_s"]["train"] / 60 for r in records], 1)
        assert cells[15] == records[0]["git"]["commit"][:7] + ("+dirty" if records[0]["git"]["dirty"] else "")
    assert section.index("foreground threshold of highest pooled Dice on the validation") < section.rindex("unet_tiny")
    (missing,) = _table_rows(section, "never_trained")  # in the first table only
    assert missing[1:3] == ["0 of 3", experiments.report.NOT_RUN] and not any(missing[3:])
    # A table none of whose rows has run is named, not drawn.
    assert "Tables with no run yet: later on synthetic (`--grid=later --sets=synthetic`)." in section
    assert "#### later" not in section and not _table_rows(section, "not_yet")
    assert (root / "results" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["runs"] == 2


def test_report_replaces_only_the_marked_readme_section(tiny_results, tmp_path):
    root, _, _, _ = tiny_results
    readme = tmp_path / "README.md"
    before = f"# Title\n\nintro\n{experiments.BEGIN_MARKER}\nold table\n{experiments.END_MARKER}\n\n## After\ntext\n"
    readme.write_text(before)
    experiments.write_report({"tiny": TINY}, root / "results", readme=readme)
    text = readme.read_text()
    assert text.startswith(f"# Title\n\nintro\n{experiments.BEGIN_MARKER}\n")
    assert text.endswith(f"{experiments.END_MARKER}\n\n## After\ntext\n")
    assert "old table" not in text and "| unet_tiny | 2 of 2 |" in text
    experiments.write_report({"tiny": TINY}, root / "results", readme=readme)
    assert readme.read_text() == text  # rendering again changes nothing

    unmarked = tmp_path / "NO_MARKERS.md"
    unmarked.write_text("# no markers\n")
    with pytest.raises(ValueError, match="NO_MARKERS.md.*results:begin"):
        experiments.write_report({"tiny": TINY}, root / "results", readme=unmarked)
    assert unmarked.read_text() == "# no markers\n"


def test_cli_dry_run_lists_runs_and_a_failing_grid_exits_nonzero(tmp_path):
    grids_file = tmp_path / "grids.py"
    broken = _broken_run()
    grids_file.write_text(f"GRIDS = {{'bad': [('synthetic', 'broken', {broken.config!r}, "
                          f"{dict(broken.overrides)!r}, (0,))]}}\n")
    common = [sys.executable, "launch/run_experiments.py", f"--grids_file={grids_file}", "--grid=bad",
              f"--results_dir={tmp_path / 'results'}", f"--work_dir={tmp_path / 'runs'}"]
    dry = subprocess.run([*common, "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "synthetic/broken-seed0 [to do; CONFIG ERROR" in dry.stdout and "no_such_key" in dry.stdout
    assert "train: python launch/train.py --config=configs/imsahlo.py:" in dry.stdout
    failed = subprocess.run(common, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and "1 run(s) failed: synthetic/broken-seed0" in failed.stderr
    assert not (tmp_path / "results").exists()


def test_grids_agree_on_shared_rows_and_filters_reject_typos():
    experiments.check_grids(GRIDS_MODULE.GRIDS)
    imsahlo = [run for grid in ("table2", "table3", "table4") for run in
               experiments.expand_grid(grid, GRIDS_MODULE.GRIDS[grid]) if (run.set, run.row) == ("pfc_pn", "imsahlo")]
    assert len(imsahlo) == 9 and len({(run.config, tuple(run.overrides.items())) for run in imsahlo}) == 1
    conflicting = {"a": [("pfc_pn", "unet", "configs/imsahlo.py:model=unet", {}, (0,))],
                   "b": [("pfc_pn", "unet", "configs/imsahlo.py:model=unet", {"model.width": 8}, (0,))]}
    with pytest.raises(ValueError, match="row 'unet' of set 'pfc_pn' differs between grids 'a' and 'b'"):
        experiments.check_grids(conflicting)
    with pytest.raises(ValueError, match="seeds field"):
        experiments.expand_grid("x", [("pfc_pn", "unet", "configs/imsahlo.py", {"seed": 1}, (0,))])
    runs = experiments.expand_grid("table2", GRIDS_MODULE.GRIDS["table2"])
    with pytest.raises(ValueError, match="unknown row.*'unte'"):
        experiments.select_runs(runs, rows=["unte"])
    selected = experiments.select_runs(runs, sets=["bbbc039"], rows=["unet", "imsahlo"], seeds=[1])
    assert [(run.set, run.name) for run in selected] == [("bbbc039", "unet-seed1"), ("bbbc039", "imsahlo-seed1")]


def test_table4_rows_leave_out_one_hybrid_term_each():
    rows = {run.row: experiments.build_config(run) for run in
            experiments.expand_grid("table4", GRIDS_MODULE.GRIDS["table4"]) if run.seed == 0}
    full = dict(rows.pop("imsahlo").loss.terms)
    assert full == pytest.approx({"tversky": 0.4, "boundary": 0.2, "focal": 0.3, "cldice": 0.1})  # eq. 3
    for term, row in (("tversky", "no_tversky"), ("boundary", "no_contour"), ("focal", "no_focal"),
                      ("cldice", "no_cldice")):
        kept = {name: weight for name, weight in full.items() if name != term}
        total = sum(kept.values())
        assert dict(rows[f"imsahlo-{row}"].loss.terms) == pytest.approx({k: w / total for k, w in kept.items()})
    assert dict(rows["imsahlo-bce"].loss.terms) == {"bce": 1.0}
    assert dict(rows["imsahlo-dice"].loss.terms) == {"dice": 1.0}


def test_reference_row_is_skipped_without_torch(tmp_path, monkeypatch):
    def unavailable():
        raise experiments.ReferenceUnavailable("monai_basicunet_dicece needs torch and monai (test)")

    monkeypatch.setattr(monai_reference, "_import_torch_monai", unavailable)
    run = dataclasses.replace(experiments.expand_grid("tiny", TINY)[0], row=monai_reference.ROW)
    lines = []
    report = experiments.run_experiments([run], results_dir=tmp_path / "results", work_dir=tmp_path / "runs",
                                         log=lines.append)
    assert report.ok and report.unavailable == [f"synthetic/{run.name}"] and not report.written
    assert any("skipped, monai_basicunet_dicece needs torch" in line for line in lines)
    assert not (tmp_path / "results").exists()


def test_monai_reference_row_trains_on_our_batches_and_is_scored_by_our_metrics(tmp_path):
    pytest.importorskip("torch", reason="the MONAI reference row needs torch (pip install torch)")
    pytest.importorskip("monai", reason="the MONAI reference row needs monai (pip install monai)")
    tiny = experiments.expand_grid("tiny", TINY)[0]
    run = dataclasses.replace(tiny, row=monai_reference.ROW,
                              overrides={**tiny.overrides, "train.num_steps": 2, "train.eval_every": 1})
    report = experiments.run_experiments([run], results_dir=tmp_path / "results", work_dir=tmp_path / "runs",
                                         log=lambda line: None)
    assert report.written == [f"synthetic/{run.name}"], report
    record = json.loads(run.result_path(tmp_path / "results").read_text())
    assert record["trainer"] == monai_reference.ROW and set(record["commands"]) == {"run"}
    assert record["best"]["step"] in (1, 2) and math.isfinite(record["best"]["val"]["loss"])
    assert (run.workdir(tmp_path / "runs") / "best.pt").exists()
    curve = [json.loads(line) for line in (run.workdir(tmp_path / "runs") / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in curve] == [(1, "train"), (1, "val"), (2, "train"), (2, "val")]
    best_val = [r for r in curve if r["split"] == "val" and r["step"] == record["best"]["step"]][0]
    assert best_val["loss"] == pytest.approx(record["best"]["val"]["loss"])
    raw = record["test"]["variants"]["raw"]
    assert record["test"]["images"] == _split_names(experiments.build_config(run), "test")
    assert len(raw["per_image_dice"]) == 3 and 0.0 <= raw["pooled"]["dice"] <= 1.0
    assert np.mean(raw["per_image_dice"]) == pytest.approx(raw["per_image_mean"]["dice"])
    assert record["test"]["threshold_source"] == "config"
    at_val = record["test_val_threshold"]
    assert at_val["threshold_source"] == "validation" and at_val["images"] == record["test"]["images"]
    assert at_val["threshold"] == at_val["threshold_choice"]["threshold"]


def test_a_run_stopped_before_its_last_step_writes_nothing_and_stops_the_grid(tiny_results, tmp_path, monkeypatch):
    root, runs, _, _ = tiny_results
    finished = experiments.build_config(runs[0])
    runner._check_finished(finished, runs[0].workdir(root / "runs"))  # 4 of 4 steps: finished
    longer = experiments.build_config(dataclasses.replace(runs[0], overrides={**runs[0].overrides,
                                                                               "train.num_steps": 8}))
    with pytest.raises(runner.TrainingStopped, match="stopped at step 4 of 8"):
        runner._check_finished(longer, runs[0].workdir(root / "runs"))

    attempted = []

    def stopped(config, workdir):
        attempted.append(workdir)
        raise runner.TrainingStopped(f"{workdir}: training stopped at step 2 of 4")

    monkeypatch.setattr(runner, "train_and_evaluate_jax", stopped)
    lines = []
    report = experiments.run_experiments(runs, results_dir=tmp_path / "results", work_dir=tmp_path / "runs",
                                         log=lines.append)
    assert len(attempted) == 1 and report.failed == [f"synthetic/{runs[0].name}"] and not report.written
    assert any("stopping the grid" in line for line in lines)
    assert not (tmp_path / "results").exists()


def _transunet_sizes_declared(config_spec: str) -> bool:
    module = experiments.load_module(REPO / config_spec.partition(":")[0])
    return "hidden_size" in module.get_config(config_spec.partition(":")[2]).model


@pytest.mark.parametrize("grid", sorted(GRIDS_MODULE.GRIDS))
def test_every_run_of_every_grid_builds_its_config(grid):
    """Typos in a grid, or a config that stops declaring a key a grid sets, fail here, not hours into a grid."""
    blocked = []
    for run in experiments.expand_grid(grid, GRIDS_MODULE.GRIDS[grid]):
        if "model.hidden_size" in run.overrides and not _transunet_sizes_declared(run.config):
            blocked.append(f"{run.set}/{run.name}")
            continue
        config = experiments.build_config(run)
        assert config.seed == run.seed
        for key, value in run.overrides.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (run.set, run.name, key)
    if blocked:
        pytest.skip(f"{blocked}: their config's model declares no TransUNet sizes (model.hidden_size, num_layers, "
                    "num_heads, mlp_dim) for the CPU-sized transunet_small overrides; the other runs build")


def test_git_state_is_dirty_for_changed_code_but_not_for_the_runners_results(tmp_path):
    from neuroseg_jax.train.loop import git_state

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "results" / "metrics.json").write_text('{"a": 1}')  # the runner's own output
    assert git_state(tmp_path / "results") == clean  # from a subfolder too
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": clean["commit"], "dirty": True}
    assert git_state(tmp_path.parent / "nowhere-in-git")["commit"] == "unknown"


def test_a_note_names_every_row_it_applies_to_once():
    text = experiments.report._notes_text(
        {"three_class": "A", "boundary2": "B", "unet": "C"},
        ["unet", "unet-three_class", "imsahlo-three_class", "unet-three_class-boundary2"])
    assert text == ("- unet, unet-three_class, unet-three_class-boundary2: C\n"
                    "- unet-three_class, imsahlo-three_class, unet-three_class-boundary2: A\n"
                    "- unet-three_class-boundary2: B\n")
    assert experiments.report._notes_text({"x": "never"}, ["unet"]) == ""
