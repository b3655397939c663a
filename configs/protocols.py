"""Protocols on the real development sets of ``../shared/data``, shared by every config.

``configs/imsahlo.py:data=pfc_pn`` and ``configs/morphoseg.py:data=pfc_pn`` train on the same
images, split, preprocessing and budget: each protocol below is one function that edits
``config.data``, ``config.model.width``, ``config.train`` and ``config.inference``.

- Data root: ``../shared/data/<set>`` beside the repository; ``--config.data.root=DIR`` points
  elsewhere (a missing folder fails when the dataset is built, naming the path).
- Split: fixed by image in ``configs/splits/<set>.json``. Its test images are held out: no
  checkpoint or hyper-parameter is chosen on them (model selection uses ``val``). The files were
  written by ``python configs/protocols.py`` (seed 0, stratified by foreground fraction), which
  writes the same files again from the same folders.
- Budget: batch 8, evaluation every 50 steps, and as many steps as IMSAHLO at width 16 (every
  model's width here) should train in about 15 minutes on an idle 2-core CPU: 600 steps on PFC-PN,
  500 on BBBC039's larger crops. Each result's JSON records the wall time its run took.
- Whole-image evaluation: sliding windows of the crop size with 25 % overlap.
"""

from __future__ import annotations

import pathlib
import sys

import ml_collections

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLIT_DIR = REPO / "configs" / "splits"
# (val, test) images of each set's split file; the rest train.
SPLIT_SIZES = {"pfc_pn": (10, 18), "bbbc039": (18, 30), "fnc": (1, 1)}
SPLIT_SEED = 0
WIDTH = 16
BATCH_SIZE = 8
EVAL_EVERY = 50
WINDOW_OVERLAP = 0.25


def default_root(name: str) -> pathlib.Path:
    """``../shared/data/<name>`` beside the repository, wherever the command runs from."""
    return REPO.parent / "shared" / "data" / name


def split_file(name: str) -> pathlib.Path:
    return SPLIT_DIR / f"{name}.json"


def _set_common(config: ml_collections.ConfigDict, name: str, *, crop: tuple[int, int], batch_size: int,
                num_steps: int, eval_every: int) -> None:
    config.data.source = "folder"
    config.data.root = str(default_root(name))
    config.data.split.file = str(split_file(name))
    config.data.crop_size = crop
    config.model.width = WIDTH
    config.train.batch_size = batch_size
    config.train.num_steps = num_steps
    config.train.eval_every = eval_every
    config.train.checkpoint_every = 0  # at every evaluation
    config.inference.window = crop
    config.inference.overlap = WINDOW_OVERLAP


def pfc_pn(config: ml_collections.ConfigDict) -> None:
    """PFC-PN bright-field pyramidal neurons: 88 images -> 60 train / 10 val / 18 test.

    The 1280x960 RGB JPEGs are resized (INTER_AREA) to 320x240, where a neurite is still 1-3 px
    wide; one channel is the mean of R, G and B unless the config asks for 3. Multi-scale patches
    (MorphoSeg) are 224 px at this resolution plus the whole image.
    """
    config.data.image_size = (240, 320)
    config.data.patches.sizes = (224,)
    _set_common(config, "pfc_pn", crop=(224, 224), batch_size=BATCH_SIZE, num_steps=600, eval_every=EVAL_EVERY)


def bbbc039(config: ml_collections.ConfigDict) -> None:
    """BBBC039 U2OS nuclei: 148 images -> 100 train / 18 val / 30 test.

    Native 696x520 uint16 images, each normalised by its own 0.5 / 99.8 percentiles; the instance-
    label masks give the binary foreground (label > 0) and, for the boundary term, the touching-
    cells weights. Multi-scale patches (MorphoSeg): 224 and 448 px plus the whole image.
    """
    config.data.image_size = None
    config.data.patches.sizes = (224, 448)
    _set_common(config, "bbbc039", crop=(256, 256), batch_size=BATCH_SIZE, num_steps=500, eval_every=EVAL_EVERY)


def fnc(config: ml_collections.ConfigDict) -> None:
    """FNC yellow sample, a smoke test: 4 images -> 2 train / 1 val / 1 test.

    The FNC release layout and red+green signal, resized (INTER_AREA) from 1600x1200 to 768x512 as
    the IMSAHLO paper does. Two training images allow a batch of 2 only; 20 steps with an
    evaluation at 10 and 20 check that a run goes through, not what it learns (5 min with IMSAHLO
    width 16 on 2 shared CPU cores, compilation included).
    """
    config.data.layout = "fnc"
    config.data.image_size = (512, 768)
    config.data.patches.sizes = (224, 448)
    _set_common(config, "fnc", crop=(256, 256), batch_size=2, num_steps=20, eval_every=10)


PROTOCOLS = {"pfc_pn": pfc_pn, "bbbc039": bbbc039, "fnc": fnc}


def write_split_files(names: list[str]) -> None:
    """Write ``configs/splits/<name>.json`` for each set from its folder under ../shared/data."""
    from neuroseg_jax.data import FolderDataset
    from neuroseg_jax.data.splits import write_split_file

    for name in names:
        layout = "fnc" if name == "fnc" else "plain"
        dataset = FolderDataset(default_root(name), layout=layout)
        strata = [dataset.foreground_fraction(i) for i in range(len(dataset))]
        num_val, num_test = SPLIT_SIZES[name]
        content = write_split_file(split_file(name), dataset.names, num_val=num_val, num_test=num_test,
                                   seed=SPLIT_SEED, strata=strata)
        print(f"{split_file(name)}: " + ", ".join(f"{split} {len(stems)}" for split, stems in content.items()))


if __name__ == "__main__":
    unknown = sorted(set(sys.argv[1:]) - set(PROTOCOLS))
    if unknown:
        sys.exit(f"usage: python configs/protocols.py [{' '.join(PROTOCOLS)}]; unknown {unknown}")
    write_split_files(sys.argv[1:] or list(PROTOCOLS))
