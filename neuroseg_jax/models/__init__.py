"""Segmentation models: `create_model(name, **kwargs)` over the registry `MODELS`; `build_model(config.model)`.

Every model maps images (B, H, W, C) to float32 logits (B, H, W, num_classes) via
`__call__(x, *, train=False, return_features=False)`; with return_features=True it returns
(logits, features (B, H, W, D)). Dropout uses the 'dropout' rng; BatchNorm (norm='batch') keeps
running statistics in the 'batch_stats' collection.
"""

from neuroseg_jax.models import layers
from neuroseg_jax.models.deeplab import DeepLabV3Plus
from neuroseg_jax.models.imsahlo import IMSAHLO
from neuroseg_jax.models.registry import MODELS, ModelEntry, build_model, create_model, model_kwargs
from neuroseg_jax.models.sharding import MODEL_AXIS, partition_specs, sharding_rules
from neuroseg_jax.models.transunet import TransUNet, load_pretrained_npz
from neuroseg_jax.models.unet import UNet
from neuroseg_jax.models.unetpp import UNetPlusPlus

__all__ = [
    "DeepLabV3Plus",
    "IMSAHLO",
    "MODELS",
    "MODEL_AXIS",
    "ModelEntry",
    "TransUNet",
    "UNet",
    "UNetPlusPlus",
    "build_model",
    "create_model",
    "layers",
    "load_pretrained_npz",
    "model_kwargs",
    "partition_specs",
    "sharding_rules",
]
