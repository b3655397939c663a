"""Experiment grids: the runner that trains and evaluates every run of a grid into
``results/<set>/<row>-seed<N>/metrics.json``, reference rows trained outside JAX, and the report
that renders those files as README tables.

May import every other layer; nothing imports it.
"""

from neuroseg_jax.experiments.report import (
    BEGIN_MARKER,
    COLUMNS,
    END_MARKER,
    load_results,
    mean_sd,
    render_section,
    replace_marked_section,
    write_report,
)
from neuroseg_jax.experiments.runner import (
    ExperimentRun,
    ReferenceUnavailable,
    RunnerReport,
    build_config,
    check_grids,
    expand_grid,
    load_module,
    run_experiments,
    select_runs,
)

__all__ = [
    "BEGIN_MARKER",
    "COLUMNS",
    "END_MARKER",
    "ExperimentRun",
    "ReferenceUnavailable",
    "RunnerReport",
    "build_config",
    "check_grids",
    "expand_grid",
    "load_module",
    "load_results",
    "mean_sd",
    "render_section",
    "replace_marked_section",
    "run_experiments",
    "select_runs",
    "write_report",
]
