"""The real-voice benchmark: manifests that train on synthetic speech and test on real
recordings of the Free Spoken Digit Dataset (FSDD), and the table of what the runs scored.

    python real.py data --fsdd ../shared/data/fsdd/recordings --synth data/real/synth --out data/real
    python real.py table --work work/real --runs RUN [RUN ...]       # markdown rows

`data` writes three manifests (preprocess.py --manifest) and their solutions under OUT:

  synth.csv  the synthetic clips of SYNTH/train/<word>/ (demo.py's layout; every word, the
             ten digit words and the rest as distractors) train in 5 folds grouped by
             speaker; all 3,000 FSDD clips are the test set (synth_solution.csv: file_name,
             label, speaker)
  few.csv    the same, plus every clip of one real speaker (--real-speaker) in the training
             set of every fold (fold -1: never validated); the other five speakers are tested
  real.csv   FSDD alone, one fold per speaker (leave one speaker out): the supervised
             ceiling on real voices, read from the CV
  openset.csv       words outside the vocabulary: the synthetic clips of five digits
             (--known) keep their label, every other word and digit is _unknown_; the test is
             all 3,000 FSDD clips, the other five digits _unknown_ in openset_solution.csv (the
             model must reject them)
  openset_real.csv  the same labels on FSDD alone, one fold per speaker
  openset_other.wav the FSDD clips of the other five digits, one after another with 0.2-0.8 s
             of silence between them (about 24 minutes, 8 kHz; openset_other.csv: each clip's
             start and end): speech without the words, for inference.py --other-speech (the
             words the rule lets in per hour)

FSDD names its files {digit}_{speaker}_{index}.wav (8 kHz); the label is the digit's word
(0 zero ... 9 nine), the vocabulary of demo.py's words. preprocess.py resamples the clips to
16 kHz as it does every clip. The FSDD is CC BY-SA 4.0 (NOTICE): read in place, never copied.
`table` reads each run's test_score.json (inference.py --solution ...): digit accuracy (the
most probable of the ten digit words), top-1 over every class, each speaker's digit accuracy
and the worst, the CV, epochs and minutes of training.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from arg import Parser
from layouts import DIGITS, FSDD_SR, NOISE_DIR, UNKNOWN, fsdd_rows
from runs import HISTORY, OOF, OOF_TTA, REJECT, RESULT, Run, Work
from util import UsageError, read_table, run_cli, write_csv

ENGINES = ("all", "espeak", "kokoro")


def synth_rows(synth: Path, engine: str = "all") -> pd.DataFrame:
    """path, label, group of demo.py's training clips (SYNTH/train/<word>/<speaker>_nohash_*),
    those of one engine's speakers when `engine` is espeak or kokoro (SYNTH/meta.csv)."""
    files = sorted((synth / "train").glob("*/*.wav"))
    if not files:
        raise UsageError(f"--synth {synth}: no clips in {synth}/train/<word>/ (make them with "
                         f"python demo.py --out {synth})")
    rows = pd.DataFrame({"path": [str(f.resolve()) for f in files],
                         "label": [f.parent.name for f in files],
                         "group": [f.stem.split("_nohash_")[0] for f in files]})
    if engine == "all":
        return rows
    meta = pd.read_csv(synth / "meta.csv", keep_default_na=False)
    kokoro = set(meta.path[meta.voice.str.startswith("kokoro:")].map(lambda p: str(
        (synth / p).resolve())))
    rows = rows[rows.path.isin(kokoro) == (engine == "kokoro")]
    if rows.empty:
        raise UsageError(f"--voices {engine}: {synth} has no training clips of {engine} speakers")
    return rows.reset_index(drop=True)


