"""How the numbers are computed fast, never what the model is.

The 2-D convolution with its compiled CPU handlers (`conv2d`), group normalisation and pooling with
their custom gradients, resizing, and the host-memory policy of CPU runs. Each op computes what its
plain-lax counterpart computes; the custom gradients run on the CPU, where they pay, and other
platforms get plain lax ops with JAX's own derivatives (forward mode included), except the dilated
convolutions of `conv2d` on NVIDIA/AMD GPUs. This package imports no other layer of neuroseg_jax.
"""

from neuroseg_jax.ops.conv import CONV_IMPLEMENTATIONS, conv2d
from neuroseg_jax.ops.norm import group_norm
from neuroseg_jax.ops.pooling import guarded_max, max_pool2x
from neuroseg_jax.ops.resize import resize_to, upsample2x
from neuroseg_jax.ops.runtime import reuse_freed_host_memory, uses_glibc

__all__ = [
    "CONV_IMPLEMENTATIONS", "conv2d", "group_norm", "guarded_max", "max_pool2x", "resize_to",
    "reuse_freed_host_memory", "upsample2x", "uses_glibc",
]
