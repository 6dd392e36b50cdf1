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

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from audio import HOP
from predictor import NEVER, OPEN, Detector, Rule, best_word, decide
from runs import REJECT, Run
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
    word, best = best_word(probs, classes)
    top, p = np.asarray(classes)[word], best if score is None else score
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
GRID = np.round(np.arange(0, 1001) / 1000, 3)  # the thresholds a rate per hour is fitted on


def gates(other: dict, classes: list[str], rule: Rule) -> list[tuple]:
    """The recordings of `other` (each window's probs, silent, first (a recording's first
    window) and end in seconds) through the first half of the rule over time (Detector.gate:
    smoothing and patience), a recording at a time: [(word, gate, end)] per recording."""
    probs, silent, end = other["probs"], np.asarray(other["silent"], bool), other["end"]
    bounds = np.r_[np.flatnonzero(other["first"]), len(probs)]
    return [(*Detector(classes, rule).gate(probs[a:b], silent[a:b]), np.asarray(end[a:b]))
            for a, b in zip(bounds[:-1], bounds[1:])]


def detections(gated: list[tuple], classes: list[str], rule: Rule, threshold: float) -> int:
    """How many detections the rule over time makes at `threshold` on recordings `gates` read:
    predict.py's count on each recording read from its start (Detector.fire). On recordings
    that hold none of the words each is a false accept."""
    return sum(len(Detector(classes, replace(rule, threshold=threshold)).fire(*g))
               for g in gated)


def fit_per_hour(gated: list[tuple], hours: float, classes: list[str], rule: Rule,
                 rate: float) -> tuple[float, float]:
    """(the lowest threshold of GRID from which the rule lets in at most `rate` detections per
    hour of the recordings, at every threshold above it too; the rate there): lowest_under the
    count of detections per hour. Above 1 (NEVER): nothing is said at all."""
    return lowest_under(lambda t: detections(gated, classes, rule, t) / hours, rate)


def lowest_under(per_hour_at, rate: float) -> tuple[float, float]:
    """(the lowest threshold of GRID from which `per_hour_at(threshold)` stays at or under
    `rate`, at every threshold above it too; its value there), read from the top down so that
    only the few detections near the rate are ever counted; (NEVER, 0) where even 1.0 is over."""
    got = 0.0
    for k in range(len(GRID) - 1, -1, -1):
        now = per_hour_at(float(GRID[k]))
        if now > rate:
            return (float(GRID[k + 1]), got) if k + 1 < len(GRID) else (NEVER, 0.0)
        got = now
    return 0.0, got


def every(other: dict, step: int) -> dict:
    """`other` (recordings read in windows every HOP s: other_windows) as read every
    `step` * HOP s: each recording's windows that start at a multiple of it, and its last one
    (which ends at its end), as predict.py reads at that hop (its silence judged as at HOP)."""
    if step == 1:
        return other
    start = (np.asarray(other["end"], float) - other["window"]) / (step * HOP)
    keep = np.isclose(start, np.round(start), atol=1e-6)
    first = np.flatnonzero(other["first"])
    keep[np.r_[first[1:], len(keep)] - 1] = True
    return dict(other, **{k: np.asarray(other[k])[keep] for k in ("probs", "silent", "first",
                                                                   "end")})


HOPS = (1, 2)  # the hops the rule over time is chosen from, in steps of HOP: 0.25 and 0.5 s
WINDOWS = (1, 2, 3)  # the smoothing and the patience it is chosen from, in windows


def choose_rule(other: dict, keys: dict, truth: pd.DataFrame, classes: list[str], base: Rule,
                rate: float) -> tuple[Rule, dict, list[dict]]:
    """The rule over time for at most `rate` false accepts per hour, chosen on held-out
    recordings: for each hop of HOPS and each smoothing and patience of WINDOWS, the lowest
    threshold (of GRID) whose false accepts per hour of `other` (speech without the words) and
    `keys` (a recording of the words, `truth`: word, start, end) together stay at or under
    `rate`, and the share of those keywords it detects there. The rule that detects the most
    (on a tie: the longer hop, which reads fewer windows; then the fewer windows to wait for),
    `base`'s refractory time kept; its row; and every candidate's row."""
    rows = []
    hours = other["hours"] + keys["hours"]
    for step in HOPS:
        o, k = every(other, step), every(keys, step)
        for smooth in WINDOWS:
            for patience in WINDOWS:
                rule = replace(base, smooth=smooth, patience=patience, hop=step * HOP)
                gated_o, gated_k = gates(o, classes, rule), gates(k, classes, rule)[0]

                def per_hour_at(t, rule=rule, gated_o=gated_o, gated_k=gated_k):
                    wrong = keyword_outcomes(gated_k, truth, classes, rule, t, k["window"])[1]
                    return (detections(gated_o, classes, rule, t) + wrong) / hours

                t, at = lowest_under(per_hour_at, rate)
                t = min(t, NEVER)
                hit = keyword_outcomes(gated_k, truth, classes, rule, t, k["window"])[0]
                rows.append(dict(hop=rule.hop, smooth=smooth, patience=patience, threshold=t,
                                 per_hour=at, detected=hit / len(truth)))
    best = max(rows, key=lambda r: (r["detected"], r["hop"], -r["smooth"] - r["patience"],
                                    -r["smooth"]))
    return replace(base, **{k: best[k] for k in ("threshold", "smooth", "patience", "hop")}), \
        best, rows


