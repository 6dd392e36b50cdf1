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

from arg import Config
from audio import codec, word_span
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
        self.p_cut, self.cut_share, self.words, self.unknown = 0.0, 0.0, None, -1

    def cut_words(self, p_cut: float, cut_share: float, classes: list[str]) -> None:
        """--p-cut: that share of the word rows is read as a stream's window catches a word
        going by: the word (its sound, word_span) moved so that a uniform random share of it
        falls outside the window, at the start or the end; cut by more than `cut_share`, it
        is learnt as _unknown_. Rows of _unknown_ and _silence_ are read as they are."""
        if UNKNOWN not in classes:
            raise UsageError(f"--p-cut {p_cut}: a word cut beyond --cut-share is learnt as "
                             f"{UNKNOWN}, and the classes hold none (preprocess.py --unknown "
                             f"LABELS|DIR)")
        is_open = np.isin(self.targets, [classes.index(c) for c in (UNKNOWN, SILENCE)
                                         if c in classes])
        self.p_cut, self.cut_share, self.words = p_cut, cut_share, ~is_open
        self.unknown = classes.index(UNKNOWN)

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
        targets = self.targets[idx]
        if self.p_cut > 0:
            waves, targets = self.cut(waves, targets, self.words[idx])
        if self.p_codec > 0 and self.codecs:
            self.through_codecs(waves)
        return (torch.from_numpy(waves), torch.from_numpy(targets),
                torch.from_numpy(self.row_ids[idx]))

    def cut(self, waves: np.ndarray, targets: np.ndarray, words: np.ndarray):
        """The --p-cut of a batch (int16 [B, L], class indices [B]): new arrays, each chosen
        word row shifted so that a uniform share of its word_span lies beyond one edge of the
        window (zeros where the clip has no samples), _unknown_ beyond --cut-share. Torch's
        generator draws, as random_starts does (seeded by Lightning, one stream per worker)."""
        waves, targets = waves.copy(), targets.copy()
        draw = torch.rand(len(waves), 3, dtype=torch.float64).numpy()
        n = waves.shape[1]
        for i in np.flatnonzero(words & (draw[:, 0] < self.p_cut)):
            a, b = word_span(waves[i])
            share = draw[i, 1]
            gone = int(round(share * (b - a)))
            # the window's sample t reads the clip's sample t + shift
            shift = a + gone if draw[i, 2] < 0.5 else a + (b - a) - gone - n
            out = np.zeros(n, waves.dtype)
            lo, hi = max(0, -shift), min(n, n - shift)
            out[lo:hi] = waves[i, lo + shift:hi + shift]
            waves[i] = out
            if share > self.cut_share:
                targets[i] = self.unknown
        return waves, targets


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


