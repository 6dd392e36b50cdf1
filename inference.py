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
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import audio
from arg import Config, add_members, config_from_args, make_parser
from audio import HOP, HOP_HELP, WINDOW_HELP, window_problem
from cache import Clips, Rows, windows
from ensemble import (ensemble, fit_blend, load_checkpoint, load_members, member_probs,
                      oof_for_blend, predict_waves, with_temperature)
from predictor import (NEVER, OPEN, Rule, accepts, add_rule_flags, decide, label_files,
                       read_file_windows, rule_from)
from reject import (HOPS, PER_HOUR, WINDOWS, choose_rule, detections, every, fit_per_hour,
                    fit_threshold, gates, keyword_stream, per_hour, stored_rule)
from results import cv_report, load_oof, write_html
from runs import REJECT, RUN_RESULTS, Run, Work, oof_missing, requested_folds
from submission import write_blend, write_embeddings, write_submission, write_windows
from transform import tta_views
from util import UsageError, run_cli, setup_logging, torch_device, write_json

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- predict
def predict_files(paths: list[Path], files: list[str], tta: bool, how: str, weights: np.ndarray,
                  temperature: float, device: torch.device, batch: int,
                  threshold: float | None) -> int:
    """Top-3 labels of each audio file (or folder's files) given, and what the reject rule at
    `threshold` says of it (the run's reject.json, where it has one), read as predict.py reads
    them: the same code path as the exported bundle (predictor.label_files), with these
    checkpoints."""
    ref = load_checkpoint(paths[0])
    cfg, errors = ref.cfg, []

    def probs(waves):  # as the test set's: the blend's temperature too
        score = ensemble(predict_waves(paths, waves, tta, device, batch)[0], how, weights)[1]
        return with_temperature(score, temperature) if temperature != 1.0 else score

    found = audio.audio_files(files)
    for path, said, top in label_files(found, cfg.sr, cfg.clip_samples, probs, ref.classes,
                                       threshold, 3, errors):
        print(audio.top_line(path, top) + ("" if threshold is None else f"  -> {said}"))
    for path, reason in errors:
        print(f"{path}: skipped - {reason}", file=sys.stderr)
    if len(errors) == len(found):
        print("predict: no readable audio among the paths given", file=sys.stderr)
    return 1 if errors or not found else 0


# ----------------------------------------------------------------------------- main


def inference_parser():
    p = make_parser(__doc__.split("\n")[0], "inference")
    g = p.add_argument_group("members")
    add_members(g)
    g.add_argument("--fit-weights", action="store_true",
                   help="fit the run weights and a temperature on the OOF (min. log-loss); "
                        "writes blend.json and calibrated test_probs.csv")
    g.add_argument("--ensemble", default="soft", choices=("soft", "hard"))
    g.add_argument("--false-accepts", type=float, default=0.05, metavar="RATE",
                   help="the reject rule's target where the classes hold _unknown_ or _silence_ "
                        "(preprocess.py --unknown, --silence): the share of those OOF clips a "
                        "word may let in; its threshold goes to reject.json (default: 0.05)")
    g.add_argument("--other-speech", nargs="+", default=None, metavar="PATH",
                   help="recordings (files or folders) that hold none of the words: read in "
                        "blocks as predict.py reads them (clip-length windows every %g s), the "
                        "detections the rule over time lets in per hour go to reject.json and "
                        "report.html, with detection at %s per hour" % (
                            HOP, ", ".join(f"{r:g}" for r in PER_HOUR)))
    g.add_argument("--mine", default=None, metavar="DIR",
                   help="with --other-speech: write each window of it that the rule fires on "
                        "(at the clip rule's threshold) as a WAV clip into DIR, with mined.csv: "
                        "hard negatives for preprocess.py --unknown DIR, then train again")
    g.add_argument("--false-accepts-per-hour", type=float, default=None, metavar="RATE",
                   help="with --other-speech: fit the rule over time's threshold for at most "
                        "RATE detections per hour of it; reject.json's stream rule, which "
                        "export.py puts in the model for predict.py")
    g.add_argument("--fit-keywords", default=None, metavar="FILE",
                   help="with --false-accepts-per-hour: a held-out recording of the words, their "
                        "word,start,end (s) in FILE's .csv beside it (stream.py data's "
                        "stream_fit_keys.wav), on which the stream rule's smoothing and patience "
                        "(%s windows) and hop (%s s) are chosen: each gets the threshold that "
                        "keeps --other-speech and FILE at RATE false accepts per hour, and the "
                        "one that detects most of FILE's words is kept" % (
                            ", ".join(map(str, WINDOWS)), ", ".join(f"{h * HOP:g}" for h in HOPS)))
    add_rule_flags(g)
    g.add_argument("--keyword-stream", default=None, metavar="FILE",
                   help="a long recording with the words inside other speech, its keywords' "
                        "word,start,end (s) in FILE's .csv beside it (stream.py data's "
                        "stream_test.wav): read as predict.py reads it, the words missed at "
                        "0.1, 0.5 and 2 false accepts per hour, and at the stream rule, go to "
                        "reject.json and report.html")
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


