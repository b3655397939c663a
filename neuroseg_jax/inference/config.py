"""``config.inference``: every key the inference layer reads, with the defaults of a whole-image
sliding window; each experiment config changes what its paper uses."""

import ml_collections


def default_inference_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        # Sliding window (see `sliding_options`): overlap is a fraction of the window (< 1) or pixels (>= 1).
        "window": (512, 768), "overlap": 0.25, "batch_size": 4, "blend": "gaussian",
        "tta": False,
        "postprocess": True,
        # Foreground probability threshold of masks. choose_threshold (on by default) picks it on the
        # validation split instead, when training ends (stored with the best checkpoint, see
        # inference.choose_threshold): the recall-biased hybrid loss puts its best Dice well above 0.5
        # (README, results). `threshold` stays the fixed value that choose_threshold=False uses.
        "threshold": 0.5, "choose_threshold": True,
    })
