"""Lightning callbacks: a fold's records and its checkpoints.

Per fold folder: history.csv + curve.png (each epoch), oof.csv from the best epoch.
Checkpoints go through AtomicCheckpointIO: written aside, then renamed.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import Callback, WeightAveraging
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
               "val_f1", "val_map", "val_auc", "seconds"]

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


class SWA(WeightAveraging):
    """Stochastic weight averaging (Izmailov et al.): the equal average of the weights at the
    end of every epoch from `start` on. From then, validation, best.ckpt (so the OOF and
    inference) and the final weights are the average; before it, the weights themselves.
    Lightning's WeightAveraging does the averaging, the swaps and the checkpoints."""

    def __init__(self, start: int):
        super().__init__()  # no avg_fn: the equal (SWA) average
        self.start, self._swapped = start, False

    def should_update(self, step_idx=None, epoch_idx=None) -> bool:
        return False  # updated below, before the epoch's validation, so that it counts there

    def on_validation_epoch_start(self, trainer, pl_module):
        if trainer.sanity_checking or trainer.current_epoch < self.start:
            return
        if trainer.current_epoch > self._latest_update_epoch:
            self._average_model.update_parameters(pl_module)
            self._latest_update_epoch = trainer.current_epoch
        super().on_validation_epoch_start(trainer, pl_module)
        self._swapped = True

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self._latest_update_epoch >= 0:  # nothing averaged yet: the weights as they are
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer, pl_module):
        if self._latest_update_epoch >= 0:
            super().on_train_end(trainer, pl_module)


class OOFWriter(Callback):
    """oof.csv from the epoch with the best validation score (accuracy, or mAP for multilabel:
    the epoch best.ckpt holds): path, row, fold, label (the primary), secondary (multilabel),
    then one probability column per class."""

    def __init__(self, folder: str | Path, val_table: pd.DataFrame, classes: list[str]):
        self.folder, self.classes = Path(folder), classes
        self.table = val_table.set_index("row")
        self.best = -1.0

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not pl_module._val:
            return
        got = pl_module.gathered_val()
        score = pl_module.val_score()
        rows, probs = got[0].cpu().numpy(), got[2].cpu().numpy()
        if not trainer.is_global_zero or score <= self.best:
            return
        self.best = score
        t = self.table.loc[rows]
        meta = dict(row=rows, fold=t.fold.to_numpy(), label=t.label.to_numpy())
        if pl_module.cfg.multilabel and "secondary" in t:
            meta["secondary"] = t.secondary.to_numpy()
        write_csv(probs_frame(t.path, probs, self.classes, key="path", **meta),
                  self.folder / "oof.csv")

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]