def steps(argv) -> int:
    args = inference_parser().parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    return run(cfg, args)


def main(argv=None) -> int:
    return run_cli(steps, "inference", argv)


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
    if not 0 <= args.false_accepts < 1:
        raise UsageError(f"--false-accepts {args.false_accepts}: a share of the other clips in "
                         f"[0, 1)")
    rate = args.false_accepts_per_hour
    if args.keyword_stream:
        keyword_truth(args.keyword_stream)
    if args.fit_keywords:
        if rate is None:
            raise UsageError("--fit-keywords chooses the rule fitted for --false-accepts-per-hour: "
                             "give a rate (and --other-speech)")
        given = [f"--{k}" for k in ("smooth", "patience") if getattr(args, k) is not None]
        if given:
            raise UsageError(f"--fit-keywords chooses {' and '.join(given)}: drop "
                             f"{'them' if len(given) > 1 else 'it'}")
        keyword_truth(args.fit_keywords, "--fit-keywords")
    if args.mine is not None and not args.other_speech:
        raise UsageError("--mine keeps the windows of --other-speech the rule fires on: give "
                         "recordings of speech without the words")
    if args.mine is not None and Path(args.mine).exists() and any(Path(args.mine).iterdir()):
        raise UsageError(f"--mine {args.mine}: not empty; give a new folder for each round")
    if rate is not None and not rate > 0:  # NaN too
        raise UsageError(f"--false-accepts-per-hour {rate:g}: expected a rate above 0")
    if rate is not None and not args.other_speech:
        raise UsageError("--false-accepts-per-hour is fitted on --other-speech: give recordings "
                         "of speech without the words")
    problem = rule_from(args, Rule(0.5)).problem()
    if problem:
        raise UsageError(problem)
    return runs


def test_windows(work: Path, prep: dict, args) -> tuple[object, pd.DataFrame, str]:
    """The test set as windows (cache.Rows over cache.windows) and the row mode."""
    sr, length = prep["sr"], Config(sr=prep["sr"], seconds=prep["seconds"]).clip_samples
    win = int(round(args.window * sr)) if args.window else length
    hop = int(round(args.hop * sr)) if args.hop else win
    clips = Clips.of(work, "test")
    wins = windows(clips, win, hop, sr)
    mode = prep.get("rows", "file") if args.rows == "auto" else args.rows
    return Rows(clips, wins.row, length, wins.start, win), wins, mode


