"""Flags of the launchers that read a trained run (evaluate.py, predict.py), defined once.

Each launcher adopts them (`flags.adopt_module_key_flags`) so its ``--help`` lists them, and sets its
own ``--tta`` default with `flags.set_default`: evaluation reports TTA rows beside the plain ones,
prediction stays plain unless asked.
"""

from absl import flags

WORKDIR = flags.DEFINE_string("workdir", None, "Training run folder.", required=True)
CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
TTA = flags.DEFINE_integer("tta", 0, "Test-time augmentations (IMSAHLO: 5; <= 1: none).")
THRESHOLD = flags.DEFINE_string(
    "threshold", None, "Foreground probability threshold of the masks: a number strictly between 0 and 1, 'val' "
    "for the one chosen on the validation split and stored with the checkpoint (chosen first if absent), or 'config' "
    "for config.inference.threshold. Default: the validation choice with config.inference.choose_threshold (the "
    "default), else config.inference.threshold.")

DECLUMP = flags.DEFINE_bool(
    "declump", None, "Split a binary mask's touching convex objects (nuclei) by shape, with the h and sigma of "
    "config.instances (see inference.watershed.declump); --nodeclump keeps connected components. Default: "
    "config.instances.declump. Not for three-class runs, which separate objects by their boundary class.")


def _valid_threshold(value: str | None) -> bool:
    if value is None or value in ("val", "config"):
        return True
    try:
        return 0.0 < float(value) < 1.0
    except ValueError:
        return False


flags.register_validator("threshold", _valid_threshold,
                         "--threshold must be 'val', 'config' or a number strictly between 0 and 1")
