"""Render results/**/metrics.json as README tables: ``python launch/render_results.py`` replaces
README.md's text between ``<!-- results:begin -->`` and ``<!-- results:end -->``;
``--output=FILE`` writes the section to FILE instead. Also draws ``--results_dir/summary.png``.
"""

from absl import app, flags

from neuroseg_jax import experiments

_GRIDS = flags.DEFINE_list("grids", ["table2", "instances", "table3", "table4", "morphoseg", "smoke"],
                           "Grids of --grids_file to render, in this order.")
_GRIDS_FILE = flags.DEFINE_string("grids_file", "configs/experiments.py", "Python file defining GRIDS.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", "results", "Folder of <set>/<row>-seed<N>/metrics.json.")
_README = flags.DEFINE_string("readme", "README.md", "File whose marked section is replaced.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the section to this file instead of --readme.")
_VARIANT = flags.DEFINE_string("variant", "raw", "Evaluation variant: raw (threshold 0.5) or post.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    module = experiments.load_module(_GRIDS_FILE.value)
    unknown = sorted(set(_GRIDS.value) - set(module.GRIDS))
    if unknown:
        raise app.UsageError(f"--grids: {unknown} not in {_GRIDS_FILE.value}; known: {sorted(module.GRIDS)}")
    try:
        written = experiments.write_report(
            {name: module.GRIDS[name] for name in _GRIDS.value}, _RESULTS_DIR.value,
            readme=None if _OUTPUT.value else _README.value, output=_OUTPUT.value,
            titles=getattr(module, "TITLES", {}), notes=getattr(module, "NOTES", {}), variant=_VARIANT.value)
    except (ValueError, KeyError) as error:  # missing markers, a malformed metrics.json, an unknown variant
        raise SystemExit(f"render_results: {error}") from None
    print(f"wrote {written['section']} and {written['plot']} from {written['runs']} runs")


if __name__ == "__main__":
    app.run(main)
