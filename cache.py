"""The waveform cache: every clip of a split decoded once, int16, back to back in
WORK/{split}_wave.npy (memory-mapped) with WORK/{split}_offsets.npy saying where each starts.
preprocess.py writes it (decode_all: in parallel, block by block, moved into place whole) and
every later step reads it (Clips: a batch of rows in one strided read; Rows, windows: the
fixed-length crops and windows of recordings).
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from arg import Config
from audio import AudioError, read_audio, seconds_label, window_starts
from runs import Work
from util import atomic_write


# ----------------------------------------------------------------------------- reading
class Clips:
    """The clips of one split, each of its own length: WORK/{split}_wave.npy holds every sample
    of every clip back to back (int16, 1-D, memory-mapped) and {split}_offsets.npy where each
    clip starts (N + 1 entries). A WORK built before clips kept their length (a 2-D [N, L]
    cache, no offsets) reads the same way. Opened lazily, once per worker process."""

    def __init__(self, wave: str | Path | np.ndarray, offsets=None):
        """`wave`: the cache file or an array; `offsets`: a file or an array of N + 1 starts
        (None, or a file that is not there, with an older [N, L] cache: rows of L samples)."""
        self.path, self._wave = (None, wave) if isinstance(wave, np.ndarray) else (str(wave), None)
        if isinstance(offsets, (str, Path)):
            offsets = np.load(offsets) if Path(offsets).is_file() else None
        self._offsets = None if offsets is None else np.asarray(offsets, dtype=np.int64)
        if self._offsets is None:  # an older [N, L] cache
            n, length = np.load(self.path, mmap_mode="r").shape
            self._offsets = np.arange(n + 1, dtype=np.int64) * length

    @classmethod
    def of(cls, work: str | Path, split: str) -> "Clips":
        return cls(Work(work).wave(split), Work(work).offsets(split))

    @classmethod
    def from_arrays(cls, clips) -> "Clips":
        """In memory, from a list of 1-D int16 arrays (tests, bench)."""
        lengths = [len(c) for c in clips]
        flat = np.concatenate(clips).astype(np.int16) if clips else np.zeros(0, np.int16)
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)]))

    def __getstate__(self):  # a memmap would travel as a copy of the data: reopen instead
        return {**self.__dict__, "_wave": None if self.path else self._wave}

    @property
    def wave(self) -> np.ndarray:
        if self._wave is None:
            self._wave = np.load(self.path, mmap_mode="r").reshape(-1).view(np.ndarray)
        return self._wave

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def clip(self, i: int) -> np.ndarray:
        return self.wave[self._offsets[i]:self._offsets[i + 1]]

    def read(self, rows, length: int, starts=None) -> np.ndarray:
        """[len(rows), length] int16: `length` samples of each clip from its start (or
        `starts`), zero-padded past its end."""
        rows = np.asarray(rows, dtype=np.int64)
        starts = np.zeros(len(rows), np.int64) if starts is None else np.asarray(starts, np.int64)
        # np.empty, not np.zeros: a fresh zeroed buffer costs a page fault per 4 KiB written,
        # which made reading a batch 9x slower (bench.py --sections crops)
        begin, end = self._offsets[rows] + starts, self._offsets[rows + 1]
        whole = end - begin >= length  # most rows: one gather in C
        if len(rows) and whole.all():  # (no rows: the cache may be shorter than a window)
            return np.lib.stride_tricks.sliding_window_view(self.wave, length)[begin]
        out = np.empty((len(rows), length), np.int16)
        if whole.any():
            out[whole] = np.lib.stride_tricks.sliding_window_view(self.wave, length)[begin[whole]]
        for i in np.flatnonzero(~whole):  # shorter than `length` from there: zero-padded
            n = max(0, int(end[i] - begin[i]))
            out[i, :n] = self.wave[begin[i]:begin[i] + n]
            out[i, n:] = 0
        return out

    def random_starts(self, rows, length: int) -> np.ndarray:
        """A uniform random start for each clip longer than `length` (torch's generator:
        seeded by Lightning, one stream per worker), 0 for the others."""
        room = np.maximum(self.lengths[np.asarray(rows, dtype=np.int64)] - length, 0)
        if not room.any():  # fixed-length clips draw nothing: their runs stay as they were
            return np.zeros(len(room), np.int64)
        u = torch.rand(len(room), dtype=torch.float64).numpy()
        return np.floor(u * (room + 1)).astype(np.int64)


class Rows:
    """`window` samples (default `length`) of clips[rows] from their start (or `starts`),
    zero-padded or cut to `length`, read a slice at a time (predict_waves takes it batch by
    batch): the rows are never all in memory at once."""

    def __init__(self, clips: Clips, rows, length: int, starts=None, window: int | None = None):
        self.clips, self.rows, self.length = clips, np.asarray(rows, dtype=np.int64), length
        self.starts = np.zeros(len(self.rows), np.int64) if starts is None else np.asarray(starts)
        self.window = window or length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, s: slice) -> np.ndarray:
        w = self.clips.read(self.rows[s], self.window, self.starts[s])
        if self.window == self.length:
            return w
        out = np.zeros((len(w), self.length), np.int16)
        n = min(self.window, self.length)
        out[:, :n] = w[:, :n]
        return out


def windows(clips: Clips, window: int, hop: int, sr: int) -> pd.DataFrame:
    """Every clip's windows (audio.window_starts), in clip then time order: row, start
    (samples), end (the window's end in seconds as a row id writes it: audio.seconds_label)."""
    rows, starts, ends = [], [], []
    for i, n in enumerate(clips.lengths):
        for s in window_starts(int(n), window, hop):
            rows.append(i), starts.append(s)
            ends.append(seconds_label(s + window, sr))
    return pd.DataFrame({"row": rows, "start": starts, "end": ends})


# ----------------------------------------------------------------------------- writing
CACHE_FORMAT = "clips-v2"  # whole clips back to back + offsets (dataset.Clips)


def decode(path: str | os.PathLike, sr: int, length: int | None = None) -> tuple[np.ndarray, dict]:
    """int16 waveform of any soundfile format at `sr`, mono, cut to at most `length` samples
    (None: all), and the file's info; audio.read_audio reads it (the torch-free predictor
    reads clips the same way). AudioError (a ValueError) with a short reason for files that
    cannot be used."""
    info = {}
    y = read_audio(path, sr, info)
    if length is not None:
        y = y[:length]
    return np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16), info


