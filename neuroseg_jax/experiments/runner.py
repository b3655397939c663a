"""Experiment runner: train every run of a grid, evaluate its best checkpoint on the protocol's
held-out 'test' split, and write one small ``results/<set>/<row>-seed<N>/metrics.json`` per run.

Each run's best checkpoint is evaluated at the fixed threshold config.inference.threshold ('test')
and, for binary masks, at the threshold of highest validation Dice ('test_val_threshold'). A run
whose metrics.json exists is not trained again, so an interrupted grid continues where it stopped;
an evaluation its JSON lacks or holds in an older EVALUATION_VERSION is redone from the workdir's
best checkpoint. A run interrupted mid-training resumes from its workdir's latest checkpoint
(``train_and_evaluate`` resumes). metrics.json is written last and atomically, so it exists only for
a finished run: a run that fails leaves nothing under results/, and the runner goes on to the next
run.

Configs are built by the same absl ``config_flags`` parsing ``launch/train.py`` does, from the very
flags recorded in metrics.json, so the recorded command reproduces the recorded config.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shlex
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from neuroseg_jax import inference, train
from neuroseg_jax.data.config import instance_mode
from neuroseg_jax.train import builders, loop
from neuroseg_jax.train.checkpoint import Checkpoints
from neuroseg_jax.train.metrics_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
SCHEMA_VERSION = 1
# How a test evaluation scores objects; an evaluation of an older version is redone from the run's best
# checkpoint. 1: objects matched to the target mask's connected components; 2: matched to the
# dataset's instance labels where it has them (touching nuclei are separate targets).
EVALUATION_VERSION = 2
TEST_SPLIT = "test"
# Where each headline metric of metrics.json lives, for readers of the JSON (see report.COLUMNS).
METRIC_KEYS = {
    "ap@0.5:0.95": "pooled.coco_map: COCO-style ranked average precision of 8-connected objects (scored "
                   "by mean probability, 101-point PR area), averaged over IoU 0.50:0.05:0.95",
    "ap_dsb@0.5:0.95": "pooled.instance_map: score-free tp/(tp+fp+fn) (2018 Data Science Bowl) averaged "
                       "over IoU 0.50:0.05:0.95",
    "f1@0.5": "pooled.f1@0.50: object F1 at IoU 0.5",
    "hd95": "per_image_mean.hd95: MONAI convention, in pixels",
    "count_error": "per_image_mean.abs_count_error: |objects predicted - objects true| per image",
}
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclasses.dataclass(frozen=True)
class ExperimentRun:
    """One seed of one row of a grid."""
    grid: str
    set: str
    row: str
    config: str  # configs/FILE.py[:ARGS]
    overrides: Mapping[str, Any]
    seed: int

    @property
    def name(self) -> str:
        return f"{self.row}-seed{self.seed}"

    def result_path(self, results_dir: str | os.PathLike) -> pathlib.Path:
        return pathlib.Path(results_dir) / self.set / self.name / "metrics.json"

    def workdir(self, work_dir: str | os.PathLike) -> pathlib.Path:
        return pathlib.Path(work_dir) / self.set / self.name

    def config_flags(self) -> list[str]:
        """The ``--config`` flags of ``launch/train.py`` that build this run's config."""
        return [f"--config={self.config}", f"--config.seed={self.seed}",
                *(f"--config.{key}={format_flag_value(value)}" for key, value in self.overrides.items())]


