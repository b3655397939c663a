"""Ceiling of the instance mode's three-class representation on BBBC039 (not a timing).

Every instance-label mask is turned into its exact background / interior / boundary targets, which
are decoded back by the seeded watershed as if a model had predicted them perfectly; the decoded
objects are matched to the true labels. What the representation loses here, no model trained on
it can win back, which is how the boundary width is chosen.

  python benchmarks/instance_ceiling.py [--data_root=../shared/data/bbbc039] [--widths=1,2] [--min_sizes=1,15]
"""

import pathlib

import numpy as np
from absl import app, flags

from neuroseg_jax.data.instance_targets import NUM_CLASSES, check_instance_labels, three_class_targets
from neuroseg_jax.data.io import read_labels
from neuroseg_jax.inference.watershed import instances_from_three_class
from neuroseg_jax.metrics.instances import instance_metrics_from_counts, match_counts, sum_match_counts

DEFAULT_ROOT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc039"
_ROOT = flags.DEFINE_string("data_root", str(DEFAULT_ROOT), "folder with masks/ of instance labels")
_WIDTHS = flags.DEFINE_list("widths", ["1", "2"], "boundary widths (pixels)")
_MIN_SIZES = flags.DEFINE_list("min_sizes", ["1", "15"], "decode's smallest object (pixels)")


def main(argv):
    del argv
    files = sorted((pathlib.Path(_ROOT.value) / "masks").glob("*.png"))
    if not files:
        raise SystemExit(f"no masks/*.png under {_ROOT.value}")
    labels = [read_labels(path) for path in files]
    for path, label_image in zip(files, labels):
        check_instance_labels(label_image, str(path))
    print(f"{len(files)} masks of {_ROOT.value}")
    print("| boundary width | min size | mean abs count error | max abs count error | mean AP@0.5 | "
          "mean AP@0.5:0.95 | pooled AP@0.5:0.95 | predicted / true objects |")
    print("|---|---|---|---|---|---|---|---|")
    for width in map(int, _WIDTHS.value):
        for min_size in map(int, _MIN_SIZES.value):
            counts, per_image = [], []
            for label_image in labels:
                one_hot = np.eye(NUM_CLASSES, dtype=np.float32)[three_class_targets(label_image, boundary_width=width)]
                decoded = instances_from_three_class(one_hot, min_size=min_size)
                counts.append(match_counts(decoded, label_image))
                per_image.append(instance_metrics_from_counts(counts[-1]))
            pooled = instance_metrics_from_counts(sum_match_counts(counts))
            errors = np.abs([m["count_error"] for m in per_image])
            print(f"| {width} | {min_size} | {errors.mean():.3f} | {errors.max():.0f} | "
                  f"{np.mean([m['ap@0.50'] for m in per_image]):.4f} | "
                  f"{np.mean([m['instance_map'] for m in per_image]):.4f} | {pooled['instance_map']:.4f} | "
                  f"{pooled['n_pred']} / {pooled['n_target']} |", flush=True)


if __name__ == "__main__":
    app.run(main)
