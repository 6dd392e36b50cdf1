"""How preprocess.py builds WORK: the layouts it reads (contest, Speech Commands, manifest,
BirdCLEF: where the clips, their labels, the test set and the background noise are), speakers
as groups, folds (StratifiedGroupKFold, a manifest's own, -1: train only), what the data and
the sample submission disagree on, and `prepare`, which decodes everything once into the cache
(cache.py) and writes WORK's tables and prep.json (a fingerprint: a re-run reuses WORK).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

from arg import Config
from audio import AudioError, audio_files, read_audio
from cache import CACHE_FORMAT, decode, decode_all, drop_rows
from predictor import OPEN
from runs import TRAIN_ONLY, Work, validation_folds
from util import UsageError, atomic_write, secondary_names, write_csv, write_json

log = logging.getLogger(__name__)


NOISE_DIR = "_background_noise_"


class DataLayoutError(UsageError):
    """The data folder does not look like any accepted layout."""


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


def noise_files(cfg: Config, found: list[Path]) -> tuple[list[str], str]:
    """(the background-noise files, their folder or ''): --noise DIR when given, else the first
    of the layout's `found` folders that exists."""
    if cfg.noise:
        folder = Path(cfg.noise)
        if not folder.is_dir():
            raise DataLayoutError(f"--noise {folder}: no such folder (background-noise recordings)")
    else:
        folder = next((d for d in found if d.is_dir()), None)
    if folder is None:
        return [], ""
    return [str(p) for p in sorted(folder.iterdir()) if p.is_file()], str(folder)


def find_clips(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, tuple[list[str], str], str]:
    """Returns train (path,label[,group,fold]), test (file_name,path,label), the noise files and
    their folder (noise_files), layout."""
    data = Path(cfg.data)
    if cfg.manifest:
        man_path = Path(cfg.manifest)
        if not man_path.is_file():
            raise DataLayoutError(f"{man_path}: manifest not found")
        man = pd.read_csv(man_path, keep_default_na=False, dtype={
            "path": str, "label": str, "secondary": str, "group": str, "fold": str})
        if not {"path", "label"} <= set(man.columns):
            raise DataLayoutError(f"{man_path}: needs the columns path,label "
                                  f"(optional group, fold, split); it has {list(man.columns)}")
        man["path"] = [str(p if Path(p).is_absolute() else man_path.parent / p) for p in man.path]
        split = man.pop("split") if "split" in man else pd.Series("train", index=man.index)
        test = man[split == "test"].assign(file_name=lambda d: d.path.map(lambda p: Path(p).name))
        train = man[split != "test"].reset_index(drop=True)
        noise = noise_files(cfg, [man_path.parent / NOISE_DIR])
        return train, test[["file_name", "path", "label"]].reset_index(drop=True), noise, "manifest"

    if not data.is_dir():
        raise DataLayoutError(f"{data}: data folder not found (pass --data DIR or --manifest FILE)")
    if (data / "train_metadata.csv").is_file():
        train, test, layout = birdclef_clips(data)
        return train, test, noise_files(cfg, [data / NOISE_DIR]), layout
    noise = noise_files(cfg, [data / NOISE_DIR, data / "train" / NOISE_DIR])
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


def birdclef_clips(data: Path):
    """BirdCLEF: train_metadata.csv (primary_label, secondary_labels, filename under
    train_audio/, author or site: the group), test_soundscapes/ (scored per window) and
    sample_submission.csv (row_id, one column per class)."""
    path = data / "train_metadata.csv"
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"primary_label", "filename"} <= set(meta.columns):
        raise DataLayoutError(f"{path}: needs the columns primary_label and filename (optional "
                              f"secondary_labels, author); it has {list(meta.columns)}")
    group = next((meta[c] for c in ("author", "site", "recordist") if c in meta), "")
    train = pd.DataFrame({"path": [str(data / "train_audio" / f) for f in meta.filename],
                          "label": meta.primary_label, "group": group,
                          "secondary": [" ".join(secondary_names(v))
                                        for v in meta.get("secondary_labels", [""] * len(meta))]})
    soundscapes = data / "test_soundscapes"
    files = audio_files([soundscapes]) if soundscapes.is_dir() else []
    test = pd.DataFrame({"file_name": [f.name for f in files], "path": [str(f) for f in files],
                         "label": ""})
    return train, test, "birdclef"


