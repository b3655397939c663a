"""reuse_freed_host_memory: a jitted call's temporaries stop costing fresh pages on every call."""

import os
import subprocess
import sys

import pytest

from neuroseg_jax.ops import uses_glibc

glibc_only = pytest.mark.skipif(not uses_glibc(), reason="the policy sets glibc malloc parameters")

# A jitted call with a 64 MiB temporary (the (8192, 2048) product that the second matmul reads);
# prints the minor page faults of its third call.
_PROBE = """
import resource, sys
if sys.argv[1] == "reuse":
    from neuroseg_jax.ops import reuse_freed_host_memory
    assert reuse_freed_host_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda x, w: jnp.sum((x @ w) @ w.T))
x, w = jnp.ones((8192, 16)), jnp.ones((16, 2048))
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x, w).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _third_call_page_faults(policy: str) -> int:
    result = subprocess.run([sys.executable, "-c", _PROBE, policy], capture_output=True, text=True, check=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return int(result.stdout.split()[-1])


@glibc_only
def test_reused_memory_spares_the_page_faults():
    # The probe runs in fresh processes: the policy must be set before JAX starts.
    temporary_pages = 8192 * 2048 * 4 // 4096
    assert _third_call_page_faults("default") > temporary_pages // 2  # glibc maps the temporary afresh
    assert _third_call_page_faults("reuse") < temporary_pages // 20


@glibc_only
def test_refuses_once_jax_has_started():
    import jax

    from neuroseg_jax.train import reuse_freed_host_memory

    jax.devices()
    with pytest.raises(RuntimeError, match="before JAX's first computation"):
        reuse_freed_host_memory()
