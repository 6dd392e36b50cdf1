"""Loss, reports and plots, and small I/O helpers shared by the scripts."""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- loss
def classification_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0,
                        ohem: float = 1.0) -> torch.Tensor:
    """Cross-entropy with label smoothing; `target` is class indices or soft (mixup) targets.
    OHEM keeps the `ohem` share of the batch with the largest loss (1.0 = all)."""
    loss = F.cross_entropy(logits.float(), target, label_smoothing=smoothing, reduction="none")
    if ohem < 1.0:
        k = max(1, int(round(ohem * loss.numel())))
        loss = loss.topk(k).values
    return loss.mean()


# ----------------------------------------------------------------------------- I/O
def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) and move the file into place, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)


def probs_frame(names, probs: np.ndarray, classes: list[str], key: str = "file_name",
                **extra) -> pd.DataFrame:
    """A table of `key`, the `extra` columns, then one probability column per class."""
    df = pd.DataFrame({key: list(names), **extra})
    return pd.concat([df, pd.DataFrame(probs, columns=classes)], axis=1)


# ----------------------------------------------------------------------------- reports
def scores(y_true, y_pred, n_classes: int) -> dict:
    """Contest accuracy (micro) and macro-F1 with torchmetrics."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    t, p = torch.tensor(np.asarray(y_true)), torch.tensor(np.asarray(y_pred))
    return dict(acc=float(multiclass_accuracy(p, t, n_classes, average="micro")),
                f1=float(multiclass_f1_score(p, t, n_classes, average="macro")))


def most_confused(y_true, y_pred, classes: list[str], top: int = 10) -> list[tuple[str, str, int]]:
    """The `top` (true, predicted, count) pairs with true != predicted, most frequent first."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=range(len(classes)))
    np.fill_diagonal(cm, 0)
    order = np.argsort(cm, axis=None)[::-1][:top]
    pairs = [(classes[i], classes[j], int(cm[i, j])) for i, j in zip(*np.unravel_index(order, cm.shape))]
    return [p for p in pairs if p[2] > 0]


def plot_confusion(y_true, y_pred, classes: list[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix with class names on both axes, sized for 30+ classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=range(len(classes)), normalize="true")
    n = len(classes)
    side = max(6.0, 0.32 * n + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, j in zip(*np.nonzero(cm >= 0.01)):
        ax.text(j, i, f"{cm[i, j]:.2f}"[1:] if cm[i, j] < 1 else "1", ha="center", va="center",
                fontsize=5.5, color="white" if cm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion (rows sum to 1)")
    fig.colorbar(im, fraction=0.04)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