def write_benchmark(fsdd: Path, synth: Path, out: Path, real_speaker: str,
                    engine: str = "all", known: tuple = DIGITS[:5]) -> dict:
    """OUT/{synth,few,real,openset,openset_real}.csv and their *_solution.csv; returns the row
    counts."""
    real, syn = fsdd_rows(fsdd), synth_rows(synth, engine)
    odd = sorted(set(known) - set(DIGITS))
    if odd or not 0 < len(known) < len(DIGITS):
        raise UsageError(f"--known {','.join(known)}: some of the ten digit words, not all "
                         f"(not {', '.join(odd) or 'all ten'})")
    speakers = sorted(real.speaker.unique())
    if real_speaker not in speakers:
        raise UsageError(f"--real-speaker {real_speaker}: not an FSDD speaker "
                         f"({', '.join(speakers)})")
    missing = sorted(set(DIGITS) - set(syn.label))
    if missing:
        raise UsageError(f"--synth {synth}: no clips of {', '.join(missing)}; the benchmark "
                         f"tests the ten digit words (demo.py --words)")
    out.mkdir(parents=True, exist_ok=True)
    test = real.assign(split="test", group="", fold="")
    syn = syn.assign(split="train", fold="")
    heard = real[real.speaker == real_speaker]
    few_train = heard.assign(split="train", group="fsdd_" + real_speaker, fold=-1)
    cols = ["path", "label", "group", "fold", "split"]
    tables = {
        "synth": (pd.concat([syn, test])[cols], real),
        "few": (pd.concat([syn, few_train, test[test.speaker != real_speaker]])[cols],
                real[real.speaker != real_speaker]),
        "real": (real.assign(group=real.speaker, fold=real.speaker.map(speakers.index),
                             split="train")[cols], None),
    }

    def open_labels(t):  # what is not a known digit is _unknown_
        return t.assign(label=t.label.where(t.label.isin(known), UNKNOWN))
    tables["openset"] = (open_labels(pd.concat([syn, test]))[cols], open_labels(real))
    tables["openset_real"] = (open_labels(tables["real"][0]), None)
    counts = {}
    for name, (manifest, solution) in tables.items():
        write_csv(manifest, out / f"{name}.csv")
        if solution is not None:
            write_csv(solution[["file_name", "label", "speaker"]], out / f"{name}_solution.csv")
        counts[name] = dict(train=int((manifest.split == "train").sum()),
                            test=int((manifest.split == "test").sum()))
    counts["openset_other"] = write_other_speech(real, known, out)
    noise = synth / NOISE_DIR  # the synthetic set's own background noise, beside the manifests
    link = out / NOISE_DIR
    if noise.is_dir() and not link.exists():
        link.symlink_to(noise.resolve(), target_is_directory=True)
    return counts


OTHER_GAP = (0.2, 0.8)  # seconds of silence between two clips of openset_other.wav


def write_other_speech(real: pd.DataFrame, known: tuple, out: Path, seed: int = 0) -> dict:
    """OUT/openset_other.wav: the FSDD clips of the digits outside `known` (every speaker) in
    a shuffled order, OTHER_GAP seconds of silence between two, at the FSDD's 8 kHz; and
    OUT/openset_other.csv: file_name, label, speaker, start, end (seconds) of each. Returns
    its clips and seconds."""
    import numpy as np
    import soundfile as sf

    from audio import read_audio

    rng = np.random.default_rng(seed)
    other = real[~real.label.isin(known)].sample(frac=1.0, random_state=seed)
    parts, rows, at = [], [], 0
    for r in other.itertuples():
        y = read_audio(r.path, FSDD_SR)
        gap = np.zeros(int(rng.uniform(*OTHER_GAP) * FSDD_SR), np.float32)
        rows.append(dict(file_name=r.file_name, label=r.label, speaker=r.speaker,
                         start=at / FSDD_SR, end=(at + len(y)) / FSDD_SR))
        parts += [y, gap]
        at += len(y) + len(gap)
    sf.write(out / "openset_other.wav", np.concatenate(parts), FSDD_SR, subtype="PCM_16")
    write_csv(pd.DataFrame(rows), out / "openset_other.csv")
    return dict(clips=len(rows), seconds=at / FSDD_SR)


def oof_by_group(work: Path, run: Run) -> dict:
    """{group: accuracy} of the run's out-of-fold predictions (with TTA where it has them):
    each held-out speaker of real.csv's leave-one-speaker-out folds."""
    train = read_table(Work(work).train_csv).set_index("row")
    right = {}
    for d in run.folds().values():
        oof = d / OOF_TTA if (d / OOF_TTA).is_file() else d / OOF
        if oof.is_file():
            t = read_table(oof)
            pred = t[Work(work).classes()].to_numpy().argmax(1)
            for g, ok in zip(train.loc[t.row, "group"], pred == t.label.map(
                    Work(work).classes().index).to_numpy()):
                right.setdefault(str(g), []).append(ok)
    return {g: float(sum(v) / len(v)) for g, v in right.items()}


