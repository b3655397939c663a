"""Building blocks shared by every segmentation model.

All arrays are channels-last: feature maps are (B, H, W, C). Every convolution goes through
`Conv`, which calls `neuroseg_jax.models.conv.conv2d` so that one implementation of the 2-D
convolution serves all models. Normalisation is GroupNorm by default (no mutable state); BatchNorm
is available with `norm="batch"` and keeps its running statistics in the 'batch_stats' collection.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from neuroseg_jax.models.conv import conv2d

Dtype = Any
Initializer = Callable[..., jax.Array]

NORMS = ("group", "batch", "none")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "swish": nn.swish,
    "silu": nn.swish,
    "gelu": nn.gelu,
    "leaky_relu": nn.leaky_relu,
    "identity": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called `name` (one of `ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{what} must be an int or a pair of ints for a 2-D conv, got {value}")
    return value


def group_count(channels: int, max_groups: int) -> int:
    """Largest divisor of `channels` that is <= `max_groups` (GroupNorm needs an exact split)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def check_spatial_size(x: jax.Array, divisor: int, model_name: str) -> None:
    """Raises ValueError unless x is (B, H, W, C) with H and W divisible by `divisor`."""
    if x.ndim != 4:
        raise ValueError(f"{model_name}: expected images (B, H, W, C), got shape {x.shape}")
    height, width = x.shape[1], x.shape[2]
    if height % divisor or width % divisor:
        raise ValueError(
            f"{model_name}: input size {height}x{width} is not divisible by {divisor}; "
            f"pad or crop height and width to multiples of {divisor}"
        )


class Conv(nn.Module):
    """2-D convolution with the fields of `flax.linen.Conv`, computed by `models.conv.conv2d`.

    inputs (B, H, W, Cin) -> (B, H', W', features). Kernel is HWIO (kh, kw, Cin / groups, features),
    parameters are named 'kernel' and 'bias' as in `flax.linen.Conv`, so checkpoints and sharding
    rules written for nn.Conv apply unchanged.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence[tuple[int, int]] = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    def transform_kernel(self, kernel: jax.Array) -> jax.Array:
        """Hook for kernel re-parameterisations (see `WSConv`); identity here."""
        return kernel

    def _padding(self) -> str | list[tuple[int, int]]:
        if isinstance(self.padding, str):
            if self.padding.upper() not in ("SAME", "VALID"):
                raise ValueError(f"Conv padding must be 'SAME', 'VALID', an int or pairs, got {self.padding!r}")
            return self.padding.upper()
        if isinstance(self.padding, int):
            return [(self.padding, self.padding)] * 2
        pads = [tuple(p) if not isinstance(p, int) else (p, p) for p in self.padding]
        if len(pads) != 2:
            raise ValueError(f"Conv padding needs one entry per spatial dim (2), got {self.padding!r}")
        return pads

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if inputs.ndim != 4:
            raise ValueError(f"Conv expects (B, H, W, C) inputs, got shape {inputs.shape}")
        kernel_size = _pair(self.kernel_size, "kernel_size")
        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count or self.features % self.feature_group_count:
            raise ValueError(
                f"Conv: input channels {in_features} and features {self.features} must both be "
                f"divisible by feature_group_count {self.feature_group_count}"
            )
        kernel_shape = (*kernel_size, in_features // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        kernel = self.transform_kernel(kernel)
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        strides = _pair(self.strides, "strides")
        dilation = _pair(self.kernel_dilation, "kernel_dilation")
        padding = self._padding()
        if strides == kernel_size != (1, 1) and padding == "VALID" and dilation == (1, 1) and self.feature_group_count == 1:
            # Non-overlapping patches (ViT patch embedding): space-to-depth + 1x1 conv is the same
            # sum, and compiles far faster than a 16x16 window (whose kernel gradient would be
            # built from kh*kw shifted input views).
            inputs, kernel = _patches_as_channels(inputs, kernel)
            strides = (1, 1)
        y = conv2d(
            inputs,
            kernel,
            strides=strides,
            padding=padding,
            dilation=dilation,
            groups=self.feature_group_count,
        )
        if bias is not None:
            y = y + bias
        return y


def _patches_as_channels(inputs: jax.Array, kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, C), (kh, kw, C, O) -> (B, H//kh, W//kw, kh*kw*C), (1, 1, kh*kw*C, O).

    A VALID conv with stride == kernel size equals a 1x1 conv on the flattened patches; the
    (i, j, c) flattening order of patches and kernel match. Trailing rows/columns that do not fill a
    patch are dropped, as VALID padding does.
    """
    batch, height, width, channels = inputs.shape
    kh, kw, _, out_features = kernel.shape
    rows, cols = height // kh, width // kw
    patches = inputs[:, : rows * kh, : cols * kw, :].reshape(batch, rows, kh, cols, kw, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, kh * kw * channels)
    return patches, kernel.reshape(1, 1, kh * kw * channels, out_features)


