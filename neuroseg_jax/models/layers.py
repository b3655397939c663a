"""Building blocks shared by every segmentation model.

All arrays are channels-last: feature maps are (B, H, W, C). Every convolution goes through
`Conv`, which calls `neuroseg_jax.ops.conv2d` so that one implementation of the 2-D convolution
serves all models; the `conv` field of the blocks (and of every model: `config.model.conv`) picks
it, 'auto' (fast custom gradients on the CPU) or 'lax' (plain lax convolution). Normalisation is
GroupNorm by default (no mutable state); BatchNorm is available with `norm="batch"` and keeps its
running statistics in the 'batch_stats' collection. How the convolution, GroupNorm and pooling are
computed fast is `neuroseg_jax.ops`' business.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from neuroseg_jax._validation import pair
# max_pool2x, resize_to and upsample2x stay reachable as `layers.<name>` beside the blocks.
from neuroseg_jax.ops import conv2d, group_norm, guarded_max, max_pool2x, resize_to, upsample2x  # noqa: F401

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
    """2-D convolution with the fields of `flax.linen.Conv`, computed by `neuroseg_jax.ops.conv2d`.

    inputs (B, H, W, Cin) -> (B, H', W', features). Kernel is HWIO (kh, kw, Cin / groups, features),
    parameters are named 'kernel' and 'bias' as in `flax.linen.Conv`, so checkpoints and sharding
    rules written for nn.Conv apply unchanged. `implementation` is conv2d's: 'auto' or 'lax'.
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
    implementation: str = "auto"

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
        kernel_size = pair(self.kernel_size, "Conv kernel_size")
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
        strides = pair(self.strides, "Conv strides")
        dilation = pair(self.kernel_dilation, "Conv kernel_dilation")
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
            implementation=self.implementation,
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

    Same values and parameters ('scale', 'bias' of shape (C,)) as `flax.linen.GroupNorm` with its
    default fast variance, computed by `neuroseg_jax.ops.group_norm` (statistics in float32).
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (channels,), self.param_dtype)
        normalised = group_norm(x, scale, bias, num_groups=self.num_groups, epsilon=self.epsilon)
        return normalised.astype(self.dtype or x.dtype)


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
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            kernel_dilation=self.dilation,
            use_bias=self.norm == "none",
            dtype=self.dtype,
            implementation=self.conv,
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
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        hidden = Conv(max(channels // self.reduction, 1), 1, dtype=self.dtype, implementation=self.conv)(squeezed)
        gate = nn.sigmoid(Conv(channels, 1, dtype=self.dtype, implementation=self.conv)(activation(self.act)(hidden)))
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
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        block = dict(norm=self.norm, dtype=self.dtype, conv=self.conv)
        y = ConvNormAct(self.features, 3, self.strides, self.dilation, act=self.act, **block)(x, train=train)
        y = ConvNormAct(self.features, 3, 1, self.dilation, act="identity", **block)(y, train=train)
        if self.se:
            y = SqueezeExcite(self.se_reduction, "swish", self.dtype, self.conv)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = ConvNormAct(self.features, 1, self.strides, 1, act="identity", **block)(x, train=train)
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
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        growth = self.growth or max(self.features // 2, 1)
        block = dict(norm=self.norm, dtype=self.dtype, conv=self.conv)
        x0 = ConvNormAct(self.features, 1, act=self.act, **block)(x, train=train)
        branches = [x0]
        for dilation in self.dilations:
            dense_input = jnp.concatenate(branches, axis=-1)
            branches.append(ConvNormAct(growth, 3, dilation=dilation, act=self.act, **block)(dense_input, train=train))
        fused = ConvNormAct(self.features, 1, act="identity", **block)(jnp.concatenate(branches, axis=-1), train=train)
        if self.se:
            fused = SqueezeExcite(dtype=self.dtype, conv=self.conv)(fused)
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
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        conv = dict(dtype=self.dtype, implementation=self.conv)
        squeeze = Conv(max(channels // self.reduction, 1), 1, name="channel_mlp_in", **conv)
        excite = Conv(channels, 1, name="channel_mlp_out", **conv)
        pooled_avg = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled_max = guarded_max(x, (1, 2))
        channel_scores = nn.sigmoid(excite(nn.swish(squeeze(pooled_avg))) + excite(nn.swish(squeeze(pooled_max))))
        x = x * channel_scores
        spatial_input = jnp.concatenate(
            [jnp.mean(x, axis=-1, keepdims=True), guarded_max(x, -1)], axis=-1
        )
        spatial_scores = nn.sigmoid(Conv(1, self.spatial_kernel, name="spatial_conv", **conv)(spatial_input))
        return x * spatial_scores


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net (Oktay et al. 2018).

    skip (B, H, W, Cs), gate (B, h, w, Cg) from the coarser decoder level (resized to H x W):
    alpha = sigmoid(psi(relu(theta(skip) + phi(gate)))), out = skip * alpha, (B, H, W, Cs).
    """

    inter_features: int
    dtype: Dtype = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, skip: jax.Array, gate: jax.Array) -> jax.Array:
        gate = resize_to(gate, skip.shape[1:3])
        conv = dict(dtype=self.dtype, implementation=self.conv)
        theta = Conv(self.inter_features, 1, use_bias=False, name="theta", **conv)(skip)
        phi = Conv(self.inter_features, 1, name="phi", **conv)(gate)
        alpha = nn.sigmoid(Conv(1, 1, name="psi", **conv)(nn.relu(theta + phi)))
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
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        block = dict(norm=self.norm, act=self.act, dtype=self.dtype, conv=self.conv)
        branches = [ConvNormAct(self.features, 1, **block)(x, train=train)]
        for rate in self.rates:
            branches.append(ConvNormAct(self.features, 3, dilation=rate, **block)(x, train=train))
        # GroupNorm over a 1x1 map would normalise single values to zero, so the pooled branch
        # uses a biased conv without a norm.
        pooled_conv = Conv(self.features, 1, dtype=self.dtype, implementation=self.conv)
        pooled = pooled_conv(jnp.mean(x, axis=(1, 2), keepdims=True))
        branches.append(jnp.broadcast_to(activation(self.act)(pooled), (*x.shape[:3], self.features)))
        y = ConvNormAct(self.features, 1, **block)(jnp.concatenate(branches, axis=-1), train=train)
        return SpatialDropout(self.dropout_rate)(y, train=train)


def segmentation_output(
    features: jax.Array, num_classes: int, return_features: bool, kernel_size: int = 1, conv: str = "auto"
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Shared head: float32 logits (B, H, W, num_classes) from full-resolution features (B, H, W, D).

    Must be called inside a compact `__call__`; the head conv is named 'head' and computes in float32
    so low-precision models still return float32 logits. `conv`: the `Conv` implementation.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    features = features.astype(jnp.float32)
    logits = Conv(num_classes, kernel_size, dtype=jnp.float32, name="head", implementation=conv)(features)
    return (logits, features) if return_features else logits


def width_at(width: int, level: int) -> int:
    """Channels at encoder level `level` (0 = full resolution): width * 2**level."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return width * 2**level
