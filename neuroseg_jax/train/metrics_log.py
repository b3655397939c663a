"""Metrics to JSONL, TensorBoard and stdout; only process 0 writes."""

import json
import math
import pathlib
from typing import Mapping

import numpy as np


def _to_float(value) -> float:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else float("nan")


class MetricWriter:
    """Appends one JSON object per (step, split) to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard event files under ``tensorboard/``. A no-op on processes other than 0."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter  # heavy import, only where it is used
            self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _to_float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "split"):
                self._tensorboard.add_scalar(f"{split}/{key}", value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_after(path: str | pathlib.Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a resume restarts from), so the
    log of a resumed run reads like the uninterrupted one."""
    path = pathlib.Path(path)
    records = [r for r in read_metrics(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