def _decode_chunk(job):
    paths, sr, most = job
    waves, infos = [], []
    for path in paths:
        try:
            w, info = decode(path, sr, most)
            waves.append(w)
            infos.append(dict(info, status="ok", samples=len(w)))
        except AudioError as e:
            waves.append(np.zeros(0, np.int16))  # a rejected clip holds no samples
            infos.append(dict(orig_sr=0, orig_channels=0, orig_seconds=0.0, status=str(e),
                              samples=0))
    return waves, infos


def npy_header(f, n: int) -> None:
    """The .npy header of an int16 vector of `n` samples, always 128 bytes (so that it can be
    written before the length is known, and again after)."""
    f.seek(0)
    np.lib.format.write_array_header_1_0(
        f, {"descr": "<i2", "fortran_order": False, "shape": (n,)})
    if f.tell() != 128:
        raise RuntimeError(f"npy header of {f.tell()} bytes, 128 expected")


def write_clips(path: Path, blocks) -> np.ndarray:
    """Clips one after another into an int16 .npy vector at `path`, from `blocks` (lists of
    1-D arrays, in order), written through the file block by block and moved into place: the
    process holds one block, never the cache, and a full disk is one line (DiskFullError).
    Returns the offsets (N + 1) of dataset.Clips."""
    lengths = []

    def write(tmp):
        with open(tmp, "wb") as f:
            npy_header(f, 0)
            for block in blocks:
                for clip in block:
                    f.write(np.ascontiguousarray(clip, dtype="<i2").tobytes())
                    lengths.append(len(clip))
            npy_header(f, int(sum(lengths)))
    atomic_write(path, write)
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def save_offsets(work: Path, split: str, offsets: np.ndarray) -> None:
    atomic_write(Work(work).offsets(split), lambda tmp: np.save(tmp, offsets))


def decode_all(paths: list[str], work: Path, split: str, sr: int, most: int | None,
               workers: int) -> pd.DataFrame:
    """Decode `paths` in parallel, each whole (at most `most` samples), into WORK/{split}_wave.npy
    and {split}_offsets.npy; returns per-clip info (status 'ok' or the reason it was
    rejected, in which case the clip holds no samples)."""
    chunk = 64
    jobs = [(paths[i:i + chunk], sr, most) for i in range(0, len(paths), chunk)]
    infos = []
    bar = tqdm(total=len(paths), desc=split, unit="clip", disable=None)

    def blocks(pool):
        for w, info in pool.map(_decode_chunk, jobs):
            infos.extend(info)
            bar.update(len(w))
            yield w

    with ProcessPoolExecutor(max(1, workers)) as pool:
        try:
            offsets = write_clips(Work(work).wave(split), blocks(pool))
        except BaseException:  # a full disk, ^C: do not decode the rest first
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    bar.close()
    save_offsets(work, split, offsets)
    return pd.DataFrame(infos)


def drop_rows(work: Path, split: str, keep: np.ndarray) -> None:
    """Forget the clips where `keep` is false: rejected clips hold no samples, so only the
    offsets change."""
    off = np.load(Work(work).offsets(split))
    if (np.diff(off)[~keep] != 0).any():
        raise RuntimeError("only empty (rejected) clips can be dropped")
    save_offsets(work, split, np.concatenate([off[:-1][keep], off[-1:]]))


def training_clips(work, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """The first n training clips as training reads them: the clip length of WORK's prep.json,
    a random crop of a longer clip (dataset.Clips.random_starts), zero-padded if shorter;
    and the length in words for the header."""
    prep = Work(work).prep()
    length = Config(sr=prep["sr"], seconds=prep["seconds"]).clip_samples
    clips, rows = Clips.of(work, "train"), np.arange(n)
    torch.manual_seed(seed)
    waves = clips.read(rows, length, clips.random_starts(rows, length))
    said = f"{length} samples ({prep['seconds']:g} s at {prep['sr']} Hz, as training reads them)"
    return waves, said
