"""Fold x model x TTA ensemble -> submission.csv + test_probs.csv, and the CV report.

    python inference.py -t 224 -m res2next50 -f 5 -a y            # 5 folds, soft, 4 TTA views
    python inference.py --runs res2next50_224 resnet18_64 --weights 2 1 -f 5 -a y
    python inference.py -t 64 -m resnet18 -f 5 --ensemble hard --solution data/demo/solution.csv
    python inference.py -t 64 -m resnet18 -f 5 --predict some.wav some/folder

-f N means folds 0..N-1 (so -f 1 is fold 0 alone); -f 0,2 is a list of fold indices.
Outputs go to WORK/runs/<run>/ (WORK/runs/blend_<a>+<b>/ for several runs, or --out):
submission.csv, test_probs.csv, test_score.json (with true labels), cv.json, report.txt,
confusion.png.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from util import probs_frame, scores, setup_logging, write_csv, write_json

log = logging.getLogger(__name__)


class InferenceError(Exception):
    """Nothing useful can be written (exit code 2)."""


# ----------------------------------------------------------------------------- ensembling
def ensemble(probs: np.ndarray, how: str = "soft", weights=None) -> tuple[np.ndarray, np.ndarray]:
    """probs (M, N, C) of M members -> (labels (N,), scores (N, C)).
    soft: weighted mean of the probabilities. hard: weighted majority vote of the members'
    argmax; ties go to the tied class with the highest mean probability."""
    m = probs.shape[0]
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean = np.tensordot(w, probs, axes=1)
    if how == "soft":
        return mean.argmax(1), mean
    votes = np.zeros_like(mean)
    for k in range(m):
        np.add.at(votes, (np.arange(probs.shape[1]), probs[k].argmax(1)), w[k])
    tied = np.isclose(votes, votes.max(1, keepdims=True))
    return np.where(tied, mean, -1.0).argmax(1), votes


def parse_folds(spec: str) -> list[int]:
    """'5' -> [0..4] (the seed's meaning); '0,2' -> [0, 2]; '3,' -> [3]."""
    if "," in spec:
        return [int(s) for s in spec.split(",") if s.strip()]
    return list(range(int(spec)))


# ----------------------------------------------------------------------------- members
def train_command(run_dir: Path, work: Path, fold: str) -> str:
    """The command that trains `fold` of a run: another fold's command.txt with -f changed,
    else one guessed from the run's MODEL_SIZE name."""
    import shlex

    from train import _strip

    for cmd in sorted(run_dir.glob("fold*/command.txt")):
        args = _strip(shlex.split(cmd.read_text())[2:], ("-f", "--fold"))
        args = [a for a in args if a != "--no-progress"]
        return shlex.join(["python", "train.py", *args, "-f", fold])
    model, _, size = run_dir.name.rpartition("_")
    if model and size.isdigit():
        return f"python train.py --work {work} -m {model} -t {size} -f {fold} -g 0"
    return f"python train.py --work {work} --run {run_dir.name} -m MODEL -t SIZE -f {fold} -g 0"


def checkpoint_paths(work: Path, runs: list[str], folds: list[int]) -> list[Path]:
    paths = [work / "runs" / r / f"fold{k}" / "best.ckpt" for r in runs for k in folds]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        hints = [f"  {p}\n    make it with: {train_command(p.parent.parent, work, p.parent.name[4:])}"
                 for p in missing]
        raise InferenceError(f"{len(missing)} of {len(paths)} fold checkpoints are missing:\n"
                             + "\n".join(hints))
    return paths


def check_compatible(ref, ref_path: Path, other, path: Path) -> None:
    """Refuse a member whose classes or feature settings differ from the reference's."""
    if other.classes != ref.classes:
        raise InferenceError(f"class lists differ: {ref_path} has {len(ref.classes)} classes, "
                             f"{path} has {len(other.classes)}; they cannot be blended")
    a, b = ref.feature_settings(), other.feature_settings()
    diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
    if diff:
        raise InferenceError(f"feature settings differ between {ref_path} and {path}: "
                             + ", ".join(f"{k} {x} vs {y}" for k, (x, y) in diff.items()))


def predict_waves(paths: list[Path], waves: np.ndarray, tta: bool, device: torch.device,
                  batch: int, desc: str = "") -> tuple[np.ndarray, list[str]]:
    """(M, N, C) probabilities, each member averaged over its views; models loaded one at a
    time, once each, and checked against the first. Returns the class list too."""
    from model import load_checkpoint
    from transform import tta_views

    views = tta_views(tta)
    out, first = [], None
    amp = dict(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")
    for path in tqdm(paths, desc=desc or "folds", unit="model", disable=None):
        model = load_checkpoint(path, device)
        if first is None:
            first = model
        check_compatible(first, paths[0], model, path)
        probs = []
        with torch.no_grad(), torch.autocast(**amp):
            for i in range(0, len(waves), batch):
                wave = torch.from_numpy(np.array(waves[i:i + batch])).to(device)
                probs.append(model.predict_views(wave, views).mean(0).cpu().numpy())
        out.append(np.concatenate(probs) if probs else np.zeros((0, len(model.classes))))
        model.cpu()  # free the device; the first stays (on the CPU) as the reference
    return np.stack(out), first.classes


# ----------------------------------------------------------------------------- reports
def cv_report(runs_dir: Path, runs: list[str], weights, folds: list[int], classes: list[str],
              out: Path) -> None:
    """cv.json of the (blended) runs' OOF, then report.txt, confusion.png and the most
    confused pairs for the TTA OOF where there is one, else the plain one."""
    from sklearn.metrics import classification_report

    from callback import cv_summary, load_oof
    from util import most_confused, plot_confusion

    run_dirs = [runs_dir / r for r in runs]
    cv = cv_summary(run_dirs, classes, folds, out, weights)
    if cv is None:
        log.warning("no oof.csv for every fold %s of %s: no CV report", folds, "+".join(runs))
        return
    table, probs = (load_oof(run_dirs, folds, "oof_tta", classes, weights)
                    or load_oof(run_dirs, folds, "oof", classes, weights))
    true = table.label.map({c: i for i, c in enumerate(classes)}).to_numpy()
    pred = probs.argmax(1)
    report = classification_report(true, pred, labels=range(len(classes)), target_names=classes,
                                   digits=4, zero_division=0)
    (out / "report.txt").write_text(report)
    plot_confusion(true, pred, classes, out / "confusion.png",
                   f"{'+'.join(runs)}: OOF accuracy {(true == pred).mean():.4f} ({len(true)} clips)")
    for key in ("plain", "tta"):
        if key in cv:
            o = cv[key]["overall"]
            log.info("CV %s: accuracy %.4f, macro-F1 %.4f", key, o["acc"], o["f1"])
    pairs = most_confused(true, pred, classes)
    if pairs:
        log.info("most confused (true -> predicted: count): %s",
                 ", ".join(f"{a}->{b}: {n}" for a, b, n in pairs))


def score_test(test: pd.DataFrame, labels: list[str], solution: str | None, classes: list[str],
               out: Path) -> float | None:
    truth = None
    if solution:
        sol = pd.read_csv(solution, dtype=str, keep_default_na=False).set_index("file_name")
        truth = test.file_name.map(sol.label)
    elif "label" in test and (test.label != "").all():
        truth = test.label
    if truth is None or truth.isna().any():
        return None
    acc = float((truth.to_numpy() == np.asarray(labels)).mean())
    write_json(dict(accuracy=acc, clips=len(test), solution=solution or "test.csv"),
               out / "test_score.json")
    return acc


# ----------------------------------------------------------------------------- predict
def predict_files(args, paths: list[Path], weights: np.ndarray, device: torch.device) -> int:
    """Top-3 labels per audio file or folder given, decoding each file here."""
    from model import load_checkpoint
    from preprocess import AUDIO_EXTS, decode

    files = []
    for p in map(Path, args.predict):
        files += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTS) if p.is_dir() else [p]
    cfg = load_checkpoint(paths[0]).cfg
    length = int(round(cfg.sr * cfg.seconds))
    good, waves = [], []
    for f in files:
        try:
            waves.append(decode(f, cfg.sr, length)[0])
            good.append(f)
        except (ValueError, OSError) as e:
            print(f"{f}: skipped - {e}", file=sys.stderr)
    if not good:
        print("predict: no readable audio among the paths given", file=sys.stderr)
        return 1
    probs, classes = predict_waves(paths, np.stack(waves), args.tta == "y", device, args.batch_size)
    _, scores_ = ensemble(probs, args.ensemble, weights)
    for f, s in zip(good, scores_):
        top = np.argsort(s)[::-1][:3]
        print(f"{f}: " + "  ".join(f"{classes[i]} {s[i]:.3f}" for i in top))
    return 0 if len(good) == len(files) else 1


# ----------------------------------------------------------------------------- main
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("members")
    g.add_argument("--work", default="work", help="work folder (preprocess.py --work)")
    g.add_argument("-m", "--model", default="res2next50", help="model of the run to use")
    g.add_argument("-t", "--size", type=int, default=224, help="size of the run to use")
    g.add_argument("--run", default="", help="run name (default MODEL_SIZE)")
    g.add_argument("--runs", nargs="+", default=None, help="several runs to blend")
    g.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per run")
    g.add_argument("-f", "--folds", default="5", help="N = folds 0..N-1, or a list 0,2")
    g = p.add_argument_group("prediction")
    g.add_argument("-a", "--tta", default="n", choices=("y", "n"),
                   help="add the 4 TTA views (shift +-10%%, gain +-5 dB) to the identity")
    g.add_argument("--ensemble", default="soft", choices=("soft", "hard"))
    g.add_argument("-g", "--gpu", type=int, default=0, help="GPU index; -1 = CPU")
    g.add_argument("-b", "--batch-size", type=int, default=256)
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default="", help="output folder (default: the run's folder)")
    g.add_argument("--solution", default="", help="CSV file_name,label to score the test set")
    g.add_argument("--predict", nargs="+", default=None, metavar="PATH",
                   help="print the top-3 labels of these audio files/folders instead")
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    setup_logging()
    work = Path(args.work)
    runs = args.runs or [args.run or f"{args.model}_{args.size}"]
    if args.weights and len(args.weights) != len(runs):
        print(f"inference: {len(args.weights)} --weights for {len(runs)} runs", file=sys.stderr)
        return 2
    weights = np.asarray(args.weights or [1.0] * len(runs))  # one per run, spread over its folds
    folds = parse_folds(args.folds)
    device = torch.device(f"cuda:{args.gpu}" if args.gpu >= 0 and torch.cuda.is_available() else "cpu")
    try:
        paths = checkpoint_paths(work, runs, folds)
        member_w = np.repeat(weights, len(folds))
        if args.predict:
            return predict_files(args, paths, member_w, device)
        out = Path(args.out) if args.out else work / "runs" / (
            runs[0] if len(runs) == 1 else "blend_" + "+".join(runs))
        out.mkdir(parents=True, exist_ok=True)
        from dataset import read_classes, read_table

        test = read_table(work / "test.csv")
        waves = np.load(work / "test_wave.npy", mmap_mode="r")
        probs, classes = predict_waves(paths, waves, args.tta == "y", device, args.batch_size,
                                       desc=f"{len(paths)} models x {1 + 4 * (args.tta == 'y')} views")
        if classes != read_classes(work):
            raise InferenceError(f"{paths[0]} was trained on other classes than "
                                 f"{work / 'classes.json'}")
    except InferenceError as e:
        print(f"inference: {e}", file=sys.stderr)
        return 2
    pred, score = ensemble(probs, args.ensemble, member_w)
    labels = [classes[i] for i in pred]
    bad = test[test.status != "ok"]
    if len(bad):
        print(f"inference: {len(bad)} test files could not be read and were predicted from "
              f"silence: " + ", ".join(f"{r.file_name} ({r.status})" for r in bad.itertuples()),
              file=sys.stderr)
    write_csv(pd.DataFrame({"file_name": test.file_name, "label": labels}), out / "submission.csv")
    write_csv(probs_frame(test.file_name, score, classes), out / "test_probs.csv")
    log.info("submission: %d rows -> %s", len(test), out / "submission.csv")
    acc = score_test(test, labels, args.solution, classes, out)
    if acc is not None:
        log.info("test accuracy %.4f (%s, %d folds x %d runs, %s%s)", acc, args.ensemble,
                 len(folds), len(runs), "TTA" if args.tta == "y" else "no TTA",
                 f", {args.solution}" if args.solution else "")
    cv_report(work / "runs", runs, weights, folds, classes, out)
    made = [f for f in ("submission.csv", "test_probs.csv", "test_score.json", "cv.json",
                        "report.txt", "confusion.png") if (out / f).is_file()]
    log.info("outputs in %s: %s; learning curves: %s", out, ", ".join(made),
             ", ".join(str(work / "runs" / r / "fold*" / "curve.png") for r in runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
