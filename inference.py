"""Fold x model x TTA ensemble -> submission.csv + test_probs.csv, and the CV report.

    python inference.py -t 224 -m res2next50 -f 5 -a y            # 5 folds, soft, 4 TTA views
    python inference.py --runs res2next50_224 resnet18_64 --weights 2 1 -f 5 -a y
    python inference.py --runs res2next50_224 resnet18_64 -f 5 -a y --fit-weights
    python inference.py -t 64 -m resnet18 -f 5 --ensemble hard --solution data/demo/solution.csv
    python inference.py -t 64 -m resnet18 -f 5 --predict some.wav some/folder

-f N means folds 0..N-1 (so -f 1 is fold 0 alone); -f 0,2 is a list of fold indices.
Outputs go to WORK/runs/<run>/ (WORK/runs/blend_<a>+<b>/ for several runs, or --out):
submission.csv, test_probs.csv, test_score.json (with true labels), cv.json, report.txt,
confusion.png, report.html (one run), blend.json (--fit-weights).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from model import CheckpointError, predict_waves
from util import UsageError, probs_frame, setup_logging, write_csv, write_json

log = logging.getLogger(__name__)


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


def with_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """softmax(log(p) / t): the same ranking, confidence scaled (t > 1 softens)."""
    z = np.log(np.clip(probs, 1e-15, 1.0)) / t
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def log_loss(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-15, 1.0)).mean())


def calibration_error(probs: np.ndarray, y: np.ndarray) -> float:
    """Expected calibration error (15 bins, L1) with torchmetrics."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, y = torch.tensor(probs, dtype=torch.float32), torch.tensor(y)  # copies: writable
    return float(multiclass_calibration_error(probs, y, probs.shape[1], n_bins=15, norm="l1"))


def fit_blend(probs: np.ndarray, y: np.ndarray) -> dict:
    """Run weights (on the simplex) minimising the OOF log-loss of the weighted mean of
    probs (R, N, C), then a temperature minimising the blend's log-loss (scipy.optimize)."""
    from scipy.optimize import minimize, minimize_scalar

    r = probs.shape[0]
    p_true = probs[:, np.arange(len(y)), y]  # (R, N): only the true class counts in log-loss

    def nll(z):
        w = np.exp(z - z.max())
        return -np.log(np.clip((w / w.sum()) @ p_true, 1e-15, 1.0)).mean()

    z = minimize(nll, np.zeros(r), method="L-BFGS-B").x if r > 1 else np.zeros(1)
    w = np.exp(z - z.max())
    w = w / w.sum()
    equal, blend = probs.mean(0), np.tensordot(w, probs, axes=1)
    t = minimize_scalar(lambda t: log_loss(with_temperature(blend, t), y), bounds=(0.05, 20.0),
                        method="bounded").x
    calibrated = with_temperature(blend, t)
    return dict(weights=w.tolist(), temperature=float(t),
                oof_log_loss=dict(equal=log_loss(equal, y), fitted=log_loss(blend, y),
                                  calibrated=log_loss(calibrated, y)),
                oof_accuracy=dict(equal=float((equal.argmax(1) == y).mean()),
                                  fitted=float((blend.argmax(1) == y).mean())),
                oof_ece=dict(before=calibration_error(blend, y),
                             after=calibration_error(calibrated, y)))


def parse_folds(spec: str) -> list[int]:
    """'5' -> [0..4] (the seed's meaning); '0,2' -> [0, 2]; '3,' -> [3]."""
    try:
        if "," in spec:
            return [int(s) for s in spec.split(",") if s.strip()]
        return list(range(int(spec)))
    except ValueError:
        raise UsageError(f"-f {spec}: expected a fold count (5) or a list (0,2)") from None


