"""Results tables from ``results/<set>/<row>-seed<N>/metrics.json``: mean ± sd over seeds per row,
one markdown table per grid and set, a Dice plot, and README's generated section.

Only what was measured is shown: a row of a grid without any metrics.json reads "not run yet".
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

BEGIN_MARKER = "<!-- results:begin -->"
END_MARKER = "<!-- results:end -->"
# (header, section of the variant's results, metric key, decimals); sections as in evaluate_dataset.
COLUMNS = (
    ("Dice per-image", "per_image_mean", "dice", 3),
    ("Dice pooled", "pooled", "dice", 3),
    ("Precision", "pooled", "precision", 3),
    ("Recall", "pooled", "recall", 3),
    ("HD95 (px)", "per_image_mean", "hd95", 1),
    ("clDice", "per_image_mean", "cldice", 3),
    ("Betti-0 err", "per_image_mean", "betti0_error", 2),
    ("AP@0.5:0.95", "pooled", "coco_map", 3),
    ("AP-DSB@0.5:0.95", "pooled", "instance_map", 3),
    ("F1@0.5", "pooled", "f1@0.50", 3),
    ("Count err", "per_image_mean", "abs_count_error", 2),
)
NOT_RUN = "not run yet"


def load_results(results_dir: str | os.PathLike) -> dict[tuple[str, str], list[dict]]:
    """Every run's metrics.json, grouped by (set, row), each group sorted by seed."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(pathlib.Path(results_dir).glob("*/*/metrics.json")):
        try:
            record = json.loads(path.read_text())
            key = (record["set"], record["row"])
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{path}: not a results metrics.json ({error!r})") from error
        groups.setdefault(key, []).append(record)
    for records in groups.values():
        records.sort(key=lambda record: record["seed"])
    return groups


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no sd for a single value."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def format_mean_sd(values: Sequence[float], decimals: int) -> str:
    if not len(values):
        return "—"
    mean, sd = mean_sd(values)
    if not math.isfinite(mean):
        return "nan"
    return f"{mean:.{decimals}f}" + ("" if sd is None else f" ± {sd:.{decimals}f}")


def metric_values(records: Sequence[Mapping], section: str, key: str, variant: str,
                  evaluation: str = "test") -> list[float]:
    """One value per seed; a record without the variant or key is an error naming the run.
    ``evaluation``: 'test' (the configured threshold) or 'test_val_threshold'."""
    values = []
    for record in records:
        try:
            values.append(float(record[evaluation]["variants"][variant][section][key]))
        except KeyError as error:
            raise KeyError(f"results {record['set']}/{record['row']}-seed{record['seed']}: no "
                           f"{evaluation}.variants.{variant}.{section}.{key} ({error})") from None
    return values


def _commits(records: Sequence[Mapping], evaluation: str = "test") -> str:
    """The training commits, and the evaluation's where it was added to the record later."""
    def short(git: Mapping) -> str:
        return git["commit"][:7] + ("+dirty" if git.get("dirty") else "")

    commits = set()
    for record in records:
        trained, evaluated = short(record["git"]), record[evaluation].get("git")
        commits.add(trained if evaluated is None else f"{trained} (evaluated {short(evaluated)})")
    return ", ".join(sorted(commits))


def grid_tables(grid: Sequence[Sequence]) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """set -> [(row, seeds)] in the grid's order."""
    tables: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for set_name, row, _config, _overrides, seeds in grid:
        tables.setdefault(set_name, []).append((row, tuple(int(s) for s in seeds)))
    return tables


def row_records(results: Mapping[tuple[str, str], list[dict]], set_name: str, row: str,
                seeds: Sequence[int]) -> list[dict]:
    return [record for record in results.get((set_name, row), []) if record["seed"] in seeds]


