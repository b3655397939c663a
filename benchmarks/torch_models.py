"""PyTorch twins (NCHW) of the networks that `train_step.py` times, and a Flax-to-PyTorch copy.

Imported by `train_step.py` only when a torch variant or `--check` runs, so the JAX variants need
no torch. The IMSAHLO twin takes its hyper-parameters from the Flax module and the layer constants
(norm groups, reductions, attention kernel) from `neuroseg_jax.models.layers`, so the two cannot
drift apart silently; `load_flax_params` lets `train_step.py --check` compare their outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flax.traverse_util import flatten_dict
from torch import nn
from torch.nn import functional as F

from neuroseg_jax.models import layers


class TorchUNet(nn.Module):
    """The benchmark U-Net of `train_step.BenchUNet`, with ConvTranspose2d(k=2, s=2) upsampling."""

    def __init__(self, level_channels: Sequence[int], norm_groups: int) -> None:
        super().__init__()

        def block(in_channels: int, out_channels: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.GroupNorm(norm_groups, out_channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_channels, out_channels, 3, padding=1),
                nn.GroupNorm(norm_groups, out_channels),
                nn.ReLU(inplace=True),
            )

        channels = tuple(level_channels)
        self.down = nn.ModuleList(
            [block(cin, cout) for cin, cout in zip((1,) + channels[:-2], channels[:-1])]
        )
        self.bottom = block(channels[-2], channels[-1])
        self.up = nn.ModuleList(
            [
                nn.ConvTranspose2d(cin, cout, 2, stride=2)
                for cin, cout in zip(channels[:0:-1], channels[-2::-1])
            ]
        )
        self.up_blocks = nn.ModuleList(
            [block(2 * cout, cout) for cout in channels[-2::-1]]
        )
        self.head = nn.Conv2d(channels[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, up_block, skip in zip(self.up, self.up_blocks, reversed(skips)):
            x = up_block(torch.cat([up(x), skip], dim=1))
        return self.head(x)


# The twins of the layers.py blocks below register their sub-layers in the order the Flax blocks
# create them, which is what `load_flax_params` relies on.


class ConvNormAct(nn.Sequential):
    """layers.ConvNormAct with GroupNorm: bias-free 'SAME' conv, GroupNorm, then SiLU or nothing."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int = 1,
        activate: bool = True,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                padding=dilation * (kernel_size - 1) // 2,
                dilation=dilation,
                bias=False,
            ),
            nn.GroupNorm(
                layers.group_count(out_channels, layers.Norm.groups),
                out_channels,
                eps=layers.Norm.epsilon,
            ),
            nn.SiLU() if activate else nn.Identity(),
        )


