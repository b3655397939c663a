"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the environment."""

import os

import jax
from absl import flags

_MULTIHOST = "multihost"


def define_flags() -> None:
    flags.DEFINE_bool(_MULTIHOST, os.environ.get("NEUROSEG_MULTIHOST", "0") == "1",
                      "Call jax.distributed.initialize before anything else (multi-host runs).")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host; else from the environment).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host; else from the environment).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host; else from the environment).")


def initialize_from_flags() -> None:
    values = flags.FLAGS
    if not values[_MULTIHOST].value:
        return
    # CPU processes need an explicit cross-process collectives backend; GPUs/TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=values.coordinator, num_processes=values.num_processes,
                               process_id=values.process_id)