class WSConv(Conv):
    """Weight-standardised Conv (BiT / ResNet-V2 of ViT-hybrids; Qiao et al. 2019).

    kernel <- (kernel - mean) / sqrt(var + 1e-5), mean and variance over (kh, kw, Cin) per output
    channel, as used by the R50 backbone of the public R50+ViT-B/16 checkpoints.
    """

    def transform_kernel(self, kernel: jax.Array) -> jax.Array:
        mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
        return (kernel - mean) * jax.lax.rsqrt(var + 1e-5)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) of (B, H, W, C) over H, W and each group of C channels.

    Same values and parameters ('scale', 'bias' of shape (C,)) as `flax.linen.GroupNorm` with
    its default fast variance E[x^2] - E[x]^2, computed as one per-channel affine map
    y = x * a[b, c] + s[b, c]: statistics are per-channel sums folded into groups on a (B, C)
    array, so the full-size work is two reductions and one multiply-add. The backward pass
    (`_group_norm`, a custom VJP) is two reductions (the per-(image, channel) sums of g and g*x,
    from which the scale and bias gradients follow) and one multiply-add as well. flax's version
    reshapes the map into groups and broadcasts group statistics back through that reshape; on the
    CPU that ran 1.6-2x slower forward + backward (2x256x384x32 with Swish: 142 -> 85 ms); autodiff
    of this one summed the bias gradient over the whole cotangent once more (2x512x768x32 with
    Swish: 44 -> 38 ms with the custom VJP). Statistics are computed in float32.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"GroupNorm expects (B, H, W, C) inputs, got shape {x.shape}")
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by num_groups={self.num_groups}")
        scale = self.param("scale", nn.initializers.ones_init(), (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,), self.param_dtype)
        normalised = _group_norm(
            x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32), self.num_groups, self.epsilon
        )
        return normalised.astype(self.dtype or x.dtype)


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


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(values: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float) -> jax.Array:
    """GroupNorm of float32 (B, H, W, C) values as y = x * a[b, c] + s[b, c]."""
    return _group_norm_fwd(values, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(values, scale, bias, num_groups, epsilon):
    channels = values.shape[3]
    mean, inverse_std = _group_statistics(values, num_groups, epsilon)
    multiplier = _per_channel(inverse_std, channels) * scale
    shift = bias - _per_channel(mean, channels) * multiplier
    return values * multiplier[:, None, None, :] + shift[:, None, None, :], (values, scale, mean, inverse_std)


def _group_norm_bwd(num_groups, epsilon, residuals, out_grad):
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


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class Norm(nn.Module):
    """GroupNorm ('group'), BatchNorm ('batch', running stats in 'batch_stats') or nothing ('none').

    GroupNorm uses the largest group count <= `groups` that divides the channels so narrow test
    models work; BatchNorm normalises over the batch in training and uses running averages otherwise.
    """

    kind: str = "group"
    groups: int = 8
    epsilon: float = 1e-5
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if self.kind == "group":
            return GroupNorm(num_groups=group_count(x.shape[-1], self.groups), epsilon=self.epsilon, dtype=self.dtype)(x)
        if self.kind == "batch":
            return nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=self.epsilon, dtype=self.dtype
            )(x)
        if self.kind == "none":
            return x
        raise ValueError(f"unknown norm {self.kind!r}; known: {list(NORMS)}")