def format_flag_value(value: Any) -> str:
    """A value as ``config_flags`` parses it back: tuples as '(a, b)', the rest as str()."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def load_module(path: str | os.PathLike):
    """A Python file (``configs/experiments.py``) as a module; relative paths from the working
    directory, else from the repository root."""
    path = _resolve(path)
    spec = importlib.util.spec_from_file_location(f"_experiments_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resolve(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if path.is_absolute() or path.exists():
        return path
    if (REPO / path).exists():
        return REPO / path
    raise FileNotFoundError(f"{path} not found in {pathlib.Path.cwd()} nor in {REPO}")


def expand_grid(grid_name: str, grid: Sequence[Sequence]) -> list[ExperimentRun]:
    """``[(set, row, config, overrides, seeds), ...]`` -> one ExperimentRun per seed."""
    runs = []
    for entry in grid:
        if len(entry) != 5:
            raise ValueError(f"grid {grid_name!r}: a run is (set, row, config, overrides, seeds), got {entry!r}")
        set_name, row, config, overrides, seeds = entry
        for label, value in (("set", set_name), ("row", row)):
            if not isinstance(value, str) or not _NAME.match(value):
                raise ValueError(f"grid {grid_name!r}: {label} {value!r} must be a non-empty name of "
                                 "letters, digits and _ . + -")
        if "seed" in overrides:
            raise ValueError(f"grid {grid_name!r}, row {row!r}: give seeds in the seeds field, not as an override")
        if not seeds:
            raise ValueError(f"grid {grid_name!r}, row {row!r}: no seeds")
        runs.extend(ExperimentRun(grid_name, set_name, row, config, dict(overrides), int(seed)) for seed in seeds)
    return runs


def check_grids(grids: Mapping[str, Sequence]) -> None:
    """A (set, row) shared by several grids must be the same experiment in all of them."""
    seen: dict[tuple[str, str], tuple[str, str, dict]] = {}
    for grid_name, grid in grids.items():
        for run in expand_grid(grid_name, grid):
            key = (run.set, run.row)
            definition = (run.config, dict(run.overrides))
            if key in seen and seen[key][1:] != definition:
                raise ValueError(f"row {run.row!r} of set {run.set!r} differs between grids {seen[key][0]!r} "
                                 f"and {grid_name!r}: {seen[key][1:]} vs {definition}")
            seen.setdefault(key, (grid_name, *definition))


def select_runs(runs: Sequence[ExperimentRun], *, sets: Sequence[str] | None = None,
                rows: Sequence[str] | None = None, seeds: Sequence[int] | None = None) -> list[ExperimentRun]:
    """The runs whose set, row and seed are among the given ones (None: any); a name that matches
    no run of the grid is an error (a typo would otherwise run nothing)."""
    for label, wanted, known in (("set", sets, {r.set for r in runs}), ("row", rows, {r.row for r in runs}),
                                 ("seed", seeds, {r.seed for r in runs})):
        unknown = sorted(set(wanted or ()) - known, key=str)
        if unknown:
            raise ValueError(f"unknown {label}(s) {unknown}; this grid has {sorted(known, key=str)}")
    return [run for run in runs if (not sets or run.set in sets) and (not rows or run.row in rows)
            and (not seeds or run.seed in seeds)]


def build_config(run: ExperimentRun) -> ml_collections.ConfigDict:
    """The run's config, parsed from its ``--config`` flags exactly as ``launch/train.py`` does."""
    from absl import flags
    from ml_collections import config_flags

    path, sep, arg = run.config.partition(":")
    argv = ["run_experiments", f"--config={_resolve(path)}{sep}{arg}", *run.config_flags()[1:]]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=flag_values,
                                    sys_argv=argv, lock_config=False)
    try:
        flag_values(argv)
    except Exception as error:  # absl and config_flags raise several types; say which run and flags
        raise ValueError(f"{run.set}/{run.name}: the config flags {run.config_flags()} do not build a config: "
                         f"{type(error).__name__}: {error}") from error
    return flag_values.config


def commands(run: ExperimentRun, results_dir, work_dir, *, reference: bool) -> dict[str, str]:
    """Shell commands, from the repository root, that reproduce the run."""
    workdir = run.workdir(work_dir)
    runner = shlex.join(["python", "launch/run_experiments.py", f"--grid={run.grid}", f"--sets={run.set}",
                         f"--rows={run.row}", f"--seeds={run.seed}", f"--results_dir={results_dir}",
                         f"--work_dir={work_dir}"])
    if reference:
        return {"run": runner}
    return {"train": shlex.join(["python", "launch/train.py", *run.config_flags(), f"--workdir={workdir}"]),
            "evaluate": shlex.join(["python", "launch/evaluate.py", f"--workdir={workdir}", "--checkpoint=best",
                                    f"--split={TEST_SPLIT}", "--tta=0"]),
            "run": runner}


def _latest_checkpoint_step(workdir: pathlib.Path) -> int | None:
    """Step the training will resume from: orbax names each saved step's folder by its number."""
    steps = [int(p.name) for p in (workdir / "checkpoints" / "latest").glob("*") if p.name.isdigit()]
    return max(steps) if steps else None


def _val_metrics_at(workdir: pathlib.Path, step: int) -> dict[str, float]:
    records = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "val" and r["step"] == step]
    return {k: v for k, v in records[-1].items() if k not in ("step", "split")} if records else {}


class TrainingStopped(RuntimeError):
    """Training returned before its last step (a SIGTERM asked it to save and leave): the grid stops
    there, and running it again resumes this run."""


