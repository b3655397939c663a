"""Maxima with gradients that are fast on the CPU (`max_pool2x`) and never 0/0 (`guarded_max`)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def max_pool2x(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2, (B, H, W, C) -> (B, H//2, W//2, C) (an odd last row or column
    is dropped, as VALID pooling does).

    Values and gradients of ``nn.max_pool`` (the first maximum of a window gets the gradient on
    ties). On the CPU a custom VJP keeps one int8 index per output and scatters the cotangent with
    four selects, where XLA's select-and-scatter backward was several times slower (figures:
    benchmarks/README.md, "Max pooling"). Elsewhere (`lax.platform_dependent`) JAX differentiates
    the same pairwise comparisons, so forward mode (jvp, jacfwd) works there; on the CPU JAX raises
    "can't apply forward-mode autodiff (jvp) to a custom_vjp function". Either way no gradient comes
    from a float-equality test against a separately computed max, which gave 0/0 where XLA fused
    the two sides differently.
    """
    height, width = x.shape[1:3]
    even = x[:, : height // 2 * 2, : width // 2 * 2]
    return lax.platform_dependent(even, cpu=_max_pool2x_cpu, default=lambda v: _first_max_of_windows(v)[0])


def _first_max_of_windows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, C) -> maxima of the 2x2 windows and which element each came from (int8, 0-3 in
    row-major window order; the first one on ties, as `nn.max_pool`'s gradient).

    Found by pairwise strict comparisons, so the maximum is always one of the window's values
    and the index always points at it (no float-equality test against a separately computed max).
    """
    top_left, top_right = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    bottom_left, bottom_right = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    right_wins_top, right_wins_bottom = top_right > top_left, bottom_right > bottom_left
    top = jnp.where(right_wins_top, top_right, top_left)
    bottom = jnp.where(right_wins_bottom, bottom_right, bottom_left)
    bottom_wins = bottom > top
    index = jnp.where(
        bottom_wins, jnp.where(right_wins_bottom, 3, 2), jnp.where(right_wins_top, 1, 0)
    ).astype(jnp.int8)
    return jnp.where(bottom_wins, bottom, top), index


@jax.custom_vjp
def _max_pool2x_cpu(x: jax.Array) -> jax.Array:
    return _first_max_of_windows(x)[0]


def _max_pool2x_cpu_bwd(index: jax.Array, pooled_grad: jax.Array) -> tuple[jax.Array]:
    batch, rows, cols, channels = pooled_grad.shape
    zero = jnp.zeros_like(pooled_grad)
    window_grads = [jnp.where(index == position, pooled_grad, zero) for position in range(4)]
    # (B, rows, 2, cols, 2, C) row-major windows back to (B, 2*rows, 2*cols, C).
    top = jnp.stack(window_grads[:2], axis=3)
    bottom = jnp.stack(window_grads[2:], axis=3)
    return (jnp.stack([top, bottom], axis=2).reshape(batch, 2 * rows, 2 * cols, channels),)


_max_pool2x_cpu.defvjp(_first_max_of_windows, _max_pool2x_cpu_bwd)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def guarded_max(x: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
    """``jnp.max(x, axis, keepdims=True)`` with the same gradient, minus its 0/0.

    The derivative is shared equally by the elements equal to the maximum. ``jnp.max`` divides by
    the count of those elements; where XLA fuses the comparison and the reduction differently the
    comparison can find no element and the gradient becomes 0/0. Here the comparison uses the
    forward max and the count is kept >= 1. A custom JVP, so forward and reverse mode both work on
    every platform.
    """
    return jnp.max(x, axis=axis, keepdims=True)


@guarded_max.defjvp
def _guarded_max_jvp(axis, primals, tangents):
    (x,), (x_tangent,) = primals, tangents
    maximum = jnp.max(x, axis=axis, keepdims=True)

    def share(x, maximum, x_tangent):
        is_max = (x == maximum).astype(x_tangent.dtype)
        count = jnp.maximum(jnp.sum(is_max, axis=axis, keepdims=True), 1)
        return jnp.sum(is_max * x_tangent, axis=axis, keepdims=True) / count

    # Rematerialised: reverse mode keeps x and the max for the backward pass, not a full-size mask.
    return maximum, jax.checkpoint(share)(x, maximum, x_tangent)
