"""Named experiment grids for ``launch/run_experiments.py --grid=NAME``.

A grid is a list of runs; a run is ``(set, row, config, overrides, seeds)``:
  set        the data protocol the row is trained and tested on ('pfc_pn', 'bbbc039', 'fnc',
             'synthetic'); results land in ``results/<set>/<row>-seed<N>/metrics.json``
  row        the row's name in the results tables, unique within its set: a row that appears in
             several grids (Table II's imsahlo is also Table III's top rung and Table IV's full
             hybrid loss) is one set of trained runs, shared by those tables
  config     ``configs/FILE.py:ARGS`` as ``launch/train.py --config`` takes it
  overrides  ``{"dotted.key": value}``, as ``--config.dotted.key=value`` (the key must exist)
  seeds      each seed N is one run with ``config.seed = N``

Reference rows are trained by their own trainer (``neuroseg_jax.experiments.REFERENCE_ROWS``), on
batches of the same protocol config, and scored with the same metrics.
"""

# IMSAHLO Table II's "*" rows: 3 seeds; every other row: 1.
THREE_SEEDS = (0, 1, 2)
ONE_SEED = (0,)

# TransUNet at a size a CPU can train: the R50 stem (3, 4, 9) at the protocol's width and 4 transformer
# layers of ViT-Ti's widths (hidden 192, 3 heads, MLP 768) instead of ViT-B's 12 x 768 (registry "transunet").
TRANSUNET_SMALL = {"model.hidden_size": 192, "model.num_layers": 4, "model.num_heads": 3, "model.mlp_dim": 768}

NOTES = {
    "transunet_small": "TransUNet R50-ViT, CPU-sized: R50 stem (3, 4, 9) at the protocol's width, 4 "
                       "transformer layers of hidden size 192, 3 heads, MLP 768 (ViT-Ti widths); hybrid loss.",
    "monai_basicunet_dicece": "Reference: MONAI BasicUNet with DiceCELoss(sigmoid=True), trained in PyTorch "
                              "on our loader's batches of the same protocol (crops, augmentation, steps, "
                              "batch, lr schedule, weight decay), best checkpoint by validation loss.",
    "three_class": "Instance mode ('-three_class' rows): background / interior / boundary targets from the "
                   "instance labels, softmax CE + Dice over 3 classes, objects decoded by seeded watershed "
                   "(config.instances); the other binary rows' objects are connected components of the mask, "
                   "so touching nuclei merge. Every row's objects are matched to the instance labels.",
    "declump": "the binary row's model and training; its mask's objects split by shape (distance-transform "
               "watershed, config.instances.declump: h 0.75 px, sigma 1 px, chosen on the validation split).",
    "boundary2": "the boundary band of the three-class targets 2 pixels wide instead of 1.",
    "symmetric": "eq. 3's terms and weights with Tversky alpha = beta = 0.5 and focal alpha 0.5 (the paper: "
                 "0.3 / 0.7 and 0.8, which weigh missed foreground more than false foreground).",
    "dice_bce": "BCE + Dice with equal weights, the loss of the MONAI reference row (DiceCE).",
    "touching10": "the boundary pixels where two nuclei touch weigh 1 + 10 in the cross-entropy "
                  "(instances.touching_weight; U-Net's w0 = 10 for touching cells).",
    "morphoseg": "MorphoSeg rows: the CPU-sized TransUNet of transunet_small, CE + Dice over 2 softmax "
                 "classes; '-outliers' adds virtual outlier synthesis and the uncertainty loss for the last "
                 "quarter of the steps (MorphoSeg: from epoch 150 of 200).",
}

TABLE2_MODELS = (  # (row, model, seeds); all with IMSAHLO's hybrid loss (eq. 3)
    ("unet", "unet", THREE_SEEDS),
    ("unetpp", "unetpp", ONE_SEED),
    ("attention_unet", "attention_unet", ONE_SEED),
    ("deeplabv3plus", "deeplabv3plus", ONE_SEED),
    ("transunet_small", "transunet", ONE_SEED),
    ("neurosegnet", "neurosegnet", ONE_SEED),
    ("imsahlo", "imsahlo", THREE_SEEDS),
)


def _model_row(data: str, row: str, model: str, seeds) -> tuple:
    overrides = dict(TRANSUNET_SMALL) if model == "transunet" else {}
    return (data, row, f"configs/imsahlo.py:data={data},model={model}", overrides, seeds)


def _table2(data: str) -> list[tuple]:
    return [_model_row(data, row, model, seeds) for row, model, seeds in TABLE2_MODELS] + [
        (data, "monai_basicunet_dicece", f"configs/imsahlo.py:data={data}", {}, ONE_SEED)]


# IMSAHLO Table IV on pfc_pn: the full hybrid loss, each of its four terms left out (the rest keep
# their eq. 3 weights renormalised to sum 1), and BCE or Dice alone; then two rows beyond the paper
# that ask whether the hybrid loss's lean towards foreground (Tversky's FN weight 0.7, focal alpha 0.8)
# costs precision: eq. 3 with both made symmetric, and BCE + Dice, the reference row's loss.
SYMMETRIC_HYBRID = {"loss.params.tversky.alpha": 0.5, "loss.params.tversky.beta": 0.5,
                    "loss.params.focal.alpha": 0.5}
