"""IMSAHLO (IMSAHLO §IV-B, Figs. 2-3) and its Table III ablation ladder as switches of one module.

Encoder: per level a block (MSDB or residual) then 2x2 max pooling; bottleneck block followed by
Hierarchical Attention (HA) and spatial dropout; decoder: bilinear 2x upsampling + 3x3 ConvNormAct,
the encoder skip passed through HA, concatenation, then the same block type; 1x1 head (sigmoid for
num_classes=1 is applied by the loss / inference, the model returns logits).

Table III ladder (registry names in `models.registry`):
  resunet           block='residual', se=False, act='relu',  attention=False  (residual-only baseline)
  neurosegnet       block='residual', se=True,  act='swish', attention=False  (+ SE with Swish)
  neurosegnet_msdb  block='msdb',     se=True,  act='swish', attention=False  (+ MSDB)
  imsahlo           block='msdb',     se=True,  act='swish', attention=True   (+ HA, full model)
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from neuroseg_jax.models.layers import (
    ConvNormAct,
    HierarchicalAttention,
    MultiScaleDenseBlock,
    ResidualBlock,
    SpatialDropout,
    check_spatial_size,
    segmentation_output,
    width_at,
)
from neuroseg_jax.ops import max_pool2x, upsample2x

BLOCKS = ("residual", "msdb")


class IMSAHLO(nn.Module):
    """images (B, H, W, C), H and W divisible by 2**depth -> logits (B, H, W, num_classes).

    With return_features=True also returns the last decoder features (B, H, W, width). `conv`: the
    convolution implementation ('auto' or 'lax', see `neuroseg_jax.ops.conv2d`).
    """

    num_classes: int = 1
    width: int = 32
    depth: int = 4
    block: str = "msdb"
    se: bool = True
    attention: bool = True
    act: str = "swish"
    norm: str = "group"
    dilations: Sequence[int] = (1, 2, 4)
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    conv: str = "auto"

    def _block(self, features: int) -> nn.Module:
        common = dict(norm=self.norm, act=self.act, se=self.se, dtype=self.dtype, conv=self.conv)
        if self.block == "residual":
            return ResidualBlock(features, **common)
        if self.block == "msdb":
            return MultiScaleDenseBlock(features, dilations=tuple(self.dilations), **common)
        raise ValueError(f"unknown IMSAHLO block {self.block!r}; known: {list(BLOCKS)}")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        check_spatial_size(x, 2**self.depth, "imsahlo")
        x = x.astype(self.dtype)
        skips = []
        for level in range(self.depth):
            x = self._block(width_at(self.width, level))(x, train=train)
            skips.append(x)
            x = max_pool2x(x)
        x = self._block(width_at(self.width, self.depth))(x, train=train)
        if self.attention:
            x = HierarchicalAttention(dtype=self.dtype, conv=self.conv)(x)
        x = SpatialDropout(self.dropout_rate)(x, train=train)
        for level in reversed(range(self.depth)):
            features = width_at(self.width, level)
            x = ConvNormAct(features, 3, norm=self.norm, act=self.act, dtype=self.dtype, conv=self.conv)(
                upsample2x(x), train=train
            )
            skip = skips[level]
            if self.attention:
                skip = HierarchicalAttention(dtype=self.dtype, conv=self.conv)(skip)
            x = self._block(features)(jnp.concatenate([x, skip], axis=-1), train=train)
        return segmentation_output(x, self.num_classes, return_features, conv=self.conv)
