"""Datasets over the int16 waveform caches of preprocess.py, and the data module of one fold.

No decoding and no features here: a batch is a slice of rows of a memory-mapped .npy
(int16 tensor), the labels and the row indices. Features are made on the device (model.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset


class WaveDataset(Dataset):
    """Rows of an int16 [N, L] .npy; `rows` picks a subset, `labels` are class indices."""

    def __init__(self, path: str | Path, rows=None, labels=None):
        self.path = str(path)
        n = np.load(self.path, mmap_mode="r").shape[0]
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        self.labels = (np.full(len(self.rows), -1) if labels is None
                       else np.asarray(labels, dtype=np.int64))
        self._waves = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def waves(self) -> np.ndarray:
        if self._waves is None:
            self._waves = np.load(self.path, mmap_mode="r")
        return self._waves

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]):
        """A whole batch in one memmap read (sorted rows, then put back in order)."""
        idx = np.asarray(idx)
        rows = self.rows[idx]
        order = np.argsort(rows)
        waves = np.empty((len(rows), self.waves.shape[1]), np.int16)
        waves[order] = self.waves[rows[order]]
        return torch.from_numpy(waves), torch.from_numpy(self.labels[idx]), torch.from_numpy(rows)


def _batch(x):  # __getitems__ already returns the collated batch
    return x


def loader(ds: WaveDataset, batch_size: int, shuffle: bool, workers: int,
           drop_last: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=_batch, pin_memory=torch.cuda.is_available(),
                      drop_last=drop_last, persistent_workers=workers > 0)


def read_classes(work: str | Path) -> list[str]:
    path = Path(work) / "classes.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python preprocess.py --data DIR "
                                f"--work {work}` first")
    return json.loads(path.read_text())


def read_table(path: str | Path) -> pd.DataFrame:
    """A WORK csv with empty strings kept as '' (not NaN)."""
    return pd.read_csv(path, keep_default_na=False, dtype={"label": str, "file_name": str})


def load_noise(work: str | Path) -> torch.Tensor | None:
    path = Path(work) / "noise.npy"
    return torch.from_numpy(np.load(path).astype(np.float32) / 32768.0) if path.is_file() else None


class FoldData(L.LightningDataModule):
    """Train on every fold but `fold`, validate on `fold`."""

    def __init__(self, work: str | Path, fold: int, batch_size: int = 64, workers: int = 0):
        super().__init__()
        self.work, self.fold, self.batch_size, self.workers = Path(work), fold, batch_size, workers
        self.classes = read_classes(work)
        self.table = read_table(self.work / "train.csv")
        folds = sorted(self.table.fold.unique())
        if fold not in folds:
            raise ValueError(f"fold {fold} is not in {self.work / 'train.csv'} (folds {folds})")
        self.val_table = self.table[self.table.fold == fold]
        train = self.table[self.table.fold != fold]
        wave = self.work / "train_wave.npy"
        self.train_ds = WaveDataset(wave, train.row, train.y)
        self.val_ds = WaveDataset(wave, self.val_table.row, self.val_table.y)

    def train_dataloader(self):
        return loader(self.train_ds, self.batch_size, True, self.workers,
                      drop_last=len(self.train_ds) > self.batch_size)

    def val_dataloader(self):
        return loader(self.val_ds, self.batch_size * 2, False, self.workers)
