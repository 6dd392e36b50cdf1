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

from util import UsageError


class Rows:
    """waves[rows] of a memory-mapped cache, read a slice at a time (predict_waves takes it
    batch by batch), so that the rows are never all in memory at once."""

    def __init__(self, waves: np.ndarray, rows):
        self.waves, self.rows = waves, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.waves[self.rows[s]]


class WaveDataset(Dataset):
    """Rows of an int16 [N, L] .npy; `rows` picks a subset, `labels` are class indices."""

    def __init__(self, path: str | Path, rows=None, labels=None):
        self.path = str(path)
        n = np.load(self.path, mmap_mode="r").shape[0]
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        self.labels = (np.full(len(self.rows), -1) if labels is None
                       else np.asarray(labels, dtype=np.int64))
        self.row_ids = self.rows  # what a batch reports as its rows
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
        return (torch.from_numpy(waves), torch.from_numpy(self.labels[idx]),
                torch.from_numpy(self.row_ids[idx]))


class JoinedDataset(Dataset):
    """WaveDatasets one after another, each batch read with one memmap read per part."""

    def __init__(self, *parts: WaveDataset):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]):
        idx = np.asarray(idx)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        waves, labels, rows = [], [], []
        order = np.concatenate([np.flatnonzero(part == k) for k in range(len(self.parts))])
        for k, p in enumerate(self.parts):
            if (part == k).any():
                w, y, r = p.__getitems__(idx[part == k] - self.offsets[k])
                waves.append(w), labels.append(y), rows.append(r)
        back = torch.from_numpy(np.argsort(order))  # put the batch back in the asked order
        return torch.cat(waves)[back], torch.cat(labels)[back], torch.cat(rows)[back]


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
        raise UsageError(f"{path} not found: run `python preprocess.py --data DIR "
                         f"--work {work}` first")
    return json.loads(path.read_text())


def read_table(path: str | Path) -> pd.DataFrame:
    """A WORK csv with empty strings kept as '' (not NaN)."""
    return pd.read_csv(path, keep_default_na=False, dtype={"label": str, "file_name": str})


def work_folds(work: Path) -> list[int]:
    """The folds of a finished WORK; UsageError when WORK is missing or half-built."""
    if not (work / "prep.json").is_file():
        state = "does not exist" if not work.exists() else \
            "is not built, or its build was interrupted (no prep.json)"
        raise UsageError(f"{work} {state}: run python preprocess.py --data DATA --work {work}")
    return sorted(read_table(work / "train.csv").fold.unique().tolist())


def load_noise(work: str | Path) -> torch.Tensor | None:
    path = Path(work) / "noise.npy"
    return torch.from_numpy(np.load(path).astype(np.float32) / 32768.0) if path.is_file() else None


def pseudo_labels(work: str | Path, test_probs: str | Path, threshold: float,
                  classes: list[str]) -> pd.DataFrame:
    """The test rows whose top probability in `test_probs` (a run's test_probs.csv) is at least
    `threshold`: row, file_name, y (the top class), p. UsageError when the file does not
    match WORK's test set or classes."""
    probs = pd.read_csv(test_probs, keep_default_na=False)
    test = read_table(Path(work) / "test.csv")
    if list(probs.columns[1:]) != classes:
        raise UsageError(f"{test_probs}: its classes differ from {Path(work) / 'classes.json'}")
    if list(probs.file_name.astype(str)) != list(test.file_name):
        raise UsageError(f"{test_probs}: its rows are not {Path(work) / 'test.csv'}'s test clips "
                         f"(made from another WORK?)")
    p = probs[classes].to_numpy()
    keep = (p.max(1) >= threshold) & (test.status == "ok").to_numpy()
    return pd.DataFrame({"row": test.row[keep], "file_name": test.file_name[keep],
                         "y": p.argmax(1)[keep], "p": p.max(1)[keep]})


def labelled_share(train: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """The stratified, seeded `share` of `train`'s rows (at least one per class): the rows a
    label-efficiency run (--labels) keeps."""
    from sklearn.model_selection import train_test_split

    if share >= 1.0:
        return train
    if not 0.0 < share:
        raise UsageError(f"--labels {share}: expected a share in (0, 1]")
    n = max(int(round(share * len(train))), train.y.nunique())
    keep, _ = train_test_split(train, train_size=n, stratify=train.y, random_state=seed)
    return keep.sort_values("row")


class FoldData(L.LightningDataModule):
    """Train on every fold but `fold` (plus pseudo-labelled test rows), validate on `fold`.
    Pseudo-labelled rows carry row ids -1 - test row, so nothing mistakes them for
    training rows, and they never enter validation."""

    def __init__(self, work: str | Path, fold: int, batch_size: int, workers: int,
                 pseudo: pd.DataFrame | None = None, labels: float = 1.0, seed: int = 0):
        super().__init__()
        self.work, self.fold, self.batch_size, self.workers = Path(work), fold, batch_size, workers
        self.classes = read_classes(work)
        self.table = read_table(self.work / "train.csv")
        folds = sorted(self.table.fold.unique())
        if fold not in folds:
            raise UsageError(f"fold {fold} is not in {self.work / 'train.csv'} (folds "
                             f"{', '.join(map(str, folds))})")
        self.val_table = self.table[self.table.fold == fold]
        train = labelled_share(self.table[self.table.fold != fold], labels, seed)
        wave = self.work / "train_wave.npy"
        self.train_ds = WaveDataset(wave, train.row, train.y)
        if pseudo is not None and len(pseudo):
            extra = WaveDataset(self.work / "test_wave.npy", pseudo.row, pseudo.y)
            extra.row_ids = -1 - extra.rows
            self.train_ds = JoinedDataset(self.train_ds, extra)
        self.val_ds = WaveDataset(wave, self.val_table.row, self.val_table.y)

    def train_dataloader(self):
        return loader(self.train_ds, self.batch_size, True, self.workers,
                      drop_last=len(self.train_ds) > self.batch_size)

    def val_dataloader(self):
        return loader(self.val_ds, self.batch_size * 2, False, self.workers)
