"""Find the clips, decode each once, validate, split into folds and cache the waveforms.

    python preprocess.py --data DIR --work WORK [--folds 5] [--seed 2020] [--sr 16000] [--seconds 1.0]
    python preprocess.py --manifest clips.csv --work WORK          # path,label[,group,fold,split]

Accepted layouts:
  contest          DIR/train/<label>/*.wav, DIR/test/*.wav, DIR/submission.csv (file_name,label)
  speech commands  DIR/<label>/*.wav, DIR/testing_list.txt (becomes the test set, labels kept)
  manifest         a CSV of path,label with optional group, fold and split (train/test) columns
Background noise comes from a `_background_noise_/` folder in DIR or DIR/train.

Writes WORK/classes.json, train.csv, train_wave.npy, test.csv, test_wave.npy, noise.npy,
rejected.csv and prep.json (the fingerprint that lets a re-run reuse WORK).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from arg import Config, config_from_args, make_parser
from predict import AudioError, fit, read_audio
from util import UsageError, atomic_write, write_csv, write_json

log = logging.getLogger(__name__)

NOISE_DIR = "_background_noise_"


class DataLayoutError(UsageError):
    """The data folder does not look like any accepted layout."""


# ---------------------------------------------------------------------------------- decoding
def decode(path: str | os.PathLike, sr: int, length: int | None) -> tuple[np.ndarray, dict]:
    """int16 waveform of any soundfile format at `sr`, mono, padded with zeros or cut to
    `length` samples (None: all), and the file's info; predict.read_audio reads it (the
    torch-free predictor reads clips the same way). AudioError (a ValueError) with a short
    reason for files that cannot be used."""
    info = {}
    y = read_audio(path, sr, info)
    if length is not None:
        y = fit(y, length)
    return np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16), info


def _decode_chunk(job):
    paths, sr, length = job
    waves = np.zeros((len(paths), length), np.int16)
    infos = []
    for i, path in enumerate(paths):
        try:
            waves[i], info = decode(path, sr, length)
            infos.append(dict(info, status="ok"))
        except AudioError as e:
            infos.append(dict(orig_sr=0, orig_channels=0, orig_seconds=0.0, status=str(e)))
    return waves, infos


def write_rows(path: Path, n: int, length: int, blocks) -> None:
    """An int16 [n, length] .npy at `path` from `blocks` (arrays of rows, in order), written
    through the file one block at a time and moved into place: the process holds one block,
    not the cache, and a full disk is one line (DiskFullError), not a crash."""
    def write(tmp):
        done = 0
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<i2", "fortran_order": False, "shape": (n, length)})
            for block in blocks:
                f.write(np.ascontiguousarray(block, dtype="<i2").tobytes())
                done += len(block)
        if done != n:
            raise RuntimeError(f"{path}: {done} rows written, {n} expected")
    atomic_write(path, write)


def decode_all(paths: list[str], out: Path, sr: int, length: int, workers: int,
               desc: str) -> pd.DataFrame:
    """Decode `paths` in parallel into an int16 [N, length] .npy at `out`; returns per-clip info
    (status 'ok' or the reason it was rejected, in which case its row is zeros)."""
    chunk = 64
    jobs = [(paths[i:i + chunk], sr, length) for i in range(0, len(paths), chunk)]
    infos = []
    bar = tqdm(total=len(paths), desc=desc, unit="clip", disable=None)

    def blocks(pool):
        for w, info in pool.map(_decode_chunk, jobs):
            infos.extend(info)
            bar.update(len(w))
            yield w

    with ProcessPoolExecutor(max(1, workers)) as pool:
        try:
            write_rows(out, len(paths), length, blocks(pool))
        except BaseException:  # a full disk, ^C: do not decode the rest first
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    bar.close()
    return pd.DataFrame(infos)


def keep_rows(path: Path, keep: np.ndarray, chunk: int = 4096) -> None:
    """Rewrite the cache at `path` with only the rows where `keep` is true, block by block."""
    waves = np.load(path, mmap_mode="r")
    write_rows(path, int(keep.sum()), waves.shape[1],
               (waves[i:i + chunk][keep[i:i + chunk]] for i in range(0, len(waves), chunk)))


# ---------------------------------------------------------------------------------- layouts
def speaker_of(path: str) -> str:
    """Speech Commands speaker id: the part of the name before `_nohash_`, else the stem."""
    stem = Path(path).stem
    return stem.split("_nohash_")[0] if "_nohash_" in stem else stem


def _class_files(folder: Path) -> list[tuple[str, str]]:
    """(path, label) for every visible file in the class folders below `folder`."""
    rows = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        if cls.name.startswith((".", "_")):
            continue
        rows += [(str(f), cls.name) for f in sorted(cls.rglob("*"))
                 if f.is_file() and not f.name.startswith(".")]
    return rows


def find_clips(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, list[str], str]:
    """Returns train (path,label[,group,fold]), test (file_name,path,label), noise paths, layout."""
    data = Path(cfg.data)
    if cfg.manifest:
        man_path = Path(cfg.manifest)
        if not man_path.is_file():
            raise DataLayoutError(f"{man_path}: manifest not found")
        man = pd.read_csv(man_path, dtype={"path": str, "label": str}, keep_default_na=False)
        if not {"path", "label"} <= set(man.columns):
            raise DataLayoutError(f"{man_path}: needs the columns path,label "
                                  f"(optional group, fold, split); it has {list(man.columns)}")
        man["path"] = [str(p if Path(p).is_absolute() else man_path.parent / p) for p in man.path]
        split = man.pop("split") if "split" in man else pd.Series("train", index=man.index)
        test = man[split == "test"].assign(file_name=lambda d: d.path.map(lambda p: Path(p).name))
        train = man[split != "test"].reset_index(drop=True)
        noise = [str(p) for p in sorted((data / NOISE_DIR).glob("*")) if p.is_file()]
        return train, test[["file_name", "path", "label"]].reset_index(drop=True), noise, "manifest"

    if not data.is_dir():
        raise DataLayoutError(f"{data}: data folder not found (pass --data DIR or --manifest FILE)")
    noise_dirs = [data / NOISE_DIR, data / "train" / NOISE_DIR]
    noise = [str(p) for d in noise_dirs if d.is_dir() for p in sorted(d.iterdir()) if p.is_file()]
    if (data / "train").is_dir():
        layout = "contest"
        train = pd.DataFrame(_class_files(data / "train"), columns=["path", "label"])
        sub_path = data / "submission.csv"
        if sub_path.is_file():
            sub = pd.read_csv(sub_path, dtype=str, keep_default_na=False)
            if "file_name" not in sub:
                raise DataLayoutError(f"{sub_path}: needs a file_name column")
            names = list(sub.file_name)
        else:
            names = sorted(p.name for p in (data / "test").glob("*") if p.is_file())
        test = pd.DataFrame({"file_name": names,
                             "path": [str(data / "test" / n) for n in names], "label": ""})
    else:
        layout = "speech_commands"
        rows = _class_files(data)
        listed = data / "testing_list.txt"
        test_names = listed.read_text().split() if listed.is_file() else []
        in_test = set(test_names)
        train = pd.DataFrame([r for r in rows if os.path.relpath(r[0], data) not in in_test],
                             columns=["path", "label"])
        test = pd.DataFrame({"file_name": test_names,
                             "path": [str(data / n) for n in test_names],
                             "label": [n.split("/")[0] for n in test_names]})
    if train.empty:
        raise DataLayoutError(
            f"{data}: no labelled clips found. Expected {data}/train/<label>/*.wav (contest), "
            f"{data}/<label>/*.wav with testing_list.txt (Speech Commands), or --manifest FILE.csv")
    return train, test, noise, layout


def assign_folds(train: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """StratifiedGroupKFold by label with speaker groups: no group is in two folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = train.group.nunique()
    if n_groups < folds:
        raise DataLayoutError(f"only {n_groups} speakers/groups for {folds} folds; "
                              f"lower --folds or add data")
    fold = np.full(len(train), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class": fold_gaps says it per class
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        for k, (_, idx) in enumerate(splitter.split(train, train.label, train.group)):
            fold[idx] = k
    return fold


def fold_gaps(train: pd.DataFrame) -> list[str]:
    """One line for each class that some fold has no validation clip of (a class with fewer
    clips, or speakers, than folds): its clips, the folds without it, and the folds that
    train without it. Such data still trains; its CV is measured on fewer folds."""
    folds = sorted(train.fold.unique())
    lines = []
    for label, g in train.groupby("label", sort=True):
        held = set(g.fold)
        missing = [k for k in folds if k not in held]
        if not missing:
            continue
        line = (f"class {label!r}: {len(g)} clip(s) from {g.group.nunique()} speaker(s) for "
                f"{len(folds)} folds; folds {', '.join(map(str, missing))} have no validation "
                f"clip of it")
        if len(held) == 1:
            line += f", and fold {held.pop()} trains without it"
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------- pipeline
def fingerprint(cfg: Config, paths: list[str], layout: str) -> str:
    h = hashlib.sha1(json.dumps([layout, cfg.sr, cfg.seconds, cfg.folds, cfg.seed,
                                 cfg.manifest]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def prepare(cfg: Config, force: bool = False, workers: int | None = None) -> dict:
    """Build (or reuse) WORK from the data; returns a summary dict."""
    work = Path(cfg.work)
    train, test, noise, layout = find_clips(cfg)
    all_paths = list(train.path) + list(test.path) + noise
    fp = fingerprint(cfg, all_paths, layout)
    prep_file = work / "prep.json"
    if not force and prep_file.is_file():
        old = json.loads(prep_file.read_text())
        outputs = ["classes.json", "train.csv", "train_wave.npy", "test.csv", "rejected.csv"]
        if old.get("fingerprint") == fp and all((work / f).exists() for f in outputs):
            log.info("%s is up to date with %s (%d clips): reusing it (--force rebuilds)",
                     work, cfg.manifest or cfg.data, len(all_paths))
            return dict(old, reused=True)
    work.mkdir(parents=True, exist_ok=True)
    # the fingerprint goes first and comes back last: an interrupted build is never reused
    prep_file.unlink(missing_ok=True)
    workers = workers or os.cpu_count() or 1
    length = cfg.clip_samples

    info = decode_all(list(train.path), work / "train_wave.npy", cfg.sr, length, workers, "train")
    train = pd.concat([train.reset_index(drop=True), info], axis=1)
    rejected = [train.loc[train.status != "ok", ["path", "status"]]]
    ok = train.status == "ok"
    if not ok.all():  # keep only usable rows: rewrite the cache without the rejected ones
        keep_rows(work / "train_wave.npy", ok.to_numpy())
        train = train[ok].reset_index(drop=True)
    classes = sorted(train.label.unique())
    if not classes:
        raise DataLayoutError(f"{cfg.data}: every training clip was rejected (see rejected.csv)")
    if "group" not in train or (train.group.astype(str) == "").any():
        train["group"] = [speaker_of(p) for p in train.path]
    if "fold" not in train:
        train["fold"] = assign_folds(train, cfg.folds, cfg.seed)
    gaps = fold_gaps(train)
    for line in gaps:
        print(f"preprocess: {line}", file=sys.stderr)
    train["y"] = train.label.map({c: i for i, c in enumerate(classes)})
    train.insert(0, "row", np.arange(len(train)))
    write_csv(train.drop(columns="status"), work / "train.csv")
    write_json(classes, work / "classes.json")

    if len(test):
        info = decode_all(list(test.path), work / "test_wave.npy", cfg.sr, length, workers, "test")
        test = pd.concat([test.reset_index(drop=True), info], axis=1)
        rejected.append(test.loc[test.status != "ok", ["path", "status"]])
    else:
        write_rows(work / "test_wave.npy", 0, length, [])
        test = test.assign(status=pd.Series(dtype=str))
    test.insert(0, "row", np.arange(len(test)))
    write_csv(test, work / "test.csv")

    noise_waves = []
    for p in noise:
        try:
            noise_waves.append(decode(p, cfg.sr, None)[0])
        except AudioError as e:
            rejected.append(pd.DataFrame({"path": [p], "status": [str(e)]}))
    if noise_waves:
        noise_all = np.concatenate(noise_waves)
        atomic_write(work / "noise.npy", lambda tmp: np.save(tmp, noise_all))
    elif (work / "noise.npy").exists():
        (work / "noise.npy").unlink()

    rejected = pd.concat(rejected).rename(columns={"status": "reason"})
    write_csv(rejected, work / "rejected.csv")
    if len(rejected):
        reasons = rejected.reason.str.split(" ").str[0].value_counts()
        print(f"preprocess: {len(rejected)} of {len(all_paths)} files rejected "
              f"({', '.join(f'{n} {r}' for r, n in reasons.items())}) - listed in "
              f"{work / 'rejected.csv'}", file=sys.stderr)
    summary = dict(fingerprint=fp, layout=layout, classes=len(classes), train=len(train),
                   test=len(test), noise_seconds=sum(map(len, noise_waves)) / cfg.sr,
                   rejected=len(rejected), sr=cfg.sr, seconds=cfg.seconds, folds=cfg.folds,
                   data=cfg.data, manifest=cfg.manifest, fold_gaps=gaps)
    write_json(summary, prep_file)
    return dict(summary, reused=False)


def main(argv=None) -> int:
    p = make_parser(__doc__.split("\n")[0], groups=("data",))
    p.add_argument("--force", action="store_true", help="rebuild WORK even if it is up to date")
    p.add_argument("--jobs", type=int, default=None, help="decoding processes (default: cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(args)
    try:
        s = prepare(cfg, force=args.force, workers=args.jobs)
    except UsageError as e:
        print(f"preprocess: {e}", file=sys.stderr)
        return 2
    log.info("%s (%s layout): %d classes, %d train clips in %d folds, %d test clips, "
             "%.0f s of background noise, %d rejected", cfg.work, s["layout"], s["classes"],
             s["train"], s["folds"], s["test"], s["noise_seconds"], s["rejected"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
