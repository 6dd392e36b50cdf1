"""Saying "none of these": _unknown_ and _silence_ in the folds and the submission, the reject
rule fitted on the OOF, and the same rejected rows from inference.py, the ONNX graph and
predict.py."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY, refusal, refused, run_script
from predictor import OPEN, Detector, Rule, decide
from reject import (GRID, choose_rule, det_curve, detection_at, detections, every, fit_per_hour,
                    fit_threshold, gates, keyword_outcomes, keyword_stream, outcomes, per_hour)

CLASSES = ["_silence_", "_unknown_", "down", "go", "up"]


def random_probs(n: int, seed: int):
    """Scores of a fair-to-middling model: the true class favoured, unknowns spread thin."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(CLASSES, n, p=[0.1, 0.3, 0.2, 0.2, 0.2])
    logits = rng.normal(0, 1, (n, len(CLASSES)))
    logits[np.arange(n), [CLASSES.index(t) for t in truth]] += rng.uniform(0, 3, n)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, truth


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_the_fitted_threshold_meets_its_false_accepts_and_is_the_lowest(target):
    probs, truth = random_probs(600, 1)
    rule = fit_threshold(probs, truth, CLASSES, target)
    fa, det = outcomes(probs, truth, CLASSES, rule["threshold"])
    assert fa <= target and (fa, det) == (rule["oof_false_accepts"], rule["oof_detection"])
    below = det_curve(probs, truth, CLASSES).threshold  # the next lower score lets in more
    lower = below[below < rule["threshold"]].max()
    assert outcomes(probs, truth, CLASSES, lower)[0] > target
    assert rule["open_clips"] == np.isin(truth, OPEN).sum()


def test_the_det_curve_is_the_rule_at_every_threshold_and_the_table_s_points_are_on_it():
    probs, truth = random_probs(300, 2)
    curve = det_curve(probs, truth, CLASSES)
    for t, fa, det in curve[["threshold", "false_accepts", "detection"]].to_numpy()[::7]:
        assert (fa, det) == pytest.approx(outcomes(probs, truth, CLASSES, t))
    assert curve.false_accepts.is_monotonic_decreasing and curve.detection.iloc[-1] == 0
    table = detection_at(probs, truth, CLASSES)
    for _, row in table.iterrows():
        point = curve[curve.threshold == row.threshold].iloc[0]
        assert point.false_accepts <= row["false accepts <="]
        assert row["all words"] == pytest.approx(point.detection)
        words = truth[~np.isin(truth, OPEN)]  # the words' rates average to all words'
        assert row["all words"] == pytest.approx(sum(
            row[w] * np.mean(words == w) for w in ("down", "go", "up")))


