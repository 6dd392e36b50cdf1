"""Every score the project reports, in one place (torchmetrics and scikit-learn underneath).

Validation (callback.ValidationCollector), the CV report (results.py), the test score and the
blend (inference.py) all compute their numbers here, so a score means the same everywhere.
"""
from __future__ import annotations

import numpy as np
import torch


def top1_label(y: torch.Tensor) -> torch.Tensor:
    """Class indices of labels that are indices already or multi-hot (the primary: the largest)."""
    return y if y.dim() == 1 else y.argmax(-1)


def scores(y_true, y_pred, n_classes: int) -> dict:
    """Contest accuracy (micro) and macro-F1 with torchmetrics."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    t, p = torch.as_tensor(np.asarray(y_true)), torch.as_tensor(np.asarray(y_pred))
    return dict(acc=float(multiclass_accuracy(p, t, n_classes, average="micro")),
                f1=float(multiclass_f1_score(p, t, n_classes, average="macro")))


def multilabel_scores(probs: torch.Tensor, target: torch.Tensor) -> dict:
    """Macro average precision (mAP) and ROC-AUC over the classes that have at least one
    positive (and, for AUC, one negative) among the rows (torchmetrics)."""
    from torchmetrics.functional.classification import (multilabel_auroc,
                                                        multilabel_average_precision)

    t = (target > 0).int()
    n = t.shape[1]
    pos = t.sum(0)
    has, both = pos > 0, (pos > 0) & (pos < len(t))
    out = {}
    if has.any():
        ap = multilabel_average_precision(probs.float(), t, n, average=None)
        out["map"] = float(ap[has].mean())
    if both.any():
        auc = multilabel_auroc(probs.float(), t, n, average=None)
        out["auc"] = float(auc[both].mean())
    return out


def validation_scores(probs: torch.Tensor, target: torch.Tensor, multilabel: bool) -> dict:
    """The scores of one validation pass over every row once: acc and f1 of the top class
    (the primary label for multilabel data), and map and auc for multilabel data."""
    y = top1_label(target)
    out = scores(y.cpu(), probs.argmax(1).cpu(), probs.shape[1])
    if multilabel:
        out.update(multilabel_scores(probs.cpu(), target.cpu()))
    return out


def monitored(multilabel: bool) -> str:
    """The score that picks a run's best epoch (best.ckpt, oof.csv, the summary): mAP for
    multilabel data, else accuracy."""
    return "map" if multilabel else "acc"


def padded_cmap(truth: np.ndarray, probs: np.ndarray, pad: int = 5) -> float:
    """BirdCLEF's padded cmAP: `pad` rows of ones added to the truth and the predictions, then
    the macro average precision over every class (torchmetrics)."""
    from torchmetrics.functional.classification import multilabel_average_precision

    t = np.concatenate([truth, np.ones((pad, truth.shape[1]))]).astype(np.int64)
    p = np.concatenate([probs, np.ones((pad, probs.shape[1]))]).astype(np.float32)
    return float(multilabel_average_precision(torch.from_numpy(p), torch.from_numpy(t),
                                              truth.shape[1], average="macro"))


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-15, 1.0)).mean())


def calibration_error(probs: np.ndarray, y: np.ndarray) -> float:
    """Expected calibration error (15 bins, L1) with torchmetrics."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, y = torch.tensor(probs, dtype=torch.float32), torch.tensor(y)  # copies: writable
    return float(multiclass_calibration_error(probs, y, probs.shape[1], n_bins=15, norm="l1"))


def most_confused(y_true, y_pred, classes: list[str], top: int = 10) -> list[tuple[str, str, int]]:
    """The `top` (true, predicted, count) pairs with true != predicted, most frequent first."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=range(len(classes)))
    np.fill_diagonal(cm, 0)
    order = np.argsort(cm, axis=None)[::-1][:top]
    pairs = [(classes[i], classes[j], int(cm[i, j])) for i, j in zip(*np.unravel_index(order, cm.shape))]
    return [p for p in pairs if p[2] > 0]