class ConvNormAct(nn.Module):
    """Conv -> Norm -> activation; (B, H, W, Cin) -> (B, H/s, W/s, features).

    The conv has no bias when a norm follows (the norm's shift makes it redundant).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    norm: str = "group"
    act: str = "relu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            kernel_dilation=self.dilation,
            use_bias=self.norm == "none",
            dtype=self.dtype,
        )(x)
        x = Norm(self.norm, dtype=self.dtype)(x, train=train)
        return activation(self.act)(x)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel recalibration (Hu et al. 2018) with a Swish bottleneck.

    s = sigmoid(W2 act(W1 mean_hw(x))), out = x * s; hidden width = max(C // reduction, 1).
    """

    reduction: int = 8
    act: str = "swish"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        hidden = Conv(max(channels // self.reduction, 1), 1, dtype=self.dtype)(squeezed)
        gate = nn.sigmoid(Conv(channels, 1, dtype=self.dtype)(activation(self.act)(hidden)))
        return x * gate


class SpatialDropout(nn.Module):
    """Drops whole channels (same mask over H and W; Tompson et al. 2015). Uses the 'dropout' rng."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        return nn.Dropout(self.rate, broadcast_dims=(1, 2))(x, deterministic=not train or self.rate == 0.0)


class ResidualBlock(nn.Module):
    """Two 3x3 ConvNormAct with an identity (or 1x1 projection) shortcut, optional SE.

    out = act(F(x) + shortcut(x)), F = conv-norm-act, conv-norm, [SE]; strides and dilation apply
    to the first conv. (B, H, W, Cin) -> (B, H/s, W/s, features).
    """

    features: int
    strides: int = 1
    dilation: int = 1
    norm: str = "group"
    act: str = "relu"
    se: bool = False
    se_reduction: int = 8
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        y = ConvNormAct(self.features, 3, self.strides, self.dilation, self.norm, self.act, self.dtype)(x, train=train)
        y = ConvNormAct(self.features, 3, 1, self.dilation, self.norm, "identity", self.dtype)(y, train=train)
        if self.se:
            y = SqueezeExcite(self.se_reduction, "swish", self.dtype)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = ConvNormAct(self.features, 1, self.strides, 1, self.norm, "identity", self.dtype)(x, train=train)
        return activation(self.act)(y + shortcut)


class MultiScaleDenseBlock(nn.Module):
    """Multi-Scale Dense Block (IMSAHLO §IV-B, Fig. 3A): parallel receptive fields, densely joined.

    x0 = 1x1 projection of x to `features`. Branch k (dilation d_k of a 3x3 conv, receptive fields
    3, 5, 9 for d = 1, 2, 4) sees the concatenation [x0, y_1, ..., y_{k-1}] of the projection and all
    earlier branches (dense connectivity) and adds `growth` channels. A 1x1 conv fuses
    [x0, y_1, ..., y_K], optional SE recalibrates, and a residual from x0 keeps gradients short:
    out = act(fuse + x0). (B, H, W, Cin) -> (B, H, W, features).
    """

    features: int
    dilations: Sequence[int] = (1, 2, 4)
    growth: int | None = None
    norm: str = "group"
    act: str = "swish"
    se: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        growth = self.growth or max(self.features // 2, 1)
        x0 = ConvNormAct(self.features, 1, norm=self.norm, act=self.act, dtype=self.dtype)(x, train=train)
        branches = [x0]
        for dilation in self.dilations:
            dense_input = jnp.concatenate(branches, axis=-1)
            branches.append(
                ConvNormAct(growth, 3, dilation=dilation, norm=self.norm, act=self.act, dtype=self.dtype)(
                    dense_input, train=train
                )
            )
        fused = ConvNormAct(self.features, 1, norm=self.norm, act="identity", dtype=self.dtype)(
            jnp.concatenate(branches, axis=-1), train=train
        )
        if self.se:
            fused = SqueezeExcite(dtype=self.dtype)(fused)
        return activation(self.act)(fused + x0)


class HierarchicalAttention(nn.Module):
    """Hierarchical Attention (IMSAHLO §IV-B, Fig. 3B): channel attention, then spatial attention.

    Channel ("what"): a = sigmoid(MLP(avgpool_hw x) + MLP(maxpool_hw x)), x1 = x * a, MLP = 1x1 conv,
    Swish, 1x1 conv (Swish rather than ReLU: a narrow ReLU bottleneck can die and stop learning).
    Spatial ("where"): s = sigmoid(conv_kxk([mean_c x1, max_c x1])), out = x1 * s.
    Shape preserving: (B, H, W, C) -> (B, H, W, C).
    """

    reduction: int = 8
    spatial_kernel: int = 7
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        squeeze = Conv(max(channels // self.reduction, 1), 1, dtype=self.dtype, name="channel_mlp_in")
        excite = Conv(channels, 1, dtype=self.dtype, name="channel_mlp_out")
        pooled_avg = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled_max = guarded_max(x, (1, 2))
        channel_scores = nn.sigmoid(excite(nn.swish(squeeze(pooled_avg))) + excite(nn.swish(squeeze(pooled_max))))
        x = x * channel_scores
        spatial_input = jnp.concatenate(
            [jnp.mean(x, axis=-1, keepdims=True), guarded_max(x, -1)], axis=-1
        )
        spatial_scores = nn.sigmoid(Conv(1, self.spatial_kernel, dtype=self.dtype, name="spatial_conv")(spatial_input))
        return x * spatial_scores


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net (Oktay et al. 2018).

    skip (B, H, W, Cs), gate (B, h, w, Cg) from the coarser decoder level (resized to H x W):
    alpha = sigmoid(psi(relu(theta(skip) + phi(gate)))), out = skip * alpha, (B, H, W, Cs).
    """

    inter_features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, skip: jax.Array, gate: jax.Array) -> jax.Array:
        gate = resize_to(gate, skip.shape[1:3])
        theta = Conv(self.inter_features, 1, use_bias=False, dtype=self.dtype, name="theta")(skip)
        phi = Conv(self.inter_features, 1, dtype=self.dtype, name="phi")(gate)
        alpha = nn.sigmoid(Conv(1, 1, dtype=self.dtype, name="psi")(nn.relu(theta + phi)))
        return skip * alpha


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLabV3, Chen et al. 2017).

    Branches: 1x1 conv, 3x3 convs with dilations `rates`, image-level pooling (global mean -> 1x1
    conv -> broadcast); concatenated, fused by a 1x1 ConvNormAct, then spatial dropout.
    (B, H, W, Cin) -> (B, H, W, features).
    """

    features: int
    rates: Sequence[int] = (6, 12, 18)
    norm: str = "group"
    act: str = "relu"
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        branches = [ConvNormAct(self.features, 1, norm=self.norm, act=self.act, dtype=self.dtype)(x, train=train)]
        for rate in self.rates:
            branches.append(
                ConvNormAct(self.features, 3, dilation=rate, norm=self.norm, act=self.act, dtype=self.dtype)(
                    x, train=train
                )
            )
        # GroupNorm over a 1x1 map would normalise single values to zero, so the pooled branch
        # uses a biased conv without a norm.
        pooled = activation(self.act)(Conv(self.features, 1, dtype=self.dtype)(jnp.mean(x, axis=(1, 2), keepdims=True)))
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        y = ConvNormAct(self.features, 1, norm=self.norm, act=self.act, dtype=self.dtype)(
            jnp.concatenate(branches, axis=-1), train=train
        )
        return SpatialDropout(self.dropout_rate)(y, train=train)


def resize_to(x: jax.Array, size: Sequence[int], method: str = "bilinear") -> jax.Array:
    """Resizes (B, H, W, C) to (B, size[0], size[1], C); identity when already that size."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method=method)


