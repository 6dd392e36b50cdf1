"""Saying "none of these": the reject rule's threshold fitted on the out-of-fold predictions,
and what a keyword user reads about it (a DET curve, detection at fixed false accepts).

A run whose classes hold _unknown_ (and _silence_: preprocess.py --unknown, --silence) learns
what is not a word; the rule (predictor.decide) takes the most probable word when its
probability reaches a threshold, whatever _unknown_ scores, and none otherwise: a threshold
above what argmax would give rejects more, one below it accepts words the model half-heard as
unknown. The threshold is the lowest that keeps the OOF false accepts (unknown and silence
clips taken for a word) at or under a target: the most words recognised for that many
strangers let in. inference.py fits it (--false-accepts), writes reject.json and applies it;
export.py puts it in the model, where predict.py applies it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from predictor import OPEN, decide
from util import UsageError


def outcomes(probs: np.ndarray, truth: np.ndarray, classes: list[str], threshold: float):
    """(false accepts: the share of the open rows (truth _unknown_ or _silence_) taken for a
    word, detection: the share of the word rows recognised as their word) at `threshold`."""
    said = np.asarray(decide(probs, classes, threshold))
    open_rows = np.isin(truth, OPEN)
    fa = float(np.mean(~np.isin(said[open_rows], OPEN))) if open_rows.any() else float("nan")
    det = float(np.mean(said[~open_rows] == truth[~open_rows])) if (~open_rows).any() else \
        float("nan")
    return fa, det


def det_curve(probs: np.ndarray, truth: np.ndarray, classes: list[str],
              score: np.ndarray | None = None) -> pd.DataFrame:
    """threshold, false_accepts, detection (and miss = 1 - detection) at every threshold the
    rows make (each row's best word's probability, or its `score` where given: bench.py's
    energy), lowest first: `outcomes` at each, counted at once (a row's best word is accepted
    from its score down)."""
    words = ~np.isin(classes, OPEN)
    scores = np.where(words, probs, -1.0)
    top, p = np.asarray(classes)[scores.argmax(1)], scores.max(1) if score is None else score
    open_rows = np.isin(truth, OPEN)
    let_in = np.sort(p[open_rows])
    right = np.sort(p[~open_rows & (top == truth)])
    t = np.unique(np.concatenate([[min(0.0, p.min(initial=0.0))], p,
                                  [max(1.0, p.max(initial=1.0)) + 1e-9]]))
    fa = (len(let_in) - np.searchsorted(let_in, t)) / max(1, int(open_rows.sum()))
    det = (len(right) - np.searchsorted(right, t)) / max(1, int((~open_rows).sum()))
    return pd.DataFrame({"threshold": t, "false_accepts": fa, "detection": det, "miss": 1 - det})


def fit_threshold(probs: np.ndarray, truth: np.ndarray, classes: list[str],
                  target: float, score: np.ndarray | None = None) -> dict:
    """The lowest threshold whose OOF false accepts are at most `target`, with its false
    accepts and detection on the OOF (of the best word's probability, or of `score`)."""
    curve = det_curve(probs, truth, classes, score)
    ok = curve[curve.false_accepts <= target]
    best = ok.iloc[0] if len(ok) else curve.iloc[-1]
    return dict(score="best word's probability", threshold=float(best.threshold), target=target,
                oof_false_accepts=float(best.false_accepts), oof_detection=float(best.detection),
                open_clips=int(np.isin(truth, OPEN).sum()),
                word_clips=int((~np.isin(truth, OPEN)).sum()))


def detection_at(probs: np.ndarray, truth: np.ndarray, classes: list[str],
                 rates=(0.01, 0.05, 0.10)) -> pd.DataFrame:
    """Each word's detection rate (and all words') at the threshold that lets in at most each
    false-accept rate of the open rows: the table a keyword user reads."""
    return pd.DataFrame([{"false accepts <=": rate, **words_detected(
        probs, truth, classes, fit_threshold(probs, truth, classes, rate)["threshold"])}
        for rate in rates])


def words_detected(probs: np.ndarray, truth: np.ndarray, classes: list[str],
                   threshold: float) -> dict:
    """threshold, and each word's (and all words') share recognised by the rule there."""
    said = np.asarray(decide(probs, classes, threshold))
    row = {"threshold": threshold}
    for word in [c for c in classes if c not in OPEN] + ["all words"]:
        rows = ~np.isin(truth, OPEN) if word == "all words" else truth == word
        row[word] = float(np.mean(said[rows] == truth[rows])) if rows.any() else np.nan
    return row


# ----------------------------------------------------------------------------- per hour
PER_HOUR = (0.5, 2.0, 10.0)  # the false accepts per hour of other speech the report reads at


def word_segments(other: dict, classes: list[str], thresholds) -> np.ndarray:
    """How many word segments predict.py would report at each threshold in recordings read
    window by window (`other`: each window's probs, silent, first (a recording's first window),
    start and end in seconds): each window labelled by the rule (decide; '' where silent), the
    windows below the threshold dropped, and a window that starts before the end of the one
    kept before it, with its label, in the same recording, joins its segment
    (predictor.segments). On recordings that hold none of the words each is a false accept."""
    probs, silent = other["probs"], np.asarray(other["silent"], bool)
    start, end = np.asarray(other["start"]), np.asarray(other["end"])
    rec = np.cumsum(other["first"])
    is_open = np.isin(classes, OPEN)
    word, other_best = (np.where(mask, probs, -1.0) for mask in (~is_open, is_open))
    w, pw, o, po = word.argmax(1), word.max(1), other_best.argmax(1), other_best.max(1)
    out = []
    for t in thresholds:
        took = pw >= t
        label, p = np.where(took, w, o), np.where(took, pw, po)
        k = np.nonzero(~silent & (p >= t))[0]
        joins = np.r_[False, (label[k[1:]] == label[k[:-1]]) & (start[k[1:]] <= end[k[:-1]])
                      & (rec[k[1:]] == rec[k[:-1]])]
        out.append(int((took[k] & ~joins).sum()))
    return np.asarray(out)


def per_hour(probs: np.ndarray, truth: np.ndarray, classes: list[str], other: dict,
             rates=PER_HOUR) -> pd.DataFrame:
    """For each rate: the lowest threshold (on a 0.001 grid) from which the rule accepts at most
    `rate` word segments per hour of the other-speech recordings (`other`: as word_segments
    reads them, and their hours), with each word's (and all words') detection on the rows
    `probs`/`truth` (the OOF) there: detection at fixed false accepts per hour."""
    grid = np.round(np.arange(0, 1001) / 1000, 3)
    count = word_segments(other, classes, grid)
    rate_at = count / other["hours"]
    out = []
    for rate in rates:
        over = np.nonzero(rate_at > rate)[0]  # from the threshold on, never above the rate
        k = over[-1] + 1 if len(over) else 0
        t = float(grid[k]) if k < len(grid) else 1.0 + 1e-9
        out.append({"false accepts per hour <=": rate, "per hour": float(rate_at[k]) if k < len(
            grid) else 0.0, **words_detected(probs, truth, classes, t)})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- which score
def word_energy(logits: np.ndarray, classes: list[str], t: float = 1.0) -> np.ndarray:
    """t * logsumexp(word logits / t): high where some word is strongly heard (the energy
    score of out-of-distribution detection, on the words alone)."""
    return t * logsumexp(logits[:, ~np.isin(classes, OPEN)] / t, axis=1)


def compare_scores(oof: dict, test: dict, classes: list[str], temperature: float,
                   targets=(0.05, 0.10, 0.20)) -> pd.DataFrame:
    """The rule's threshold fitted on `oof` (logits, probs, truth) for each target with each
    score (the best word's probability: the rule used; the word energy at T = 1 and at
    `temperature`), and what it gives on `test`: the false accepts aimed at against those
    got, and the words recognised (bench.py --sections reject)."""
    scores = {"best word's probability": (None, None),
              "word energy (T=1)": (word_energy(oof["logits"], classes),
                                    word_energy(test["logits"], classes)),
              f"word energy (T={temperature:.2f})": (
                  word_energy(oof["logits"], classes, temperature),
                  word_energy(test["logits"], classes, temperature))}
    rows = []
    for name, (s_oof, s_test) in scores.items():
        curve = det_curve(test["probs"], test["truth"], classes, s_test)
        for target in targets:
            rule = fit_threshold(oof["probs"], oof["truth"], classes, target, s_oof)
            at = curve.iloc[min(int(np.searchsorted(curve.threshold, rule["threshold"])),
                                len(curve) - 1)]  # the last row accepts nothing
            rows.append({"score": name, "target": target,
                         "OOF accepted": rule["oof_false_accepts"],
                         "OOF recognised": rule["oof_detection"],
                         "test accepted": float(at.false_accepts),
                         "test recognised": float(at.detection)})
    return pd.DataFrame(rows)


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
