"""Lightning callbacks: a fold's records and its checkpoints.

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

from report import plot_curves, save_figure
from util import atomic_write, probs_frame, write_csv


class AtomicCheckpointIO(TorchCheckpointIO):
    """A killed process leaves the previous checkpoint intact, never half of a new one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save = super().save_checkpoint
        atomic_write(path, lambda tmp: save(checkpoint, tmp, storage_options))


class History(Callback):
    """history.csv (epoch, lr, train/val loss, acc, f1, seconds) and curve.png, every epoch.
    On resume the rows of epochs already done are kept."""

    COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "train_acc", "val_acc", "train_f1",
               "val_f1", "seconds"]

    def __init__(self, folder: str | Path, title: str = "", fold: int = 0, columns=None):
        self.folder, self.title, self.fold, self._t0 = Path(folder), title, fold, time.time()
        self.columns = list(columns or self.COLUMNS)

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.time()

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {c: m.get(c, np.nan) for c in self.columns}
        row.update(epoch=trainer.current_epoch, lr=trainer.optimizers[0].param_groups[0]["lr"],
                   seconds=round(time.time() - self._t0, 2))
        path = self.folder / "history.csv"
        old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=self.columns)
        hist = pd.concat([old[old.epoch < trainer.current_epoch], pd.DataFrame([row])])
        write_csv(hist, path)
        save_figure(plot_curves({self.fold: hist}, self.title), self.folder / "curve.png")


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
