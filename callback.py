"""Lightning callbacks for a fold's records, and the cross-validation summary of a run.

Per fold folder: history.csv + curve.png (each epoch), oof.csv from the best epoch.
Checkpoints go through AtomicCheckpointIO: written aside, then renamed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from util import atomic_write, probs_frame, scores, write_csv, write_json


class AtomicCheckpointIO(TorchCheckpointIO):
    """A killed process leaves the previous checkpoint intact, never half of a new one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save = super().save_checkpoint
        atomic_write(path, lambda tmp: save(checkpoint, tmp, storage_options))


def plot_curves(history: pd.DataFrame, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ("loss", "acc", "f1")):
        for stage, style in (("train", "o-"), ("val", "s-")):
            col = f"{stage}_{metric}"
            if col in history:
                ax.plot(history.epoch, history[col], style, ms=3, label=stage)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


class History(Callback):
    """history.csv (epoch, lr, train/val loss, acc, f1, seconds) and curve.png, every epoch.
    On resume the rows of epochs already done are kept."""

    COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "train_acc", "val_acc", "train_f1",
               "val_f1", "seconds"]

    def __init__(self, folder: str | Path, title: str = ""):
        self.folder, self.title, self._t0 = Path(folder), title, time.time()

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.time()

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {c: m.get(c, np.nan) for c in self.COLUMNS}
        row.update(epoch=trainer.current_epoch, lr=trainer.optimizers[0].param_groups[0]["lr"],
                   seconds=round(time.time() - self._t0, 2))
        path = self.folder / "history.csv"
        old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=self.COLUMNS)
        hist = pd.concat([old[old.epoch < trainer.current_epoch], pd.DataFrame([row])])
        write_csv(hist, path)
        plot_curves(hist, self.folder / "curve.png", self.title)


class OOFWriter(Callback):
    """oof.csv from the epoch with the best validation accuracy (the epoch best.ckpt holds):
    path, row, fold, label, then one probability column per class."""

    def __init__(self, folder: str | Path, val_table: pd.DataFrame, classes: list[str]):
        self.folder, self.classes = Path(folder), classes
        self.table = val_table.set_index("row")
        self.best = -1.0

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not pl_module._val:
            return
        rows, y, probs = (t.cpu().numpy() for t in pl_module.gathered_val())
        acc = float((probs.argmax(1) == y).mean())
        if not trainer.is_global_zero or acc <= self.best:
            return
        self.best = acc
        t = self.table.loc[rows]
        meta = dict(row=rows, fold=t.fold.to_numpy(), label=t.label.to_numpy())
        write_csv(probs_frame(t.path, probs, self.classes, key="path", **meta),
                  self.folder / "oof.csv")

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]


def load_oof(run_dirs: list[Path], folds: list[int], name: str, classes: list[str],
             weights=None) -> tuple[pd.DataFrame, np.ndarray] | None:
    """The OOF table (path, row, fold, label) of `folds` and its probabilities, averaged over
    runs with `weights`; None when a fold of a run has no `name`.csv."""
    tables = []
    for d in run_dirs:
        paths = [Path(d) / f"fold{k}" / f"{name}.csv" for k in folds]
        if not all(p.is_file() for p in paths):
            return None
        tables.append(pd.concat([pd.read_csv(p, keep_default_na=False) for p in paths])
                      .sort_values("row").reset_index(drop=True))
    probs = np.average(np.stack([t[classes].to_numpy() for t in tables]), axis=0, weights=weights)
    return tables[0][["path", "row", "fold", "label"]], probs


def cv_summary(run_dirs: list[Path], classes: list[str], folds: list[int], out: Path,
               weights=None) -> dict | None:
    """Per-fold and overall OOF accuracy and macro-F1 of the (blended) runs, plain and with
    TTA where every fold has it, written to out/cv.json; None while a fold lacks oof.csv."""
    result = {}
    for name, key in (("oof", "plain"), ("oof_tta", "tta")):
        got = load_oof(run_dirs, folds, name, classes, weights)
        if got is None:
            continue
        table, probs = got
        pred = probs.argmax(1)
        true = table.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
        fold = table.fold.to_numpy()
        result[key] = dict(overall=scores(true, pred, len(classes)), clips=len(table), folds={
            int(k): scores(true[fold == k], pred[fold == k], len(classes)) for k in folds})
    if "plain" not in result:
        return None
    result.update(accuracy=result["plain"]["overall"]["acc"], folds=folds,
                  runs=[Path(d).name for d in run_dirs])
    write_json(result, Path(out) / "cv.json")
    return result
