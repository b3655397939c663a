"""U-Net++ (Zhou et al. 2018): nested, densely connected skip pathways, optional deep supervision.

Node X[i, j] (level i, column j): X[i, 0] = DoubleConv(pool(X[i-1, 0])) is the encoder;
X[i, j] = DoubleConv([X[i, 0], ..., X[i, j-1], up(X[i+1, j-1])]) for j >= 1. The prediction comes
from X[0, depth]; with deep supervision every X[0, j] (j = 1..depth) gets its own 1x1 head, the
returned logits are their mean ("accurate mode") and the per-head logits are sown into the
'intermediates' collection as 'deep_supervision_logits' for a multi-head loss.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from neuroseg_jax.models.layers import (
    Conv,
    SpatialDropout,
    check_spatial_size,
    segmentation_output,
    width_at,
)
from neuroseg_jax.models.unet import DoubleConv
from neuroseg_jax.ops import max_pool2x, upsample2x


class UNetPlusPlus(nn.Module):
    """images (B, H, W, C), H and W divisible by 2**depth -> logits (B, H, W, num_classes).

    `conv`: the convolution implementation ('auto' or 'lax', see `neuroseg_jax.ops.conv2d`).
    """

    num_classes: int = 1
    width: int = 32
    depth: int = 4
    norm: str = "group"
    act: str = "relu"
    deep_supervision: bool = False
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        check_spatial_size(x, 2**self.depth, "unetpp")
        nodes: dict[tuple[int, int], jax.Array] = {}
        previous = x.astype(self.dtype)
        for level in range(self.depth + 1):
            block_input = previous if level == 0 else max_pool2x(previous)
            previous = DoubleConv(width_at(self.width, level), self.norm, self.act, self.dtype, self.conv)(
                block_input, train=train
            )
            nodes[(level, 0)] = previous
        nodes[(self.depth, 0)] = SpatialDropout(self.dropout_rate)(nodes[(self.depth, 0)], train=train)
        for column in range(1, self.depth + 1):
            for level in range(self.depth + 1 - column):
                inputs = [nodes[(level, k)] for k in range(column)] + [upsample2x(nodes[(level + 1, column - 1)])]
                block = DoubleConv(width_at(self.width, level), self.norm, self.act, self.dtype, self.conv)
                nodes[(level, column)] = block(jnp.concatenate(inputs, axis=-1), train=train)
        features = nodes[(0, self.depth)]
        if not self.deep_supervision:
            return segmentation_output(features, self.num_classes, return_features, conv=self.conv)
        head_logits = tuple(
            Conv(self.num_classes, 1, dtype=jnp.float32, name=f"head_{column}", implementation=self.conv)(
                nodes[(0, column)].astype(jnp.float32)
            )
            for column in range(1, self.depth + 1)
        )
        self.sow("intermediates", "deep_supervision_logits", head_logits)
        logits = jnp.mean(jnp.stack(head_logits), axis=0)
        return (logits, features.astype(jnp.float32)) if return_features else logits