def _upsample2x_axis(x: jax.Array, axis: int) -> jax.Array:
    # Half-pixel-centred linear 2x: out[2i] = .75 x[i] + .25 x[i-1], out[2i+1] = .75 x[i] + .25 x[i+1],
    # edges clamped — the values of jax.image.resize(..., "bilinear") for an exact 2x upscale.
    size = x.shape[axis]
    previous = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, 0, size - 1, axis=axis)], axis)
    following = jnp.concatenate([jax.lax.slice_in_dim(x, 1, size, axis=axis), jax.lax.slice_in_dim(x, size - 1, size, axis=axis)], axis)
    even = 0.75 * x + 0.25 * previous
    odd = 0.75 * x + 0.25 * following
    interleaved = jnp.stack([even, odd], axis=axis + 1)
    return interleaved.reshape(*x.shape[:axis], 2 * size, *x.shape[axis + 1 :])


def upsample2x(x: jax.Array) -> jax.Array:
    """Bilinear 2x upsampling, (B, H, W, C) -> (B, 2H, 2W, C).

    Same values as `resize_to(x, (2H, 2W))` (tested), written with slices so it compiles and runs
    faster than the general resize (whose gradient builds dense interpolation matrices).
    """
    return _upsample2x_axis(_upsample2x_axis(x, 1), 2)


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
def _max_pool2x_even(x: jax.Array) -> jax.Array:
    return _first_max_of_windows(x)[0]


