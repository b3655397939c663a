"""The custom gradients at XLA's default CPU optimisation level, against plain-lax/autodiff references.

The test suite compiles at --xla_backend_optimization_level=0 (tests/conftest.py), where XLA fuses
less; a NaN gradient once appeared only at the default level. tests/test_default_optimization.py
runs this script in a subprocess without that option. Each check jits our function and its
reference separately, and compares values and gradients (of sum(f(x) * weights), a generic
cotangent): finite, and equal within float32 tolerance. Prints one line per check; an assertion
error names the failing one.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from neuroseg_jax import losses
from neuroseg_jax.models import layers
from neuroseg_jax.ops import conv, conv_ffi, guarded_max, max_pool2x
from test_losses import _reference_skeleton  # tests/ is this script's directory

RNG = np.random.default_rng(0)


def normal(*shape: int) -> jax.Array:
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def value_and_grads(fn, argnums=(0,)):
    """x... -> (fn(x...), gradients of sum(fn(x...) * weights)) with fixed random weights."""

    def run(*args):
        output = fn(*args)
        weights = jnp.asarray(np.random.default_rng(1).normal(size=output.shape), output.dtype)
        grads = jax.grad(lambda *a: jnp.sum(fn(*a) * weights), argnums)(*args)
        return output, grads

    return run


def check(name: str, ours, reference, *args, argnums=(0,), rtol=1e-5, atol=1e-6, relative_atol=False):
    got = jax.jit(value_and_grads(ours, argnums))(*args)
    expected = jax.jit(value_and_grads(reference, argnums))(*args)
    for index, (mine, theirs) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(expected))):
        what = f"{name}: {'value' if index == 0 else f'gradient {index - 1}'}"
        mine, theirs = np.asarray(mine), np.asarray(theirs)
        assert np.all(np.isfinite(mine)), f"{what} is not finite"
        tolerance = atol * float(np.max(np.abs(theirs))) if relative_atol else atol
        np.testing.assert_allclose(mine, theirs, rtol=rtol, atol=tolerance, err_msg=what)
    print(f"{name}: ok")


def max_pool_checks() -> None:
    def reference(v):
        return nn.max_pool(v, (2, 2), strides=(2, 2))

    check("max_pool2x", max_pool2x, reference, normal(2, 8, 12, 3))
    # All 16 patterns of maxima among {0, 1} in 2x2 windows: ties go to the first maximum.
    patterns = np.array([[(code >> bit) & 1 for bit in range(4)] for code in range(16)], np.float32)
    ties = jnp.asarray(patterns.reshape(4, 4, 2, 2).transpose(0, 2, 1, 3).reshape(1, 8, 8, 1))
    check("max_pool2x with ties", max_pool2x, reference, ties)


def guarded_max_checks() -> None:
    ties = jnp.round(2.0 * normal(2, 5, 6, 4)) / 2.0  # few distinct values: ties in most reductions
    for axis in ((1, 2), -1):
        check(
            f"guarded_max over {axis}",
            lambda v, axis=axis: guarded_max(v, axis),
            lambda v, axis=axis: jnp.max(v, axis, keepdims=True),
            ties,
        )


def group_norm_check() -> None:
    x = 3.0 + 2.0 * normal(2, 6, 5, 8)
    scale, bias = 1.0 + 0.3 * normal(8), 0.3 * normal(8)

    def with_module(module):
        # Swish after the norm, as the networks use it, so the norm's backward fuses with a consumer.
        return lambda v, s, b: nn.swish(module.apply({"params": {"scale": s, "bias": b}}, v))

    check(
        "GroupNorm + Swish",
        with_module(layers.GroupNorm(num_groups=4, epsilon=1e-5)),
        with_module(nn.GroupNorm(num_groups=4, epsilon=1e-5)),
        x, scale, bias, argnums=(0, 1, 2), rtol=1e-4, atol=1e-4,
    )


def conv_checks() -> None:
    cases = [
        # name, input shape, kernel shape, strides, dilation; 2x16x16 has WINOGRAD_MIN_TILES 2x2 tiles.
        ("3x3 stride 1 (Winograd)", (2, 16, 16, 4), (3, 3, 4, 8), (1, 1), (1, 1)),
        ("3x3 stride 1 dilation 2 (Winograd)", (2, 16, 16, 4), (3, 3, 4, 8), (1, 1), (2, 2)),
        ("7x7 2->1 (thin)", (2, 12, 12, 2), (7, 7, 2, 1), (1, 1), (1, 1)),
        ("3x3 stride 2", (2, 9, 8, 3), (3, 3, 3, 5), (2, 2), (1, 1)),
    ]
    tiles = 2 * 8 * 8
    assert tiles >= conv.WINOGRAD_MIN_TILES, (tiles, conv.WINOGRAD_MIN_TILES)
    for name, input_shape, kernel_shape, strides, dilation in cases:
        def ours(x, k, strides=strides, dilation=dilation):
            return conv.conv2d(x, k, strides=strides, padding="SAME", dilation=dilation)

        def reference(x, k, strides=strides, dilation=dilation):
            return lax.conv_general_dilated(
                x, k, strides, "SAME", rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")
            )

        x, kernel = normal(*input_shape), normal(*kernel_shape)
        if "Winograd" in name and conv_ffi.available():
            hlo = jax.jit(value_and_grads(ours, (0, 1))).lower(x, kernel).compile().as_text()
            assert 'custom_call_target="neuroseg_conv_winograd_kernel_grad"' in hlo, f"{name}: no Winograd handler"
        check(f"conv2d {name}", ours, reference, x, kernel, argnums=(0, 1), rtol=2e-5, atol=2e-5, relative_atol=True)


def soft_skeleton_check() -> None:
    x = jnp.asarray(RNG.uniform(size=(1, 12, 14, 2)), jnp.float32)  # no ties: gradients are unique
    check(
        "soft_skeleton",
        lambda v: losses.soft_skeleton(v, 2),
        lambda v: _reference_skeleton(v, 2),
        x,
    )


if __name__ == "__main__":
    # XLA reads its flags when the backend starts, at the first computation below.
    if "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r} must not set the optimisation level here")
    max_pool_checks()
    guarded_max_checks()
    group_norm_check()
    conv_checks()
    soft_skeleton_check()
    print(f"compiled handlers: {conv_ffi.available()}")
