"""DeepLabV3+ (Chen et al. 2018): atrous residual encoder (output stride 16), ASPP, light decoder.

Encoder: stride-2 stem, residual stages at H/2, H/4 (low-level features), H/8, H/16, then two
dilated residual blocks (dilation 2, 4) that enlarge the receptive field without further striding.
ASPP (rates 6, 12, 18 at output stride 16) -> upsample to H/4 -> concat with 1x1-projected low-level
features -> two 3x3 ConvNormAct -> bilinear upsample to H x W -> 1x1 head. Plain (not separable)
3x3 convolutions are used throughout.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from neuroseg_jax.models.layers import (
    ASPP,
    ConvNormAct,
    ResidualBlock,
    check_spatial_size,
    segmentation_output,
    width_at,
)
from neuroseg_jax.ops import resize_to


class DeepLabV3Plus(nn.Module):
    """images (B, H, W, C), H and W divisible by 16 -> logits (B, H, W, num_classes).

    Features returned on request are the decoder output resized to (B, H, W, 4 * width). `conv`: the
    convolution implementation ('auto' or 'lax', see `neuroseg_jax.ops.conv2d`).
    """

    num_classes: int = 1
    width: int = 32
    norm: str = "group"
    act: str = "relu"
    rates: Sequence[int] = (6, 12, 18)
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        check_spatial_size(x, 16, "deeplabv3plus")
        input_size = x.shape[1:3]
        block = dict(norm=self.norm, act=self.act, dtype=self.dtype, conv=self.conv)
        y = ConvNormAct(self.width, 3, strides=2, **block)(x.astype(self.dtype), train=train)
        y = ResidualBlock(self.width, **block)(y, train=train)
        low_level = ResidualBlock(width_at(self.width, 1), strides=2, **block)(y, train=train)
        y = ResidualBlock(width_at(self.width, 2), strides=2, **block)(low_level, train=train)
        y = ResidualBlock(width_at(self.width, 3), strides=2, **block)(y, train=train)
        y = ResidualBlock(width_at(self.width, 3), dilation=2, **block)(y, train=train)
        y = ResidualBlock(width_at(self.width, 3), dilation=4, **block)(y, train=train)
        y = ASPP(width_at(self.width, 2), tuple(self.rates), dropout_rate=self.dropout_rate, **block)(y, train=train)
        y = resize_to(y, low_level.shape[1:3])
        low_level = ConvNormAct(max(self.width, 1), 1, **block)(low_level, train=train)
        y = jnp.concatenate([y, low_level], axis=-1)
        y = ConvNormAct(width_at(self.width, 2), 3, **block)(y, train=train)
        y = ConvNormAct(width_at(self.width, 2), 3, **block)(y, train=train)
        return segmentation_output(resize_to(y, input_size), self.num_classes, return_features, conv=self.conv)
