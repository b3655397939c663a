"""Host-memory policy for CPU runs: each step's temporaries reuse the pages the last step freed.

XLA's CPU runtime allocates an executable's temporaries with malloc on every call and frees them
afterwards (gigabytes per training step at full image size). glibc serves blocks above 32 MiB with
a fresh mmap and gives them back with munmap, so by default every step the kernel faults in and
zeroes every page again, in system CPU time.

The policy: glibc serves large blocks from its main heap and never trims it, and JAX runs
single-device CPU computations on the calling thread, whose allocations come from that heap
(a worker thread's own arena falls back to mmap for blocks this size whatever the limit says).
Forcing every thread onto one arena would also work but slowed XLA's multi-threaded compilation.
Figures: benchmarks/README.md, "Host memory policy".
"""

from __future__ import annotations

import ctypes
import platform

import jax
from jax._src import xla_bridge

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def uses_glibc() -> bool:
    """Whether this process runs on Linux with glibc, the C library whose malloc the policy sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def reuse_freed_host_memory() -> bool:
    """Keeps freed host memory in the process and runs single-device CPU computations inline.

    Call it before JAX's first computation (the CPU client reads its dispatch mode when it
    starts); the process's resident memory then stays at its peak. Returns False, changing
    nothing, where the C library is not glibc (macOS, musl).
    """
    if not uses_glibc():
        return False
    if xla_bridge.backends_are_initialized():  # no public API tells whether the CPU client started
        raise RuntimeError("reuse_freed_host_memory() must run before JAX's first computation "
                           "(call it first thing in the process or notebook)")
    libc = ctypes.CDLL(None)
    # A trim threshold of -1 (SIZE_MAX) disables trimming, as mallopt(3) documents.
    if not (libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1):
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
