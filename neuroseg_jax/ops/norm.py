"""Group normalisation (Wu & He 2018) as one per-channel affine map, with a CPU backward pass.

`group_norm` gives the values of `flax.linen.GroupNorm` with its default fast variance
E[x^2] - E[x]^2, computed as y = x * a[b, c] + s[b, c]: statistics are per-channel sums folded into
groups on a (B, C) array, so the full-size work is two reductions and one multiply-add. flax's
version reshapes the map into groups and broadcasts group statistics back through that reshape,
which ran slower on the CPU forward and backward.

On the CPU the backward pass is a custom VJP (`_group_norm_cpu`): two reductions (the
per-(image, channel) sums of g and g*x, from which the scale and bias gradients follow) and one
multiply-add, where autodiff of the affine map summed the bias gradient over the whole cotangent
once more. Elsewhere (`lax.platform_dependent`) JAX differentiates the affine map itself, so forward
mode (jvp, jacfwd) works there; on the CPU JAX raises "can't apply forward-mode autodiff (jvp) to a
custom_vjp function". Figures: benchmarks/README.md, "GroupNorm backward".
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def group_norm(values: jax.Array, scale: jax.Array, bias: jax.Array, *, num_groups: int, epsilon: float) -> jax.Array:
    """GroupNorm of (B, H, W, C) `values` over H, W and each group of C // num_groups channels.

    scale, bias: (C,). Statistics and result are float32, whatever the inputs' dtypes.

    Raises:
      ValueError: unless values are 4-D with C divisible by num_groups.
    """
    if values.ndim != 4:
        raise ValueError(f"group_norm expects (B, H, W, C) values, got shape {values.shape}")
    channels = values.shape[-1]
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"group_norm: {channels} channels are not divisible by num_groups={num_groups}")
    operands = tuple(array.astype(jnp.float32) for array in (values, scale, bias))

    def cpu(x, s, b):
        return _group_norm_cpu(x, s, b, num_groups, epsilon)

    def portable(x, s, b):
        return _affine_group_norm(x, s, b, num_groups, epsilon)[0]

    return lax.platform_dependent(*operands, cpu=cpu, default=portable)


def _group_statistics(values: jax.Array, num_groups: int, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Per (image, group) mean and 1/sqrt(variance + epsilon) of (B, H, W, C) values, each (B, groups)."""
    batch, height, width, channels = values.shape
    group_size = channels // num_groups

    def group_mean(per_channel_sum: jax.Array) -> jax.Array:
        return per_channel_sum.reshape(batch, num_groups, group_size).sum(-1) / (height * width * group_size)

    mean = group_mean(jnp.sum(values, axis=(1, 2)))
    variance = jnp.maximum(group_mean(jnp.sum(jnp.square(values), axis=(1, 2))) - jnp.square(mean), 0.0)
    return mean, lax.rsqrt(variance + epsilon)


def _per_channel(per_group: jax.Array, channels: int) -> jax.Array:
    """(B, groups) -> (B, channels), each group's value repeated over its channels."""
    return jnp.repeat(per_group, channels // per_group.shape[1], axis=1)


def _affine_group_norm(values, scale, bias, num_groups, epsilon):
    """y = x * a[b, c] + s[b, c] for float32 (B, H, W, C) values, and the custom VJP's residuals."""
    channels = values.shape[3]
    mean, inverse_std = _group_statistics(values, num_groups, epsilon)
    multiplier = _per_channel(inverse_std, channels) * scale
    shift = bias - _per_channel(mean, channels) * multiplier
    return values * multiplier[:, None, None, :] + shift[:, None, None, :], (values, scale, mean, inverse_std)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm_cpu(values: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float) -> jax.Array:
    """The affine map with the two-reduction backward pass (module doc)."""
    return _affine_group_norm(values, scale, bias, num_groups, epsilon)[0]


def _group_norm_cpu_bwd(num_groups, epsilon, residuals, out_grad):
    values, scale, mean, inverse_std = residuals
    batch, height, width, channels = values.shape
    count = height * width * (channels // num_groups)
    # The barrier keeps XLA from folding the bias gradient's sum over images into a second pass over
    # the whole cotangent.
    grad_sum, grad_x_sum = lax.optimization_barrier(
        (jnp.sum(out_grad, axis=(1, 2)), jnp.sum(out_grad * values, axis=(1, 2)))
    )
    mean, inverse_std = _per_channel(mean, channels), _per_channel(inverse_std, channels)
    centred_sum = grad_x_sum - mean * grad_sum  # sum of g * (x - mean) per (image, channel)

    def group_total(per_channel: jax.Array) -> jax.Array:
        return _per_channel(per_channel.reshape(batch, num_groups, -1).sum(-1), channels)

    # dx = inverse_std * (scale * g - (total + x_hat * total_normalised) / count), where total and
    # total_normalised are the sums of scale * g and scale * g * x_hat over the group.
    total = group_total(scale * grad_sum)
    total_normalised = group_total(scale * centred_sum) * inverse_std
    x_coefficient = -inverse_std * inverse_std * total_normalised / count
    constant = -inverse_std * total / count - mean * x_coefficient
    inputs_grad = (
        out_grad * (inverse_std * scale)[:, None, None, :]
        + values * x_coefficient[:, None, None, :]
        + constant[:, None, None, :]
    )
    return inputs_grad, jnp.sum(centred_sum * inverse_std, axis=0), jnp.sum(grad_sum, axis=0)


_group_norm_cpu.defvjp(_affine_group_norm, _group_norm_cpu_bwd)
