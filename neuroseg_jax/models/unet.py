"""U-Net (Ronneberger et al. 2015) and Attention U-Net (Oktay et al. 2018), the Table II baselines.

Both: 4 max-pool downsamplings (H, W divisible by 16), two ConvNormAct per level with widths
width * (1, 2, 4, 8, 16), bilinear 2x upsampling + concatenation of the encoder skip in the decoder.
Attention U-Net gates each skip with an `AttentionGate` driven by the coarser decoder features.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from neuroseg_jax.models.layers import (
    AttentionGate,
    ConvNormAct,
    SpatialDropout,
    check_spatial_size,
    segmentation_output,
    width_at,
)
from neuroseg_jax.ops import max_pool2x, upsample2x


class DoubleConv(nn.Module):
    """Two 3x3 ConvNormAct: (B, H, W, Cin) -> (B, H, W, features)."""

    features: int
    norm: str = "group"
    act: str = "relu"
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        block = dict(norm=self.norm, act=self.act, dtype=self.dtype, conv=self.conv)
        x = ConvNormAct(self.features, 3, **block)(x, train=train)
        return ConvNormAct(self.features, 3, **block)(x, train=train)


class UNet(nn.Module):
    """U-Net; images (B, H, W, C) -> logits (B, H, W, num_classes) [, features (B, H, W, width)].

    attention_gates=True gives Attention U-Net. Spatial dropout (rate `dropout_rate`) is applied to
    the bottleneck during training. `conv`: the convolution implementation ('auto' or 'lax', see
    `neuroseg_jax.ops.conv2d`).
    """

    num_classes: int = 1
    width: int = 32
    depth: int = 4
    norm: str = "group"
    act: str = "relu"
    attention_gates: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        name = "attention_unet" if self.attention_gates else "unet"
        check_spatial_size(x, 2**self.depth, name)
        x = x.astype(self.dtype)
        skips = []
        for level in range(self.depth):
            x = DoubleConv(width_at(self.width, level), self.norm, self.act, self.dtype, self.conv)(x, train=train)
            skips.append(x)
            x = max_pool2x(x)
        x = DoubleConv(width_at(self.width, self.depth), self.norm, self.act, self.dtype, self.conv)(x, train=train)
        x = SpatialDropout(self.dropout_rate)(x, train=train)
        for level in reversed(range(self.depth)):
            features = width_at(self.width, level)
            skip = skips[level]
            if self.attention_gates:
                skip = AttentionGate(max(features // 2, 1), self.dtype, self.conv)(skip, x)
            x = ConvNormAct(features, 3, norm=self.norm, act=self.act, dtype=self.dtype, conv=self.conv)(
                upsample2x(x), train=train
            )
            x = DoubleConv(features, self.norm, self.act, self.dtype, self.conv)(
                jnp.concatenate([x, skip], axis=-1), train=train
            )
        return segmentation_output(x, self.num_classes, return_features, conv=self.conv)
