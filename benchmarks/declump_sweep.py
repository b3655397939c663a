"""Declumping settings on a trained binary run's validation split (not a timing).

The run's best checkpoint predicts every validation image once; its mask at the run's threshold
(the results tables' 'raw' variant: no post-processing) is turned into objects by connected components and by
`inference.watershed.declump` at each (h, sigma), and the objects are matched to the instance labels.
This is how the defaults of config.instances.declump_h / declump_sigma were chosen; the test split
is never read.

  python benchmarks/declump_sweep.py --workdir=runs/bbbc039/unet-seed0 [--h=0.5,0.75,1,1.5] [--sigma=1,1.5]
"""

import functools

import numpy as np
from absl import app, flags, logging

from neuroseg_jax import data as data_lib
from neuroseg_jax.inference import runs
from neuroseg_jax.inference.predict import predict_image
from neuroseg_jax.inference.watershed import declump
from neuroseg_jax.metrics import binarize, connected_components
from neuroseg_jax.metrics.instances import instance_metrics_from_counts, match_counts, sum_match_counts

_WORKDIR = flags.DEFINE_string("workdir", None, "A binary run trained on instance-labelled data.", required=True)
_H = flags.DEFINE_list("h", ["0.5", "0.75", "1", "1.5"], "h-maxima depths (pixels)")
_SIGMA = flags.DEFINE_list("sigma", ["1", "1.5"], "Gaussian smoothing of the distance transform (pixels)")


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    run = runs.load_run(_WORKDIR.value)
    predict_fn = runs.make_predict_fn(run.model, run.variables)
    threshold, _ = runs.decision_threshold(run, _WORKDIR.value, "best", None)
    dataset = data_lib.build_dataset(run.config.data, "val", with_instances=True)
    decoders = {"connected components": connected_components}
    for h in map(float, _H.value):
        for sigma in map(float, _SIGMA.value):
            decoders[f"declump h={h:g} sigma={sigma:g}"] = functools.partial(declump, h=h, sigma=sigma)
    counts = {name: [] for name in decoders}
    for index in range(len(dataset)):
        example = dataset[index]
        probability = predict_image(predict_fn, np.asarray(example["image"], np.float32),
                                    **runs.sliding_options(run.config.inference))
        mask = binarize(probability, threshold)
        for name, decode in decoders.items():
            counts[name].append(match_counts(decode(mask), example["instances"]))
    print(f"{_WORKDIR.value}: {len(dataset)} validation images, threshold {threshold}")
    print("| objects | AP-DSB@0.5:0.95 (pooled) | F1@0.5 (pooled) | mean abs count error | predicted / true |")
    print("|---|---|---|---|---|")
    for name, image_counts in counts.items():
        pooled = instance_metrics_from_counts(sum_match_counts(image_counts))
        errors = [abs(c["n_pred"] - c["n_target"]) for c in image_counts]
        print(f"| {name} | {pooled['instance_map']:.3f} | {pooled['f1@0.50']:.3f} | {np.mean(errors):.1f} | "
              f"{pooled['n_pred']} / {pooled['n_target']} |")


if __name__ == "__main__":
    app.run(main)
