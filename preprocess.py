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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from arg import Config, config_from_args, make_parser
from util import write_json

log = logging.getLogger(__name__)

AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3"}
NOISE_DIR = "_background_noise_"


class DataLayoutError(Exception):
    """The data folder does not look like any accepted layout (exit code 2)."""


# ---------------------------------------------------------------------------------- decoding
def decode(path: str | os.PathLike, sr: int, length: int | None) -> tuple[np.ndarray, dict]:
    """Read any soundfile format, average to mono, resample to `sr` (as librosa.load does),
    pad with zeros / crop to `length` samples (None: keep all) and return int16 + info.
    Raises ValueError with a short reason for files that cannot be used."""
    import librosa
    import soundfile as sf

    try:
        y, orig_sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise ValueError(f"not readable audio ({str(e).strip().splitlines()[0][:120]})") from None
    channels, frames = y.shape[1], y.shape[0]
    if frames == 0:
        raise ValueError("empty (0 samples)")
    y = librosa.to_mono(y.T) if channels > 1 else y[:, 0]
    if not np.isfinite(y).all():
        raise ValueError("contains NaN or infinite samples")
    if orig_sr != sr:
        y = librosa.resample(y, orig_sr=orig_sr, target_sr=sr, res_type="soxr_hq")
    if length is not None:
        y = y[:length] if len(y) >= length else np.pad(y, (0, length - len(y)))
    wave = np.clip(np.round(y * 32768.0), -32768, 32767).astype(np.int16)
    return wave, dict(orig_sr=orig_sr, orig_channels=channels, orig_seconds=frames / orig_sr)


def _decode_chunk(job):
    paths, sr, length = job
    waves = np.zeros((len(paths), length), np.int16)
    infos = []
    for i, path in enumerate(paths):
        try:
            waves[i], info = decode(path, sr, length)
            infos.append(dict(info, status="ok"))
        except ValueError as e:
            infos.append(dict(orig_sr=0, orig_channels=0, orig_seconds=0.0, status=str(e)))
    return waves, infos


def decode_all(paths: list[str], out: Path, sr: int, length: int, workers: int,
               desc: str) -> pd.DataFrame:
    """Decode `paths` in parallel into an int16 [N, length] .npy at `out`; returns per-clip info
    (status 'ok' or the reason it was rejected, in which case its row is zeros)."""
    waves = np.lib.format.open_memmap(out, mode="w+", dtype=np.int16, shape=(len(paths), length))
    chunk = 64
    jobs = [(paths[i:i + chunk], sr, length) for i in range(0, len(paths), chunk)]
    infos = []
    bar = tqdm(total=len(paths), desc=desc, unit="clip", disable=None)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        for i, (w, info) in enumerate(pool.map(_decode_chunk, jobs)):
            waves[i * chunk:i * chunk + len(w)] = w
            infos += info
            bar.update(len(w))
    bar.close()
    waves.flush()
    del waves
    return pd.DataFrame(infos)


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
    for k, (_, idx) in enumerate(splitter.split(train, train.label, train.group)):
        fold[idx] = k
    return fold


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
    length = int(round(cfg.sr * cfg.seconds))

    info = decode_all(list(train.path), work / "train_wave.npy", cfg.sr, length, workers, "train")
    train = pd.concat([train.reset_index(drop=True), info], axis=1)
    rejected = [train.loc[train.status != "ok", ["path", "status"]]]
    ok = train.status == "ok"
    if not ok.all():  # keep only usable rows: rewrite the cache without the rejected ones
        waves = np.load(work / "train_wave.npy", mmap_mode="r")[ok.to_numpy()]
        np.save(work / "train_wave.npy", waves)
        train = train[ok].reset_index(drop=True)
    classes = sorted(train.label.unique())
    if not classes:
        raise DataLayoutError(f"{cfg.data}: every training clip was rejected (see rejected.csv)")
    if "group" not in train or (train.group.astype(str) == "").any():
        train["group"] = [speaker_of(p) for p in train.path]
    if "fold" not in train:
        train["fold"] = assign_folds(train, cfg.folds, cfg.seed)
    train["y"] = train.label.map({c: i for i, c in enumerate(classes)})
    train.insert(0, "row", np.arange(len(train)))
    train.drop(columns="status").to_csv(work / "train.csv", index=False)
    write_json(classes, work / "classes.json")

    if len(test):
        info = decode_all(list(test.path), work / "test_wave.npy", cfg.sr, length, workers, "test")
        test = pd.concat([test.reset_index(drop=True), info], axis=1)
        rejected.append(test.loc[test.status != "ok", ["path", "status"]])
    else:
        np.save(work / "test_wave.npy", np.zeros((0, length), np.int16))
        test = test.assign(status=pd.Series(dtype=str))
    test.insert(0, "row", np.arange(len(test)))
    test.to_csv(work / "test.csv", index=False)

    noise_waves = []
    for p in noise:
        try:
            noise_waves.append(decode(p, cfg.sr, None)[0])
        except ValueError as e:
            rejected.append(pd.DataFrame({"path": [p], "status": [str(e)]}))
    if noise_waves:
        np.save(work / "noise.npy", np.concatenate(noise_waves))
    elif (work / "noise.npy").exists():
        (work / "noise.npy").unlink()

    rejected = pd.concat(rejected).rename(columns={"status": "reason"})
    rejected.to_csv(work / "rejected.csv", index=False)
    if len(rejected):
        reasons = rejected.reason.str.split(" ").str[0].value_counts()
        print(f"preprocess: {len(rejected)} of {len(all_paths)} files rejected "
              f"({', '.join(f'{n} {r}' for r, n in reasons.items())}) - listed in "
              f"{work / 'rejected.csv'}", file=sys.stderr)
    summary = dict(fingerprint=fp, layout=layout, classes=len(classes), train=len(train),
                   test=len(test), noise_seconds=sum(map(len, noise_waves)) / cfg.sr,
                   rejected=len(rejected), sr=cfg.sr, seconds=cfg.seconds, folds=cfg.folds)
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
    except DataLayoutError as e:
        print(f"preprocess: {e}", file=sys.stderr)
        return 2
    log.info("%s (%s layout): %d classes, %d train clips in %d folds, %d test clips, "
             "%.0f s of background noise, %d rejected", cfg.work, s["layout"], s["classes"],
             s["train"], s["folds"], s["test"], s["noise_seconds"], s["rejected"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