TABLE4_LOSSES = (  # (row, loss=, overrides)
    ("imsahlo-no_tversky", "boundary+focal+cldice", {}),
    ("imsahlo-no_contour", "tversky+focal+cldice", {}),
    ("imsahlo-no_focal", "tversky+boundary+cldice", {}),
    ("imsahlo-no_cldice", "tversky+boundary+focal", {}),
    ("imsahlo-bce", "bce", {}),
    ("imsahlo-dice", "dice", {}),
    ("imsahlo-symmetric", "", SYMMETRIC_HYBRID),
    ("imsahlo-dice_bce", "bce+dice", {}),
)


def _loss_row(model: str, row: str, loss: str, overrides: dict) -> tuple:
    """A PFC-PN row of ``model`` trained with ``loss=`` (empty: eq. 3) and ``overrides``."""
    return ("pfc_pn", row, f"configs/imsahlo.py:data=pfc_pn,model={model}{f',loss={loss}' if loss else ''}",
            overrides, ONE_SEED)


MORPHOSEG_WEIGHTINGS = ("balance", "norm", "pareto")

TITLES = {
    "table2": "Models with the hybrid loss (IMSAHLO Table II)",
    "table3": "Architecture ladder (IMSAHLO Table III)",
    "table4": "Loss ablations of IMSAHLO (IMSAHLO Table IV)",
    "morphoseg": "TransUNet with and without virtual outliers x loss weighting (MorphoSeg)",
    "loss_choice": "The hybrid loss against BCE + Dice, by model",
    "instances": "Touching nuclei: binary mask vs instance mode (BBBC039)",
    "smoke": "Smoke run on the 4 public FNC images",
    "tiny": "Tiny synthetic runs (tests)",
}

GRIDS = {
    "table2": _table2("pfc_pn") + _table2("bbbc039"),
    "table3": [_model_row("pfc_pn", model, model, THREE_SEEDS if model == "imsahlo" else ONE_SEED)
               for model in ("resunet", "neurosegnet", "neurosegnet_msdb", "imsahlo")],
    "table4": [_model_row("pfc_pn", "imsahlo", "imsahlo", THREE_SEEDS)] + [
        _loss_row("imsahlo", row, loss, overrides) for row, loss, overrides in TABLE4_LOSSES],
    "morphoseg": [
        ("pfc_pn", f"morphoseg-{weighting}{'-outliers' if outliers else ''}",
         f"configs/morphoseg.py:data=pfc_pn,weighting={weighting}",
         {**TRANSUNET_SMALL, "outliers.enabled": outliers},
         ONE_SEED)
        for weighting in MORPHOSEG_WEIGHTINGS for outliers in (False, True)],
    # Does the hybrid loss or the model make the difference to the reference row? Each model with the
    # paper's loss (Table II's runs), its symmetric form and BCE + Dice (Table IV's runs for imsahlo).
    "loss_choice": [_model_row("pfc_pn", "unet", "unet", THREE_SEEDS),
                    _loss_row("unet", "unet-dice_bce", "bce+dice", {}),
                    _model_row("pfc_pn", "imsahlo", "imsahlo", THREE_SEEDS),
                    _loss_row("imsahlo", "imsahlo-symmetric", "", SYMMETRIC_HYBRID),
                    _loss_row("imsahlo", "imsahlo-dice_bce", "bce+dice", {}),
                    _table2("pfc_pn")[-1]],
    # The binary unet row is Table II's (same command and seeds: one set of runs).
    "instances": [_model_row("bbbc039", "unet", "unet", THREE_SEEDS),
                  # The same training; the decode splits touching convex objects along the mask's necks.
                  ("bbbc039", "unet-declump", "configs/imsahlo.py:data=bbbc039,model=unet", {"instances.declump": True},
                   ONE_SEED)] + [
        ("bbbc039", f"{model}-three_class", f"configs/imsahlo.py:data=bbbc039,model={model},instances=three_class",
         {}, ONE_SEED) for model in ("unet", "imsahlo")] + [
        # A 2-pixel boundary band: a wider target for the model to learn where touching nuclei part.
        ("bbbc039", "unet-three_class-boundary2", "configs/imsahlo.py:data=bbbc039,model=unet,instances=three_class",
         {"instances.boundary_width": 2}, ONE_SEED),
        # The cut between touching nuclei, a few percent of the boundary class, weighted as U-Net weighs it.
        ("bbbc039", "unet-three_class-touching10", "configs/imsahlo.py:data=bbbc039,model=unet,instances=three_class",
         {"instances.touching_weight": 10.0}, ONE_SEED)],
    "smoke": [("fnc", "unet", "configs/imsahlo.py:data=fnc,model=unet", {}, ONE_SEED)],
    # For tests: two seeds of a 4-wide U-Net trained 4 steps on 32 px crops of synthetic images.
    "tiny": [("synthetic", "unet_tiny", "configs/imsahlo.py:quick,model=unet,loss=dice+bce", {
        "data.synthetic.num_images": 12, "data.synthetic.image_size": (64, 64), "data.crop_size": (32, 32),
        "data.split.val_fraction": 0.25, "data.split.test_fraction": 0.25, "model.width": 4,
        "train.batch_size": 2, "train.num_steps": 4, "train.eval_every": 2, "train.log_every": 1,
        "train.num_preview": 1, "inference.window": (32, 32), "inference.batch_size": 4}, (0, 1))],
}