# ----------------------------------------------------------------------------- keywords in a stream
SLACK = 0.5  # seconds after a keyword's end in which its detection still counts (Picovoice's)


def keyword_outcomes(gated: tuple, truth: pd.DataFrame, classes: list[str], rule: Rule,
                     threshold: float, window: float) -> tuple[int, int]:
    """(keywords detected, false accepts) of the rule over time at `threshold` on one stream
    (`gated`: its (word, gate, end) from Detector.gate) whose keywords are `truth` (word,
    start, end in seconds, in order). A detection whose window (`window` seconds ending at it)
    overlaps a keyword's span plus SLACK, for that word, detects it (a second one there is
    neither); any other detection is a false accept."""
    found = Detector(classes, replace(rule, threshold=threshold)).fire(*gated)
    if not found:
        return 0, 0
    t = np.asarray([d[0] for d in found])
    said = np.asarray([d[1] for d in found])
    starts, ends = truth.start.to_numpy(), truth.end.to_numpy()
    i = np.searchsorted(starts, t, side="right") - 1  # the last keyword begun before it
    inside = (i >= 0) & (t - window <= ends[np.maximum(i, 0)] + SLACK)
    right = inside & (said == truth.word.to_numpy()[np.maximum(i, 0)])
    return len(np.unique(i[right])), int((~right).sum())


def keyword_stream(gated: tuple, hours: float, truth: pd.DataFrame, classes: list[str],
                   rule: Rule, window: float, rates=(0.1, 0.5, 2.0),
                   fitted: float | None = None) -> dict:
    """The benchmark's reading of a stream: at each threshold of GRID, the share of keywords
    missed and the false accepts per hour (the DET curve over time), the miss rate at the
    lowest threshold that keeps each of `rates` per hour on this stream, and at the `fitted`
    threshold (chosen on other recordings for a rate) what it lets in here."""
    def at(t):
        hit, fa = keyword_outcomes(gated, truth, classes, rule, t, window)
        return dict(threshold=t, miss=1 - hit / len(truth), false_accepts_per_hour=fa / hours)

    curve = [at(float(t)) for t in GRID[::10]]
    table = []
    for rate in rates:
        t, _ = lowest_under(lambda x: at(x)["false_accepts_per_hour"], rate)
        table.append({"false accepts per hour <=": rate, **at(t)})
    return dict(hours=hours, keywords=len(truth), rule=asdict(rule), window=window, curve=curve,
                table=table, fitted=None if fitted is None else at(fitted))


def per_hour(probs: np.ndarray, truth: np.ndarray, classes: list[str], other: dict, rule: Rule,
             rates=PER_HOUR) -> pd.DataFrame:
    """For each rate: the threshold fit_per_hour gives for the rule over time on the
    other-speech recordings (`other`, and its hours), with each word's (and all words')
    detection on the clips `probs`/`truth` (the OOF) there: detection at fixed false accepts
    per hour."""
    gated = gates(other, classes, rule)
    out = []
    for rate in rates:
        t, got = fit_per_hour(gated, other["hours"], classes, rule, rate)
        out.append({"false accepts per hour <=": rate, "per hour": got,
                    **words_detected(probs, truth, classes, t)})
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- stored
def stored_rule(work: Path, runs: list[str], folds: list[int], tta: bool, weights: np.ndarray,
                temperature: float) -> dict | None:
    """The reject rule inference.py fitted for these runs, folds, views, weights and temperature
    (their reject.json): {threshold, stream: the rule over time fitted per hour, or None};
    None without one. UsageError naming the file: a rule fitted for another ensemble, a
    threshold outside [0, 1] (NaN too), a damaged file. export.py and `inference.py --predict`
    read it so."""
    path = Run.blend(work, runs).dir / REJECT
    if not path.is_file():
        return None
    try:
        rule = json.loads(path.read_text())
        fitted = (rule["runs"], rule["folds"], rule["tta"])
        w = np.asarray(rule["weights"], float)
        same = (w.shape == np.shape(weights) and np.allclose(w, weights)
                and np.isclose(float(rule["temperature"]), temperature))
        threshold = float(rule["threshold"])
        stream = rule.get("stream")
        over_time = None if stream is None else Rule.of(stream)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is damaged ({type(e).__name__}): run inference.py on these "
                         f"runs again to fit it") from None
    problem = (None if 0 <= threshold <= 1 else f"threshold {threshold}: expected a "
               f"probability in [0, 1]") or (over_time and over_time.problem())
    if problem:
        raise UsageError(f"{path}: {problem} - run inference.py on these runs again to fit it")
    if fitted != (runs, folds, tta) or not same:
        raise UsageError(f"{path} was fitted for runs {rule['runs']}, folds {rule['folds']}, TTA "
                         f"{rule['tta']}, weights {rule['weights']}, temperature "
                         f"{rule['temperature']}: export that ensemble, or fit the rule for this "
                         f"one (inference.py with the same -f, -a and weights)")
    return dict(threshold=threshold, stream=over_time)


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
