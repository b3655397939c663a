"""Train and evaluate a named grid of configs/experiments.py:
``python launch/run_experiments.py --grid=table2 [--sets=pfc_pn] [--rows=unet,imsahlo] [--seeds=0]``.

Each run trains in ``--work_dir/<set>/<row>-seed<N>`` and, once its best checkpoint is evaluated on
the held-out test split, writes ``--results_dir/<set>/<row>-seed<N>/metrics.json``. Runs with a
metrics.json are not trained again (an evaluation the JSON lacks, or holds from an older version of
the scoring, is redone from the run's best checkpoint); re-running resumes the rest. ``--dry_run`` lists the runs, their state and
the command that reproduces each. Exits non-zero when a run failed (the others still run).
"""

from absl import app, flags, logging

from neuroseg_jax import experiments
from neuroseg_jax.ops import reuse_freed_host_memory

_GRID = flags.DEFINE_string("grid", None, "Grid name in --grids_file (table2, table3, table4, loss_choice, "
                            "morphoseg, instances, smoke, tiny).", required=True)
_GRIDS_FILE = flags.DEFINE_string("grids_file", "configs/experiments.py", "Python file defining GRIDS.")
_SETS = flags.DEFINE_list("sets", [], "Only these sets (data protocols), e.g. pfc_pn.")
_ROWS = flags.DEFINE_list("rows", [], "Only these rows, e.g. unet,imsahlo.")
_SEEDS = flags.DEFINE_list("seeds", [], "Only these seeds, e.g. 0,1.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Where metrics.json files go.")
_WORK_DIR = flags.DEFINE_string("work_dir", "runs", "Where training workdirs go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the runs and their commands; train nothing.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    grids = experiments.load_module(_GRIDS_FILE.value).GRIDS
    if _GRID.value not in grids:
        raise app.UsageError(f"--grid={_GRID.value!r} is not in {_GRIDS_FILE.value}; known: {sorted(grids)}")
    experiments.check_grids(grids)
    runs = experiments.select_runs(experiments.expand_grid(_GRID.value, grids[_GRID.value]), sets=_SETS.value,
                                   rows=_ROWS.value, seeds=[int(seed) for seed in _SEEDS.value])
    if _DRY_RUN.value:
        for line in experiments.runner.describe_runs(runs, _RESULTS_DIR.value, _WORK_DIR.value):
            print(line)
        return
    reuse_freed_host_memory()
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    report = experiments.run_experiments(runs, results_dir=_RESULTS_DIR.value, work_dir=_WORK_DIR.value)
    if not report.ok:
        raise SystemExit(f"{len(report.failed)} run(s) failed: {', '.join(report.failed)}")


if __name__ == "__main__":
    app.run(main)