# ----------------------------------------------------------------------------- members
def checkpoint_paths(work: Path, runs: list[str], folds: list[int]) -> list[Path]:
    """best.ckpt of every run x fold; UsageError naming each missing or unfinished one with
    the command that makes it."""
    from report import fold_done, train_command

    paths = [work / "runs" / r / f"fold{k}" / "best.ckpt" for r in runs for k in folds]
    bad = [p for p in paths if not (p.is_file() and fold_done(p.parent))]
    if bad:
        hints = []
        for p in bad:
            cmd = train_command(p.parent.parent, work, p.parent.name[4:])
            state = "unfinished (no result.json)" if p.is_file() else "missing"
            hints.append(f"  {p}: {state}\n    make it with: {cmd}"
                         + (" --resume" if p.is_file() else ""))
        raise UsageError(f"{len(bad)} of {len(paths)} fold checkpoints are missing or "
                         f"unfinished:\n" + "\n".join(hints))
    return paths


def oof_for_blend(work: Path, runs: list[str], folds: list[int], name: str,
                  classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(R, N, C) OOF probabilities of each run and the labels, refusing runs whose OOF covers
    other rows."""
    from report import label_index, load_oof, train_command

    tables, probs = [], []
    for r in runs:
        got = load_oof([work / "runs" / r], folds, name, classes)
        if got is None:
            missing = [k for k in folds if not (work / "runs" / r / f"fold{k}" / f"{name}.csv")
                       .is_file()]
            how = ("train them with -a y, or fit without -a y" if name == "oof_tta" else
                   "train them: " + train_command(work / "runs" / r, work, str(missing[0])))
            raise UsageError(f"--fit-weights: run {r} has no finished {name}.csv for fold(s) "
                             f"{', '.join(map(str, missing)) or 'all'}; {how}")
        tables.append(got[0])
        probs.append(got[1])
    for r, t in zip(runs[1:], tables[1:]):
        if not np.array_equal(t.row.to_numpy(), tables[0].row.to_numpy()):
            raise UsageError(f"--fit-weights: the OOF of {runs[0]} and {r} cover different rows "
                             f"(other folds or another WORK); blend runs of the same WORK")
    return np.stack(probs), label_index(tables[0].label, classes)


# ----------------------------------------------------------------------------- reports
def score_test(test: pd.DataFrame, labels: list[str], solution: str | None, out: Path,
               how: str) -> float | None:
    truth = None
    if solution:
        if not Path(solution).is_file():
            raise UsageError(f"--solution {solution}: no such file")
        sol = pd.read_csv(solution, dtype=str, keep_default_na=False).set_index("file_name")
        truth = test.file_name.map(sol.label)
    elif "label" in test and (test.label != "").all():
        truth = test.label
    if truth is None or truth.isna().any():
        return None
    acc = float((truth.to_numpy() == np.asarray(labels)).mean())
    write_json({"accuracy": acc, "clips": len(test), "solution": solution or "test.csv",
                "with": how}, out / "test_score.json")
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
def make_parser():
    from arg import Parser

    p = Parser(description=__doc__.split("\n")[0])
    g = p.add_argument_group("members")
    g.add_argument("--work", default="work", help="work folder (preprocess.py --work)")
    g.add_argument("-m", "--model", default="res2next50", help="model of the run to use")
    g.add_argument("-t", "--size", type=int, default=224, help="size of the run to use")
    g.add_argument("--run", default="", help="run name (default MODEL_SIZE)")
    g.add_argument("--runs", nargs="+", default=None, help="several runs to blend")
    g.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per run")
    g.add_argument("--fit-weights", action="store_true",
                   help="fit the run weights and a temperature on the OOF (min. log-loss); "
                        "writes blend.json and calibrated test_probs.csv")
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
    try:
        return run(args)
    except (UsageError, CheckpointError) as e:
        print(f"inference: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from dataset import read_classes, read_table
    from report import cv_report, write_html
    from dataset import work_folds

    work = Path(args.work)
    runs = args.runs or [args.run or f"{args.model}_{args.size}"]
    if args.weights and len(args.weights) != len(runs):
        raise UsageError(f"{len(args.weights)} --weights for {len(runs)} runs")
    if args.fit_weights and (args.weights or args.ensemble == "hard"):
        raise UsageError("--fit-weights chooses the weights of a soft blend: drop --weights "
                         "and --ensemble hard")
    weights = np.asarray(args.weights or [1.0] * len(runs))  # one per run, spread over its folds
    folds = parse_folds(args.folds)
    have = work_folds(work)
    if not set(folds) <= set(have):
        raise UsageError(f"-f {args.folds}: {work / 'train.csv'} has folds "
                         f"{', '.join(map(str, have))}")
    device = torch.device(f"cuda:{args.gpu}" if args.gpu >= 0 and torch.cuda.is_available() else "cpu")
    paths = checkpoint_paths(work, runs, folds)
    classes = read_classes(work)
    blend = None
    if args.fit_weights:
        oof, y = oof_for_blend(work, runs, folds, "oof_tta" if args.tta == "y" else "oof",
                               classes)
        blend = fit_blend(oof, y)
        weights = np.asarray(blend["weights"])
    if args.predict:
        return predict_files(args, paths, np.repeat(weights, len(folds)), device)
    out = Path(args.out) if args.out else work / "runs" / (
        runs[0] if len(runs) == 1 else "blend_" + "+".join(runs))
    test = read_table(work / "test.csv")
    waves = np.load(work / "test_wave.npy", mmap_mode="r")
    views = 1 + 4 * (args.tta == "y")
    probs, got = predict_waves(paths, waves, args.tta == "y", device, args.batch_size,
                               desc=f"{len(paths)} models x {views} views")
    if got != classes:
        raise UsageError(f"{paths[0]} was trained on other classes than {work / 'classes.json'}")
    pred, score = ensemble(probs, args.ensemble, np.repeat(weights, len(folds)))
    if blend:
        score = with_temperature(score, blend["temperature"])
        write_json(dict(runs=runs, folds=folds, tta=args.tta == "y", **blend), out / "blend.json")
        log.info("fitted on the OOF: weights %s, temperature %.3f; OOF log-loss %.4f (equal "
                 "weights) -> %.4f (fitted) -> %.4f (calibrated); ECE %.4f -> %.4f",
                 ", ".join(f"{r} {w:.3f}" for r, w in zip(runs, blend["weights"])),
                 blend["temperature"], *blend["oof_log_loss"].values(),
                 *blend["oof_ece"].values())
    labels = [classes[i] for i in pred]
    bad = test[test.status != "ok"]
    if len(bad):
        print(f"inference: {len(bad)} test files could not be read and were predicted from "
              f"silence: " + ", ".join(f"{r.file_name} ({r.status})" for r in bad.itertuples()),
              file=sys.stderr)
    write_csv(pd.DataFrame({"file_name": test.file_name, "label": labels}), out / "submission.csv")
    write_csv(probs_frame(test.file_name, score, classes), out / "test_probs.csv")
    log.info("submission: %d rows -> %s", len(test), out / "submission.csv")
    how = (f"{len(folds)} fold{'s' * (len(folds) > 1)}" + (f" x {len(runs)} runs" if len(runs) > 1
                                                           else "")
           + f", {args.ensemble}" + (", TTA" if args.tta == "y" else "")
           + (", fitted weights" if blend else ""))
    acc = score_test(test, labels, args.solution, out, how)
    if acc is not None:
        log.info("test accuracy %.4f (%s%s)", acc, how,
                 f", {args.solution}" if args.solution else "")
    cv_report([work / "runs" / r for r in runs], weights, folds, classes, out)
    if len(runs) == 1 and not args.out:
        write_html(out, work)
    made = [f for f in ("submission.csv", "test_probs.csv", "test_score.json", "cv.json",
                        "report.txt", "confusion.png", "report.html", "blend.json")
            if (out / f).is_file()]
    log.info("outputs in %s: %s", out, ", ".join(made))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
