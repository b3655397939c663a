"""TransUNet (Chen et al. 2021) as MorphoSeg §3.1 uses it, plus a loader for the public ViT .npz checkpoints.

Encoder, hybrid ("R50-B16"): ResNet-V2 with weight-standardised convs and GroupNorm (root 7x7/2
conv + 3x3/2 max pool, stages of `resnet_units` = (3, 4, 9) bottleneck units with strides 1, 2, 2,
output stride 16), then a patch embedding of its H/16 features into `hidden_size` tokens: 1x1 for
16-pixel patches, 2x2/2 for 32-pixel ones (R50-ViT-L/32, whose token grid is H/32); pure
("ViT-B16"): a PxP/P patch embedding of the image, P = `patch_size`. Learned position embeddings of
the `img_size // patch_size` grid are bilinearly resized when the input has another size. ViT
encoder: `num_layers` pre-LayerNorm blocks of multi-head self-attention and a GELU MLP (ViT-B: 12
layers, 12 heads, 768 hidden, MLP 3072; ViT-L: 24, 16, 1024, 4096).

Decoder, the cascaded upsampler (CUP): 3x3 ConvNormAct to `head_channels` (512) on the token grid,
bilinear 2x upsampling up to the H/16 grid when the patches are larger than 16 pixels (TransUNet's
CUP assumes 16: its code's R50-ViT-L_32 on 32-pixel patches fails at the first skip concatenation,
H/16 against H/8), then four blocks of
[bilinear 2x up, concat skip, two 3x3 ConvNormAct] with `decoder_channels` (256, 128, 64, 16);
the first `n_skip` blocks receive the ResNet features at H/8 (8w = 512 channels), H/4 (4w = 256)
and H/2 (w = 64) — the skip channels (512, 256, 64, 16) of the reference, whose fourth entry is
never used — and a 3x3 conv head. All widths scale with `width` (the ResNet root width, 64 for R50).
The decoder normalises with GroupNorm by default (`norm`); TransUNet's uses BatchNorm
(`norm="batch"`).

Parameter names of the encoder follow the public .npz checkpoint layout ('conv_root', 'gn_root',
'block1/unit1/conv1', 'embedding', 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query',
...) under a 'resnet' prefix for the CNN, which is what `load_pretrained_npz` relies on.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from scipy import ndimage

from neuroseg_jax.models.layers import (
    GroupNorm,
    Conv,
    ConvNormAct,
    WSConv,
    check_spatial_size,
    group_count,
    segmentation_output,
)
from neuroseg_jax.ops import upsample2x

CUP_STRIDE = 16  # the CUP's four 2x upsamplings start from the H/16 grid, the ResNet's output stride
POSITION_EMBEDDING = "Transformer/posembed_input/pos_embedding"
ATTENTION = "MultiHeadDotProductAttention_1"


def _gn(channels: int, groups: int, epsilon: float, name: str, dtype: Any) -> GroupNorm:
    return GroupNorm(num_groups=group_count(channels, groups), epsilon=epsilon, dtype=dtype, name=name)


class BottleneckUnit(nn.Module):
    """ResNet-V2 bottleneck unit of the ViT-hybrid backbone (BiT; Kolesnikov et al. 2020).

    y = gn3(conv3_1x1(relu(gn2(conv2_3x3/s(relu(gn1(conv1_1x1(x)))))))),
    out = relu(y + gn_proj(conv_proj_1x1/s(x))) — projection only when stride or width changes.
    GroupNorm: 32 groups, eps 1e-6; gn_proj: one group per channel, eps 1e-5 (reference settings).
    """

    features: int
    mid_features: int
    strides: int = 1
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = dict(use_bias=False, dtype=self.dtype, implementation=self.conv)
        residual = x
        if self.strides != 1 or x.shape[-1] != self.features:
            residual = WSConv(self.features, 1, strides=self.strides, name="conv_proj", **conv)(x)
            residual = _gn(self.features, self.features, 1e-5, "gn_proj", self.dtype)(residual)
        y = WSConv(self.mid_features, 1, name="conv1", **conv)(x)
        y = nn.relu(_gn(self.mid_features, 32, 1e-6, "gn1", self.dtype)(y))
        # Explicit (1, 1) padding matches the reference's stride-2 windows (SAME would pad (0, 1)).
        y = WSConv(self.mid_features, 3, strides=self.strides, padding=1, name="conv2", **conv)(y)
        y = nn.relu(_gn(self.mid_features, 32, 1e-6, "gn2", self.dtype)(y))
        y = WSConv(self.features, 1, name="conv3", **conv)(y)
        y = _gn(self.features, 32, 1e-6, "gn3", self.dtype)(y)
        return nn.relu(y + residual)


class ResNetStage(nn.Module):
    """`num_units` bottleneck units named unit1..unitN; the first one strides and projects."""

    features: int
    mid_features: int
    num_units: int
    strides: int
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index in range(1, self.num_units + 1):
            strides = self.strides if index == 1 else 1
            x = BottleneckUnit(self.features, self.mid_features, strides, self.dtype, self.conv, name=f"unit{index}")(x)
        return x


class ResNetV2(nn.Module):
    """Hybrid backbone: (B, H, W, 3) -> (B, H/16, W/16, 16w) and skips [H/8 8w, H/4 4w, H/2 w]."""

    width: int = 64
    units: Sequence[int] = (3, 4, 9)
    dtype: Any = jnp.float32
    conv: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        x = WSConv(
            self.width, 7, strides=2, padding=3, use_bias=False, dtype=self.dtype, implementation=self.conv,
            name="conv_root",
        )(x)
        x = nn.relu(_gn(self.width, 32, 1e-6, "gn_root", self.dtype)(x))
        stage_outputs = [x]
        # (1, 1) padding keeps H/4 exact; the reference pools unpadded and zero-pads the map back.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, num_units in enumerate(self.units):
            x = ResNetStage(
                features=self.width * 4 * 2**stage,
                mid_features=self.width * 2**stage,
                num_units=num_units,
                strides=1 if stage == 0 else 2,
                dtype=self.dtype,
                conv=self.conv,
                name=f"block{stage + 1}",
            )(x)
            stage_outputs.append(x)
        return x, stage_outputs[-2::-1]


class PositionEmbedding(nn.Module):
    """Learned position embedding (1, gh, gw, D), bilinearly resized to the token grid of the input."""

    grid: tuple[int, int]

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        hidden = tokens.shape[-1]
        table = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, *self.grid, hidden))
        if tuple(tokens.shape[1:3]) != tuple(self.grid):
            table = jax.image.resize(table, (1, *tokens.shape[1:3], hidden), method="bilinear")
        return tokens + table.astype(tokens.dtype)


class MlpBlock(nn.Module):
    """Dense(mlp_dim) -> GELU -> dropout -> Dense(D) -> dropout; (B, N, D) -> (B, N, D)."""

    mlp_dim: int
    dropout_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dense = dict(dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(stddev=1e-6))
        y = nn.Dense(self.mlp_dim, name="Dense_0", **dense)(x)
        y = nn.Dropout(self.dropout_rate)(nn.gelu(y, approximate=False), deterministic=not train)
        y = nn.Dense(x.shape[-1], name="Dense_1", **dense)(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MHSA(LN(x)), then + MLP(LN(.)); (B, N, D) -> (B, N, D)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_0")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            dropout_rate=self.attention_dropout_rate,
            deterministic=not train,
            name="MultiHeadDotProductAttention_1",
        )(y)
        x = x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="LayerNorm_2")(x)
        return x + MlpBlock(self.mlp_dim, self.dropout_rate, self.dtype, name="MlpBlock_3")(y, train=train)


class ViTEncoder(nn.Module):
    """Token map (B, h, w, D) -> position embedding, `num_layers` blocks, final LayerNorm -> (B, h, w, D)."""

    grid: tuple[int, int]
    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
        batch, height, width, hidden = tokens.shape
        if hidden % self.num_heads:
            raise ValueError(f"transunet: hidden_size {hidden} is not divisible by num_heads {self.num_heads}")
        x = PositionEmbedding(self.grid, name="posembed_input")(tokens)
        x = nn.Dropout(self.dropout_rate)(x.reshape(batch, height * width, hidden), deterministic=not train)
        for index in range(self.num_layers):
            x = EncoderBlock(
                self.num_heads, self.mlp_dim, self.dropout_rate, self.attention_dropout_rate, self.dtype,
                name=f"encoderblock_{index}",
            )(x, train=train)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="encoder_norm")(x)
        return x.reshape(batch, height, width, hidden)


class TransUNet(nn.Module):
    """images (B, H, W, C), H and W divisible by `patch_size` -> logits (B, H, W, num_classes).

    C must equal `input_channels` (3 for ImageNet-pretrained encoders); single-channel images are
    repeated to 3 channels as in the reference. Features on request: last CUP block output
    (B, H, W, decoder_channels[-1]). `conv`: the convolution implementation ('auto' or 'lax', see
    `neuroseg_jax.ops.conv2d`).
    """

    num_classes: int = 1
    width: int = 64
    hybrid: bool = True
    resnet_units: Sequence[int] = (3, 4, 9)
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.0
    img_size: int | Sequence[int] = 224
    patch_size: int = 16
    n_skip: int = 3
    decoder_channels: Sequence[int] | None = None
    head_channels: int | None = None
    input_channels: int = 3
    norm: str = "group"
    dtype: Any = jnp.float32
    conv: str = "auto"

    def _decoder_channels(self) -> tuple[int, ...]:
        if self.decoder_channels is not None:
            channels = tuple(self.decoder_channels)
            if len(channels) != 4:
                raise ValueError(f"transunet: decoder_channels needs 4 entries (4 upsamplings), got {channels}")
            return channels
        return (4 * self.width, 2 * self.width, self.width, max(self.width // 4, 1))

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        patch = self.patch_size
        if patch < CUP_STRIDE or patch & (patch - 1):
            raise ValueError(f"transunet: patch_size must be 16 times a power of two (16, 32, ...), got {patch}")
        check_spatial_size(x, patch, "transunet")
        if len(tuple(self.resnet_units)) != 3:
            raise ValueError(f"transunet: resnet_units needs 3 stages (output stride 16), got {self.resnet_units}")
        max_skip = 3 if self.hybrid else 0
        if not 0 <= self.n_skip <= max_skip:
            raise ValueError(
                f"transunet: n_skip={self.n_skip} but the {'hybrid' if self.hybrid else 'pure ViT'} encoder "
                f"provides {max_skip} skip features"
            )
        if x.shape[-1] == 1 and self.input_channels == 3:
            x = jnp.repeat(x, 3, axis=-1)
        if x.shape[-1] != self.input_channels:
            raise ValueError(f"transunet: expected {self.input_channels} input channels, got {x.shape[-1]}")
        x = x.astype(self.dtype)
        if self.hybrid:
            cnn_features, skips = ResNetV2(self.width, tuple(self.resnet_units), self.dtype, self.conv, name="resnet")(x)
            cell = patch // CUP_STRIDE  # patches of the H/16 feature map
            tokens = Conv(
                self.hidden_size, cell, strides=cell, padding="VALID", dtype=self.dtype, implementation=self.conv,
                name="embedding",
            )(cnn_features)
        else:
            skips = []
            tokens = Conv(
                self.hidden_size, patch, strides=patch, padding="VALID", dtype=self.dtype, implementation=self.conv,
                name="embedding",
            )(x)
        img_size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        grid = (img_size[0] // patch, img_size[1] // patch)
        y = ViTEncoder(
            grid, self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate, self.attention_dropout_rate,
            self.dtype, name="Transformer",
        )(tokens, train=train)
        block = dict(norm=self.norm, dtype=self.dtype, conv=self.conv)
        y = ConvNormAct(self.head_channels or 8 * self.width, 3, name="conv_more", **block)(y, train=train)
        for _ in range((patch // CUP_STRIDE).bit_length() - 1):
            y = upsample2x(y)
        for index, channels in enumerate(self._decoder_channels()):
            y = upsample2x(y)
            if index < self.n_skip:
                y = jnp.concatenate([y, skips[index].astype(y.dtype)], axis=-1)
            y = ConvNormAct(channels, 3, name=f"decoder_{index}_conv1", **block)(y, train=train)
            y = ConvNormAct(channels, 3, name=f"decoder_{index}_conv2", **block)(y, train=train)
        return segmentation_output(y, self.num_classes, return_features, kernel_size=3, conv=self.conv)


def _checkpoint_key(param_path: str) -> str | None:
    """Checkpoint name of a model parameter path, or None for parts the checkpoint lacks (decoder)."""
    first, _, rest = param_path.partition("/")
    if first == "resnet":
        return rest
    if first in ("embedding", "Transformer"):
        return param_path
    return None


def _adapt_position_embedding(source: np.ndarray, target_shape: tuple[int, ...], where: str) -> np.ndarray:
    """(1, [1 +] gs*gs, D) checkpoint table -> (1, gh, gw, D): drops a class token, resizes the grid.

    The resize is the public loaders' (TransUNet's and ViT's own `scipy.ndimage.zoom`, order 1):
    linear interpolation whose first and last rows and columns are the table's corner entries.
    """
    _, grid_h, grid_w, hidden = target_shape
    if source.ndim != 3 or source.shape[0] != 1 or source.shape[-1] != hidden:
        raise ValueError(f"{where}: {POSITION_EMBEDDING} has shape {source.shape}, expected (1, N, {hidden})")
    tokens = source[0]
    side = int(round(np.sqrt(tokens.shape[0])))
    if side * side != tokens.shape[0]:
        tokens = tokens[1:]  # ViT classification checkpoints prepend a class-token embedding
        side = int(round(np.sqrt(tokens.shape[0])))
        if side * side != tokens.shape[0]:
            raise ValueError(f"{where}: {POSITION_EMBEDDING} with {source.shape[1]} tokens is not a square grid")
    table = tokens.reshape(side, side, hidden)
    if (side, side) != (grid_h, grid_w):
        table = ndimage.zoom(table, (grid_h / side, grid_w / side, 1), order=1)
    return table[None]


def load_pretrained_npz(
    params: Mapping[str, Any], checkpoint: str | os.PathLike | Mapping[str, np.ndarray]
) -> dict[str, Any]:
    """Copies encoder weights from an R50+ViT-B/16-style .npz (or a name -> array mapping) into params.

    params: the 'params' collection of a TransUNet (hybrid or pure). Every ResNet, embedding and
    Transformer parameter of the model must be present in the checkpoint (KeyError naming the missing
    name otherwise); checkpoint entries the model does not use ('cls', 'head/*', 'pre_logits/*', the
    ResNet for a pure ViT) are ignored; decoder and head parameters keep their values. GroupNorm
    scales stored as (1, 1, 1, C) are flattened; the position embedding drops the class token and is
    resized to the model's grid. The public checkpoints store attention with separate heads, as the
    model does ((hidden, heads, head_dim) query/key/value kernels, (heads, head_dim) biases,
    (heads, head_dim, hidden) output kernels); exports with merged heads ((hidden, heads * head_dim),
    ...) are split head-major, the order TransUNet's `.view(hidden, hidden)` reads. Other shape
    mismatches raise ValueError naming the parameter.
    Returns a new nested dict; the input is not modified.
    """
    where = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint mapping"
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.exists(where):
            raise FileNotFoundError(f"pretrained checkpoint not found: {where}")
        with np.load(where) as archive:
            weights = {name: archive[name] for name in archive.files}
    else:
        weights = dict(checkpoint)
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    loaded = {}
    for path, value in flat.items():
        source_name = _checkpoint_key(path)
        if source_name is None:
            loaded[path] = value
            continue
        if source_name not in weights:
            raise KeyError(f"{where}: missing {source_name!r} (needed for model parameter {path!r})")
        array = np.asarray(weights[source_name])
        if source_name == POSITION_EMBEDDING:
            array = _adapt_position_embedding(array, tuple(value.shape), where)
        elif array.shape != tuple(value.shape) and array.size == value.size and (value.ndim == 1 or ATTENTION in path):
            array = array.reshape(value.shape)
        if array.shape != tuple(value.shape):
            raise ValueError(
                f"{where}: {source_name!r} has shape {array.shape} but model parameter {path!r} needs {tuple(value.shape)}"
            )
        loaded[path] = jnp.asarray(array, dtype=value.dtype)
    return traverse_util.unflatten_dict(loaded, sep="/")