class SqueezeExcite(nn.Module):
    """layers.SqueezeExcite: x * sigmoid(conv1x1(silu(conv1x1(mean_hw x))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // layers.SqueezeExcite.reduction, 1)
        self.squeeze = nn.Conv2d(channels, hidden, 1)
        self.excite = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.excite(F.silu(self.squeeze(squeezed))))


class MultiScaleDenseBlock(nn.Module):
    """layers.MultiScaleDenseBlock with SE and SiLU: 1x1 projection x0, densely fed dilated 3x3
    branches, 1x1 fusion, SE, then silu(fused + x0)."""

    def __init__(
        self, in_channels: int, features: int, dilations: Sequence[int]
    ) -> None:
        super().__init__()
        growth = max(features // 2, 1)
        self.project = ConvNormAct(in_channels, features, 1)
        self.branches = nn.ModuleList(
            [
                ConvNormAct(features + index * growth, growth, 3, dilation)
                for index, dilation in enumerate(dilations)
            ]
        )
        self.fuse = ConvNormAct(
            features + len(dilations) * growth, features, 1, activate=False
        )
        self.recalibrate = SqueezeExcite(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.project(x)
        outputs = [x0]
        for branch in self.branches:
            outputs.append(branch(torch.cat(outputs, dim=1)))
        fused = self.recalibrate(self.fuse(torch.cat(outputs, dim=1)))
        return F.silu(fused + x0)


class HierarchicalAttention(nn.Module):
    """layers.HierarchicalAttention: channel attention from a shared MLP over the average- and
    max-pooled maps, then spatial attention from a conv over the channel mean and max."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // layers.HierarchicalAttention.reduction, 1)
        kernel_size = layers.HierarchicalAttention.spatial_kernel
        self.channel_mlp_in = nn.Conv2d(channels, hidden, 1)
        self.channel_mlp_out = nn.Conv2d(hidden, channels, 1)
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def channel_mlp(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.channel_mlp_out(F.silu(self.channel_mlp_in(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        average_scores = self.channel_mlp(x.mean(dim=(2, 3), keepdim=True))
        max_scores = self.channel_mlp(x.amax(dim=(2, 3), keepdim=True))
        x = x * torch.sigmoid(average_scores + max_scores)
        spatial_input = torch.cat(
            [x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1
        )
        return x * torch.sigmoid(self.spatial_conv(spatial_input))


class DecoderLevel(nn.Module):
    """One IMSAHLO decoder level: bilinear 2x upsampling + 3x3 ConvNormAct, the skip through
    Hierarchical Attention, concatenation, MSDB."""

    def __init__(
        self, coarse_channels: int, features: int, dilations: Sequence[int]
    ) -> None:
        super().__init__()
        self.up_conv = ConvNormAct(coarse_channels, features, 3)
        self.skip_attention = HierarchicalAttention(features)
        self.block = MultiScaleDenseBlock(2 * features, features, dilations)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # align_corners=False is the half-pixel, edge-clamped interpolation of ops.upsample2x.
        upsampled = F.interpolate(
            x, scale_factor=2, mode="bilinear", align_corners=False
        )
        return self.block(
            torch.cat([self.up_conv(upsampled), self.skip_attention(skip)], dim=1)
        )


class TorchIMSAHLO(nn.Module):
    """The PyTorch twin of a Flax `neuroseg_jax.models.imsahlo.IMSAHLO` module (the full model:
    MSDB blocks with SE, Swish, Hierarchical Attention, GroupNorm, float32); logits (B, K, H, W)."""

    def __init__(self, flax_model: Any, in_channels: int) -> None:
        super().__init__()
        mirrored = {
            "block": "msdb",
            "se": True,
            "attention": True,
            "act": "swish",
            "norm": "group",
        }
        differing = {
            key: getattr(flax_model, key)
            for key, value in mirrored.items()
            if getattr(flax_model, key) != value
        }
        if differing or np.dtype(flax_model.dtype) != np.float32:
            raise ValueError(
                f"the twin mirrors IMSAHLO with {mirrored}, float32; got {differing}, {flax_model.dtype}"
            )
        dilations = tuple(flax_model.dilations)
        widths = [
            layers.width_at(flax_model.width, level)
            for level in range(flax_model.depth + 1)
        ]
        self.encoder = nn.ModuleList(
            [
                MultiScaleDenseBlock(cin, cout, dilations)
                for cin, cout in zip([in_channels, *widths[:-2]], widths[:-1])
            ]
        )
        self.bottleneck = MultiScaleDenseBlock(widths[-2], widths[-1], dilations)
        self.bottleneck_attention = HierarchicalAttention(widths[-1])
        # Dropout2d drops whole channels, as layers.SpatialDropout does.
        self.dropout = nn.Dropout2d(flax_model.dropout_rate)
        self.decoder = nn.ModuleList(
            [
                DecoderLevel(widths[level + 1], widths[level], dilations)
                for level in reversed(range(flax_model.depth))
            ]
        )
        self.head = nn.Conv2d(widths[0], flax_model.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.dropout(self.bottleneck_attention(self.bottleneck(x)))
        for level, skip in zip(self.decoder, reversed(skips)):
            x = level(x, skip)
        return self.head(x)


def paired_parameters(
    model: nn.Module, params: Mapping[str, Any]
) -> list[tuple[str, np.ndarray, nn.Parameter]]:
    """(Flax path, Flax array in PyTorch layout, twin parameter) for every parameter, paired in
    creation order; kernels go from HWIO to OIHW and every pair's shape is checked.

    `params` must keep the creation order of Flax's init: jax.tree_util (tree_map, jax.grad) sorts
    the keys, flax.traverse_util's flatten_dict / unflatten_dict keep the order. Two same-shaped
    parameters swapped would pass the shape check, which is why `--check` compares outputs too.
    """
    flax_leaves = list(flatten_dict(params, sep="/").items())
    torch_params = list(model.parameters())
    if len(flax_leaves) != len(torch_params):
        raise ValueError(
            f"{len(flax_leaves)} Flax parameter arrays but {len(torch_params)} in the twin"
        )
    pairs = []
    for (path, value), target in zip(flax_leaves, torch_params):
        value = np.asarray(value)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        if value.shape != tuple(target.shape):
            raise ValueError(
                f"{path}: Flax shape {value.shape} (as OIHW), twin {tuple(target.shape)}"
            )
        pairs.append((path, value, target))
    return pairs


def load_flax_params(model: nn.Module, params: Mapping[str, Any]) -> None:
    """Copies Flax `params` (in creation order, see `paired_parameters`) into the twin `model`."""
    with torch.no_grad():
        for _, value, target in paired_parameters(model, params):
            target.copy_(torch.tensor(value))