def other_windows(files: list[str], paths: list[Path], tta: bool, weights: np.ndarray,
                  blend: dict | None, device: torch.device, batch: int,
                  flag: str = "--other-speech") -> dict:
    """The recordings of `flag` window by window as predict.py reads them (in blocks:
    clip-length windows every HOP s, the quiet ones silent; predictor.read_file_windows) with the
    ensemble's probabilities: probs, silent, first (each recording's first window), end (s),
    hours, files, skipped (path: reason). Memory: the members, one block's windows, and each
    window's probabilities (40 bytes a window for 10 classes: 6 MB for 10 hours).
    Unreadable files are listed and skipped; UsageError when none is readable."""
    models = load_members(paths)
    cfg = models[0].cfg
    found, skipped, lengths = audio.audio_files(files), {}, {}
    for path in found:
        try:
            lengths[str(path)] = audio.read_info(path)
        except audio.AudioError as e:
            skipped[str(path)] = str(e)
    if not lengths:
        raise UsageError(f"{flag} {' '.join(map(str, files))}: no readable audio ("
                         + "; ".join(f"{p}: {why}" for p, why in skipped.items())
                         + ") - give recordings of speech, e.g. real.py data's openset_other.wav "
                           "or stream.py data's stream_fit.wav")
    for path, why in skipped.items():
        log.warning("%s %s: skipped - %s", flag, path, why)

    def probs(waves):
        got = np.stack([member_probs(m.to(device), waves, tta, device, batch)[0]
                        for m in models])
        score = ensemble(got, "soft", weights)[1]
        return with_temperature(score, blend["temperature"]) if blend else score

    kept, done = dict(probs=[], silent=[], first=[], end=[]), 0.0
    with tqdm(total=round(sum(lengths.values()), 2), unit="s", desc=f"{flag} (audio)",
              disable=None) as bar:
        for path, seconds in lengths.items():
            for i, (_, end, p, quiet) in enumerate(read_file_windows(
                    path, probs, cfg.sr, cfg.clip_samples)):
                kept["probs"].append(p.astype(np.float32))
                kept["silent"].append(quiet)
                kept["first"].append(np.arange(len(p)) == (0 if i == 0 else -1))
                kept["end"].append(end)
                bar.update(min(done + float(end[-1]), bar.total) - bar.n)
            done += seconds
    return dict({k: np.concatenate(v) for k, v in kept.items()},
                hours=sum(lengths.values()) / 3600, files=list(lengths), skipped=skipped,
                window=cfg.clip_samples / cfg.sr, sr=cfg.sr)


def reject_rule(work: Path, runs: list[str], folds: list[int], tta: bool, classes: list[str],
                args, weights: np.ndarray, blend: dict | None, out: Path,
                read=None) -> float | None:
    """The reject rule's threshold where the classes hold _unknown_ or _silence_: fitted on the
    runs' OOF, blended as the test scores are (weights, temperature), for --false-accepts
    (reject.fit_threshold), written to reject.json; None otherwise. `read(files, flag)` reads
    recordings (other_windows): those of --other-speech give the false accepts per hour at the
    rule, detection at PER_HOUR and the stream rule (other_speech), that of --keyword-stream
    the words missed per hour (keyword_benchmark); to reject.json too."""
    if not set(OPEN) & set(classes):
        return None
    if args.ensemble != "soft":
        raise UsageError(f"the classes hold {' and '.join(set(OPEN) & set(classes))}: the reject "
                         f"rule thresholds soft probabilities (use --ensemble soft)")
    target = args.false_accepts
    got = load_oof([Run(work, r).dir for r in runs], folds, "oof_tta" if tta else "oof", classes,
                   weights)
    if got is None:
        raise UsageError("the reject rule is fitted on the OOF: " + next(
            oof_missing(Run(work, r), folds, "oof_tta" if tta else "oof") for r in runs
            if load_oof([Run(work, r).dir], folds, "oof_tta" if tta else "oof", classes) is None))
    table, probs = got
    if blend:
        probs = with_temperature(probs, blend["temperature"])
    truth = table.label.to_numpy()
    rule = fit_threshold(probs, truth, classes, target)
    fit = None  # (the --fit-keywords recording read, its words)
    if args.fit_keywords:
        words = keyword_truth(args.fit_keywords, "--fit-keywords")
        odd = sorted(set(words.word) - set(classes))
        if odd:
            raise UsageError(f"--fit-keywords {args.fit_keywords}: {', '.join(odd)} not among the "
                             f"run's words ({', '.join(c for c in classes if c not in OPEN)})")
    if args.other_speech:
        if args.fit_keywords:
            fit = read([args.fit_keywords], "--fit-keywords"), words
        rule.update(other_speech(read(args.other_speech, "--other-speech"), probs, truth,
                                 classes, rule["threshold"], args, fit))
    if args.keyword_stream:
        rule["keyword_stream"] = keyword_benchmark(
            read([args.keyword_stream], "--keyword-stream"), classes, rule, args)
    write_json(dict(rule, runs=runs, folds=folds, tta=tta, weights=[float(w) for w in weights],
                    temperature=blend["temperature"] if blend else 1.0), out / REJECT)
    log.info("reject rule: the best word is taken from probability %.4f (OOF: %.1f %% of %d "
             "%s/%s clips taken for a word, %.1f %% of %d words recognised)", rule["threshold"],
             100 * rule["oof_false_accepts"], rule["open_clips"], *OPEN,
             100 * rule["oof_detection"], rule["word_clips"])
    return rule["threshold"]


