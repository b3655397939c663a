"""Evaluate a checkpoint: ``python launch/evaluate.py --workdir=RUN [--checkpoint=best|latest|STEP]``.

Uses the run's config snapshot unless ``--config`` is given; ``--data_root=DIR`` evaluates on
another images/ + masks/ folder with the run's preprocessing. The TTA rows average ``--tta``
test-time augmentations (default 5, IMSAHLO's). Prints the metrics and writes metrics.json,
per_image.csv and table.md.
"""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from neuroseg_jax.ops import reuse_freed_host_memory
from neuroseg_jax.inference import evaluate_run

import trained_run_flags  # launch/ is not a package; a script's own folder is on sys.path

flags.adopt_module_key_flags(trained_run_flags)
flags.set_default(trained_run_flags.TTA, 5)
_CONFIG = config_flags.DEFINE_config_file("config", None, "Optional config file; default: RUN/config.json.")
_SPLIT = flags.DEFINE_enum("split", None, ["train", "val", "test", "all"],
                           "Which split of the data (default: val, or all with --data_root).")
_DATA_ROOT = flags.DEFINE_string("data_root", None, "Evaluate on this images/ + masks/ folder instead.")
_OUTPUT = flags.DEFINE_string("output", None, "Output folder (default RUN/eval/CHECKPOINT-SPLIT).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    reuse_freed_host_memory()
    logging.set_verbosity(logging.ERROR)  # orbax warns about every read-only checkpoint it opens
    split = _SPLIT.value or ("all" if _DATA_ROOT.value else "val")
    results = evaluate_run(trained_run_flags.WORKDIR.value, checkpoint=trained_run_flags.CHECKPOINT.value,
                           split=split, config=_CONFIG.value, data_root=_DATA_ROOT.value, output_dir=_OUTPUT.value,
                           tta_n=trained_run_flags.TTA.value, threshold=trained_run_flags.THRESHOLD.value,
                           declump=trained_run_flags.DECLUMP.value)
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    app.run(main)
