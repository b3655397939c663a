"""Predict images: ``python launch/predict.py --workdir=RUN --input=FILE|DIR|GLOB --output=DIR``.

Reads the run's config snapshot (so preprocessing matches training). Writes per image a binary
mask, a 16-bit probability TIFF, instance labels and an overlay, plus counts and morphology
CSVs. A file that cannot be read is reported and skipped; the others are still predicted.
The TIFFs carry the pixel size for Fiji and napari, and the morphology is in micrometres, when the
pixel size is known: ``--pixel_size``, else the file's ImageJ / OME metadata, else the run's
config.data.pixel_size.
"""

import json

from absl import app, flags, logging

from neuroseg_jax.ops import reuse_freed_host_memory
from neuroseg_jax.inference import predict_run

import trained_run_flags  # launch/ is not a package; a script's own folder is on sys.path

flags.adopt_module_key_flags(trained_run_flags)
_INPUT = flags.DEFINE_multi_string("input", None, "Image file, folder or glob (repeatable).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.", required=True)
_PIXEL_SIZE = flags.DEFINE_float(
    "pixel_size", 0.0, "Pixel size of every input, over the files' own calibration (0: read it from each file, "
    "else config.data.pixel_size, else unknown).", lower_bound=0.0)
_PIXEL_UNIT = flags.DEFINE_string("pixel_unit", "um", "Unit of --pixel_size: 'um' (also 'µm', 'micron'), 'nm', 'mm'.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    reuse_freed_host_memory()
    logging.set_verbosity(logging.ERROR)  # orbax warns about every read-only checkpoint it opens
    summary = predict_run(trained_run_flags.WORKDIR.value, _INPUT.value, _OUTPUT.value,
                          checkpoint=trained_run_flags.CHECKPOINT.value, tta_n=trained_run_flags.TTA.value,
                          pixel_size=_PIXEL_SIZE.value, pixel_unit=_PIXEL_UNIT.value,
                          threshold=trained_run_flags.THRESHOLD.value, declump=trained_run_flags.DECLUMP.value)
    print(json.dumps({"processed": len(summary["processed"]), "failed": summary["failed"],
                      "output_dir": str(summary["output_dir"])}, indent=2, default=str))
    if summary["failed"]:
        raise SystemExit(f"{len(summary['failed'])} file(s) could not be predicted (listed above)")


if __name__ == "__main__":
    app.run(main)
