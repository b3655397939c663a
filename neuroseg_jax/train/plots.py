"""Pictures a person checks after a run: predictions beside ground truth, training curves."""

import pathlib
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_predictions(path: str | pathlib.Path, images: np.ndarray, masks: np.ndarray, probs: np.ndarray,
                     names: Sequence[str] | None = None) -> None:
    """A row per image: input, ground truth, probability, and an overlay where green is a true
    positive, red a false positive and blue a false negative. images (N,H,W,C), masks (N,H,W),
    probs (N,H,W) foreground probability."""
    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n), squeeze=False)
    for row in range(n):
        image = images[row]
        gray = image[..., 0] if image.shape[-1] == 1 else image.mean(-1)
        pred = probs[row] > 0.5
        truth = masks[row] > 0
        overlay = np.stack([gray] * 3, -1) * 0.6
        overlay[pred & truth] = (0.1, 0.9, 0.1)
        overlay[pred & ~truth] = (0.9, 0.1, 0.1)
        overlay[~pred & truth] = (0.1, 0.3, 1.0)
        title = names[row] if names is not None else f"#{row}"
        panels = [(gray, "input " + title, "gray"), (truth, "ground truth", "gray"),
                  (probs[row], "probability", "magma"), (overlay, "TP green / FP red / FN blue", None)]
        for ax, (panel, label, cmap) in zip(axes[row], panels):
            ax.imshow(panel, cmap=cmap, vmin=0, vmax=1)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curves(path: str | pathlib.Path, records: Sequence[dict]) -> None:
    """Loss terms, validation metrics and learning rate against the step."""
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig, (ax_loss, ax_val, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    for key in sorted({k for r in train for k in r if k == "loss" or k.startswith("loss/")}):
        points = [(r["step"], r[key]) for r in train if key in r]
        ax_loss.plot(*zip(*points), label=key)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "k--o", label="val loss")
        for key in ("dice", "iou", "precision", "recall"):
            ax_val.plot([r["step"] for r in val], [r[key] for r in val], "-o", label=key)
    lr = [(r["step"], r["lr"]) for r in train if "lr" in r]
    if lr:
        ax_lr.plot(*zip(*lr))
    ax_loss.set_yscale("log")
    for ax, title in ((ax_loss, "training loss terms"), (ax_val, "validation"), (ax_lr, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
