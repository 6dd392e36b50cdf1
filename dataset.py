"""Datasets over the int16 waveform cache (cache.py), and the data module of one fold.

No decoding and no features here: a batch is a slice of rows of a memory-mapped .npy
(int16 tensor), the labels and the row indices. Features are made on the device (model.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from audio import codec
from cache import Clips
from layouts import SILENCE, UNKNOWN
from runs import Work, validation_folds
from util import UsageError, read_table


class WaveDataset(Dataset):
    """`length`-sample crops of clips[rows]; `targets` are class indices (N,) or multi-hot
    targets (N, C). crop 'random': a new random start each time a clip is read (training);
    'start': from the beginning (validation, and every clip no longer than `length`)."""

    def __init__(self, clips: Clips, rows=None, targets=None, length: int | None = None,
                 crop: str = "start", codecs: tuple = (), p_codec: float = 0.0, sr: int = 16000):
        self.clips, self.crop = clips, crop
        self.codecs, self.p_codec, self.sr = tuple(codecs), p_codec, sr
        self.rows = np.arange(len(clips)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.length = int(length or clips.lengths.max(initial=1))
        self.targets = np.full(len(self.rows), -1) if targets is None else np.asarray(targets)
        self.row_ids = self.rows  # what a batch reports as its rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]):
        """A whole batch in one read of the cache (Clips.read), in the asked order."""
        idx = np.asarray(idx)
        rows = self.rows[idx]
        starts = self.clips.random_starts(rows, self.length) if self.crop == "random" else None
        waves = self.clips.read(rows, self.length, starts)
        if self.p_codec > 0 and self.codecs:
            self.through_codecs(waves)
        return (torch.from_numpy(waves), torch.from_numpy(self.targets[idx]),
                torch.from_numpy(self.row_ids[idx]))


    def through_codecs(self, waves: np.ndarray) -> None:
        """--p-codec: each chosen clip of the batch (int16, in place) through one of --codecs
        and back (audio.codec): CPU work, done where the batch is read (the loader's workers
        on a GPU machine). Draws from torch's generator, like the crops."""
        chosen = np.flatnonzero(torch.rand(len(waves)).numpy() < self.p_codec)
        which = torch.randint(len(self.codecs), (len(chosen),)).numpy()
        for i, k in zip(chosen, which):
            y = codec(waves[i].astype(np.float32) / 32768.0, self.sr, self.codecs[k])
            waves[i] = np.clip(np.round(y * 32768.0), -32768, 32767)


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
        waves, ys, rows = [], [], []
        order = np.concatenate([np.flatnonzero(part == k) for k in range(len(self.parts))])
        for k, p in enumerate(self.parts):
            if (part == k).any():
                w, y, r = p.__getitems__(idx[part == k] - self.offsets[k])
                waves.append(w), ys.append(y), rows.append(r)
        back = torch.from_numpy(np.argsort(order))  # put the batch back in the asked order
        return torch.cat(waves)[back], torch.cat(ys)[back], torch.cat(rows)[back]


def _batch(x):  # __getitems__ already returns the collated batch
    return x


def loader(ds: Dataset, batch_size: int, shuffle: bool, workers: int,
           drop_last: bool = False, sampler=None) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=workers, collate_fn=_batch,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last,
                      persistent_workers=workers > 0)


def targets(table: pd.DataFrame, classes: list[str], multilabel: bool,
            secondary_weight: float = 0.5) -> np.ndarray:
    """Class indices (N,) of the rows' labels, or with `multilabel` multi-hot float32 targets
    (N, C): 1 for the primary label, `secondary_weight` for each secondary one (the
    space-separated `secondary` column)."""
    if not multilabel:
        return table.y.to_numpy(dtype=np.int64)
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(table), len(classes)), np.float32)
    second = table.secondary if "secondary" in table else [""] * len(table)
    for i, (y, more) in enumerate(zip(table.y, second)):
        for name in str(more).split():
            if name in index:
                out[i, index[name]] = secondary_weight
        out[i, y] = 1.0
    return out


def weighted_sampler(y: np.ndarray, classes: list[str], power: float, open_share: float,
                     seed: int):
    """Each row's draw weight (with replacement, as many draws an epoch as rows), None when
    nothing asks for one: --balance P, count(its class)^-P (0: as the data is, 1: every class
    equally often); then --unknown-share S, the _unknown_ and _silence_ rows together S of the
    draws."""
    from torch.utils.data import WeightedRandomSampler

    if power <= 0 and open_share <= 0:
        return None
    w = np.bincount(y)[y].astype(np.float64) ** -power
    if open_share > 0:
        other = np.isin(y, [classes.index(c) for c in (UNKNOWN, SILENCE) if c in classes])
        if other.all() or not other.any():
            raise UsageError(f"--unknown-share {open_share}: the training rows need both "
                             f"words and {UNKNOWN} or {SILENCE} clips (preprocess.py --unknown, "
                             f"--silence)")
        w[other] *= open_share / (1 - open_share) * w[~other].sum() / w[other].sum()
    return WeightedRandomSampler(torch.from_numpy(w), len(y), replacement=True,
                                 generator=torch.Generator().manual_seed(seed))


