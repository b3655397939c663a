"""MorphoSeg: TransUNet trained with virtual outlier synthesis (MorphoSeg §3-5).

Paper settings: TransUNet R50-ViT-B/16 (or pure ViT-B/16), 224x224 inputs from multi-scale
overlapping patches (224, 448, 1000, 1500, 2000 px, 35 % overlap, patches without foreground
pruned), SGD lr 0.01, momentum 0.9, weight decay 1e-4 with polynomial decay, 200 epochs; from
epoch 150 class-conditional Gaussians over per-class embedding queues yield virtual outliers
(100,000 drawn, 10,000 kept) and an uncertainty loss beta1 CE + beta2 Dice; loss weighting
Balance, Norm, eq. 18 or Pareto (MGDA). Segmentation loss CE + Dice over 2 softmax classes as in
TransUNet (0.5 / 0.5 before the outliers start, 0.3 / 0.3 + 0.4 L_uncertainty after). Batch 24 as in
the public code (the paper trains with 128 or 256). Sliding-window inference with 224 px windows
and 56 px overlap.

Arguments, comma-separated after the file name (``configs/morphoseg.py:quick,encoder=vit_b16``):
  quick              shrink to a CPU run of a few minutes (tiny transformer, 32 px crops)
  encoder=NAME       r50_b16 (default, hybrid) | vit_b16 | r50_l16 | r50_l32 | vit_l16
  weighting=NAME     balance (default) | norm | relative (eq. 18) | pareto (MGDA)
  data=NAME          folder (default; set --config.data.root) | synthetic | a protocol of
                     configs/protocols.py on ../shared/data: pfc_pn, bbbc039 or fnc (smoke test),
                     each with its fixed split file (configs/splits/), width 16, batch 8, its step
                     budget, and multi-scale patches of the protocol's sizes resized to the model's
                     224x224 input (crop and sliding window 224 px, 25 % overlap = 56 px);
                     outliers start after 3/4 of the steps, as after epoch 150 of 200
"""

import pathlib
import sys

import ml_collections

from neuroseg_jax.data.config import default_data_config
from neuroseg_jax.inference.config import default_inference_config
from neuroseg_jax.models import MODELS
from neuroseg_jax.train.config import (default_mesh_config, default_optim_config, default_outlier_config,
                                       default_train_config, parse_config_arg)
from neuroseg_jax.train.step import WEIGHTINGS

# Launchers load this file by its path: the repository root makes its sibling modules importable.
if str(pathlib.Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.protocols import PROTOCOLS  # noqa: E402

ENCODERS = {"r50_b16": "transunet_r50_b16", "vit_b16": "transunet_vit_b16",
            "r50_l16": "transunet_r50_l16", "r50_l32": "transunet_r50_l32", "vit_l16": "transunet_vit_l16"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, {"quick": False, "encoder": "r50_b16", "weighting": "balance",
                                  "data": "folder"})
    if args["encoder"] not in ENCODERS:
        raise ValueError(f"configs/morphoseg.py: unknown encoder={args['encoder']!r}; use one of {sorted(ENCODERS)}")
    if args["weighting"] not in WEIGHTINGS:
        raise ValueError(f"configs/morphoseg.py: unknown weighting={args['weighting']!r}; use one of {WEIGHTINGS}")
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = default_data_config()
    config.data.channels = 3
    config.data.crop_size = (224, 224)
    config.data.patches.enabled = True
    config.data.patches.prune_empty = True
    config.data.split.val_fraction = 0.2
    config.data.split.test_fraction = 0.0
    if args["data"] == "synthetic":
        config.data.source = "synthetic"
        config.data.patches.enabled = False
    elif args["data"] == "folder":
        config.data.source = "folder"
    elif args["data"] not in PROTOCOLS:
        raise ValueError(f"configs/morphoseg.py: unknown data={args['data']!r}; use folder, synthetic or one of "
                         f"{sorted(PROTOCOLS)}")

    model_name = ENCODERS[args["encoder"]]
    # conv: 'auto' (the fast CPU gradients of neuroseg_jax.ops.conv2d) or 'lax' (plain lax convolution).
    config.model = ml_collections.ConfigDict({
        "name": model_name, "num_classes": 2, "width": 64, "img_size": (224, 224), "input_channels": 3,
        "resnet_units": (3, 4, 9), "n_skip": 3, "dropout_rate": 0.1, "dtype": "float32", "conv": "auto",
        **MODELS[model_name].defaults,
    })

    # lambda_1 CE + lambda_2 Dice + beta L_uncertainty with weights adding up to 1: 0.3 / 0.3 / 0.4, and
    # beta1 = beta2 = 0.5 inside L_uncertainty, give the public code's 0.3 / 0.3 / 0.2 / 0.2. Before the
    # outliers start, balance rescales the active terms to 0.5 CE + 0.5 Dice (TransUNet's loss).
    # TransUNet's Dice averages both classes, background included, with smoothing 1e-5.
    config.loss = ml_collections.ConfigDict({
        "terms": {"bce": 0.3, "dice": 0.3},
        "params": {"dice": {"include_background": True, "epsilon": 1e-5}},
        "weighting": args["weighting"],
        "primary": "bce",  # weighting='relative' (eq. 18) scales Dice and L_uncertainty to CE
    })
    config.outliers = default_outlier_config()
    config.outliers.enabled = True
    config.outliers.weight = 0.4

    config.optim = default_optim_config()
    config.optim.update({"name": "sgd", "lr": 0.01, "weight_decay": 1e-4, "momentum": 0.9, "schedule": "poly"})
    config.train = default_train_config()
    config.train.update({"batch_size": 24, "num_epochs": 200, "log_every": 20})
    config.mesh = default_mesh_config()
    config.inference = default_inference_config()
    # 224 px windows overlapping by 0.25 of them (the paper's 56 px), averaged, not post-processed.
    config.inference.update({"window": (224, 224), "batch_size": 16, "blend": "constant", "postprocess": False})
    if args["data"] in PROTOCOLS:
        PROTOCOLS[args["data"]](config)
        # The protocol's patches become the model's 224x224 input; whole images are read through
        # windows of that size.
        config.data.crop_size = tuple(config.model.img_size)
        config.inference.window = tuple(config.model.img_size)
        # Outliers from the same point of the run as the paper's epoch 150 of 200 (with another
        # --config.train.num_steps, set --config.outliers.start_step to 3/4 of it too).
        config.outliers.start_step = config.train.num_steps * 3 // 4

    if args["quick"]:
        config.data.source = "synthetic"
        config.data.patches.enabled = False
        config.data.synthetic.num_images = 32
        config.data.synthetic.image_size = (96, 96)
        config.data.crop_size = (32, 32)
        config.model.update({"width": 8, "img_size": (32, 32), "hidden_size": 32, "num_layers": 2,
                             "num_heads": 2, "mlp_dim": 64, "resnet_units": (1, 1, 1)})
        config.outliers.update({"start_epoch": 0, "start_step": 10, "buffer_size": 64, "max_per_class": 16,
                                "num_candidates": 2000, "num_selected": 200})
        config.train.batch_size = 4
        config.train.num_steps = 40
        config.train.eval_every = 20
        config.train.log_every = 5
        config.inference.window = (32, 32)
        config.inference.overlap = 8
        config.inference.batch_size = 4
    return config