def _check_finished(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    checkpoints = Checkpoints(workdir)
    try:
        meta = checkpoints.latest_meta()
    finally:
        checkpoints.close()
    total_steps = builders.step_counts(config)[1]
    if meta["step"] < total_steps and not meta["plateau"]["should_stop"]:
        raise TrainingStopped(f"{workdir}: training stopped at step {meta['step']} of {total_steps}")


def evaluate_best(workdir: pathlib.Path, evaluation: str) -> dict[str, Any]:
    """One evaluation of the best checkpoint on the test split: 'test' at the run's fixed
    config.inference.threshold, 'test_val_threshold' at the threshold of highest validation Dice
    (`inference.choose_threshold`, stored with the checkpoint), whatever
    config.inference.choose_threshold says, so that every row's two evaluations mean the same."""
    val_threshold = evaluation == "test_val_threshold"
    suffix = "-val_threshold" if val_threshold else ""
    results = inference.evaluate_run(workdir, checkpoint="best", split=TEST_SPLIT, tta_n=0, progress=False,
                                     threshold="val" if val_threshold else "config",
                                     output_dir=workdir / "eval" / f"best-{TEST_SPLIT}{suffix}")
    if val_threshold:
        results["threshold_choice"] = json.loads(
            inference.threshold_path(workdir, "best", results["step"]).read_text())
    return {"results": results, "output_dir": results["output_dir"]}


def evaluations_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The test evaluations a run's JSON holds: a validation-chosen threshold only for binary masks
    (instance mode decodes objects with config.instances' own thresholds)."""
    return ("test",) if instance_mode(config.get("instances")) == "three_class" else ("test", "test_val_threshold")


def train_and_evaluate_jax(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
    """Train (or resume) in ``workdir``, then evaluate the best checkpoint on the test split."""
    resumed_from = _latest_checkpoint_step(workdir)
    # Training time summed over the invocations that trained this run, so a resumed run reports its
    # whole training (an invocation killed without saving loses its share).
    times = workdir / "train_wall_s.json"
    earlier_s = json.loads(times.read_text())["train_s"] if times.exists() else 0.0
    start = time.perf_counter()
    train.train_and_evaluate(config, workdir)
    train_s = earlier_s + time.perf_counter() - start
    times.write_text(json.dumps({"train_s": train_s}))
    _check_finished(config, workdir)
    start = time.perf_counter()
    evaluations = {name: evaluate_best(workdir, name) for name in evaluations_of(config)}
    step = evaluations["test"]["results"]["step"]
    return {"evaluations": evaluations, "train_s": train_s, "eval_s": time.perf_counter() - start,
            "resumed_from_step": resumed_from, "best": {"step": step, "val": _val_metrics_at(workdir, step)}}


class ReferenceUnavailable(RuntimeError):
    """A reference row's framework is not installed: the row is skipped, not failed."""


def _reference_rows() -> dict[str, Callable[[ml_collections.ConfigDict, pathlib.Path], dict]]:
    from neuroseg_jax.experiments import monai_reference

    return {monai_reference.ROW: monai_reference.train_and_evaluate_reference}


def compact_evaluation(results: Mapping[str, Any], output_dir: str | os.PathLike) -> dict[str, Any]:
    """``evaluate_dataset``'s aggregates of every variant plus the per-image Dice (from its
    per_image.csv), without the per-image rows of every metric."""
    with open(pathlib.Path(output_dir) / "per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    variants = {}
    for variant, result in results["variants"].items():
        variant_rows = [row for row in rows if row["variant"] == variant]
        variants[variant] = {
            **{key: result[key] for key in ("pooled", "per_image_mean", "image_level", "hd95_empty_images",
                                            "num_images")},
            "per_image_dice": [float(row["dice"]) for row in variant_rows],
        }
    first = next(iter(results["variants"]))
    compact = {"version": EVALUATION_VERSION, "split": TEST_SPLIT, "checkpoint": "best", "tta_n": 0,
               "num_images": results["num_images"],
               # Foreground threshold of the masks and where it came from ('config' or 'validation').
               "threshold": results.get("threshold", 0.5),
               "threshold_source": results.get("threshold_source", "config"),
               "images": [row["name"] for row in rows if row["variant"] == first], "variants": variants}
    if "threshold_choice" in results:  # validation Dice of every candidate threshold
        compact["threshold_choice"] = results["threshold_choice"]
    return compact


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


def run_one(run: ExperimentRun, results_dir, work_dir) -> pathlib.Path:
    """Train and evaluate one run and write its metrics.json; returns that path."""
    reference = _reference_rows().get(run.row)
    config = build_config(run)
    git = loop.git_state()  # the code the run starts with
    workdir = run.workdir(work_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    outcome = (reference or train_and_evaluate_jax)(config, workdir)
    record = {
        "schema": SCHEMA_VERSION,
        "set": run.set, "row": run.row, "seed": run.seed, "grid": run.grid,
        "trainer": run.row if reference else "neuroseg_jax",
        "config_flags": run.config_flags(),
        "commands": commands(run, results_dir, work_dir, reference=reference is not None),
        "git": git,
        "workdir": str(workdir),
        "wall_s": {"train": outcome["train_s"], "eval": outcome["eval_s"]},
        "resumed_from_step": outcome.get("resumed_from_step"),
        "best": outcome["best"],
        **{name: compact_evaluation(evaluation["results"], evaluation["output_dir"])
           for name, evaluation in outcome["evaluations"].items()},
        "metric_keys": METRIC_KEYS,
        "config": config.to_dict(),
    }
    return _write_record(run.result_path(results_dir), record)


def _write_record(path: pathlib.Path, record: Mapping[str, Any]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1, default=_json_default))
    partial.replace(path)
    return path


def evaluations_to_redo(record: Mapping[str, Any]) -> list[str]:
    """Evaluations a finished JAX run's metrics.json lacks or holds in an older EVALUATION_VERSION
    (written by an older runner). Reference rows are scored by their own trainer: rerun them instead."""
    if record["row"] in _reference_rows():
        return []
    return [name for name in evaluations_of(ml_collections.ConfigDict(record["config"]))
            if record.get(name, {}).get("version", 1) < EVALUATION_VERSION]


def complete_record(run: ExperimentRun, results_dir, work_dir) -> list[str]:
    """(Re)computes the evaluations `evaluations_to_redo` names from the workdir's best checkpoint
    (no training), each with the commit that computed it; returns their names."""
    path = run.result_path(results_dir)
    record = json.loads(path.read_text())
    redo = evaluations_to_redo(record)
    workdir = run.workdir(work_dir)
    if redo and not (workdir / "checkpoints" / "best").is_dir():
        raise FileNotFoundError(f"{path} needs {redo} evaluated again, and {workdir} holds no best checkpoint")
    for name in redo:
        start = time.perf_counter()
        evaluation = evaluate_best(workdir, name)
        record[name] = {**compact_evaluation(evaluation["results"], evaluation["output_dir"]),
                        "git": loop.git_state(), "eval_s": time.perf_counter() - start}
    if redo:
        _write_record(path, record)
    return redo


def describe_runs(runs: Sequence[ExperimentRun], results_dir, work_dir) -> list[str]:
    """One entry per run for ``--dry_run``: state (done, resumable, to do), commands, and whether
    its config builds."""
    references = _reference_rows()
    lines = []
    for run in runs:
        if run.result_path(results_dir).exists():
            redo = evaluations_to_redo(json.loads(run.result_path(results_dir).read_text()))
            state = "done" + (f", to evaluate again: {redo}" if redo else "")
        elif (step := _latest_checkpoint_step(run.workdir(work_dir))) is not None:
            state = f"resumes from step {step}"
        else:
            state = "to do"
        try:
            build_config(run)
            config_state = "config ok"
        except ValueError as error:
            config_state = f"CONFIG ERROR: {error}"
        lines.append(f"{run.set}/{run.name} [{state}; {config_state}]")
        lines.extend(f"    {kind}: {command}" for kind, command in
                     commands(run, results_dir, work_dir, reference=run.row in references).items())
    return lines


@dataclasses.dataclass
class RunnerReport:
    written: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)  # finished before
    unavailable: list[str] = dataclasses.field(default_factory=list)  # reference framework missing
    failed: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def run_experiments(runs: Sequence[ExperimentRun], *, results_dir="results", work_dir="runs",
                    log: Callable[[str], None] = print) -> RunnerReport:
    """Run every unfinished run in order; a failure is logged and the next run starts."""
    report = RunnerReport()
    for index, run in enumerate(runs, 1):
        label = f"[{index}/{len(runs)}] {run.set}/{run.name}"
        if run.result_path(results_dir).exists():
            try:
                added = complete_record(run, results_dir, work_dir)
            except Exception:  # as a failed run: logged, and the grid goes on
                log(f"{label}: done before, but completing its metrics.json FAILED\n{traceback.format_exc()}")
                report.failed.append(f"{run.set}/{run.name}")
                continue
            log(f"{label}: done before ({run.result_path(results_dir)})"
                + (f", evaluated again: {added}" if added else ", skipped"))
            report.skipped.append(f"{run.set}/{run.name}")
            continue
        log(f"{label}: {shlex.join(run.config_flags())}")
        try:
            path = run_one(run, results_dir, work_dir)
        except ReferenceUnavailable as why:
            log(f"{label}: skipped, {why}")
            report.unavailable.append(f"{run.set}/{run.name}")
            continue
        except TrainingStopped as why:
            log(f"{label}: {why}; stopping the grid (run it again to resume)")
            report.failed.append(f"{run.set}/{run.name}")
            break
        except Exception:  # one broken run must not stop the grid; the traceback says why
            log(f"{label}: FAILED\n{traceback.format_exc()}")
            report.failed.append(f"{run.set}/{run.name}")
            continue
        log(f"{label}: wrote {path}")
        report.written.append(f"{run.set}/{run.name}")
    log(f"{len(report.written)} written, {len(report.skipped)} done before, {len(report.unavailable)} "
        f"unavailable, {len(report.failed)} failed" + (f": {report.failed}" if report.failed else ""))
    sys.stdout.flush()
    return report
