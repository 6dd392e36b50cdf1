"""Lightning callbacks: the books of a run, apart from the model that learns.

ValidationCollector gathers an epoch's validation once (every row once under DDP) and
scores it; best.ckpt (ModelCheckpoint on its `monitor`), OOFWriter, History and the printed
summary all read that one score. EMA, SWA and FreezeBody change the weights the module
trains; AtomicCheckpointIO writes checkpoints aside, then renames them.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, WeightAveraging
from lightning.pytorch.plugins.io import TorchCheckpointIO

from metrics import monitored, validation_scores
from model import warmup_steps
from results import plot_curves, save_figure
from runs import CURVE, HISTORY, OOF
from util import atomic_write, probs_frame, write_csv


class ValidationCollector(Callback):
    """The epoch's validation: each batch's rows, targets and probabilities (what the module's
    validation_step returns), gathered from every process, each row once (DistributedSampler
    pads with repeats), then scored once (metrics.validation_scores) and logged as val_acc,
    val_f1 (and val_map, val_auc for multilabel data). `monitor` names the score that picks
    the best epoch."""

    def __init__(self, multilabel: bool):
        self.multilabel = multilabel
        self.monitor = "val_" + monitored(multilabel)
        self._parts, self.rows, self.probs, self.target, self.scores = [], None, None, None, {}

    def on_validation_epoch_start(self, trainer, pl_module):
        self._parts, self.scores = [], {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0):
        self._parts.append((outputs["rows"], outputs["target"], outputs["probs"].detach()))

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or not self._parts:
            return
        val = [torch.cat(t) for t in zip(*self._parts)]
        if trainer.world_size > 1:
            val = [pl_module.all_gather(t).flatten(0, 1) for t in val]
        first = np.unique(val[0].cpu().numpy(), return_index=True)[1]
        self.rows, self.target, self.probs = (t[first].cpu() for t in val)
        self.scores = validation_scores(self.probs, self.target, self.multilabel)
        pl_module.log_dict({f"val_{k}": v for k, v in self.scores.items()}, prog_bar=True,
                           sync_dist=False)  # every process holds the same gathered rows

    @property
    def score(self) -> float:
        """This epoch's monitored score."""
        return self.scores.get(self.monitor[4:], float("nan"))


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
        # the schedule's lr: the largest group's (--layer-decay scales the lower layers down)
        lr = max(g["lr"] for g in trainer.optimizers[0].param_groups)
        row.update(epoch=trainer.current_epoch, lr=lr,
                   seconds=round(time.time() - self._t0, 2))
        path = self.folder / HISTORY
        old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=self.columns)
        hist = pd.concat([old[old.epoch < trainer.current_epoch], pd.DataFrame([row])])
        write_csv(hist, path)
        save_figure(plot_curves({self.fold: hist}, self.title), self.folder / CURVE)


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
    """oof.csv from the epoch with the best monitored score (the epoch best.ckpt holds): path,
    row, fold, label (the primary), secondary (multilabel), then one probability column per
    class."""

    def __init__(self, folder: str | Path, val_table: pd.DataFrame, classes: list[str],
                 collector: ValidationCollector):
        self.folder, self.classes, self.collector = Path(folder), classes, collector
        self.table = val_table.set_index("row")
        self.best = -1.0

    def on_validation_epoch_end(self, trainer, pl_module):
        got = self.collector
        if trainer.sanity_checking or not got.scores or not trainer.is_global_zero \
                or not got.score > self.best:
            return
        self.best = got.score
        rows = got.rows.numpy()
        t = self.table.loc[rows]
        meta = dict(row=rows, fold=t.fold.to_numpy(), label=t.label.to_numpy())
        if got.multilabel and "secondary" in t:
            meta["secondary"] = t.secondary.to_numpy()
        write_csv(probs_frame(t.path, got.probs.numpy(), self.classes, key="path", **meta),
                  self.folder / OOF)

    def state_dict(self):
        return {"best": self.best}

    def load_state_dict(self, state):
        self.best = state["best"]


class EMA(EMAWeightAveraging):
    """An exponential moving average of the weights (`decay`) that starts when the learning-rate
    warm-up ends, counted in the trainer's own optimizer steps (model.warmup_steps: the
    schedule's count, per process). Validation, best.ckpt, OOF and the final weights use it."""

    def __init__(self, decay: float, cfg):
        super().__init__(decay=decay)
        self.cfg = cfg

    def on_train_start(self, trainer, pl_module):
        self.update_starting_at_step = warmup_steps(trainer, self.cfg)
        super().on_train_start(trainer, pl_module)


class FreezeBody(Callback):
    """--freeze-epochs K: the head alone learns for the first K epochs, then every layer.
    Lightning's BaseFinetuning adds the unfrozen layers to the optimiser as a new group when
    they thaw, which would give them no warm-up and no layer decay; here every parameter is in
    the optimiser from the start and a frozen one simply has no gradient."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_start(self, trainer, pl_module):
        pl_module.net.freeze_body(trainer.current_epoch < self.epochs)
