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
  data=NAME      synthetic (default) | folder (any images/ + masks/ folder; set
                 --config.data.root) | a protocol of configs/protocols.py on ../shared/data:
                 pfc_pn (320x240, 224 px crops), bbbc039 (696x520, 256 px crops) or fnc (the
                 4-image FNC sample, a smoke test); each with its fixed split file
                 (configs/splits/), width 16, batch 8 and a CPU budget of steps
  instances=MODE none (default: objects are the binary mask's connected components) |
                 three_class (instance mode: the masks must be instance labels, e.g. bbbc039's; the
                 model gets num_classes=3 for background / interior / boundary targets, the loss
                 is softmax CE + Dice averaged over the interior and boundary classes unless loss=
                 is given, and objects are decoded by seeded watershed; decode settings in
                 config.instances, see data.config.default_instances_config)
"""

import pathlib
import sys

import ml_collections

from neuroseg_jax.data.config import INSTANCE_MODES, default_data_config, default_instances_config
from neuroseg_jax.inference.config import default_inference_config
from neuroseg_jax.losses.hybrid import IMSAHLO_ABLATIONS, IMSAHLO_PARAMS, IMSAHLO_WEIGHTS, imsahlo_term_weights
from neuroseg_jax.models import MODELS
from neuroseg_jax.train.config import (default_mesh_config, default_optim_config, default_outlier_config,
                                       default_train_config, parse_config_arg)

# Launchers load this file by its path: the repository root makes its sibling modules importable.
if str(pathlib.Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs.protocols import PROTOCOLS  # noqa: E402

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
        return imsahlo_term_weights(names)
    return {name: 1.0 / len(names) for name in names}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, {"quick": False, "model": "imsahlo", "loss": "", "data": "synthetic",
                                  "instances": "none"})
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = default_data_config()
    config.data.crop_size = (512, 768)
    config.data.clahe.enabled = True
    if args["data"] == "folder":
        config.data.source = "folder"
    elif args["data"] == "synthetic":
        config.data.synthetic.image_size = (512, 768)
    elif args["data"] not in PROTOCOLS:
        raise ValueError(f"configs/imsahlo.py: unknown data={args['data']!r}; use synthetic, folder or one of "
                         f"{sorted(PROTOCOLS)}")

    # dtype 'bfloat16' = mixed precision: bf16 compute, float32 parameters and logits. conv: 'auto' (the
    # fast CPU gradients of neuroseg_jax.ops.conv2d) or 'lax' (plain lax convolution, forward mode too).
    if args["model"] not in MODELS:
        raise ValueError(f"configs/imsahlo.py: unknown model={args['model']!r}; use one of {sorted(MODELS)}")
    config.model = ml_collections.ConfigDict({"name": args["model"], "num_classes": 1, "width": 32,
                                              "dtype": "float32", "conv": "auto",
                                              **MODELS[args["model"]].defaults})

    weights = loss_terms_from_spec(args["loss"])
    config.loss = ml_collections.ConfigDict({
        "terms": weights,
        "params": {name: dict(LOSS_PARAMS[name]) for name in weights if name in LOSS_PARAMS},
        "weighting": "balance",
        "primary": "",  # the term the others are scaled to with weighting='relative' (MorphoSeg eq. 18)
    })

    if args["instances"] not in INSTANCE_MODES:
        raise ValueError(f"configs/imsahlo.py: unknown instances={args['instances']!r}; use one of {INSTANCE_MODES}")
    config.instances = default_instances_config()
    config.instances.mode = args["instances"]
    if args["instances"] == "three_class":
        config.model.num_classes = 3
        if not args["loss"]:
            # Softmax CE + Dice (Dice over classes 1, 2: interior and boundary); the eq. 3 terms are
            # built for a binary foreground.
            config.loss.terms = {"bce": 0.5, "dice": 0.5}
            config.loss.params = {}

    config.outliers = default_outlier_config()

    config.optim = default_optim_config()
    config.optim.update({"name": "adamw", "lr": 3e-4, "weight_decay": 1e-4, "clip_norm": 1.0})
    config.optim.plateau.update({"factor": 0.5, "patience": 5, "min_scale": 1e-3})

    config.train = default_train_config()
    config.train.update({"batch_size": 16, "num_epochs": 50})
    config.train.early_stop.patience = 15
    config.mesh = default_mesh_config()
    config.inference = default_inference_config()
    if args["data"] in PROTOCOLS:
        PROTOCOLS[args["data"]](config)
        # The protocols' few hundred steps: at the paper's 3e-4 the loss is still falling steeply at the end.
        config.optim.lr = 1e-3

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