def test_a_perfect_oof_draws_its_det_curve_without_a_warning():
    import warnings

    from results import DET_FLOOR, plot_det

    truth = np.array(["down", "go", "up", "_unknown_", "_silence_"])
    probs = np.eye(5)[[CLASSES.index(t) for t in truth]]
    curve = det_curve(probs, truth, CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "no positive values" was a warning
        fig = plot_det(curve, dict(oof_false_accepts=0.0, oof_detection=1.0, threshold=0.5))
    (x, y), = [line.get_xydata()[0] for line in fig.axes[0].lines if line.get_marker() == "o"]
    assert (x, y) == (DET_FLOOR, DET_FLOOR)
    assert "0 is drawn at" in " ".join(t.get_text() for t in fig.axes[0].texts)


def test_decide_takes_the_best_word_at_its_threshold_else_the_more_probable_other():
    probs = np.array([[0.1, 0.1, 0.6, 0.1, 0.1],   # down, sure
                      [0.05, 0.15, 0.3, 0.25, 0.25],  # down, unsure -> _unknown_
                      [0.4, 0.1, 0.3, 0.1, 0.1],   # _silence_ above _unknown_
                      [0.1, 0.3, 0.2, 0.2, 0.2],   # _unknown_ itself
                      [0.05, 0.5, 0.35, 0.05, 0.05]])  # _unknown_ first, down close behind
    assert decide(probs, CLASSES, 0.5) == ["down", "_unknown_", "_silence_", "_unknown_",
                                           "_unknown_"]
    assert decide(probs, CLASSES, 0.3) == ["down", "down", "down", "_unknown_", "down"]
    assert decide(probs, CLASSES, None) == ["down", "down", "_silence_", "_unknown_",
                                            "_unknown_"]
    words = ["down", "go", "up"]  # a run without the other classes: rejected is _unknown_
    assert decide(probs[:, 2:] / probs[:, 2:].sum(1, keepdims=True), words, 0.5) == [
        "down", "_unknown_", "down", "_unknown_", "down"]


# ----------------------------------------------------------------------------- over time
WORDS = ["_silence_", "_unknown_", "a", "b"]


def score_stream(said) -> np.ndarray:
    """Windows' probabilities from (word, its probability) pairs; the rest is _unknown_."""
    probs = np.zeros((len(said), 4))
    for i, (word, p) in enumerate(said):
        probs[i, WORDS.index(word)] = p
        probs[i, 1] += 1 - p
    return probs


KNOWN = [("a", .9), ("a", .9), ("a", .2), ("a", .9), ("b", .9), ("b", .9), ("a", .1),
         ("a", .8), ("a", .3), ("a", .3)]  # windows every 0.25 s, each ending at 1 s + i/4


@pytest.mark.parametrize("rule, want", [
    (Rule(0.5, refractory=0), [(1.0, "a"), (1.75, "a"), (2.0, "b"), (2.75, "a")]),  # runs once
    (Rule(0.5, refractory=1.0), [(1.0, "a"), (2.0, "b")]),  # 1.75 and 2.75 too soon after
    (Rule(0.5, patience=2, refractory=0), [(1.25, "a"), (2.25, "b")]),  # two in a row
    (Rule(0.5, smooth=2, refractory=0), [(1.0, "a"), (2.25, "b"), (3.0, "a")]),  # means of 2
    (Rule(0.55, smooth=3, refractory=0), [(1.0, "a"), (2.25, "b")]),  # of 3: .8 and .3 stay low
    (Rule(0.95, refractory=0), []),
])
def test_the_rule_over_time_counts_a_known_score_stream(rule, want):
    """Smoothing, patience and the refractory time on a stream whose detections are worked
    out by hand: the bundle's Detector fed in blocks, and inference.py's per-hour count
    (reject.detections) over the whole recording, say the same."""
    probs, ends = score_stream(KNOWN), 1.0 + np.arange(len(KNOWN)) / 4
    silent = np.zeros(len(KNOWN), bool)
    detector, got = Detector(WORDS, rule), []
    for a, b in [(0, 1), (1, 3), (3, 3), (3, len(KNOWN))]:
        got += detector.feed(probs[a:b], silent[a:b], ends[a:b])
    assert [(t, w) for t, w, _ in got] == want
    other = dict(probs=probs, silent=silent, first=np.arange(len(KNOWN)) == 0, end=ends)
    assert detections(gates(other, WORDS, rule), WORDS, rule, rule.threshold) == len(want)


def test_a_silent_window_holds_no_word_and_a_stream_gives_what_the_whole_gives():
    probs, ends = score_stream(KNOWN), 1.0 + np.arange(len(KNOWN)) / 4
    silent = np.zeros(len(KNOWN), bool)
    silent[1] = True  # the second window of the first "a" run is quiet
    got = Detector(WORDS, Rule(0.5, patience=2, refractory=0)).feed(probs, silent, ends)
    assert [(t, w) for t, w, _ in got] == [(2.25, "b")]
    rng = np.random.default_rng(3)
    classes = ["_silence_", "_unknown_", "a", "b", "c"]
    for _ in range(60):  # blocks of any size give what the whole recording gives at once
        n = int(rng.integers(1, 60))
        probs, silent = rng.dirichlet(np.full(5, 0.3), n), rng.random(n) < 0.1
        ends = 1 + np.arange(n) / 4
        rule = Rule(float(rng.uniform(0.2, 0.9)), int(rng.integers(1, 5)),
                    int(rng.integers(1, 4)), float(rng.choice([0, 0.5, 2])))
        whole = Detector(classes, rule).feed(probs, silent, ends)
        cuts = [0, *np.sort(rng.integers(0, n + 1, 3)), n]
        detector = Detector(classes, rule)
        parts = [d for a, b in zip(cuts[:-1], cuts[1:])
                 for d in detector.feed(probs[a:b], silent[a:b], ends[a:b])]
        assert parts == whole


def test_the_per_hour_fit_meets_its_rate_on_what_it_was_fitted_on():
    probs, truth = random_probs(500, 5)
    other, _ = random_probs(2000, 6)
    first = np.zeros(2000, bool)
    first[[0, 1000]] = True  # two recordings
    ends = np.arange(2000) % 1000 * 0.25 + 1
    got = dict(probs=other, silent=np.zeros(2000, bool), first=first, end=ends, hours=0.5)
    rule = Rule(0.5, smooth=2, patience=1, refractory=0.5)
    gated = gates(got, CLASSES, rule)
    count = np.asarray([detections(gated, CLASSES, rule, t) for t in GRID]) / 0.5
    table = per_hour(probs, truth, CLASSES, got, rule, rates=(10.0, 100.0, 1000.0))
    for row in table.itertuples(index=False):
        rate, t = row[0], row.threshold
        assert row[1] <= rate and row[1] == pytest.approx(count[np.isclose(GRID, t)][0])
        assert (count[GRID >= t - 1e-9] <= rate).all()  # never above it from there on
        assert t == 0 or count[np.isclose(GRID, t - 0.001)][0] > rate  # the lowest such
        assert row[-1] == pytest.approx(outcomes(probs, truth, CLASSES, t)[1])
    assert table.threshold.is_monotonic_decreasing and table.threshold.iloc[-1] < \
        table.threshold.iloc[0]
    # each recording is read from its own start: the pair counts what each counts alone
    at = replace(rule, threshold=0.6)
    alone = [len(Detector(CLASSES, at).feed(other[a:b], np.zeros(1000, bool), ends[a:b]))
             for a, b in ((0, 1000), (1000, 2000))]
    assert detections(gated, CLASSES, rule, 0.6) == sum(alone) and min(alone) > 0
    assert fit_per_hour(gated, 0.5, CLASSES, rule, 0.0)[0] > 0.5  # none per hour: nearly mute


def held_out(said, hours=None) -> dict:
    """One recording's windows (every 0.25 s, 1 s long, the first ending at 1 s) as
    other_windows reads them, from (word, probability) pairs."""
    ends = 1.0 + np.arange(len(said)) / 4
    return dict(probs=score_stream(said), silent=np.zeros(len(said), bool),
                first=np.arange(len(said)) == 0, end=ends, window=1.0,
                hours=hours or float(ends[-1]) / 3600)


def test_the_rule_over_time_is_chosen_where_it_hears_the_most_keywords_at_the_rate():
    """choose_rule on held-out recordings made by hand: other speech whose word spikes last
    one window (b at 0.95, every 10 s), keywords that last three windows (at 0.8). Read
    window by window, no threshold below the spikes keeps 1 false accept per hour, so every
    keyword is lost; two windows in a row (or averaged) keep the spikes out and hear them all,
    at 0.25 s, where 0.5 s windows catch a keyword begun at an odd window only once."""
    other = held_out([("b", .95) if i % 40 == 20 else ("a", .05) for i in range(4000)])
    said, spans = [("a", .05)] * 4, []
    for j in range(20):  # a keyword every 13 windows: it begins at even and odd windows
        first = len(said)
        said += [("ab"[j % 2], .8)] * 3 + [("a", .05)] * 10
        at = 1.0 + first / 4  # the end of its first window
        spans.append(dict(word="ab"[j % 2], start=at - 0.6, end=at - 0.3))
    keys, truth = held_out(said), pd.DataFrame(spans)
    chosen, row, table = choose_rule(other, keys, truth, WORDS, Rule(0.5, refractory=0), 1.0)
    rows = pd.DataFrame(table).set_index(["hop", "smooth", "patience"])
    assert len(rows) == 18 and (rows.per_hour <= 1.0).all()
    assert rows.loc[(0.25, 1, 1)].detected == 0 and rows.loc[(0.25, 1, 1)].threshold > 0.95
    assert rows.loc[(0.25, 1, 2)].detected == rows.loc[(0.25, 2, 1)].detected == 1.0
    assert rows.xs(0.5).detected.max() == 0.5
    # the most detected; among those the fewest windows, then the least smoothing
    assert (chosen.hop, chosen.smooth, chosen.patience, chosen.refractory) == (0.25, 1, 2, 0)
    t = chosen.threshold
    assert t == rows.loc[(0.25, 1, 2)].threshold == row["threshold"] and row["detected"] == 1.0

    def per_hour_at(x):  # what the fit counts: both recordings' false accepts over their hours
        wrong = keyword_outcomes(gates(keys, WORDS, chosen)[0], truth, WORDS, chosen, x, 1.0)[1]
        return (detections(gates(other, WORDS, chosen), WORDS, chosen, x) + wrong) / (
            other["hours"] + keys["hours"])

    assert per_hour_at(t) <= 1.0 < per_hour_at(t - 0.001)  # the lowest that keeps the rate
    # a hop of 0.5 s: the windows predict.py reads at 0.5 s, the last one ending at the end
    from audio import window_starts

    half = every(held_out([("a", .05)] * 11), 2)
    starts = window_starts(int(3.5 * 16000), 16000, 8000)  # 11 windows at 0.25 s: 3.5 s
    assert list(half["end"]) == [s / 16000 + 1 for s in starts] == [1, 1.5, 2, 2.5, 3, 3.5]
    assert list(every(held_out([("a", .05)] * 10), 2)["end"]) == [1, 1.5, 2, 2.5, 3, 3.25]


def test_a_keyword_is_detected_inside_its_span_and_anything_else_is_a_false_accept():
    probs, ends = score_stream(KNOWN), 1.0 + np.arange(len(KNOWN)) / 4
    other = dict(probs=probs, silent=np.zeros(len(KNOWN), bool),
                 first=np.arange(len(KNOWN)) == 0, end=ends)
    truth = pd.DataFrame(dict(word=["a", "b"], start=[0.3, 1.6], end=[0.7, 1.9]))
    rule = Rule(0.5, refractory=0)  # detections: a at 1.0, a at 1.75, b at 2.0, a at 2.75
    gated = gates(other, WORDS, rule)[0]
    assert keyword_outcomes(gated, truth, WORDS, rule, 0.5, 1.0) == (2, 2)  # a at 1.75: b's
    early = truth.assign(start=[0.1, 1.6], end=[0.2, 1.9])  # a said well before 1.0 s
    assert keyword_outcomes(gated, early, WORDS, rule, 0.5, 1.0) == (2, 2)  # its window holds it
    assert keyword_outcomes(gated, early, WORDS, rule, 0.5, 0.2) == (1, 3)  # a shorter one not
    bench = keyword_stream(gated, 0.5, truth, WORDS, rule, 1.0, rates=(1.0, 3.0), fitted=0.95)
    assert bench["fitted"] == dict(threshold=0.95, miss=1.0, false_accepts_per_hour=0.0)
    for row in bench["table"]:  # the lowest threshold that keeps the rate, read there
        hit, fa = keyword_outcomes(gated, truth, WORDS, rule, row["threshold"], 1.0)
        assert (row["miss"], row["false_accepts_per_hour"]) == (1 - hit / 2, fa / 0.5)
        assert fa / 0.5 <= row["false accepts per hour <="]
        lower = keyword_outcomes(gated, truth, WORDS, rule, row["threshold"] - 0.001, 1.0)[1]
        assert row["threshold"] == 0 or lower / 0.5 > row["false accepts per hour <="]
    assert [r["false_accepts_per_hour"] for r in bench["table"]] == [0.0, 2.0]


def test_rules_out_of_range_are_named():
    assert "[0, 1]" in Rule(1.5).problem() and "[0, 1]" in Rule(float("nan")).problem()
    assert "--smooth 0" in Rule(0.5, smooth=0).problem()
    assert "--patience -1" in Rule(0.5, patience=-1).problem()
    assert "--refractory -1" in Rule(0.5, refractory=-1.0).problem()
    assert Rule(0.5, 3, 2, 0.0).problem() is None


# ----------------------------------------------------------------------------- preprocess
def labels_of(data) -> list[str]:
    return sorted(p.name for p in (data / "train").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def open_work(demo_data, tmp_path_factory) -> dict:
    """The demo data with 4 of its words as _unknown_ and 24 _silence_ clips, 2 folds."""
    words = labels_of(demo_data)
    work = tmp_path_factory.mktemp("open")
    run_script("preprocess.py", "--data", demo_data, "--work", work, "--n-folds", 2,
               "--unknown", ",".join(words[-4:]), "--silence", 24)
    return dict(work=work, data=demo_data, words=words[:-4], unknown=words[-4:])


def test_unknown_and_silence_rows_are_in_every_fold(open_work):
    from util import read_table

    work = open_work["work"]
    train = read_table(work / "train.csv")
    assert json.loads((work / "classes.json").read_text()) == sorted(
        open_work["words"] + list(OPEN))
    unknown = train[train.label == "_unknown_"]
    assert set(unknown.word) == set(open_work["unknown"])  # each row's word kept
    said = train.label.isin(open_work["words"])
    assert (train.word[said] == train.label[said]).all()
    silence = train[train.label == "_silence_"]
    assert len(silence) == 24 and silence.group.nunique() == 24
    assert not silence.group.isin(train[train.label != "_silence_"].group).any()
    for k in (0, 1):
        fold = train[train.fold == k]
        assert {"_unknown_", "_silence_"} <= set(fold.label)
    # the words' rows keep their speakers as groups (not one "nan" group)
    assert train[train.label.isin(open_work["words"])].group.nunique() > 2
    import soundfile as sf
    quiet = [np.abs(sf.read(p)[0]).max() for p in silence.path]
    assert max(quiet) < 1 and len(set(np.round(quiet, 4))) > 12  # cut at random gains


def test_preprocess_refuses_bad_unknown_and_silence(demo_data, tmp_path):
    words = labels_of(demo_data)
    work = tmp_path / "w"
    assert "no training clips labelled nosuchword" in refused(
        "preprocess.py", "--data", demo_data, "--work", work, "--unknown", "up,nosuchword")
    assert "every label would be unknown" in refused(
        "preprocess.py", "--data", demo_data, "--work", work, "--unknown", ",".join(words))
    (tmp_path / "empty").mkdir()
    assert "a folder without audio files" in refused(
        "preprocess.py", "--data", demo_data, "--work", work, "--unknown", tmp_path / "empty")
    assert "expected a number of clips" in refused(
        "preprocess.py", "--data", demo_data, "--work", work, "--silence", -3)
    n = sum(1 for _ in (demo_data / "train").glob("*/*.wav")) - sum(  # the noise is no clip
        1 for _ in (demo_data / "train" / "_background_noise_").glob("*.wav"))
    assert refusal("preprocess.py", "--data", demo_data, "--work", work, "--silence",
                   1000000).startswith(f"preprocess: --silence 1000000: at most {n}, as many as")
    assert not (work / "silence").exists()
    quiet = tmp_path / "no_noise"
    shutil.copytree(demo_data / "train", quiet / "train",
                    ignore=lambda d, names: names[4:] if d != str(demo_data / "train") else [])
    assert "no background noise to cut it from" in refused(
        "preprocess.py", "--data", quiet, "--work", work, "--silence", 5)
    assert not work.exists() or not (work / "prep.json").exists()


def test_a_folder_of_other_speech_joins_as_unknown_and_a_long_one_is_read_as_many_windows(
        demo_data, tmp_path):
    """--unknown DIR: each file an _unknown_ row; a recording longer than the window is read
    as many windows an epoch as it holds, each at a fresh random start."""
    import soundfile as sf
    import torch

    from arg import Config
    from dataset import FoldData
    from util import read_table

    other = tmp_path / "other"
    other.mkdir()
    clips = sorted((demo_data / "train" / labels_of(demo_data)[0]).glob("*"))[:6]
    for i, p in enumerate(clips):
        shutil.copy(p, other / f"x{i}.wav")
    talk = np.concatenate([sf.read(p, dtype="int16")[0] for p in clips] * 2)[:int(5.3 * 16000)]
    (other / "long").mkdir()
    sf.write(other / "long" / "talk.wav", talk, 16000, subtype="PCM_16")
    cut = (other / "x0.wav").read_bytes()  # a write cut short: its header promises more
    (other / "cut.wav").write_bytes(cut[:44 + 256])
    work = tmp_path / "w"
    last = labels_of(demo_data)[-1]  # a label and a folder in one --unknown
    run_script("preprocess.py", "--data", demo_data, "--work", work, "--n-folds", 2,
               "--unknown", f"{last},{other}")
    train = read_table(work / "train.csv")
    from_folder = train.path.str.startswith(str(other))
    assert from_folder.sum() == 7 and (train.label[from_folder] == "_unknown_").all()
    assert train[from_folder].group.nunique() == 7
    assert (train.label[train.word == last] == "_unknown_").all() and (train.word == last).any()
    rejected = read_table(work / "rejected.csv").set_index("path")
    assert rejected.loc[str(other / "cut.wav")].iloc[0].startswith("cut short (its header "
                                                                    "promises")
    long_row = int(train.row[train.path.str.endswith("talk.wav")].iloc[0])
    fold = 1 - int(train.fold[train.row == long_row].iloc[0])  # a fold that trains on it
    data = FoldData(Config(work=str(work), batch_size=8), fold)
    ds = data.train_ds
    at = np.flatnonzero(ds.rows == long_row)
    assert len(at) == 6  # 5.3 s in 1-s windows: 6 windows an epoch
    assert (np.bincount(ds.rows)[np.setdiff1d(ds.rows, long_row)] == 1).all()  # others once
    starts = []
    for epoch in range(2):
        torch.manual_seed(epoch)
        waves = ds.__getitems__(list(at))[0].numpy()
        for w in waves:  # each window is a piece of the recording, at its own start
            hit = [s for s in range(0, len(talk) - 16000 + 1) if w[0] == talk[s]
                   and np.array_equal(w[:64], talk[s:s + 64])]
            assert any(np.array_equal(w, talk[s:s + 16000]) for s in hit)
            starts.append(next(s for s in hit if np.array_equal(w, talk[s:s + 16000])))
    assert len(set(starts)) >= 10  # fresh offsets, not fixed clips


def burst_clips(n: int) -> np.ndarray:
    """n 1-s clips of zeros, each with a word-like tone burst at samples 4000-12000."""
    waves = np.zeros((n, 16000), np.int16)
    waves[:, 4000:12000] = (8000 * np.sin(np.arange(8000) / 5)).astype(np.int16) | 1
    return waves


def test_a_word_cut_beyond_the_share_is_learnt_as_unknown():
    """--p-cut: a word moved so that a uniform share of it lies beyond one edge of the window;
    cut by more than --cut-share, its row is _unknown_; open rows are never cut."""
    import torch

    from dataset import WaveDataset

    classes = ["_silence_", "_unknown_", "down", "go"]
    n = 400
    targets = np.r_[np.full(n - 40, 2), np.full(20, 1), np.full(20, 0)]
    ds = WaveDataset(None, rows=np.arange(n), targets=targets, length=16000)
    ds.cut_words(0.5, 0.25, classes)
    torch.manual_seed(0)
    waves, got = ds.cut(burst_clips(n), targets, ds.words)
    kept = (waves != 0).sum(1)
    share = 1 - kept / 8000  # how much of the word fell outside
    moved = kept != 8000
    assert 0.35 < moved[:n - 40].mean() < 0.65 and not moved[n - 40:].any()
    assert (got[n - 40:] == targets[n - 40:]).all()
    for w, k in zip(waves[moved], kept[moved]):  # the kept part sits at one edge, whole
        lit = np.flatnonzero(w)
        assert (lit[0] == 0 or lit[-1] == 15999) and lit[-1] - lit[0] + 1 == k
    assert {0, 15999} <= {int(np.flatnonzero(w)[0]) for w in waves[moved]} | {
        int(np.flatnonzero(w)[-1]) for w in waves[moved]}
    clear = np.abs(share - 0.25) > 1e-3
    assert (got[moved & clear & (share > 0.25)] == 1).all()
    assert (got[moved & clear & (share <= 0.25)] == 2).all()
    assert (got[~moved] == targets[~moved]).all()
    assert (share[moved] > 0.25).sum() > 50 and (share[moved] <= 0.25).sum() > 10
    from util import UsageError

    with pytest.raises(UsageError, match="the classes hold none"):  # no class for a cut word
        WaveDataset(None, rows=np.arange(3), targets=np.zeros(3, int), length=16000
                    ).cut_words(0.5, 0.25, ["down", "go"])


def test_cut_words_reach_the_fold_s_batches_and_bad_cuts_are_refused(open_work):
    import torch

    from arg import Config
    from dataset import FoldData

    work = open_work["work"]
    classes = json.loads((work / "classes.json").read_text())
    plain = FoldData(Config(work=str(work), batch_size=8), 0).train_ds
    cut = FoldData(Config(work=str(work), batch_size=8, p_cut=1.0, cut_share=0.0), 0).train_ds
    everything = list(range(len(cut)))
    torch.manual_seed(0)
    _, y_plain, _ = plain.__getitems__(everything)
    torch.manual_seed(0)
    _, y_cut, _ = cut.__getitems__(everything)
    unknown, silence = classes.index("_unknown_"), classes.index("_silence_")
    assert (y_cut[y_plain == silence] == silence).all()
    assert (y_cut[y_plain != silence] == unknown).all()  # every word cut, and beyond 0
    for argv, said in ((["--p-cut", 1.5], "--p-cut 1.5: a share"),
                       (["--cut-share", 1], "--cut-share 1.0: a share")):
        assert said in refused("train.py", "--work", work, *TINY, "-f", 0, "-g", "cpu", *argv)


def test_demo_writes_other_speech_without_the_keywords_through_channels(tmp_path):
    import soundfile as sf

    words = tmp_path / "words.txt"
    words.write_text("\n".join(["zero", "zeros", "one", "hero", "banana", "cat", "table",
                                 "window", "garden"]) + "\n")
    out = tmp_path / "d"
    run_script("demo.py", "--out", out, "--words", "zero,one", "--speakers", 2,
               "--talk-minutes", 3, "--word-list", words)
    table = pd.read_csv(out / "other_speech.csv")
    assert len(table) == 3 and set(table.channel) <= {"clean", "phone", "gsm", "ulaw", "mp3",
                                                       "vorbis"}
    said = {w for line in table.words for w in line.split()}
    assert said and said <= {"hero", "banana", "cat", "table", "window", "garden"}
    for name in table.file:  # a minute each, at 16 kHz, not silent
        wave, sr = sf.read(out / "other_speech" / name)
        assert sr == 16000 and len(wave) == 60 * 16000 and np.abs(wave).max() > 0.001
    assert "--talk-minutes -2: expected 0 or more" in refused(
        "demo.py", "--out", tmp_path / "x", "--words", "zero", "--speakers", 2,
        "--talk-minutes", -2)


def test_near_miss_words_sound_like_the_keyword_and_never_are_it():
    from synth import near_misses

    words = ["hero", "zero", "zeros", "won", "bun", "xerox", "banana", "cat", "arrow", "one",
             "gun", "sheila"]
    table = near_misses(["zero", "one"], words, 2)
    got = {k: list(g.near_miss) for k, g in table.groupby("keyword")}
    assert got["zero"][0] == "hero" and got["one"][:2] == ["bun", "gun"]
    assert set(table.near_miss).isdisjoint({"zero", "one", "won", "zeros"})  # nor a homophone,
    assert table.distance.is_monotonic_increasing or all(  # nor one holding the keyword
        g.distance.is_monotonic_increasing for _, g in table.groupby("keyword"))
    assert (table.distance > 0).all()


def test_demo_says_near_misses_and_the_keyword_s_halves(tmp_path):
    import soundfile as sf

    words = tmp_path / "words.txt"
    words.write_text("hero\nbun\ngun\nnone\nbanana\nzeros\nWon\n")
    out = tmp_path / "d"
    run_script("demo.py", "--out", out, "--words", "zero,one", "--speakers", 3, "--near-miss", 2,
               "--word-list", words)
    table = pd.read_csv(out / "near_miss.csv")
    assert {k: list(g.near_miss) for k, g in table.groupby("keyword")} == {
        "zero": ["hero", "banana"], "one": ["bun", "gun"]}  # nearest first; Won is a name
    meta = pd.read_csv(out / "meta.csv").set_index("path")
    trainers = {p.stem.split("_")[0] for p in (out / "train" / "zero").glob("*.wav")}
    assert len(trainers) == 2
    for keyword, group in table.groupby("keyword"):
        folder = out / "near_miss" / keyword
        for word in group.near_miss:
            assert {p.stem.split("_")[-1] for p in folder.glob(f"{word}_*.wav")} == trainers
        for speaker in trainers:  # each half: the keyword's clip with the other half muted
            clip = f"train/{keyword}/{speaker}_nohash_0.wav"
            whole = sf.read(out / clip, dtype="int16")[0]
            lo, hi = (int(meta.loc[clip, c] * 16000) for c in ("word_start", "word_end"))
            mid = (lo + hi) // 2
            for half, muted in (("first_half", slice(mid, hi)), ("last_half", slice(lo, mid))):
                piece = sf.read(folder / f"{half}_{speaker}.wav", dtype="int16")[0]
                want = whole.copy()
                want[muted] = 0
                assert np.array_equal(piece, want) and np.abs(whole[muted]).max() > 0
    for argv, said in ((["--near-miss", -1], "--near-miss -1: expected 0 or more"),
                       (["--near-miss", 2, "--word-list", tmp_path / "none.txt"], "no such file"),
                       (["--near-miss", 9, "--word-list", words], "holds fewer words near"),
                       (["--near-miss", 2, "--preset", "soundscape"], "says no keywords")):
        assert said in refused("demo.py", "--out", tmp_path / "x", "--words", "zero,one",
                               "--speakers", 2, *argv)


# ----------------------------------------------------------------------------- train -> export
@pytest.fixture(scope="module")
def open_run(open_work, tmp_path_factory) -> dict:
    """The open set trained (2 folds), and inference with a recording of other speech (the
    unknown words' clips one after another) and a damaged file beside it."""
    import soundfile as sf

    work, data = open_work["work"], open_work["data"]
    talk = tmp_path_factory.mktemp("other") / "talk.wav"
    clips = [sf.read(p, dtype="float32")[0] for w in open_work["unknown"]
             for p in sorted((data / "train" / w).glob("*.wav"))[:8]]
    sf.write(talk, np.concatenate([np.r_[c, np.zeros(4800, np.float32)] for c in clips]), 16000)
    (talk.parent / "broken.wav").write_bytes(b"RIFF\x00\x01not a wave")
    # a stream of keywords (the words' test clips) each after an unknown word and quiet
    sol = pd.read_csv(data / "solution.csv")
    keys = sol[sol.label.isin(open_work["words"])].head(12)
    parts, rows = [], []
    for i, k in enumerate(keys.itertuples()):
        parts += [clips[i], np.zeros(8000, np.float32)]
        at = sum(map(len, parts))
        y = sf.read(data / "test" / k.file_name, dtype="float32")[0]
        rows.append(dict(word=k.label, start=at / 16000, end=(at + len(y)) / 16000))
        parts += [y, np.zeros(8000, np.float32)]
    keyword = talk.parent / "keywords.wav"
    sf.write(keyword, np.concatenate(parts), 16000)
    pd.DataFrame(rows).to_csv(keyword.with_suffix(".csv"), index=False)
    run_script("train.py", "--work", work, *TINY, "-e", 2, "-f", "all", "-g", "cpu,cpu",
               "--unknown-share", 0.1)
    run_script("inference.py", "--work", work, "-m", "resnet18", "-t", 32, "-f", 2, "-a", "n",
               "--false-accepts", 0.2, "--solution", data / "solution.csv",
               "--other-speech", talk, talk.parent / "broken.wav", "--refractory", 0.5,
               "--false-accepts-per-hour", 30, "--keyword-stream", keyword,
               "--mine", talk.parent / "mined")
    return dict(open_work, run=work / "runs" / "resnet18_32", talk=talk, keyword=keyword,
                mined=talk.parent / "mined")


def test_inference_fits_the_rule_on_the_oof_and_applies_it(open_run):
    run, classes = open_run["run"], json.loads((open_run["work"] / "classes.json").read_text())
    rule = json.loads((run / "reject.json").read_text())
    oof = pd.concat([pd.read_csv(p, keep_default_na=False) for p in sorted(run.glob("*/oof.csv"))])
    fa, det = outcomes(oof[classes].to_numpy(), oof.label.to_numpy(), classes, rule["threshold"])
    assert fa <= 0.2 and fa == pytest.approx(rule["oof_false_accepts"])
    assert det == pytest.approx(rule["oof_detection"])
    probs = pd.read_csv(run / "test_probs.csv")
    sub = pd.read_csv(run / "submission.csv")
    said = decide(probs[classes].to_numpy(), classes, rule["threshold"])
    assert list(sub.label) == said
    top = np.asarray(classes)[probs[classes].to_numpy().argmax(1)]
    assert (sub.label != top).any()  # some words were rejected
    score = json.loads((run / "test_score.json").read_text())
    sol = pd.read_csv(open_run["data"] / "solution.csv").set_index("file_name").label
    truth = np.where(sub.file_name.map(sol).isin(classes), sub.file_name.map(sol), "_unknown_")
    others = np.isin(truth, OPEN)
    assert score["accepted_unknown"] == pytest.approx(np.mean(~np.isin(sub.label[others], OPEN)))
    assert score["recognised"] == pytest.approx(np.mean(sub.label[~others] == truth[~others]))
    html = (run / "report.html").read_text()
    assert "Saying none of these" in html and f"{rule['threshold']:.4f}" in html
    # the recording of other speech: read in 1 s windows every 0.25 s, the damaged file listed
    import soundfile as sf

    from audio import window_starts

    other, n = rule["other_speech"], sf.info(open_run["talk"]).frames
    assert other["files"] == [str(open_run["talk"])] and other["hop"] == 0.25
    assert list(other["skipped"]) == [str(open_run["talk"].parent / "broken.wav")]
    assert "not audio" in other["skipped"][str(open_run["talk"].parent / "broken.wav")]
    assert other["hours"] == pytest.approx(n / 16000 / 3600)
    assert other["windows"] == len(window_starts(n, 16000, 4000))
    assert other["per_hour"] == pytest.approx(other["detections"] / other["hours"])
    assert other["rule"] == dict(threshold=rule["threshold"], smooth=1, patience=1,
                                 refractory=0.5, hop=0.25)
    for row in other["table"]:
        assert row["per hour"] <= row["false accepts per hour <="]
    stream = rule["stream"]  # fitted per hour: at most its rate on the recording it was fitted on
    assert stream["target_per_hour"] == 30 and stream["fitted_per_hour"] <= 30
    assert (stream["smooth"], stream["patience"], stream["refractory"]) == (1, 1, 0.5)
    assert "Stream rule" in html and f"{stream['threshold']:.3f}" in html
    # the keywords inside a stream: read at the stream rule's smoothing, patience and refractory
    bench = rule["keyword_stream"]
    assert bench["keywords"] == 12 and bench["file"] == str(open_run["keyword"])
    assert bench["hours"] == pytest.approx(sf.info(open_run["keyword"]).duration / 3600)
    assert bench["rule"] == {k: stream[k] for k in ("threshold", "smooth", "patience",
                                                    "refractory", "hop")}
    assert bench["fitted"]["threshold"] == stream["threshold"]
    curve = pd.DataFrame(bench["curve"])
    assert curve.miss.iloc[-1] == 1 and curve.miss.iloc[0] < 1  # 1.0 hears nothing, 0 some
    for row in bench["table"]:
        assert row["false_accepts_per_hour"] <= row["false accepts per hour <="]
    assert "Keywords in a stream" in html and "DET curve over time" in html
    assert "Per hour of other speech" in html and f"{other['per_hour']:.1f} per hour" in html


def test_the_rule_s_windows_are_chosen_on_held_out_keywords_and_the_stream_reads_them(
        open_run, tmp_path):
    """inference.py --fit-keywords: the stream rule's smoothing, patience and hop are the
    candidate that hears most of the held-out recording's words at the rate per hour, and the
    keyword stream is read at that hop; report.html's section shows every candidate."""
    work = open_run["work"]
    run_script("inference.py", "--work", work, "--run", "resnet18_32", "-f", 2, "-a", "n",
               "-g", -1, "--other-speech", open_run["talk"], "--false-accepts-per-hour", 30,
               "--fit-keywords", open_run["keyword"], "--keyword-stream", open_run["keyword"],
               "--refractory", 0.5, "--out", tmp_path)
    rule = json.loads((tmp_path / "reject.json").read_text())
    stream, fit = rule["stream"], rule["stream"]["fit_keywords"]
    table = pd.DataFrame(fit["candidates"])
    assert len(table) == 18 and set(table.hop) == {0.25, 0.5} and fit["keywords"] == 12
    # the most detected; then the longer hop, the fewest windows, the least smoothing
    best = table.assign(n=table.smooth + table.patience).sort_values(
        ["detected", "hop", "n", "smooth"], ascending=[False, False, True, True]).iloc[0]
    assert fit["detected"] == table.detected.max() == best.detected
    assert (stream["hop"], stream["smooth"], stream["patience"]) == (
        best.hop, best.smooth, best.patience) and stream["refractory"] == 0.5
    row = table.set_index(["hop", "smooth", "patience"]).loc[
        (stream["hop"], stream["smooth"], stream["patience"])]
    assert row.threshold == stream["threshold"] and row.per_hour == stream["fitted_per_hour"]
    assert (table.per_hour <= 30).all() and stream["fitted_per_hour"] <= 30
    bench = rule["keyword_stream"]
    assert bench["rule"] == {k: stream[k] for k in ("threshold", "smooth", "patience",
                                                    "refractory", "hop")}
    from results import html_per_hour  # report.html's section on it

    html = html_per_hour(rule)
    assert "Chosen on keywords.wav" in html and f"windows every {stream['hop']:g} s" in html
    assert html.count("<tr>") >= 18 + 3  # every candidate, and the per-hour table


def test_the_graph_and_predict_reject_the_rows_inference_rejected(open_run, tmp_path):
    import onnxruntime as ort

    work, run = open_run["work"], open_run["run"]
    out = tmp_path / "m.onnx"
    run_script("export.py", "--work", work, "--run", "resnet18_32", "-f", 2, "-a", "n",
               "--out", out)
    sub = pd.read_csv(run / "submission.csv")
    test = pd.read_csv(work / "test.csv")
    files = [str(open_run["data"] / "test" / f) for f in sub.file_name]
    assert list(test.file_name) == list(sub.file_name)
    from predictor import Predictor, file_windows

    pred = Predictor(out)
    classes = pred.classes
    assert pred.threshold == pytest.approx(json.loads((run / "reject.json").read_text())[
        "threshold"])
    _, waves, _ = file_windows(files, pred.sr, pred.length)
    got, said = ort.InferenceSession(str(out)).run(["probs", "said"],
                                                   {"wave": waves.astype(np.float32)})
    graph = [classes[i] if i >= 0 else "_unknown_" for i in said]
    assert graph == decide(got, classes, pred.threshold)  # the graph's rule is decide, every row
    agree = np.mean(np.asarray(graph) == sub.label.to_numpy())
    assert agree >= 0.98, agree  # float32 graph vs inference's probabilities at the edge
    # the recording of other speech: predict.py lets in the detections inference.py counted,
    # at the clip rule's threshold and, by default, at the stream rule fitted per hour
    said = json.loads((run / "reject.json").read_text())
    for flags, want in ((["--min-prob", said["threshold"], "--refractory", 0.5],
                         said["other_speech"]["detections"]),
                        ([], said["stream"]["fitted_per_hour"] * said["other_speech"]["hours"])):
        proc = run_script("predict.py", out, open_run["talk"], "--hop", 0.25, *flags)
        heard = int(proc.stdout.strip().splitlines()[-1].split("predict: ")[1].split()[0])
        assert abs(heard - want) <= 1  # float32 graph vs torch at the threshold's edge
        assert heard == sum(bool(re.fullmatch(r".*talk\.wav: \S+ at [\d.]+ s \([\d.]+\)", line))
                            for line in proc.stdout.splitlines())
    import onnx

    proto = onnx.load(str(out))
    for prop in proto.metadata_props:
        if prop.key == "reject_threshold":
            prop.value = "7"
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    assert "its reject rule is out of range (threshold 7.0" in refusal(
        "predict.py", tmp_path / "bad.onnx", files[0])
    proto = onnx.load(str(out))  # a rule fitted at a hop of 0.5 s: predict.py reads at it
    for prop in proto.metadata_props:
        if prop.key == "stream_rule":
            prop.value = json.dumps(dict(json.loads(prop.value), hop=0.5))
    onnx.save(proto, str(tmp_path / "half.onnx"))
    for model, hop in ((out, 0.25), (tmp_path / "half.onnx", 0.5)):
        run_script("predict.py", model, open_run["talk"], "--window", 1,
                   "--csv", tmp_path / "w.csv")
        ends = pd.read_csv(tmp_path / "w.csv").end.to_numpy()
        assert np.allclose(np.diff(ends)[:-1], hop) and len(ends) > 8
    csv = tmp_path / "p.csv"
    run_script("predict.py", out, *files, "--csv", csv)
    got = pd.read_csv(csv)
    assert list(got.said) == graph
    # inference.py --predict applies the run's rule too: the bundle's path with the checkpoints
    proc = run_script("inference.py", "--work", work, "--run", "resnet18_32", "-f", 2, "-a", "n",
                      "-g", -1, "--predict", *files[:6])
    said = [line.rsplit("-> ", 1)[1] for line in proc.stdout.splitlines() if "-> " in line]
    assert len(said) == 6 and np.mean(np.asarray(said) == got.said[:6].to_numpy()) >= 5 / 6
    # windows apply the rule too: where it overrules the most probable class, a file read as
    # one window says what the graph says
    top = [classes[i] for i in pred.probs(waves).argmax(1)]
    overruled = [i for i in range(len(files)) if graph[i] != top[i]][:6]
    assert overruled
    for i in overruled:
        (_, _, label, p), = pred.windows(files[i], None, 10.0, silence_db=1000)
        assert label == graph[i] and 0 < p <= 1


def test_the_rule_is_refused_where_it_does_not_fit(open_run, tmp_path):
    work, run = open_run["work"], open_run["run"]
    base = ["--work", work, "--run", "resnet18_32", "-a", "n"]
    assert "--false-accepts 1.5" in refused("inference.py", *base, "-f", 2,
                                            "--false-accepts", 1.5)
    assert "use --ensemble soft" in refused("inference.py", *base, "-g", -1, "-f", 2,
                                            "--ensemble", "hard")
    assert refused("inference.py", "--work", work, "--run", "resnet18_32", "-a", "y", "-g", -1,
                   "-f", 2).endswith("fold(s) 0, 1 finished without test-time views (trained "
                                     "without -a y), so there is no TTA OOF: use -a n here, or "
                                     "train them again with -a y")
    for flags, said in ((["--false-accepts-per-hour", 0], "--false-accepts-per-hour 0: expected "
                                                          "a rate above 0"),
                        (["--false-accepts-per-hour", "nan"], "--false-accepts-per-hour nan"),
                        (["--false-accepts-per-hour", 2], "--false-accepts-per-hour is fitted "
                                                          "on --other-speech"),
                        (["--smooth", 0], "--smooth 0: expected a number of windows"),
                        (["--patience", -2], "--patience -2: expected a number of windows"),
                        (["--refractory", -1], "--refractory -1.0: expected seconds")):
        assert said in refused("inference.py", *base, "-g", -1, "-f", 2, *flags)
    assert "was fitted for runs" in refused("export.py", *base, "-f", 1, "--out",
                                            tmp_path / "a.onnx")
    assert "was fitted for runs" in refused("export.py", *base, "-f", 2, "--weights", 2,
                                            "--out", tmp_path / "a.onnx")
    assert "nowhere.wav: file not found" in refused(
        "inference.py", *base, "-g", -1, "-f", 2, "--other-speech", tmp_path / "nowhere.wav")
    talk, keys = ["--other-speech", open_run["talk"]], open_run["keyword"]
    (tmp_path / "bare.wav").write_bytes(keys.read_bytes())  # no .csv beside it
    (tmp_path / "odd.wav").write_bytes(keys.read_bytes())
    pd.read_csv(keys.with_suffix(".csv")).assign(word="zebra").to_csv(tmp_path / "odd.csv")
    for flags, said in (
            ([*talk, "--fit-keywords", keys], "--fit-keywords chooses the rule fitted for "
                                              "--false-accepts-per-hour: give a rate"),
            ([*talk, "--false-accepts-per-hour", 5, "--fit-keywords", keys, "--patience", 2],
             "--fit-keywords chooses --patience: drop it"),
            ([*talk, "--false-accepts-per-hour", 5, "--fit-keywords", keys, "--smooth", 2,
              "--patience", 2], "--fit-keywords chooses --smooth and --patience: drop them"),
            ([*talk, "--false-accepts-per-hour", 5, "--fit-keywords", tmp_path / "no.wav"],
             f"--fit-keywords {tmp_path / 'no.wav'}: no such file"),
            ([*talk, "--false-accepts-per-hour", 5, "--fit-keywords", tmp_path / "bare.wav"],
             f"its keywords {tmp_path / 'bare.csv'} cannot be read"),
            ([*talk, "--false-accepts-per-hour", 5, "--fit-keywords", tmp_path / "odd.wav",
              "--out", tmp_path / "odd"], "zebra not among the run's words")):
        assert said in refused("inference.py", *base, "-g", -1, "-f", 2, *flags)
    assert not (tmp_path / "odd" / "reject.json").exists()
    shut = tmp_path / "closed"  # the same runs, where the classes hold no _unknown_/_silence_
    shutil.copytree(work, shut)
    (shut / "classes.json").write_text(json.dumps(open_run["words"]))
    assert "hold no _unknown_ or _silence_" in refused(
        "inference.py", "--work", shut, "--run", "resnet18_32", "-a", "n", "-g", -1, "-f", 2,
        "--other-speech", open_run["talk"])
    keep = (run / "reject.json").read_text()
    try:
        (run / "reject.json").write_text(keep[:40])
        assert "reject.json is damaged" in refused("export.py", *base, "-f", 2, "--out",
                                                   tmp_path / "b.onnx")
        for bad in (7, float("nan"), -0.5):  # edited by hand, or a write that still parses
            (run / "reject.json").write_text(json.dumps(dict(json.loads(keep), threshold=bad)))
            assert refused("export.py", *base, "-f", 2, "--out", tmp_path / "b.onnx") == (
                f"export: {run / 'reject.json'}: threshold {float(bad)}: expected a probability "
                f"in [0, 1] - run inference.py on these runs again to fit it")
        stream = dict(json.loads(keep)["stream"], smooth=0)
        (run / "reject.json").write_text(json.dumps(dict(json.loads(keep), stream=stream)))
        assert "--smooth 0: expected a number of windows" in refused(
            "export.py", *base, "-f", 2, "--out", tmp_path / "b.onnx")
        assert not (tmp_path / "b.onnx").exists()
    finally:
        (run / "reject.json").write_text(keep)
    assert "--unknown-share 1.0" in refused("train.py", "--work", work, *TINY, "-f", 0,
                                            "--unknown-share", 1.0)


def test_the_open_set_table_reads_the_test_and_the_rule(open_run):
    proc = run_script("real.py", "table", "--work", open_run["work"], "--runs", "resnet18_32")
    head, _, row = proc.stdout.strip().splitlines()
    cells = dict(zip([c.strip() for c in head.split("|")[1:-1]],
                     [c.strip() for c in row.split("|")[1:-1]]))
    score = json.loads((open_run["run"] / "test_score.json").read_text())
    rule = json.loads((open_run["run"] / "reject.json").read_text())
    assert float(cells["words recognised"]) == pytest.approx(score["recognised"], abs=1e-4)
    assert float(cells["others accepted"]) == pytest.approx(score["accepted_unknown"], abs=1e-4)
    assert float(cells["target"]) == 0.2 and float(cells["threshold"]) == pytest.approx(
        rule["threshold"], abs=1e-4)


def test_bench_compares_the_reject_scores_and_its_probability_row_is_inference_s(open_run,
                                                                               tmp_path):
    work, run = open_run["work"], open_run["run"]
    base = ["--work", work, "--run", "resnet18_32", "--sections", "reject", "-g", -1, "-a", "n"]
    proc = run_script("bench.py", *base, "--solution", open_run["data"] / "solution.csv")
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    table = pd.DataFrame(rows, columns=["score", "target", "oof_fa", "oof_det", "fa", "det"])
    assert len(table) == 9 and table.score.nunique() == 3
    rule = json.loads((run / "reject.json").read_text())
    score = json.loads((run / "test_score.json").read_text())
    prob = table[(table.score == "best word's probability")
                 & (table.target.astype(float) == 0.2)].iloc[0]
    assert float(prob.oof_fa) == pytest.approx(rule["oof_false_accepts"], abs=1e-4)
    assert float(prob.oof_det) == pytest.approx(rule["oof_detection"], abs=1e-4)
    assert float(prob.fa) == pytest.approx(score["accepted_unknown"], abs=1e-4)
    assert float(prob.det) == pytest.approx(score["recognised"], abs=1e-4)
    assert (table.oof_fa.astype(float) <= table.target.astype(float)).all()
    assert "needs --run RUN" in refused("bench.py", "--work", work, *base[4:])
    assert "give --solution" in refused("bench.py", *base)
    shut = tmp_path / "closed"
    shutil.copytree(work, shut, ignore=shutil.ignore_patterns("*_wave.npy"))
    (shut / "classes.json").write_text(json.dumps(open_run["words"]))
    assert "no reject rule to compare" in refused("bench.py", "--work", shut, *base[2:])


def test_an_open_set_run_records_its_unknown_and_silence(open_run):
    """prep.json stores --unknown and --silence, so every record of the run says them."""
    import yaml

    from checkpoints import safe_load

    work, run = open_run["work"], open_run["run"]
    said = ",".join(open_run["unknown"])
    prep = json.loads((work / "prep.json").read_text())
    assert (prep["unknown"], prep["silence"]) == (said, 24)
    cfg = yaml.safe_load((run / "fold0" / "config.yaml").read_text())
    assert (cfg["unknown"], cfg["silence"]) == (said, 24)
    ckpt = safe_load(run / "fold0" / "best.ckpt", RuntimeError, fix="")
    held = ckpt["hyper_parameters"]["config"]
    assert (held["unknown"], held["silence"]) == (said, 24)
    html = (run / "report.html").read_text()
    assert said in html and "silence" in html


def test_mined_windows_are_the_ones_the_rule_fired_on_and_join_the_unknown_rows(open_run,
                                                                              tmp_path):
    from audio import read_audio
    from util import read_table

    rule = json.loads((open_run["run"] / "reject.json").read_text())
    mined = pd.read_csv(open_run["mined"] / "mined.csv")
    assert rule["other_speech"]["mined"]["windows"] == len(mined) > 0
    assert (mined.score >= rule["threshold"]).all() and mined.score.is_monotonic_decreasing
    talk = read_audio(open_run["talk"], 16000)
    for r in mined.head(5).itertuples():  # each clip is its window of the recording
        clip = read_audio(open_run["mined"] / r.file, 16000)
        at = round(r.start * 16000)
        assert len(clip) == round((r.end - r.start) * 16000)
        assert np.abs(clip - talk[at:at + len(clip)]).max() < 1e-3
    work = tmp_path / "w"  # the next round: the mined windows are _unknown_ rows
    run_script("preprocess.py", "--data", open_run["data"], "--work", work, "--n-folds", 2,
               "--unknown", open_run["mined"])
    train = read_table(work / "train.csv")
    rows = train[train.label == "_unknown_"]
    assert len(rows) == len(mined) and set(rows.path.map(lambda p: Path(p).name)) == set(
        mined.file)
    assert "--mine" in refused("inference.py", "--work", open_run["work"], "--run",
                               "resnet18_32", "-a", "n", "-g", -1, "-f", 2, "--mine",
                               open_run["mined"], "--other-speech", open_run["talk"])
