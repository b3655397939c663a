"""IMSAHLO (Integrating Multi-Scale Attention and Hybrid Loss Optimization) training regime.

Paper settings: 512x768 inputs, batch 16, AdamW lr 3e-4 / weight decay 1e-4, global-norm
clipping 1.0, 50 epochs, ReduceLROnPlateau (factor 0.5, patience 5), early stopping (patience 15),
best checkpoint by validation loss, hybrid loss 0.4 Tversky + 0.2 contour-weighted boundary +
0.3 focal + 0.1 clDice (eq. 3), CLAHE and heavy augmentation.

Arguments, comma-separated after the file name (``configs/imsahlo.py:quick,model=unet``):
  quick          shrink to a CPU run of a few minutes (small crops, width 8, few steps, no heavy aug)
  model=NAME     any registered model: Table II baselines (unet, unetpp, attention_unet,
                 deeplabv3plus, transunet) and the Table III ladder (resunet, neurosegnet,
                 neurosegnet_msdb, imsahlo)
  loss=A+B+...   Table IV ablations: a row name of losses.IMSAHLO_ABLATIONS (e.g.
                 ``loss=tversky+contour``), or '+'-joined LOSS_TERMS names: terms of eq. 3 keep
                 their eq. 3 weights renormalised to sum 1, other combinations weigh equally
  data=NAME      synthetic (default) | fnc (FNC release layout; set --config.data.root) |
                 folder (any images/ + masks/ folder; set --config.data.root)
"""

import ml_collections

from neuroseg_jax.data.config import default_data_config
from neuroseg_jax.losses.hybrid import IMSAHLO_ABLATIONS, IMSAHLO_PARAMS, IMSAHLO_WEIGHTS
from neuroseg_jax.train.config import default_mesh_config, default_outlier_config, parse_config_arg

# Hyper-parameters of every hybrid term, declared here so each is overridable by flag.
LOSS_PARAMS = {
    **IMSAHLO_PARAMS,
    # Contour width and weight are our choice (the paper gives none); the U-Net weights of the background
    # between touching cells that the boundary term adds are data.touching_cells (w0, sigma).
    "boundary": {"width": 1, "w": 5.0},
    "cldice": {"iterations": 10},
}


def loss_terms_from_spec(spec: str) -> dict[str, float]:
    """The ``loss=`` argument as term weights (see the module docstring)."""
    if not spec:
        return dict(IMSAHLO_WEIGHTS)
    if spec in IMSAHLO_ABLATIONS:
        return dict(IMSAHLO_ABLATIONS[spec])
    names = spec.split("+")
    if set(names) <= set(IMSAHLO_WEIGHTS):
        total = sum(IMSAHLO_WEIGHTS[name] for name in names)
        return {name: IMSAHLO_WEIGHTS[name] / total for name in names}
    return {name: 1.0 / len(names) for name in names}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, {"quick": False, "model": "imsahlo", "loss": "", "data": "synthetic"})
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = default_data_config()
    config.data.crop_size = (512, 768)
    config.data.clahe.enabled = True
    if args["data"] == "fnc":
        config.data.source = "folder"
        config.data.layout = "fnc"
        config.data.image_size = (512, 768)  # paper: INTER_AREA resize of the 1200x1600 images
    elif args["data"] == "folder":
        config.data.source = "folder"
    elif args["data"] == "synthetic":
        config.data.synthetic.image_size = (512, 768)
    else:
        raise ValueError(f"configs/imsahlo.py: unknown data={args['data']!r}; use synthetic, fnc or folder")

    # dtype 'bfloat16' = mixed precision: bf16 compute, float32 parameters and logits. conv: 'auto' (the
    # fast CPU gradients of neuroseg_jax.ops.conv2d) or 'lax' (plain lax convolution, forward mode too).
    config.model = ml_collections.ConfigDict({"name": args["model"], "num_classes": 1, "width": 32,
                                              "dtype": "float32", "conv": "auto"})

    weights = loss_terms_from_spec(args["loss"])
    config.loss = ml_collections.ConfigDict({
        "terms": weights,
        "params": {name: dict(LOSS_PARAMS[name]) for name in weights if name in LOSS_PARAMS},
        "weighting": "balance",
        "primary": "",  # the term the others are scaled to with weighting='relative' (MorphoSeg eq. 18)
    })

    config.outliers = default_outlier_config()

    config.optim = ml_collections.ConfigDict({
        "name": "adamw", "lr": 3e-4, "weight_decay": 1e-4, "b1": 0.9, "b2": 0.999, "momentum": 0.9,
        "clip_norm": 1.0, "schedule": "constant", "warmup_steps": 0, "poly_power": 0.9,
        "ema_decay": 0.0,  # > 0: evaluate, keep as best and predict with an EMA of the weights
        "plateau": {"factor": 0.5, "patience": 5, "min_scale": 1e-3, "threshold": 1e-4},
    })

    config.train = ml_collections.ConfigDict({
        "batch_size": 16,
        "num_epochs": 50,
        "num_steps": 0,  # > 0 overrides num_epochs
        "eval_every": 0,  # steps; 0 = once per epoch
        "checkpoint_every": 0,  # steps; 0 = at every evaluation
        "log_every": 10,
        "keep_checkpoints": 2,
        "early_stop": {"patience": 15},  # evaluations without improvement; 0 disables
        "eval_batch_size": 0,  # 0 = batch_size
        "num_preview": 4,
    })
    config.mesh = default_mesh_config()
    config.inference = ml_collections.ConfigDict({
        "window": (512, 768), "overlap": 0.25, "batch_size": 4, "blend": "gaussian", "tta": False,
        "postprocess": True,
    })

    if args["quick"]:
        config.data.synthetic.num_images = 200  # 30 validation images; 40 left 6, too few for a stable Dice
        config.data.synthetic.image_size = (128, 128)
        # 2.5x the default 60 photons per bright soma: at 128x128 the neurites are 1 px wide and at the
        # default noise they sit near the noise floor, so even 300 steps stop at validation Dice ~0.80.
        config.data.synthetic.photons = 150.0
        config.data.crop_size = (64, 64)
        config.data.image_size = None if args["data"] == "synthetic" else (256, 384)
        config.data.clahe.enabled = False
        config.data.augment.enabled = False
        config.model.width = 8
        # Cosine decay to 0 from 1e-2: in a few hundred steps 3e-3 and 5e-3 learn less and 2e-2 no more
        # (the paper's constant 3e-4 barely leaves the initialisation).
        config.optim.lr = 1e-2
        config.optim.schedule = "cosine"
        config.train.batch_size = 4
        config.train.num_steps = 200
        config.train.eval_every = 70  # three evaluations: each also draws a preview and saves a checkpoint
        config.train.log_every = 5
        config.inference.window = (128, 128)
        config.inference.batch_size = 2
    return config