def render_table(set_name: str, rows: Sequence[tuple[str, Sequence[int]]],
                 results: Mapping[tuple[str, str], list[dict]], *, variant: str = "raw",
                 evaluation: str = "test") -> str:
    """One row per grid row, with the foreground threshold of its masks; with
    ``evaluation='test_val_threshold'`` only the rows that hold that evaluation."""
    header = ["Row", "n seeds", "Threshold", *(name for name, *_ in COLUMNS), "Train min", "Commit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, seeds in rows:
        records = row_records(results, set_name, row, seeds)
        if evaluation != "test":
            records = [record for record in records if evaluation in record]
            if not records:
                continue
        if not records:
            lines.append(f"| {row} | 0 of {len(seeds)} | {NOT_RUN} |" + " |" * (len(header) - 3))
            continue
        cells = [format_mean_sd(metric_values(records, section, key, variant, evaluation), decimals)
                 for _, section, key, decimals in COLUMNS]
        thresholds = format_mean_sd([record[evaluation].get("threshold", 0.5) for record in records], 2)
        minutes = format_mean_sd([record["wall_s"]["train"] / 60.0 for record in records], 1)
        lines.append("| " + " | ".join([row, f"{len(records)} of {len(seeds)}", thresholds, *cells, minutes,
                                        _commits(records, evaluation)]) + " |")
    return "\n".join(lines) + "\n"


def _notes_text(notes: Mapping[str, str], rows: Sequence[str]) -> str:
    """One line per note that applies to a row (keyed by the row's name or by any of its
    '-'-separated parts), naming the rows it applies to, in the rows' order."""
    applies: dict[str, list[str]] = {}
    for row in rows:
        for key in dict.fromkeys((row, *row.split("-"))):
            if key in notes:
                applies.setdefault(key, []).append(row)
    return "".join(f"- {', '.join(named)}: {notes[key]}\n" for key, named in applies.items())


def render_section(grids: Mapping[str, Sequence], results: Mapping[tuple[str, str], list[dict]], *,
                   titles: Mapping[str, str] | None = None, notes: Mapping[str, str] | None = None,
                   variant: str = "raw", plot: str | None = None) -> str:
    """Markdown: one table per grid and set, in the order given."""
    titles, notes = titles or {}, notes or {}
    parts = [
        f"Generated by `python launch/render_results.py` from `results/<set>/<row>-seed<N>/metrics.json`: "
        f"held-out 'test' split, best checkpoint by validation loss, no test-time augmentation, variant "
        f"'{variant}'. Mean ± sample sd over the seeds run (n seeds = run of listed). Dice per-image: mean "
        f"over images; pooled, precision, recall, AP, F1: pixel/object counts summed over images. HD95 "
        f"(MONAI convention), clDice, Betti-0 error and count error |objects predicted - true|: mean over "
        f"images. Objects are connected components, the watershed decode in instance mode, or the "
        f"mask's shape-based split in 'declump' rows. "
        f"AP@0.5:0.95: COCO-style ranked AP averaged over IoU 0.50:0.05:0.95; AP-DSB@0.5:0.95: the 2018 "
        f"Data Science Bowl's score-free tp/(tp+fp+fn) averaged over the same IoUs; F1@0.5: object F1 at "
        f"IoU 0.5.\n"]
    tables, not_run = _tables_run(grids, results)
    for grid_name, set_name, rows in tables:
        parts.append(f"#### {titles.get(grid_name, grid_name)}: {set_name}\n")
        parts.append(render_table(set_name, rows, results, variant=variant))
        val_threshold = render_table(set_name, rows, results, variant=variant, evaluation="test_val_threshold")
        if val_threshold.count("\n") > 2:
            parts.append("Same runs, foreground threshold of highest pooled Dice on the validation split "
                         "(chosen from 0.05 to 0.95, stored with the checkpoint):\n")
            parts.append(val_threshold)
        notes_text = _notes_text(notes, [row for row, _ in rows])
        if notes_text:
            parts.append(notes_text)
    if not_run:
        parts.append("Tables with no run yet: " + ", ".join(
            f"{titles.get(grid_name, grid_name)} on {set_name} (`--grid={grid_name} --sets={set_name}`)"
            for grid_name, set_name in not_run) + ".\n")
    if plot:
        parts.append(f"![Dice per row, mean ± sd over seeds]({plot})\n")
    return "\n".join(parts)


def _tables_run(grids: Mapping[str, Sequence], results: Mapping[tuple[str, str], list[dict]]
                ) -> tuple[list[tuple[str, str, list]], list[tuple[str, str]]]:
    """([(grid, set, rows)] of the tables with at least one run, [(grid, set)] of those with none)."""
    tables, not_run = [], []
    for grid_name, grid in grids.items():
        for set_name, rows in grid_tables(grid).items():
            if any(row_records(results, set_name, row, seeds) for row, seeds in rows):
                tables.append((grid_name, set_name, rows))
            else:
                not_run.append((grid_name, set_name))
    return tables, not_run


def plot_summary(grids: Mapping[str, Sequence], results: Mapping[tuple[str, str], list[dict]],
                 path: str | os.PathLike, *, titles: Mapping[str, str] | None = None, variant: str = "raw") -> None:
    """Per-image Dice of every row, mean with sd bars over seeds, one panel per grid and set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = titles or {}
    panels, _ = _tables_run(grids, results)
    if not panels:
        raise ValueError("plot_summary: no grid has a run to draw")
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False)
    for axis, (grid_name, set_name, rows) in zip(axes[:, 0], panels):
        means, sds = [], []
        for row, seeds in rows:
            records = row_records(results, set_name, row, seeds)
            if records:
                mean, sd = mean_sd(metric_values(records, "per_image_mean", "dice", variant))
            else:
                mean, sd = math.nan, None
            means.append(mean)
            sds.append(sd or 0.0)
        positions = np.arange(len(rows))
        axis.bar(positions, np.nan_to_num(means), yerr=sds, capsize=3, color="tab:blue")
        for position, mean in zip(positions, means):
            if not math.isfinite(mean):
                axis.text(position, 0.02, NOT_RUN, rotation=90, ha="center", va="bottom", fontsize=7)
        axis.set_xticks(positions, [row for row, _ in rows], rotation=30, ha="right", fontsize=8)
        axis.set_ylim(0, 1)
        axis.set_ylabel("Dice (per image)")
        axis.set_title(f"{titles.get(grid_name, grid_name)}: {set_name}", fontsize=9)
    figure.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def replace_marked_section(text: str, section: str, *, name: str) -> str:
    """``text`` with what lies between BEGIN_MARKER and END_MARKER replaced by ``section``;
    ``name`` (the file) is named in the error when the markers are missing."""
    begin, end = text.find(BEGIN_MARKER), text.find(END_MARKER)
    if begin < 0 or end < 0 or end < begin:
        raise ValueError(f"{name}: needs the markers {BEGIN_MARKER} and then {END_MARKER} around the results "
                         "section")
    return f"{text[:begin + len(BEGIN_MARKER)]}\n{section.strip()}\n{text[end:]}"


def write_report(grids: Mapping[str, Sequence], results_dir: str | os.PathLike, *,
                 readme: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
                 titles: Mapping[str, str] | None = None, notes: Mapping[str, str] | None = None,
                 variant: str = "raw", plot: bool = True) -> dict[str, Any]:
    """Render the section into ``output`` (a new file) or between README's markers; the plot
    goes to ``results_dir/summary.png``. Returns the paths written."""
    if (readme is None) == (output is None):
        raise ValueError("write_report: give exactly one of readme= and output=")
    target = pathlib.Path(output if output is not None else readme)
    readme_text = None
    if readme is not None:
        readme_text = target.read_text()
        replace_marked_section(readme_text, "", name=str(target))  # fails before any work without markers
    results = load_results(results_dir)
    plot_path = pathlib.Path(results_dir) / "summary.png"
    plot_link = None
    if plot and _tables_run(grids, results)[0]:
        plot_summary(grids, results, plot_path, titles=titles, variant=variant)
        plot_link = os.path.relpath(plot_path.resolve(), target.resolve().parent)
    section = render_section(grids, results, titles=titles, notes=notes, variant=variant, plot=plot_link)
    if output is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(section)
    else:
        target.write_text(replace_marked_section(readme_text, section, name=str(target)))
    return {"section": str(target), "plot": str(plot_path) if plot_link else None,
            "runs": sum(map(len, results.values()))}
