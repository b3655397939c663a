"""Where a three-class run finds the boundary class: against the background, and where nuclei touch
(not a timing).

The run's best checkpoint predicts every validation image; its argmax class is compared with the
three-class targets of the instance labels on two kinds of boundary pixels: those facing the
background only, and the touching band (`data.instance_targets.touching_band_weights`), where two
objects meet. A touching pair whose band is missed keeps one interior and decodes as one object.

  python benchmarks/touching_recall.py --workdir=runs/bbbc039/unet-three_class-seed0
"""

import numpy as np
from absl import app, flags, logging

from neuroseg_jax import data as data_lib
from neuroseg_jax.data.instance_targets import BOUNDARY, three_class_targets, touching_band_weights
from neuroseg_jax.inference import runs
from neuroseg_jax.inference.sliding import SlidingWindow
from neuroseg_jax.inference.watershed import instances_from_probabilities

_WORKDIR = flags.DEFINE_string("workdir", None, "A run trained with config.instances.mode='three_class'.",
                               required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)
    run = runs.load_run(_WORKDIR.value)
    predict_fn = runs.make_predict_fn(run.model, run.variables)
    tiling = SlidingWindow(**runs.sliding_options(run.config.inference))
    dataset = data_lib.build_dataset(run.config.data, "val", with_instances=True, require_instance_labels=True)
    width = int(run.config.instances.boundary_width)
    print(f"{_WORKDIR.value}: {len(dataset)} validation images, boundary width {width}")
    print("| image | true objects | decoded objects | boundary recall, facing background | "
          "boundary recall, touching band | mean p(boundary), touching band |")
    print("|---|---|---|---|---|---|")
    totals = np.zeros(4)
    for index in range(len(dataset)):
        labels = dataset[index]["instances"]
        probabilities = tiling.probabilities(predict_fn, np.asarray(dataset[index]["image"], np.float32))
        predicted = probabilities.argmax(-1) == BOUNDARY
        boundary = three_class_targets(labels, boundary_width=width) == BOUNDARY
        touching = touching_band_weights(labels, boundary_width=width, weight=1.0) > 0
        facing_background = boundary & ~touching
        decoded = instances_from_probabilities(probabilities, run.config.instances).max()
        true_objects = len(np.unique(labels)) - 1
        print(f"| {dataset.name(index)} | {true_objects} | {decoded} | {predicted[facing_background].mean():.2f} | "
              f"{predicted[touching].mean():.2f} | {probabilities[..., BOUNDARY][touching].mean():.2f} |")
        totals += [predicted[facing_background].sum(), facing_background.sum(), predicted[touching].sum(),
                   touching.sum()]
    print(f"| all pixels | | | {totals[0] / totals[1]:.2f} | {totals[2] / totals[3]:.2f} | |")


if __name__ == "__main__":
    app.run(main)
