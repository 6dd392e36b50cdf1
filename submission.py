"""What inference.py writes: submission.csv (every row of the sample, in its order),
test_probs.csv, the rows of a windowed test set (BirdCLEF's row_id + a column per class), the
test score against a solution (accuracy, per solution column, among the solution's labels;
padded cmAP for windows), the embeddings and blend.json."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ensemble import embed_waves
from metrics import multilabel_scores, padded_cmap
from predictor import OPEN
from runs import BLEND, EMBEDDINGS, EMBEDDINGS_CSV, SUBMISSION, TEST_PROBS, TEST_SCORE, Work
from util import UsageError, atomic_write, probs_frame, read_table, write_csv, write_json

log = logging.getLogger(__name__)


def test_truth(test: pd.DataFrame, solution: str | None, classes: list[str]):
    """(each test row's true label, {solution column: its values}) from --solution (or
    test.csv's labels); (None, {}) where a row has none. Where the classes hold _unknown_, a
    word the model was not taught is _unknown_: one it should reject."""
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
        return None, {}
    truth = truth.to_numpy()
    if set(OPEN) & set(classes):
        truth = np.where(np.isin(truth, classes), truth, OPEN[0])
    return truth, groups


def score_test(test: pd.DataFrame, score: np.ndarray, classes: list[str], solution: str | None,
               out: Path, how: str, labels=None) -> dict | None:
    """Test accuracy of the scores (N, classes) against --solution (or test.csv's labels), and
    per value of any other column of the solution (demo.py --preset shift writes `domain`,
    real.py `speaker`) -> test_score.json; None without true labels. Where the true labels are
    fewer than the classes (the ten digits of real.py's benchmark among 30 words), the same
    again with the most probable of the true labels' classes (`accuracy_within`, `by_within`).
    `labels`, what the submission says (a reject rule's, predictor.decide): with true
    _unknown_ / _silence_ rows, `recognised` (the words said right) and `accepted_unknown` (the
    others taken for a word), and per solution column."""
    truth, groups = test_truth(test, solution, classes)
    if truth is None:
        return None

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
    if np.isin(truth, OPEN).any():
        said = np.asarray(labels if labels is not None else
                          [classes[i] for i in score.argmax(1)])
        result.update(open_set_scores(truth, said, groups))
    write_json(result, out / TEST_SCORE)
    return result


def open_set_scores(truth: np.ndarray, said: np.ndarray, groups: dict) -> dict:
    """recognised: the share of the word rows said right; accepted_unknown: the share of the
    _unknown_ / _silence_ rows said as a word; each also per value of a solution column."""
    def both(rows):
        words, others = rows & ~np.isin(truth, OPEN), rows & np.isin(truth, OPEN)
        return dict(recognised=float(np.mean(said[words] == truth[words])) if words.any()
                    else None, accepted_unknown=float(np.mean(~np.isin(said[others], OPEN)))
                    if others.any() else None)
    every = np.ones(len(truth), bool)
    return dict(**both(every), open_by={c: {str(v): both((g == v).to_numpy()) for v in
                                            sorted(g.unique())} for c, g in groups.items()})


def write_embeddings(path: Path, waves, wins: pd.DataFrame, mode: str, work: Path, out: Path,
                     device, batch: int) -> None:
    """embeddings.npy (rows, features) of `path`'s network and embeddings.csv naming each row:
    test files (their windows averaged) or windows (row_id), as the submission's rows."""
    vectors = embed_waves(path, waves, device, batch)
    test = read_table(Work(work).test_csv)  # read_test named the unreadable files already
    if mode == "file":
        vectors = pd.DataFrame(vectors).groupby(wins.row.to_numpy()).mean().to_numpy()
        names = pd.DataFrame({"file_name": test.file_name})
    else:
        names = pd.DataFrame({"row_id": window_ids(test, wins)})
    atomic_write(out / EMBEDDINGS, lambda tmp: np.save(tmp, vectors.astype(np.float32)))
    write_csv(names, out / EMBEDDINGS_CSV)
    log.info("embeddings: %d x %d from %s -> %s", *vectors.shape, path, out / EMBEDDINGS)


def write_blend(blend: dict, runs: list[str], folds: list[int], tta: bool, out: Path) -> None:
    write_json(dict(runs=runs, folds=folds, tta=tta, **blend), out / BLEND)
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
                  classes: list[str], solution: str, how: str, sample: Path | None) -> None:
    """One row per window of every test file, in file then time order: row_id (the file's stem
    and the window's end second) and one probability column per class, as submission.csv and
    test_probs.csv; rows of a sample_submission.csv that no window made are added with zeros.
    With --solution (row_id + one 0/1 column per class): padded cmAP, mAP and ROC-AUC."""
    test = read_test(work)
    ids = window_ids(test, wins)
    sub = probs_frame(pd.Series(ids), score, classes, key="row_id")
    columns = classes
    if sample is not None and sample.is_file():
        want = pd.read_csv(sample, dtype={"row_id": str})
        columns = [c for c in want.columns[1:] if c in classes]  # the sample's, in its order
        missing = want.row_id[~want.row_id.isin(set(ids))]
        if len(missing):
            print(f"inference: {len(missing)} rows of {sample} match no test window (their files "
                  f"are not in the test folder): written with probability 0", file=sys.stderr)
            sub = pd.concat([sub, pd.DataFrame({"row_id": missing, **{c: 0.0 for c in classes}})])
    write_csv(sub[["row_id", *columns]], out / SUBMISSION)
    write_csv(sub, out / TEST_PROBS)
    log.info("submission: %d windows of %d files -> %s", len(wins), len(test),
             out / SUBMISSION)
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
    write_json(score, out / TEST_SCORE)
    log.info("test padded cmAP %.4f, mAP %.4f, AUC %.4f (%d windows, %s)", score["cmap_pad5"],
             score.get("map", float("nan")), score.get("auc", float("nan")), len(sol), how)


def write_submission(work: Path, out: Path, labels: list[str], score: np.ndarray,
                     classes: list[str], solution: str, how: str) -> None:
    """submission.csv (every row of the sample, in order), test_probs.csv, and the test
    accuracy where true labels exist; unreadable test files are named."""
    test = read_test(work)
    write_csv(pd.DataFrame({"file_name": test.file_name, "label": labels}), out / SUBMISSION)
    write_csv(probs_frame(test.file_name, score, classes), out / TEST_PROBS)
    log.info("submission: %d rows -> %s", len(test), out / SUBMISSION)
    result = score_test(test, score, classes, solution, out, how, labels)
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
    if "recognised" in result:
        log.info("open set: %s of the words recognised, %s of the other clips taken for a word",
                 *(f"{v:.4f}" if v is not None else "-" for v in (
                     result["recognised"], result["accepted_unknown"])))