def load_noise(work: str | Path) -> torch.Tensor | None:
    path = Work(work).noise
    return torch.from_numpy(np.load(path).astype(np.float32) / 32768.0) if path.is_file() else None


def pseudo_labels(work: str | Path, test_probs: str | Path, threshold: float,
                  classes: list[str]) -> pd.DataFrame:
    """The test rows whose top probability in `test_probs` (a run's test_probs.csv) is at least
    `threshold`: row, file_name, y (the top class), p. UsageError when the file does not
    match WORK's test set or classes."""
    probs = pd.read_csv(test_probs, keep_default_na=False)
    test = read_table(Work(work).test_csv)
    if list(probs.columns[1:]) != classes:
        raise UsageError(f"{test_probs}: its classes differ from {Work(work).classes_json}")
    if list(probs.file_name.astype(str)) != list(test.file_name):
        raise UsageError(f"{test_probs}: its rows are not {Work(work).test_csv}'s test clips "
                         f"(made from another WORK?)")
    p = probs[classes].to_numpy()
    keep = (p.max(1) >= threshold) & (test.status == "ok").to_numpy()
    return pd.DataFrame({"row": test.row[keep], "file_name": test.file_name[keep],
                         "y": p.argmax(1)[keep], "p": p.max(1)[keep]})


def labelled_share(train: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """The stratified, seeded `share` of `train`'s rows (at least one per class): the rows a
    label-efficiency run (--labels) keeps. A class with a single row cannot be split: it is
    kept, one row of every class is, and the rest of the share is drawn stratified (said)."""
    from sklearn.model_selection import train_test_split

    if share >= 1.0:
        return train
    n = max(int(round(share * len(train))), train.y.nunique())
    counts = train.y.value_counts()
    if counts.min() >= 2:
        try:
            keep, _ = train_test_split(train, train_size=n, stratify=train.y, random_state=seed)
            return keep.sort_values("row")
        except ValueError:  # too few rows left out to hold every class: as below
            pass
    logging.getLogger(__name__).warning(
        "--labels %g: the share cannot be drawn stratified (%d class(es) with a single training "
        "row): every class keeps at least one row, the rest of the share is drawn at random",
        share, int((counts < 2).sum()))
    first = train.groupby("y", group_keys=False).sample(1, random_state=seed)
    rest = train.drop(first.index).sample(frac=1.0, random_state=seed).head(n - len(first))
    return pd.concat([first, rest]).sort_values("row")


class FoldData(L.LightningDataModule):
    """Train on every fold but `fold` (plus pseudo-labelled test rows), validate on `fold`.
    Training reads a random `length`-sample crop of each clip every epoch (`crop` 'start':
    its beginning), validation the beginning. Pseudo-labelled rows carry row ids -1 - test
    row, so nothing mistakes them for training rows, and they never enter validation."""

    def __init__(self, work: str | Path, fold: int, batch_size: int, workers: int,
                 pseudo: pd.DataFrame | None = None, label_share: float = 1.0, seed: int = 0,
                 length: int | None = None, crop: str = "random", multilabel: bool = False,
                 secondary_weight: float = 0.5, balance: float = 0.0, codecs: tuple = (),
                 p_codec: float = 0.0, sr: int = 16000, open_share: float = 0.0):
        super().__init__()
        self.work, self.fold, self.batch_size, self.workers = Path(work), fold, batch_size, workers
        self.classes = Work(work).classes()
        self.table = read_table(Work(work).train_csv)
        folds = validation_folds(self.table)
        if fold not in folds:
            raise UsageError(f"fold {fold} is not in {Work(work).train_csv} (folds "
                             f"{', '.join(map(str, folds))})")
        self.val_table = self.table[self.table.fold == fold]
        train = labelled_share(self.table[self.table.fold != fold], label_share, seed)
        clips = Clips.of(self.work, "train")
        length = length or int(clips.lengths.max(initial=1))

        def y(t):
            return targets(t, self.classes, multilabel, secondary_weight)

        self.train_ds = WaveDataset(clips, train.row, y(train), length, crop, codecs, p_codec, sr)
        self.sampler = weighted_sampler(train.y.to_numpy(), self.classes, balance, open_share, seed)
        if pseudo is not None and len(pseudo):
            extra = WaveDataset(Clips.of(self.work, "test"), pseudo.row, y(pseudo.assign(
                secondary="")), length, crop)
            extra.row_ids = -1 - extra.rows
            self.train_ds = JoinedDataset(self.train_ds, extra)
            self.sampler = None  # --balance weighs the labelled rows only: refused in job.py
        self.val_ds = WaveDataset(clips, self.val_table.row, y(self.val_table), length, "start")

    def train_dataloader(self):
        return loader(self.train_ds, self.batch_size, True, self.workers,
                      drop_last=len(self.train_ds) > self.batch_size, sampler=self.sampler)

    def val_dataloader(self):
        return loader(self.val_ds, self.batch_size * 2, False, self.workers)