def long_negatives(train: pd.DataFrame, clips: Clips, length: int,
                   classes: list[str]) -> pd.DataFrame:
    """The training rows, each _unknown_ recording longer than the window repeated as many
    times as it holds windows (rounded up): an epoch reads that many windows of it, each at
    a fresh random start (crop random), rather than one (preprocess.py --unknown DIR of long
    recordings: other speech as the detector reads it)."""
    if UNKNOWN not in classes or not len(train):
        return train
    n = clips.lengths[train.row.to_numpy()]
    times = np.where(train.y.to_numpy() == classes.index(UNKNOWN), -(-n // max(1, length)), 1)
    return train.loc[train.index.repeat(np.maximum(times, 1))]


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


def weighted_sampler(y: np.ndarray, classes: list[str], power: float, unknown_share: float,
                     seed: int):
    """Each row's draw weight (with replacement, as many draws an epoch as rows), None when
    nothing asks for one: --balance P, count(its class)^-P (0: as the data is, 1: every class
    equally often); then --unknown-share S, the _unknown_ and _silence_ rows together S of the
    draws."""
    from torch.utils.data import WeightedRandomSampler

    if power <= 0 and unknown_share <= 0:
        return None
    w = np.bincount(y)[y].astype(np.float64) ** -power
    if unknown_share > 0:
        other = np.isin(y, [classes.index(c) for c in (UNKNOWN, SILENCE) if c in classes])
        if other.all() or not other.any():
            raise UsageError(f"--unknown-share {unknown_share}: the training rows need both "
                             f"words and {UNKNOWN} or {SILENCE} clips (preprocess.py --unknown, "
                             f"--silence)")
        w[other] *= unknown_share / (1 - unknown_share) * w[~other].sum() / w[other].sum()
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


def labelled_share(train: pd.DataFrame, labels: float, seed: int) -> pd.DataFrame:
    """The stratified, seeded share `labels` of `train`'s rows (at least one per class): the rows a
    label-efficiency run (--labels) keeps. A class with a single row cannot be split: it is
    kept, one row of every class is, and the rest of the share is drawn stratified (said)."""
    from sklearn.model_selection import train_test_split

    if labels >= 1.0:
        return train
    n = max(int(round(labels * len(train))), train.y.nunique())
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
        labels, int((counts < 2).sum()))
    first = train.groupby("y", group_keys=False).sample(1, random_state=seed)
    rest = train.drop(first.index).sample(frac=1.0, random_state=seed).head(n - len(first))
    return pd.concat([first, rest]).sort_values("row")


class FoldData(L.LightningDataModule):
    """Train on every fold but `fold` (plus pseudo-labelled test rows), validate on `fold`.
    Training reads a random `length`-sample crop of each clip every epoch (`crop` 'start':
    its beginning), validation the beginning. Pseudo-labelled rows carry row ids -1 - test
    row, so nothing mistakes them for training rows, and they never enter validation."""

    def __init__(self, cfg: Config, fold: int, work: Work | None = None, workers: int = 0,
                 pseudo: pd.DataFrame | None = None):
        super().__init__()
        work = work or Work(cfg.work)
        self.work, self.fold = work.dir, fold
        self.batch_size, self.workers = cfg.batch_size, workers
        self.classes = work.classes()
        self.table = read_table(work.train_csv)
        folds = validation_folds(self.table)
        if fold not in folds:
            raise UsageError(f"fold {fold} is not in {work.train_csv} (folds "
                             f"{', '.join(map(str, folds))})")
        self.val_table = self.table[self.table.fold == fold]
        train = labelled_share(self.table[self.table.fold != fold], cfg.labels, cfg.seed)
        clips = Clips.of(work.dir, "train")
        length = cfg.clip_samples or int(clips.lengths.max(initial=1))
        train = long_negatives(train, clips, length, self.classes)

        def y(t):
            return targets(t, self.classes, cfg.multilabel, cfg.secondary_weight)

        self.train_ds = WaveDataset(clips, train.row, y(train), length, cfg.crop, cfg.codecs,
                                    cfg.p_codec, cfg.sr)
        if cfg.p_cut > 0:
            self.train_ds.cut_words(cfg.p_cut, cfg.cut_share, self.classes)
        self.sampler = weighted_sampler(train.y.to_numpy(), self.classes, cfg.balance,
                                        cfg.unknown_share, cfg.seed)
        if pseudo is not None and len(pseudo):
            extra = WaveDataset(Clips.of(work.dir, "test"), pseudo.row, y(pseudo.assign(
                secondary="")), length, cfg.crop)
            extra.row_ids = -1 - extra.rows
            self.train_ds = JoinedDataset(self.train_ds, extra)
            self.sampler = None  # --balance weighs the labelled rows only: refused in job.py
        self.val_ds = WaveDataset(clips, self.val_table.row, y(self.val_table), length, "start")

    def train_dataloader(self):
        return loader(self.train_ds, self.batch_size, True, self.workers,
                      drop_last=len(self.train_ds) > self.batch_size, sampler=self.sampler)

    def val_dataloader(self):
        return loader(self.val_ds, self.batch_size * 2, False, self.workers)