def other_speech(got: dict, probs: np.ndarray, truth: np.ndarray, classes: list[str],
                 threshold: float, args, fit: tuple | None = None) -> dict:
    """What the --other-speech recordings (other_windows) say of the rule over time (the flags'
    smoothing, patience and refractory time): its detections per hour at the clip rule's
    threshold, detection at PER_HOUR per hour, and with --false-accepts-per-hour the stream
    rule fitted there (reject.json's `stream`, which export.py puts in the model): its
    threshold for the flags' rule, or with `fit` (the --fit-keywords recording read, and its
    words) its smoothing, patience, hop and threshold chosen (reject.choose_rule)."""
    over_time = rule_from(args, Rule(threshold))
    gated = gates(got, classes, over_time)
    n = detections(gated, classes, over_time, threshold)
    out = dict(other_speech=dict(
        files=got["files"], skipped=got["skipped"], hours=got["hours"],
        windows=len(got["probs"]), hop=HOP, rule=asdict(over_time), detections=n,
        per_hour=n / got["hours"],
        table=per_hour(probs, truth, classes, got, over_time).to_dict("records")))
    log.info("other speech: %d detections let in over %.2f h of %d recording(s) (%.1f per "
             "hour)", n, got["hours"], len(got["files"]), n / got["hours"])
    if args.mine is not None:
        out["other_speech"]["mined"] = mine(got, gated, classes, threshold, Path(args.mine))
    rate = args.false_accepts_per_hour
    if rate is not None and fit is not None:
        keys, words = fit
        chosen, row, table = choose_rule(got, keys, words, classes, over_time, rate)
        out["stream"] = dict(asdict(chosen), target_per_hour=rate,
                             fitted_per_hour=row["per_hour"], fit_keywords=dict(
                                 file=str(args.fit_keywords), keywords=len(words),
                                 hours=keys["hours"], detected=row["detected"],
                                 candidates=table))
        log.info("stream rule: smoothing %d, patience %d, hop %g s, threshold %.3f: %.1f %% of "
                 "the %d words of --fit-keywords detected at %.2f false accepts per hour (at most "
                 "%g)", chosen.smooth, chosen.patience, chosen.hop, min(chosen.threshold, 1.0),
                 100 * row["detected"], len(words), row["per_hour"], rate)
    elif rate is not None:
        t, at = fit_per_hour(gated, got["hours"], classes, over_time, rate)
        out["stream"] = dict(asdict(replace(over_time, threshold=min(t, NEVER))),
                             target_per_hour=rate, fitted_per_hour=at)
        log.info("stream rule: threshold %.3f for at most %g detections per hour (%.2f per hour "
                 "on the other speech)%s", min(t, 1.0), rate, at,
                 "; no threshold reaches it: the model says nothing" if t > 1 else "")
    return out


MINED = 5000  # windows --mine writes at most (the highest scored first)


def mine(got: dict, gated: list[tuple], classes: list[str], threshold: float,
         folder: Path) -> dict:
    """Every window of the --other-speech recordings whose gate score (Detector.gate) reaches
    `threshold`, the highest first (at most MINED), cut from its recording (window seconds
    ending at its end) and written to `folder` as a WAV at the model's rate; mined.csv: file,
    recording, start, end, word, score. Hard negatives: preprocess.py --unknown FOLDER."""
    import soundfile as sf

    rows = [dict(recording=path, start=max(0.0, float(e) - got["window"]), end=float(e),
                 word=classes[w], score=float(s))
            for path, (word, gate, end) in zip(got["files"], gated)
            for w, s, e in zip(word, gate, end) if accepts(s, threshold)]
    rows = sorted(rows, key=lambda r: -r["score"])[:MINED]
    folder.mkdir(parents=True, exist_ok=True)
    sr = got["sr"]
    for k, r in enumerate(tqdm(rows, desc="--mine", unit="window", disable=None)):
        info = sf.info(r["recording"])
        y, _ = sf.read(r["recording"], start=int(r["start"] * info.samplerate),
                       stop=int(r["end"] * info.samplerate), dtype="float32", always_2d=True)
        r["file"] = f"mined_{k:05d}.wav"
        sf.write(folder / r["file"], audio.resample(y.mean(1), info.samplerate, sr), sr,
                 subtype="PCM_16")
    pd.DataFrame(rows, columns=["file", "recording", "start", "end", "word", "score"]).to_csv(
        folder / "mined.csv", index=False)
    log.info("--mine: %d windows the rule fired on -> %s (preprocess.py --unknown %s, then "
             "train again)", len(rows), folder, folder)
    return dict(folder=str(folder), windows=len(rows), threshold=threshold)


