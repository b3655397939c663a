"""Model registry: `MODELS` maps a name to a module class plus the defaults that define the variant.

`create_model(name, **kwargs)` builds the module; kwargs override the variant defaults and must be
fields of the module class (unknown names raise ValueError naming them). `build_model(config.model)`
does the same from a run's model config. Lists become tuples so
configs from ml_collections produce hashable module fields. Every model takes `conv`, the
convolution implementation of `neuroseg_jax.ops.conv2d` ('auto' or 'lax').
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
from flax.core import FrozenDict

from neuroseg_jax.models.deeplab import DeepLabV3Plus
from neuroseg_jax.models.imsahlo import IMSAHLO
from neuroseg_jax.models.transunet import TransUNet
from neuroseg_jax.models.unet import UNet
from neuroseg_jax.models.unetpp import UNetPlusPlus
from neuroseg_jax.ops import CONV_IMPLEMENTATIONS


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered model: the module class, the defaults that make the variant, a one-line summary."""

    module: type[nn.Module]
    defaults: Mapping[str, Any]
    summary: str

    def field_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.module) if f.name not in ("parent", "name")]


# Transformer sizes of ViT-B and ViT-L; the patch size is the variant's other half (B/16, L/32, ...).
_VIT_B = dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072)
_VIT_L = dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096)

MODELS: dict[str, ModelEntry] = {
    "unet": ModelEntry(UNet, FrozenDict(), "U-Net (Ronneberger et al. 2015)"),
    "attention_unet": ModelEntry(UNet, FrozenDict(attention_gates=True), "U-Net with attention-gated skips"),
    "unetpp": ModelEntry(UNetPlusPlus, FrozenDict(), "U-Net++ nested dense skips, optional deep supervision"),
    "deeplabv3plus": ModelEntry(DeepLabV3Plus, FrozenDict(), "DeepLabV3+ with atrous residual encoder and ASPP"),
    "resunet": ModelEntry(
        IMSAHLO,
        FrozenDict(block="residual", se=False, act="relu", attention=False),
        "IMSAHLO Table III baseline: residual blocks only",
    ),
    "neurosegnet": ModelEntry(
        IMSAHLO,
        FrozenDict(block="residual", se=True, act="swish", attention=False),
        "IMSAHLO Table III: residual + SE with Swish",
    ),
    "neurosegnet_msdb": ModelEntry(
        IMSAHLO,
        FrozenDict(block="msdb", se=True, act="swish", attention=False),
        "IMSAHLO Table III: NeuroSegNet + Multi-Scale Dense Blocks",
    ),
    "imsahlo": ModelEntry(
        IMSAHLO,
        FrozenDict(block="msdb", se=True, act="swish", attention=True),
        "IMSAHLO full: MSDB encoder/decoder + Hierarchical Attention",
    ),
    "transunet": ModelEntry(
        TransUNet, FrozenDict(hybrid=True, patch_size=16, **_VIT_B), "TransUNet R50-ViT-B/16 (hybrid)"
    ),
    "transunet_r50_b16": ModelEntry(
        TransUNet, FrozenDict(hybrid=True, patch_size=16, **_VIT_B), "TransUNet R50-ViT-B/16"
    ),
    "transunet_vit_b16": ModelEntry(
        TransUNet,
        FrozenDict(hybrid=False, patch_size=16, n_skip=0, **_VIT_B),
        "TransUNet ViT-B/16 (16x16 image patches)",
    ),
    "transunet_r50_l16": ModelEntry(
        TransUNet,
        FrozenDict(hybrid=True, patch_size=16, **_VIT_L),
        "TransUNet R50-ViT-L/16 (ViT-L on 1x1 patches of the H/16 ResNet map; the only hybrid ViT-L "
        "of MorphoSeg's code)",
    ),
    "transunet_r50_l32": ModelEntry(
        TransUNet,
        FrozenDict(hybrid=True, patch_size=32, **_VIT_L),
        "TransUNet R50-ViT-L/32 (MorphoSeg Table 3's R50-L32: ViT-L on 2x2 patches of the H/16 ResNet "
        "map, an H/32 token grid)",
    ),
    "transunet_vit_l16": ModelEntry(
        TransUNet,
        FrozenDict(hybrid=False, patch_size=16, n_skip=0, **_VIT_L),
        "TransUNet ViT-L/16 (16x16 image patches)",
    ),
}


def _freeze_lists(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze_lists(v) for v in value)
    return value


def model_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """Variant defaults of `name` merged with `kwargs`, validated against the module's fields."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    entry = MODELS[name]
    allowed = entry.field_names()
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} got unknown argument(s) {unknown}; accepted: {allowed}")
    if kwargs.get("conv", "auto") not in CONV_IMPLEMENTATIONS:
        raise ValueError(f"model {name!r}: conv={kwargs['conv']!r}; use one of {CONV_IMPLEMENTATIONS}")
    return {**entry.defaults, **{key: _freeze_lists(value) for key, value in kwargs.items()}}


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds registered model `name`. Every model accepts num_classes, width, dtype and conv.

    The module's `__call__(x, *, train=False, return_features=False)` maps images (B, H, W, C) to
    float32 logits (B, H, W, num_classes), or (logits, features (B, H, W, D)) on request.
    """
    config = model_kwargs(name, **kwargs)
    return MODELS[name].module(**config)


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
    """The model of a run's ``config.model``: ``name`` picks the registered model, every other key
    is its argument. Takes an ml_collections ConfigDict or a plain mapping."""
    kwargs = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
    if "name" not in kwargs:
        raise ValueError(f"the model config has no 'name' (keys {sorted(kwargs)}); known models: {sorted(MODELS)}")
    return create_model(kwargs.pop("name"), **kwargs)
