"""Train a model: ``python launch/train.py --config=configs/imsahlo.py[:ARGS] --workdir=RUN``.

Re-running with the same ``--workdir`` resumes from its latest checkpoint. For multi-host runs
pass ``--multihost`` (or set NEUROSEG_MULTIHOST=1) on every host; JAX then reads the coordinator
address, process count and id from the cluster environment or from ``--coordinator``,
``--num_processes`` and ``--process_id``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from neuroseg_jax.ops import reuse_freed_host_memory
from neuroseg_jax.train import distributed, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/imsahlo.py:quick.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, plots.", required=True)
distributed.define_flags()
flags.adopt_module_key_flags(distributed)  # so --help lists the multi-host flags


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    reuse_freed_host_memory()
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
    distributed.initialize_from_flags()
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