def keyword_truth(path: str, flag: str = "--keyword-stream") -> pd.DataFrame:
    """The keywords of `flag` FILE (--keyword-stream, --fit-keywords): FILE's .csv beside it
    (word, start, end in seconds), in order; UsageError naming what is missing."""
    table = Path(path).with_suffix(".csv")
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        truth = pd.read_csv(table, keep_default_na=False)[["word", "start", "end"]]
        ok = len(truth) and (truth.end >= truth.start).all() and truth.start.is_monotonic_increasing
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as e:
        raise UsageError(f"{flag} {path}: its keywords {table} cannot be read "
                         f"({type(e).__name__}): a CSV of word,start,end (s), as stream.py data "
                         f"writes") from None
    if not ok:
        raise UsageError(f"{flag} {path}: {table} holds no keyword, or spans that end "
                         f"before they start or come out of order")
    return truth


def keyword_benchmark(got: dict, classes: list[str], rule: dict, args) -> dict:
    """The words of --keyword-stream missed at 0.1, 0.5 and 2 false accepts per hour of it
    (reject.keyword_stream) under the rule over time, and at its threshold (`fitted`): the
    stream rule where one was fitted, else the flags' rule at the clip rule's threshold."""
    truth = keyword_truth(args.keyword_stream)
    stream = rule.get("stream")
    over_time = Rule.of(stream) if stream else rule_from(args, Rule(rule["threshold"]))
    got = every(got, round(over_time.hop / HOP))  # read at the rule's hop
    got = keyword_stream(gates(got, classes, over_time)[0], got["hours"], truth, classes,
                         over_time, got["window"], fitted=over_time.threshold)
    for row in got["table"]:
        log.info("keyword stream: %.1f %% of %d keywords missed at %.2f false accepts per hour "
                 "(at most %g; threshold %.3f)", 100 * row["miss"], got["keywords"],
                 row["false_accepts_per_hour"], row["false accepts per hour <="], row["threshold"])
    return dict(got, file=str(args.keyword_stream))


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
    if args.predict:  # the reject rule fitted for this ensemble, where there is one
        temperature = blend["temperature"] if blend else 1.0
        rule = stored_rule(work, runs, folds, tta, weights, temperature)
        return predict_files(paths, args.predict, tta, args.ensemble, member_weights,
                             temperature, device, batch, rule and rule["threshold"])
    out = Path(args.out) if args.out else Run.blend(work, runs).dir
    if (args.other_speech or args.keyword_stream) and not set(OPEN) & set(classes):
        raise UsageError(f"{'--other-speech' if args.other_speech else '--keyword-stream'} counts "
                         f"the words the reject rule lets in: the classes of "
                         f"{Work(work).classes_json} hold no {' or '.join(OPEN)} (preprocess.py "
                         f"--unknown, --silence)")

    def read(files, flag):
        return other_windows(files, paths, tta, member_weights, blend, device, batch, flag)

    threshold = reject_rule(work, runs, folds, tta, classes, args, weights, blend, out, read)
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
        sample = Path(prep["data"]) / "sample_submission.csv" if prep.get("data") else None
        write_windows(work, out, wins, score, classes, args.solution, how, sample)
    else:
        write_submission(work, out, decide(score, classes, threshold) if threshold is not None
                         else [classes[i] for i in pred], score, classes, args.solution, how)
    if args.embed:
        write_embeddings(paths[0], waves, wins, mode, work, out, device, batch)
    cv_report([Run(work, r).dir for r in runs], weights, folds, classes, out)
    if len(runs) == 1 and not args.out:
        write_html(out, work)
    made = [f for f in RUN_RESULTS if (out / f).is_file()]
    log.info("outputs in %s: %s", out, ", ".join(made))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