def table_rows(work: Path, runs: list[str]) -> list[str]:
    """One markdown row per run: digit accuracy, top-1, worst speaker, each speaker (of the
    test set; of the out-of-fold predictions for a run without one), CV, epochs, folds and
    training minutes."""
    rows = []
    for name in runs:
        run = Run(work, name)
        score = json.loads(run.test_score.read_text()) if run.test_score.is_file() else {}
        results = [json.loads((d / RESULT).read_text()) for d in run.folds().values()
                   if (d / RESULT).is_file()]
        if not results:
            raise UsageError(f"run {name}: no finished fold in {run.dir}")
        by = score.get("by_within", score.get("by", {})).get("speaker") or oof_by_group(work, run)
        cv = json.loads(run.cv.read_text()).get("accuracy") if run.cv.is_file() else \
            sum(r["val_acc"] for r in results) / len(results)  # the folds trained so far
        hist = read_table(run.fold(results[0]["fold"]) / HISTORY)
        cells = [name, fmt(score.get("accuracy_within", score.get("accuracy"))),
                 fmt(score.get("accuracy")), fmt(min(by.values()) if by else None),
                 " ".join(f"{k[:3]} {v:.2f}" for k, v in sorted(by.items())),
                 fmt(cv), str(len(hist)), str(len(results)),
                 f"{sum(r.get('seconds', 0) for r in results) / 60:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def open_rows(work: Path, runs: list[str], target: float = 0.05) -> list[str]:
    """One markdown row per open-set run (openset*.csv): the test's words recognised and other
    words accepted (overall, worst speaker), the reject rule's target and what it gave on the
    OOF (reject.json, else fitted here on the OOF at `target`), epochs, folds, minutes."""
    from reject import fit_threshold
    from results import load_oof

    rows, classes = [], Work(work).classes()
    for name in runs:
        run = Run(work, name)
        results = [json.loads((d / RESULT).read_text()) for d in run.folds().values()
                   if (d / RESULT).is_file()]
        if not results:
            raise UsageError(f"run {name}: no finished fold in {run.dir}")
        folds = sorted(r["fold"] for r in results)
        rule_file = run.dir / REJECT
        if rule_file.is_file():
            rule = json.loads(rule_file.read_text())
        else:
            got = load_oof([run.dir], folds, "oof", classes)
            if got is None:
                raise UsageError(f"run {name}: a fold without its OOF")
            rule = fit_threshold(got[1], got[0].label.to_numpy(), classes, target)
        score = json.loads(run.test_score.read_text()) if run.test_score.is_file() else {}
        by = score.get("open_by", {}).get("speaker", {})
        worst = [min((v[k] for v in by.values() if v[k] is not None), default=None, key=key)
                 for k, key in (("recognised", None), ("accepted_unknown", lambda x: -x))]
        hist = read_table(run.fold(folds[0]) / HISTORY)
        hour = rule.get("other_speech", {}).get("per_hour")
        cells = [name, fmt(score.get("recognised")), fmt(worst[0]),
                 fmt(score.get("accepted_unknown")), fmt(worst[1]),
                 "" if hour is None else f"{hour:.1f}", fmt(rule["target"]),
                 fmt(rule["oof_false_accepts"]), fmt(rule["oof_detection"]),
                 fmt(rule["threshold"]), str(len(hist)), str(len(folds)),
                 f"{sum(r.get('seconds', 0) for r in results) / 60:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


OPEN_HEADER = ("| run | words recognised | worst speaker | others accepted | worst speaker | "
               "per hour | target | OOF accepted | OOF recognised | threshold | epochs | folds | "
               "train min |\n" + "| --- " * 13 + "|")


def fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


HEADER = ("| run | digits | top-1 | worst speaker | per speaker | CV (val) | epochs | folds | "
          "train min |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def steps(argv) -> int:
    p = Parser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="job", required=True)
    d = sub.add_parser("data", help="write the benchmark's manifests", allow_abbrev=False)
    d.add_argument("--fsdd", default="../shared/data/fsdd/recordings",
                   help="the FSDD's recordings folder")
    d.add_argument("--synth", required=True, help="demo.py's output folder (train/<word>/)")
    d.add_argument("--out", required=True, help="folder for the manifests and solutions")
    d.add_argument("--real-speaker", default="george",
                   help="the real speaker whose clips join training in few.csv")
    d.add_argument("--voices", default="all", choices=ENGINES,
                   help="the synthetic speakers to train on: all, or one engine's (meta.csv)")
    d.add_argument("--known", default=",".join(DIGITS[:5]),
                   help="openset*.csv: the digit words learnt; the others are _unknown_ "
                        "(default: zero..four)")
    t = sub.add_parser("table", help="markdown rows of the runs' scores", allow_abbrev=False)
    t.add_argument("--work", required=True, help="the WORK the runs are in")
    t.add_argument("--runs", nargs="+", required=True, help="run names")
    args = p.parse_args(argv)
    if args.job == "data":
        counts = write_benchmark(Path(args.fsdd), Path(args.synth), Path(args.out),
                                 args.real_speaker, args.voices,
                                 tuple(w.strip() for w in args.known.split(",") if w.strip()))
        for name, c in counts.items():
            print(f"{Path(args.out) / name}.wav: {c['clips']} clips one after another, "
                  f"{c['seconds'] / 60:.1f} min" if "seconds" in c else
                  f"{Path(args.out) / name}.csv: {c['train']} training clips, {c['test']} test")
        return 0
    if UNKNOWN in Work(args.work).classes():
        print(OPEN_HEADER)
        print("\n".join(open_rows(Path(args.work), args.runs)))
    else:
        print(HEADER)
        print("\n".join(table_rows(Path(args.work), args.runs)))
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "real", argv)


if __name__ == "__main__":
    sys.exit(main())
