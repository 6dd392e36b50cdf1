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

from audio import HOP_HELP, WINDOW_HELP, window_problem
from metrics import calibration_error, log_loss, multilabel_scores, padded_cmap
from model import load_checkpoint, predict_waves
from results import cv_report, write_html
from runs import Run, Work, requested_folds, train_command
from transform import tta_views
from util import (UsageError, atomic_write, probs_frame, read_table, setup_logging, torch_device,
                  write_csv, write_json)

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


# ----------------------------------------------------------------------------- members
def oof_for_blend(work: Path, runs: list[str], folds: list[int], name: str,
                  classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(R, N, C) OOF probabilities of each run and the labels, refusing runs whose OOF covers
    other rows."""
    from results import label_index, load_oof

    tables, probs = [], []
    for r in (Run(work, name) for name in runs):
        got = load_oof([r.dir], folds, name, classes)
        if got is None:
            missing = [k for k in folds if not r.oof(k, name).is_file()]
            how = ("train them with -a y, or fit without -a y" if name == "oof_tta" else
                   "train them: " + train_command(r, str(missing[0])))
            raise UsageError(f"--fit-weights: run {r.name} has no finished {name}.csv for fold(s) "
                             f"{', '.join(map(str, missing)) or 'all'}; {how}")
        tables.append(got[0])
        probs.append(got[1])
    for r, t in zip(runs[1:], tables[1:]):
        if not np.array_equal(t.row.to_numpy(), tables[0].row.to_numpy()):
            raise UsageError(f"--fit-weights: the OOF of {runs[0]} and {r} cover different rows "
                             f"(other folds or another WORK); blend runs of the same WORK")
    return np.stack(probs), label_index(tables[0].label, classes)


# ----------------------------------------------------------------------------- reports
def score_test(test: pd.DataFrame, score: np.ndarray, classes: list[str], solution: str | None,
               out: Path, how: str) -> dict | None:
    """Test accuracy of the scores (N, classes) against --solution (or test.csv's labels), and
    per value of any other column of the solution (demo.py --preset shift writes `domain`,
    real.py `speaker`) -> test_score.json; None without true labels. Where the true labels are
    fewer than the classes (the ten digits of real.py's benchmark among 30 words), the same
    again with the most probable of the true labels' classes (`accuracy_within`, `by_within`)."""
    truth, groups = None, {}
    if solution:
        if not Path(solution).is_file():
            raise UsageError(f"--solution {solution}: no such file")
        sol = pd.read_csv(solution, dtype=str, keep_default_na=False).set_index("file_name")
        truth = test.file_name.map(sol.label)
        groups = {c: test.file_name.map(sol[c]) for c in sol.columns if c != "label"}
    elif "label" in test and (test.label != "").all():
        truth = test.label
    if truth is None or truth.isna().any():
        return None
    truth = truth.to_numpy()

    def scored(cols: list[int], suffix: str) -> dict:
        right = truth == np.asarray(classes)[np.asarray(cols)[score[:, cols].argmax(1)]]
        by = {c: {str(v): float(right[(g == v).to_numpy()].mean()) for v in sorted(g.unique())}
              for c, g in groups.items()}
        return {f"accuracy{suffix}": float(right.mean()), **({f"by{suffix}": by} if by else {})}

    result = {**scored(list(range(len(classes))), ""), "clips": len(test),
              "solution": solution or "test.csv", "with": how}
    within = sorted(classes.index(c) for c in set(truth) if c in classes)
    if len(within) < len(classes):
        result.update(scored(within, "_within"), within=[classes[i] for i in within])
    write_json(result, out / "test_score.json")
    return result


# ----------------------------------------------------------------------------- predict
def predict_files(paths: list[Path], files: list[str], tta: bool, how: str, weights: np.ndarray,
                  device: torch.device, batch: int) -> int:
    """Top-3 labels of each audio file (or folder's files) given, read as predict.py reads
    them: the same code path as the exported bundle, with these checkpoints."""
    import audio
    from model import load_checkpoint

    ref = load_checkpoint(paths[0])
    cfg, errors = ref.cfg, []

    def probs(waves):
        return ensemble(predict_waves(paths, waves, tta, device, batch)[0], how, weights)[1]

    found = audio.audio_files(files)
    for path, top in audio.predict_files(found, cfg.sr, cfg.clip_samples, probs, ref.classes,
                                         3, errors):
        print(audio.top_line(path, top))
    for path, reason in errors:
        print(f"{path}: skipped - {reason}", file=sys.stderr)
    if len(errors) == len(found):
        print("predict: no readable audio among the paths given", file=sys.stderr)
    return 1 if errors or not found else 0


# ----------------------------------------------------------------------------- main
FIELDS = ("work", "model", "size", "run", "gpus", "tta", "batch_size")  # of Config


def make_parser():
    from arg import GROUPS, add_folds, make_parser as config_parser

    p = config_parser(__doc__.split("\n")[0], GROUPS, only=FIELDS)
    g = p.add_argument_group("members")
    g.add_argument("--runs", nargs="+", default=None,
                   help="several runs blended into one ensemble, every fold of a run weighted "
                        "equally")
    g.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per run")
    g.add_argument("--fit-weights", action="store_true",
                   help="fit the run weights and a temperature on the OOF (min. log-loss); "
                        "writes blend.json and calibrated test_probs.csv")
    add_folds(g)
    g.add_argument("--ensemble", default="soft", choices=("soft", "hard"))
    g = p.add_argument_group("outputs")
    g.add_argument("--out", default="", help="output folder (default: the run's folder)")
    g.add_argument("--solution", default="", help="CSV file_name,label to score the test set")
    g.add_argument("--rows", default="auto", choices=("auto", "file", "window"),
                   help="one submission row per test file, or per window (row_id = file stem + "
                        "end second, one probability column per class: BirdCLEF); auto: as "
                        "preprocess.py found the data (a sample_submission.csv with row_id)")
    g.add_argument("--window", type=float, default=None, metavar="SECONDS",
                   help=f"{WINDOW_HELP} (default: the clip length)")
    g.add_argument("--hop", type=float, default=None, metavar="SECONDS",
                   help=f"{HOP_HELP} (default: the window: no overlap)")
    g.add_argument("--embed", action="store_true",
                   help="also write the test clips' embeddings (the first model's pooled vector "
                        "before its classifier; a file's windows averaged): embeddings.npy and "
                        "embeddings.csv, its rows' order")
    g.add_argument("--predict", nargs="+", default=None, metavar="PATH",
                   help="print the top-3 labels of these audio files/folders instead")
    return p


def main(argv=None) -> int:
    from arg import config_from_args

    args = make_parser().parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    try:
        return run(cfg, args)
    except UsageError as e:
        print(f"inference: {e}", file=sys.stderr)
        return 2


def check_request(cfg, args) -> list[str]:
    """The runs to use; UsageError for weights that do not fit them."""
    runs = args.runs or [cfg.run_name]
    if args.weights and len(args.weights) != len(runs):
        raise UsageError(f"{len(args.weights)} --weights for {len(runs)} runs")
    problem = window_problem(args.window, args.hop)
    if problem:
        raise UsageError(problem)
    if args.fit_weights and (args.weights or args.ensemble == "hard"):
        raise UsageError("--fit-weights chooses the weights of a soft blend: drop --weights "
                         "and --ensemble hard")
    return runs


def test_windows(work: Path, prep: dict, args) -> tuple[object, pd.DataFrame, str]:
    """The test set as windows (dataset.Rows over dataset.windows) and the row mode."""
    from arg import Config
    from dataset import Clips, Rows, windows

    sr, length = prep["sr"], Config(sr=prep["sr"], seconds=prep["seconds"]).clip_samples
    win = int(round(args.window * sr)) if args.window else length
    hop = int(round(args.hop * sr)) if args.hop else win
    clips = Clips.of(work, "test")
    wins = windows(clips, win, hop, sr)
    mode = prep.get("rows", "file") if args.rows == "auto" else args.rows
    return Rows(clips, wins.row, length, wins.start, win), wins, mode


def run(cfg, args) -> int:

    work, tta = Path(cfg.work), cfg.tta == "y"
    runs = check_request(cfg, args)
    folds = requested_folds(work, args.folds)
    device = torch_device(cfg.gpus)
    paths = [p for r in runs for p in Run(work, r).checkpoints(folds)]
    classes = Work(work).classes()
    weights, blend = np.asarray(args.weights or [1.0] * len(runs)), None  # one per run
    if args.fit_weights:
        if load_checkpoint(paths[0]).cfg.multilabel:
            raise UsageError("--fit-weights fits a softmax blend by log-loss: not for multilabel "
                             "runs (blend them with --weights)")
        blend = fit_blend(*oof_for_blend(work, runs, folds, "oof_tta" if tta else "oof", classes))
        weights = np.asarray(blend["weights"])
    member_weights = np.repeat(weights, len(folds))  # a run's weight spread over its folds
    batch = cfg.batch_size * 2
    if args.predict:
        return predict_files(paths, args.predict, tta, args.ensemble, member_weights, device,
                             batch)
    out = Path(args.out) if args.out else Run.blend(work, runs).dir
    prep = Work(work).prep()
    waves, wins, mode = test_windows(work, prep, args)
    probs, got = predict_waves(paths, waves, tta, device, batch,
                               desc=f"{len(paths)} models x {len(tta_views(tta))} views")
    if got != classes:
        raise UsageError(f"{paths[0]} was trained on other classes than {Work(work).classes_json}")
    _, score = ensemble(probs, args.ensemble, member_weights)  # per window
    if mode == "file":  # a file is the mean of its windows (one window for a short clip)
        score = pd.DataFrame(score).groupby(wins.row.to_numpy()).mean().to_numpy()
    pred = score.argmax(1)
    if blend:
        score = with_temperature(score, blend["temperature"])
        write_blend(blend, runs, folds, tta, out)
    how = (f"{len(folds)} fold{'s' * (len(folds) > 1)}" + (f" x {len(runs)} runs" if len(runs) > 1
                                                           else "")
           + f", {args.ensemble}" + (", TTA" if tta else "") + (", fitted weights" if blend else ""))
    if mode == "window":
        sample = Path(prep.get("data", "")) / "sample_submission.csv"
        write_windows(work, out, wins, score, classes, args.solution, how, sample)
    else:
        write_submission(work, out, [classes[i] for i in pred], score, classes, args.solution,
                         how)
    if args.embed:
        write_embeddings(paths[0], waves, wins, mode, work, out, device, batch)
    cv_report([Run(work, r).dir for r in runs], weights, folds, classes, out)
    if len(runs) == 1 and not args.out:
        write_html(out, work)
    made = [f for f in ("submission.csv", "test_probs.csv", "test_score.json", "cv.json",
                        "report.txt", "confusion.png", "report.html", "blend.json",
                        "embeddings.npy")
            if (out / f).is_file()]
    log.info("outputs in %s: %s", out, ", ".join(made))
    return 0


def write_embeddings(path: Path, waves, wins: pd.DataFrame, mode: str, work: Path, out: Path,
                     device, batch: int) -> None:
    """embeddings.npy (rows, features) of `path`'s network and embeddings.csv naming each row:
    test files (their windows averaged) or windows (row_id), as the submission's rows."""
    from model import embed_waves

    vectors = embed_waves(path, waves, device, batch)
    test = read_table(Work(work).test_csv)  # read_test named the unreadable files already
    if mode == "file":
        vectors = pd.DataFrame(vectors).groupby(wins.row.to_numpy()).mean().to_numpy()
        names = pd.DataFrame({"file_name": test.file_name})
    else:
        names = pd.DataFrame({"row_id": window_ids(test, wins)})
    atomic_write(out / "embeddings.npy", lambda tmp: np.save(tmp, vectors.astype(np.float32)))
    write_csv(names, out / "embeddings.csv")
    log.info("embeddings: %d x %d from %s -> %s", *vectors.shape, path, out / "embeddings.npy")


def write_blend(blend: dict, runs: list[str], folds: list[int], tta: bool, out: Path) -> None:
    write_json(dict(runs=runs, folds=folds, tta=tta, **blend), out / "blend.json")
    log.info("fitted on the OOF: weights %s, temperature %.3f; OOF log-loss %.4f (equal "
             "weights) -> %.4f (fitted) -> %.4f (calibrated); ECE %.4f -> %.4f",
             ", ".join(f"{r} {w:.3f}" for r, w in zip(runs, blend["weights"])),
             blend["temperature"], *blend["oof_log_loss"].values(), *blend["oof_ece"].values())


def window_ids(test: pd.DataFrame, wins: pd.DataFrame) -> list[str]:
    """Each window's row_id: its file's stem and the window's end in seconds."""
    stems = test.file_name.map(lambda n: Path(n).stem).to_numpy()
    return [f"{stems[r]}_{e}" for r, e in zip(wins.row, wins.end)]


def read_test(work: Path) -> pd.DataFrame:
    """WORK's test.csv; the files that could not be read (predicted from silence) are named."""
    test = read_table(Work(work).test_csv)
    bad = test[test.status != "ok"]
    if len(bad):
        print(f"inference: {len(bad)} test files could not be read and were predicted from "
              f"silence: " + ", ".join(f"{r.file_name} ({r.status})" for r in bad.itertuples()),
              file=sys.stderr)
    return test


def write_windows(work: Path, out: Path, wins: pd.DataFrame, score: np.ndarray,
                  classes: list[str], solution: str, how: str, sample: Path) -> None:
    """One row per window of every test file, in file then time order: row_id (the file's stem
    and the window's end second) and one probability column per class, as submission.csv and
    test_probs.csv; rows of a sample_submission.csv that no window made are added with zeros.
    With --solution (row_id + one 0/1 column per class): padded cmAP, mAP and ROC-AUC."""
    test = read_test(work)
    ids = window_ids(test, wins)
    sub = probs_frame(pd.Series(ids), score, classes, key="row_id")
    columns = classes
    if sample.is_file():
        want = pd.read_csv(sample, dtype={"row_id": str})
        columns = [c for c in want.columns[1:] if c in classes]  # the sample's, in its order
        missing = want.row_id[~want.row_id.isin(set(ids))]
        if len(missing):
            print(f"inference: {len(missing)} rows of {sample} match no test window (their files "
                  f"are not in the test folder): written with probability 0", file=sys.stderr)
            sub = pd.concat([sub, pd.DataFrame({"row_id": missing, **{c: 0.0 for c in classes}})])
    write_csv(sub[["row_id", *columns]], out / "submission.csv")
    write_csv(sub, out / "test_probs.csv")
    log.info("submission: %d windows of %d files -> %s", len(wins), len(test),
             out / "submission.csv")
    if not solution:
        return
    if not Path(solution).is_file():
        raise UsageError(f"--solution {solution}: no such file")
    sol = pd.read_csv(solution, dtype={"row_id": str})
    if not {"row_id", *classes} <= set(sol.columns):
        raise UsageError(f"--solution {solution}: needs row_id and one column per class")
    sol = sol.set_index("row_id")
    scored = sub.set_index("row_id").reindex(sol.index)
    if scored.isna().any().any():
        raise UsageError(f"--solution {solution}: its rows are not this test set's windows")
    truth, p = sol[classes].to_numpy(), scored[classes].to_numpy()
    found = multilabel_scores(torch.from_numpy(p), torch.from_numpy(truth))
    score = {"cmap_pad5": padded_cmap(truth, p), **found, "windows": len(sol),
             "solution": solution, "with": how}
    write_json(score, out / "test_score.json")
    log.info("test padded cmAP %.4f, mAP %.4f, AUC %.4f (%d windows, %s)", score["cmap_pad5"],
             score.get("map", float("nan")), score.get("auc", float("nan")), len(sol), how)


def write_submission(work: Path, out: Path, labels: list[str], score: np.ndarray,
                     classes: list[str], solution: str, how: str) -> None:
    """submission.csv (every row of the sample, in order), test_probs.csv, and the test
    accuracy where true labels exist; unreadable test files are named."""
    test = read_test(work)
    write_csv(pd.DataFrame({"file_name": test.file_name, "label": labels}), out / "submission.csv")
    write_csv(probs_frame(test.file_name, score, classes), out / "test_probs.csv")
    log.info("submission: %d rows -> %s", len(test), out / "submission.csv")
    result = score_test(test, score, classes, solution, out, how)
    if result is None:
        return
    log.info("test accuracy %.4f (%s%s)", result["accuracy"], how,
             f", {solution}" if solution else "")
    for col, accs in result.get("by", {}).items():
        log.info("test accuracy by %s: %s", col, ", ".join(f"{v} {a:.4f}" for v, a in accs.items()))
    if "within" in result:
        log.info("test accuracy among the %d labels of the solution %.4f%s", len(result["within"]),
                 result["accuracy_within"], "".join(
                     f"; by {col}: " + ", ".join(f"{v} {a:.4f}" for v, a in accs.items())
                     for col, accs in result.get("by_within", {}).items()))


if __name__ == "__main__":
    raise SystemExit(main())