def _max_pool2x_even_bwd(index: jax.Array, pooled_grad: jax.Array) -> tuple[jax.Array]:
    batch, rows, cols, channels = pooled_grad.shape
    zero = jnp.zeros_like(pooled_grad)
    window_grads = [jnp.where(index == position, pooled_grad, zero) for position in range(4)]
    # (B, rows, 2, cols, 2, C) row-major windows back to (B, 2*rows, 2*cols, C).
    top = jnp.stack(window_grads[:2], axis=3)
    bottom = jnp.stack(window_grads[2:], axis=3)
    return (jnp.stack([top, bottom], axis=2).reshape(batch, 2 * rows, 2 * cols, channels),)


_max_pool2x_even.defvjp(_first_max_of_windows, _max_pool2x_even_bwd)


def max_pool2x(x: jax.Array) -> jax.Array:
    """2x2 max pooling with stride 2, (B, H, W, C) -> (B, H//2, W//2, C) (an odd last row or column
    is dropped, as VALID pooling does).

    Values and gradients of ``nn.max_pool`` (the first maximum of a window gets the gradient on
    ties, tested), with a custom VJP that keeps one int8 index per output and scatters the
    cotangent with four selects: XLA's select-and-scatter backward was 4.7x slower on the CPU at
    2x512x768x32 (forward + backward 843 -> 178 ms). No float-equality test against the max
    either, which broke ``max(axis=...)``'s gradient (0/0) where XLA fused the two differently.
    """
    height, width = x.shape[1:3]
    return _max_pool2x_even(x[:, : height // 2 * 2, : width // 2 * 2])


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def guarded_max(x: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
    """``jnp.max(x, axis, keepdims=True)`` with the same gradient, minus its 0/0.

    The gradient is shared equally by the elements equal to the maximum. ``jnp.max`` re-derives
    them by comparing x with the max inside the backward computation; where XLA fuses the two
    sides differently the comparison can find no element and the gradient becomes 0/0. Here the
    comparison uses the saved forward max and the count is kept >= 1.
    """
    return jnp.max(x, axis=axis, keepdims=True)


def _guarded_max_fwd(x: jax.Array, axis) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    maximum = jnp.max(x, axis=axis, keepdims=True)
    return maximum, (x, maximum)


def _guarded_max_bwd(axis, residuals, max_grad: jax.Array) -> tuple[jax.Array]:
    x, maximum = residuals
    is_max = (x == maximum).astype(max_grad.dtype)
    share = max_grad / jnp.maximum(jnp.sum(is_max, axis=axis, keepdims=True), 1)
    return (is_max * share,)


guarded_max.defvjp(_guarded_max_fwd, _guarded_max_bwd)


def segmentation_output(
    features: jax.Array, num_classes: int, return_features: bool, kernel_size: int = 1
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Shared head: float32 logits (B, H, W, num_classes) from full-resolution features (B, H, W, D).

    Must be called inside a compact `__call__`; the head conv is named 'head' and computes in float32
    so low-precision models still return float32 logits.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    features = features.astype(jnp.float32)
    logits = Conv(num_classes, kernel_size, dtype=jnp.float32, name="head")(features)
    return (logits, features) if return_features else logits


def width_at(width: int, level: int) -> int:
    """Channels at encoder level `level` (0 = full resolution): width * 2**level."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return width * 2**level
