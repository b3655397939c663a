"""Seeded train/val/test splits by image, optionally stratified, or read from a split file."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _split_count(num_items: int, fraction: float) -> int:
    """round(n * fraction), at least 1 when the fraction is positive."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction {fraction} must be in [0, 1)")
    if fraction == 0.0:
        return 0
    return max(1, int(round(num_items * fraction)))


def _spread_pick(order: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pick `count` items evenly spaced along `order` (random phase); return (picked, rest).

    When `order` is sorted by foreground density this is systematic stratified sampling: every
    density range contributes in proportion to its size.
    """
    if count == 0:
        return order[:0], order
    positions = np.floor((np.arange(count) + rng.uniform()) * len(order) / count).astype(int)
    positions = np.minimum(positions, len(order) - 1)
    keep = np.ones(len(order), bool)
    keep[positions] = False
    return order[~keep], order[keep]


def split_indices(
    num_items: int,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    strata: Sequence[float] | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic disjoint split of range(num_items) into sorted index arrays.

    `strata`: one value per item (e.g. foreground fraction); val/test then sample evenly across
    its sorted order so each split spans the whole range (stratified by density).
    """
    num_val = _split_count(num_items, val_fraction)
    num_test = _split_count(num_items, test_fraction)
    if num_items - num_val - num_test < 1:
        raise ValueError(
            f"{num_items} images cannot be split with val_fraction={val_fraction}, test_fraction={test_fraction}: "
            "no training image would remain"
        )
    return _split_by_count(num_items, num_val=num_val, num_test=num_test, seed=seed, strata=strata)


def _split_by_count(
    num_items: int, *, num_val: int, num_test: int, seed: int, strata: Sequence[float] | None
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_items)
    if strata is not None:
        values = np.asarray(strata, np.float64)
        if values.shape != (num_items,):
            raise ValueError(f"strata has shape {values.shape}, expected ({num_items},)")
        order = order[np.argsort(values[order], kind="stable")]  # ties stay in random order
    test, rest = _spread_pick(order, num_test, rng)
    val, train = _spread_pick(rest, num_val, rng)
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def write_split_file(
    path: str | Path,
    names: Sequence[str],
    *,
    num_val: int,
    num_test: int,
    seed: int,
    strata: Sequence[float] | None = None,
) -> dict[str, list[str]]:
    """Split `names` into exactly `num_val` validation and `num_test` test images (the rest train),
    sampled as in `split_indices`, and write it as a JSON split file; returns what was written.

    A fixed file keeps a protocol's split when the split code or the folder listing changes.
    """
    if min(num_val, num_test) < 0 or len(names) - num_val - num_test < 1:
        raise ValueError(f"{len(names)} images cannot give {num_val} val and {num_test} test images and still train")
    indices = _split_by_count(len(names), num_val=num_val, num_test=num_test, seed=seed, strata=strata)
    content = {split: [names[i] for i in indices[split]] for split in SPLITS}
    Path(path).write_text(json.dumps(content, indent=1) + "\n")
    return content


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """Read a split file -> {'train': [stems], 'val': [...], 'test': [...]}.

    JSON: {"train": [...], "val": [...], "test": [...]} (missing splits are empty).
    CSV: rows `stem,split` (a header row `stem,split` or `name,split` is allowed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    result: dict[str, list[str]] = {name: [] for name in SPLITS}
    if path.suffix.lower() == ".json":
        content = json.loads(path.read_text())
        if not isinstance(content, dict) or set(content) - set(SPLITS):
            raise ValueError(f"{path}: expected an object with keys among {SPLITS}")
        for name, stems in content.items():
            result[name] = [str(stem) for stem in stems]
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            for line_number, row in enumerate(csv.reader(handle), start=1):
                if not row or (line_number == 1 and row[-1].strip().lower() == "split"):
                    continue
                if len(row) != 2 or row[1].strip() not in SPLITS:
                    raise ValueError(f"{path}:{line_number}: expected 'stem,split' with split in {SPLITS}, got {row}")
                result[row[1].strip()].append(row[0].strip())
    else:
        raise ValueError(f"{path}: split file must be .json or .csv")
    seen: dict[str, str] = {}
    for name, stems in result.items():
        for stem in stems:
            if stem in seen:
                raise ValueError(f"{path}: stem {stem!r} is in both {seen[stem]!r} and {name!r}")
            seen[stem] = name
    return result


def indices_from_split_file(path: str | Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Map the stems of a split file onto dataset indices; unknown stems are an error."""
    stems = read_split_file(path)
    position = {name: i for i, name in enumerate(names)}
    missing = [stem for listed in stems.values() for stem in listed if stem not in position]
    if missing:
        raise ValueError(f"{path}: stems not in the dataset: {missing[:10]}")
    return {name: np.sort(np.array([position[s] for s in listed], np.int64)) for name, listed in stems.items()}
