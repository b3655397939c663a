"""Flags of the launchers that read a trained run (evaluate.py, predict.py), defined once.

Each launcher adopts them (`flags.adopt_module_key_flags`) so its ``--help`` lists them, and sets its
own ``--tta`` default with `flags.set_default`: evaluation reports TTA rows beside the plain ones,
prediction stays plain unless asked.
"""

from absl import flags

WORKDIR = flags.DEFINE_string("workdir", None, "Training run folder.", required=True)
CHECKPOINT = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
TTA = flags.DEFINE_integer("tta", 0, "Test-time augmentations (IMSAHLO: 5; <= 1: none).")