def sample_classes(data: Path) -> list[str]:
    """The class columns of a BirdCLEF-style sample_submission.csv (row_id, classes...): a
    class no training recording has as its primary label is still predicted."""
    path = data / "sample_submission.csv"
    if not path.is_file():
        return []
    cols = list(pd.read_csv(path, nrows=0).columns)
    return cols[1:] if cols and cols[0] == "row_id" else []


def sample_gaps(train: pd.DataFrame, sample: list[str]) -> list[str]:
    """What the sample submission and the training labels disagree on, one line each: sample
    classes no recording has (trained as negatives only: no positives to learn), and labels
    that are not columns of the sample (predicted, but not in the submission)."""
    if not sample:
        return []
    heard = set(train.label) | {n for v in train.get("secondary", []) for n in secondary_names(v)}
    ghosts = [c for c in sample if c not in heard]
    extra = sorted(set(train.label) - set(sample))
    out = []
    if ghosts:
        out.append(f"{len(ghosts)} class(es) of sample_submission.csv have no training recording "
                   f"(trained as negatives only): {', '.join(ghosts)}")
    if extra:
        out.append(f"{len(extra)} training label(s) are not columns of sample_submission.csv "
                   f"(left out of the submission): {', '.join(extra)}")
    return out


def assign_folds(train: pd.DataFrame, folds: int, seed: int) -> np.ndarray:
    """StratifiedGroupKFold by label with speaker groups: no group is in two folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = train.group.nunique()
    if n_groups < folds:
        raise DataLayoutError(f"only {n_groups} speakers/groups for {folds} folds; "
                              f"lower --n-folds or add data")
    fold = np.full(len(train), -1)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class": fold_gaps says it per class
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        for k, (_, idx) in enumerate(splitter.split(train, train.label, train.group)):
            fold[idx] = k
    return fold


def groups_of(train: pd.DataFrame) -> list[str]:
    """Each row's group: its own where the table has one, else the file's speaker (speaker_of)."""
    given = train["group"].fillna("").astype(str) if "group" in train else \
        pd.Series("", index=train.index)
    return [g if g != "" else speaker_of(p) for g, p in zip(given, train.path)]


def folds_of(train: pd.DataFrame, n_folds: int, seed: int, source: str) -> np.ndarray:
    """Each row's fold: its own where the table has one (TRAIN_ONLY: trained in every fold,
    never validated), drawn by assign_folds for the others."""
    given = train["fold"].fillna("").astype(str).str.strip() if "fold" in train else \
        pd.Series("", index=train.index)
    bad = given[(given != "") & ~given.str.fullmatch(r"(\d+|-1)(\.0*)?")]  # 2 or 2.0
    if len(bad):
        raise DataLayoutError(f"{source}: fold {bad.iloc[0]!r} (row {bad.index[0] + 1} of the "
                              f"training rows): expected a fold number, -1 (train only) or empty")
    fold = np.full(len(train), TRAIN_ONLY)
    known = (given != "").to_numpy()
    fold[known] = given[known].astype(float).astype(int)
    if (~known).any():
        fold[~known] = assign_folds(train[~known], n_folds, seed)
    if not (fold != TRAIN_ONLY).any():
        raise DataLayoutError(f"{source}: every row has fold -1 (train only): no fold to "
                              f"validate on")
    return fold


def fold_gaps(train: pd.DataFrame) -> list[str]:
    """One line for each class that some fold has no validation clip of (a class with fewer
    clips, or speakers, than folds): its clips, the folds without it, and the folds that
    train without it. Such data still trains; its CV is measured on fewer folds."""
    folds = validation_folds(train)
    lines = []
    for label, g in train[train.fold != TRAIN_ONLY].groupby("label", sort=True):
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


def label_rows(train: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """train with y (the primary label's index) and secondary (its other labels that are
    classes, space-separated; '' for single-label data); secondary labels that name no class
    are said once and left out."""
    known = set(classes)
    second = train.get("secondary", pd.Series("", index=train.index)).astype(str)
    train = train.assign(y=train.label.map({c: i for i, c in enumerate(classes)}), secondary=[
        " ".join(n for n in secondary_names(v) if n in known and n != lab)
        for v, lab in zip(second, train.label)])
    unknown = sorted({n for v in second for n in secondary_names(v)} - known)
    if unknown:
        print(f"preprocess: {len(unknown)} secondary label(s) name no class and are left out: "
              f"{', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""), file=sys.stderr)
    return train


# ----------------------------------------------------------------------------- the FSDD
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def fsdd_rows(recordings: Path) -> pd.DataFrame:
    """path, label (the digit's word), speaker and file_name of every FSDD recording."""
    if not recordings.is_dir():
        raise UsageError(f"--fsdd {recordings}: no such folder (the FSDD's recordings/, "
                         f"{{digit}}_{{speaker}}_{{index}}.wav)")
    rows = []
    for f in sorted(recordings.glob("*.wav")):
        parts = f.stem.split("_")
        if len(parts) != 3 or not parts[0].isdigit() or not 0 <= int(parts[0]) <= 9:
            raise UsageError(f"{f}: not an FSDD name ({{digit}}_{{speaker}}_{{index}}.wav)")
        rows.append(dict(path=str(f.resolve()), label=DIGITS[int(parts[0])], speaker=parts[1],
                         file_name=f.name))
    if not rows:
        raise UsageError(f"--fsdd {recordings}: no .wav files")
    return pd.DataFrame(rows)


FSDD_SR = 8000  # the FSDD's recordings' rate (and the asterisk prompts')


# ----------------------------------------------------------------------------- WORK
UNKNOWN, SILENCE = OPEN  # the classes of what is not a word to say



def open_set(cfg: Config, train: pd.DataFrame, test: pd.DataFrame):
    """--unknown, a comma-separated list of labels and folders: the labels become _unknown_ in
    train and test (each row's word kept in `word`); the audio of each folder (its subfolders
    too: near misses, mined windows, long recordings of other speech) joins training as
    _unknown_ rows, each file its own group. Refused: a name that is neither a label of the
    data nor a folder, a folder without audio, and labels that would leave no other class."""
    if not cfg.unknown:
        return train, test
    names = [w.strip() for w in cfg.unknown.split(",") if w.strip()]
    folders = [n for n in names if Path(n).is_dir()]
    words = [n for n in names if n not in folders]
    missing = sorted(set(words) - set(train.label))
    if missing:
        raise DataLayoutError(f"--unknown: no training clips labelled {', '.join(missing)} (and "
                              f"no folder {missing[0]}): name labels of the data, or folders")
    if words and set(train.label) <= set(words):
        raise DataLayoutError(f"--unknown {cfg.unknown}: every label would be unknown")
    relabel = {w: UNKNOWN for w in words}
    train = train.assign(word=train.label, label=train.label.replace(relabel)) if words else train
    test = test.assign(label=test.label.replace(relabel)) if words else test
    for folder in folders:
        files = audio_files([folder])
        if not files:
            raise DataLayoutError(f"--unknown {folder}: a folder without audio files")
        extra = pd.DataFrame({"path": [str(f) for f in files], "label": UNKNOWN,
                              "group": [f"unknown/{f.parent.name}/{f.stem}" for f in files]})
        train = pd.concat([train, extra], ignore_index=True)
    return train, test


def check_silence(cfg: Config, noise: list[str], clips: int) -> None:
    """--silence refused before WORK is touched: a negative count, no noise to cut, more clips
    than the data's `clips` (the model would hear mostly silence), or more than the disk under
    WORK holds (each clip is written as a WAV and again into the cache)."""
    if cfg.silence < 0:
        raise DataLayoutError(f"--silence {cfg.silence}: expected a number of clips, 0 or more")
    if cfg.silence and not noise:
        raise DataLayoutError(f"--silence {cfg.silence}: no background noise to cut it from "
                              f"(give --noise DIR, or a _background_noise_ folder)")
    if cfg.silence > clips:
        raise DataLayoutError(f"--silence {cfg.silence}: at most {clips}, as many as the data's "
                              f"training clips (more would make silence most of what the model "
                              f"hears; Speech Commands has one silence clip in about 12)")
    need = cfg.silence * (2 * cfg.clip_samples + 44) * 2
    where = Path(cfg.work).absolute()
    free = shutil.disk_usage(next(p for p in (where, *where.parents) if p.exists())).free
    if need > free:
        raise DataLayoutError(f"--silence {cfg.silence}: needs {need / 1e9:.1f} GB under "
                              f"{cfg.work}, the disk has {free / 1e9:.1f} GB free")


def silence_rows(cfg: Config, noise: list[str], work: Path) -> pd.DataFrame:
    """--silence N: N clips of --seconds cut at random from the background noise, each at a
    random gain (seeded), written to WORK/silence/ and learnt as _silence_ (each its own
    group)."""
    rng, n = np.random.default_rng(cfg.seed), cfg.clip_samples
    bank = np.concatenate([read_audio(p, cfg.sr) for p in noise])
    bank = np.tile(bank, n // max(1, len(bank)) + 2)
    folder = work / "silence"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(cfg.silence), desc="silence clips", unit="clip", disable=None):
        start = int(rng.integers(0, len(bank) - n))
        clip = bank[start:start + n] * 10 ** (rng.uniform(-30, 0) / 20)
        path = folder / f"silence_{i:05d}.wav"
        atomic_write(path, lambda tmp: sf.write(tmp, np.clip(clip, -1, 1), cfg.sr,
                                                format="WAV", subtype="PCM_16"))
        paths.append(str(path))
    return pd.DataFrame({"path": paths, "label": SILENCE, "group": [Path(p).stem for p in paths]})


def fingerprint(cfg: Config, paths: list[str], layout: str, data: str) -> str:
    h = hashlib.sha1(json.dumps([CACHE_FORMAT, layout, cfg.sr, cfg.seconds, cfg.max_seconds,
                                 cfg.n_folds, cfg.seed, cfg.manifest, data, cfg.unknown,
                                 cfg.silence]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def write_noise(paths: list[str], work: Path, sr: int, rejected: list) -> float:
    """WORK/noise.npy: the background-noise files end to end (unreadable ones go to
    `rejected`); returns its seconds."""
    waves = []
    for p in paths:
        try:
            waves.append(decode(p, sr, None)[0])
        except AudioError as e:
            rejected.append(pd.DataFrame({"path": [p], "status": [str(e)]}))
    if waves:
        noise_all = np.concatenate(waves)
        atomic_write(Work(work).noise, lambda tmp: np.save(tmp, noise_all))
    else:
        Work(work).noise.unlink(missing_ok=True)
    return sum(map(len, waves)) / sr


def prepare(cfg: Config, force: bool = False, workers: int | None = None) -> dict:
    """Build (or reuse) WORK from the data; returns a summary dict."""
    work, files = Path(cfg.work), Work(cfg.work)
    train, test, (noise, noise_dir), layout = find_clips(cfg)
    train, test = open_set(cfg, train, test)
    check_silence(cfg, noise, len(train))
    data = "" if cfg.manifest else cfg.data  # a manifest's rows name their own files
    all_paths = list(train.path) + list(test.path) + noise
    fp = fingerprint(cfg, all_paths, layout, data)
    prep_file = files.prep_json
    if not force and prep_file.is_file():
        old = json.loads(prep_file.read_text())
        if old.get("fingerprint") == fp and all((work / f).exists() for f in Work.OUTPUTS):
            log.info("%s is up to date with %s (%d clips): reusing it (--force rebuilds)",
                     work, cfg.manifest or cfg.data, len(all_paths))
            return dict(old, reused=True)
    work.mkdir(parents=True, exist_ok=True)
    # the fingerprint goes first and comes back last: an interrupted build is never reused
    prep_file.unlink(missing_ok=True)
    workers = workers or os.cpu_count() or 1
    most = int(round(cfg.max_seconds * cfg.sr)) if cfg.max_seconds > 0 else None
    if cfg.silence:
        train = pd.concat([train, silence_rows(cfg, noise, work)], ignore_index=True)
    info = decode_all(list(train.path), work, "train", cfg.sr, most, workers)
    train = pd.concat([train.reset_index(drop=True), info], axis=1)
    rejected = [train.loc[train.status != "ok", ["path", "status"]]]
    ok = train.status == "ok"
    if not ok.all():  # keep only usable rows
        drop_rows(work, "train", ok.to_numpy())
        train = train[ok].reset_index(drop=True)
    if not len(train):
        raise DataLayoutError(f"{cfg.manifest or cfg.data}: every training clip was rejected "
                              f"(see rejected.csv)")
    sample = sample_classes(Path(data)) if data else []
    classes = sorted(set(train.label) | set(sample))
    for line in sample_gaps(train, sample):
        print(f"preprocess: {line}", file=sys.stderr)
    train["group"] = groups_of(train)
    train["fold"] = folds_of(train, cfg.n_folds, cfg.seed, cfg.manifest)
    gaps = fold_gaps(train)
    for line in gaps:
        print(f"preprocess: {line}", file=sys.stderr)
    train = label_rows(train, classes)
    multilabel = layout == "birdclef" or bool((train.secondary != "").any())
    train.insert(0, "row", np.arange(len(train)))
    write_csv(train.drop(columns=["status", "samples"]), files.train_csv)
    write_json(classes, files.classes_json)

    info = decode_all(list(test.path), work, "test", cfg.sr, None, workers)
    test = pd.concat([test.reset_index(drop=True), info], axis=1)
    if "status" not in test:  # no test clips
        test = test.assign(status=pd.Series(dtype=str), samples=pd.Series(dtype=int))
    rejected.append(test.loc[test.status != "ok", ["path", "status"]])
    test.insert(0, "row", np.arange(len(test)))
    write_csv(test.drop(columns="samples"), files.test_csv)

    noise_seconds = write_noise(noise, work, cfg.sr, rejected)

    rejected = pd.concat(rejected).rename(columns={"status": "reason"})
    write_csv(rejected, files.rejected)
    if len(rejected):
        reasons = rejected.reason.str.split(" (", regex=False).str[0].value_counts()
        print(f"preprocess: {len(rejected)} of {len(all_paths)} files rejected "
              f"({', '.join(f'{n} {r}' for r, n in reasons.items())}) - listed in "
              f"{files.rejected}", file=sys.stderr)
    summary = dict(fingerprint=fp, layout=layout, classes=len(classes), train=len(train),
                   test=len(test), noise_seconds=noise_seconds,
                   rejected=len(rejected), sr=cfg.sr, seconds=cfg.seconds,
                   n_folds=len(validation_folds(train)), noise=noise_dir,
                   max_seconds=cfg.max_seconds, multilabel=multilabel,
                   rows="window" if layout == "birdclef" else "file",
                   train_seconds=round(int(train.samples.sum()) / cfg.sr, 1),
                   format=CACHE_FORMAT, data=data, manifest=cfg.manifest, fold_gaps=gaps,
                   unknown=cfg.unknown, silence=cfg.silence)  # the open set: in every record
    write_json(summary, prep_file)
    return dict(summary, reused=False)
