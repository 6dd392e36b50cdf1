"""Label audio with an exported model (export.py): needs numpy, soundfile, soxr and onnxruntime.

    python predict.py MODEL.onnx clip.wav folder/ [--top-k 3]
    python predict.py MODEL.onnx long.wav --window 1 --hop 0.25 [--min-prob 0.5] [--csv out.csv]
    arecord -f S16_LE -r 16000 | python predict.py MODEL.onnx -     # a live stream

Clips: each file is averaged to mono, resampled to the model's rate (soxr, as preprocess.py
does) and zero-padded to its clip length, as in training (a longer file: the mean of its
clip-length windows); one line per file with the top-k labels. Recordings:
with --window, one row per window (start, end, label, probability; label '' for windows
--silence-db below the loudest), and each detection as it happens: the rule over time
(--min-prob, --smooth, --patience, --refractory; by default what inference.py fitted per hour)
says a word once per run of windows that hear it; at the end, how many detections per hour
(on speech without the words: the false accepts per hour). A recording is read in blocks, in
constant memory. `-` reads standard input as it arrives: raw 16-bit 16 kHz mono PCM, or a WAV
stream; it prints the detections only (the windows go to --csv). Unreadable and empty files are
listed on stderr and skipped.

As a module: predictor.py's `Predictor("model.onnx").predict_files([...])` and
`.windows(path, 1.0, 0.25)`.
"""
from __future__ import annotations

import argparse
import csv
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from audio import (HOP, HOP_HELP, WINDOW_HELP, AudioError, StreamError, audio_files,
                   pipe_blocks, top_line, window_problem)
from predictor import Detector, ModelError, Predictor, add_rule_flags, rule_from


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("model", help="the .onnx file written by export.py")
    ap.add_argument("paths", nargs="+", help="audio files or folders")
    ap.add_argument("--top-k", type=int, default=3, help="labels per file")
    ap.add_argument("--window", type=float, default=None, metavar="SECONDS",
                    help=f"{WINDOW_HELP} (default: the clip length)")
    ap.add_argument("--hop", type=float, default=None, metavar="SECONDS",
                    help=f"{HOP_HELP} (default: with --window or -, the hop the model's stream "
                         f"rule was fitted at, {HOP:g} without one; --hop alone also labels by "
                         f"window)")
    ap.add_argument("--min-prob", type=float, default=None,
                    help="the threshold a word's probability must reach to be heard (default: "
                         "the model's fitted rule where it has one, else 0.5)")
    add_rule_flags(ap)
    ap.add_argument("--silence-db", type=float, default=40.0,
                    help="windows this many dB below the loudest one are silence (label '')")
    ap.add_argument("--csv", default="", help="also write the rows to this CSV file")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    ap.add_argument("--embed", default="", metavar="FILE.npy",
                    help="write the files' embeddings (N, features) here instead of labels, and "
                         "their paths in the same order to FILE.csv")
    return ap


def write_embeddings(pred: Predictor, files, errors: list, embed: Path) -> None:
    good, vectors = pred.embed_files(files, errors)
    np.save(embed, vectors)
    with open(embed.with_suffix(".csv"), "w", newline="") as f:
        csv.writer(f).writerows([["path"], *[[str(g)] for g in good]])
    print(f"{len(good)} embeddings of {vectors.shape[1] if len(good) else 0} features -> "
          f"{embed} (rows in the order of {embed.with_suffix('.csv')})")


def listen(pred: Predictor, paths: list, args, rule, errors: list, write) -> tuple[int, float]:
    """Each recording (or `-`: standard input) read in blocks, window by window: the windows'
    rows (printed for a file, written by `write`), the detections of the rule over time printed
    as they happen. (detections, seconds heard)."""
    heard, seconds = 0, 0.0
    for path in paths:
        notes, end = [], 0.0
        try:
            if str(path) == "-":
                got = pred.read(pipe_blocks(sys.stdin.fileno(), pred.sr), args.window,
                                args.hop or rule.hop, args.silence_db)
            else:
                got = pred.file_blocks(path, args.window, args.hop or rule.hop, args.silence_db)
            detector = Detector(pred.classes, rule)
            for start, ends, probs, silent in got:
                for s, e, label, p in pred.rows(start, ends, probs, silent):
                    if str(path) != "-":
                        print(f"{path}\t{s:.2f}\t{e:.2f}\t{label}\t{p:.3f}")
                    write([str(path), f"{s:.3f}", f"{e:.3f}", label, f"{p:.4f}"])
                for t, word, score in detector.feed(probs, silent, ends):
                    print(f"{path}: {word} at {t:.2f} s ({score:.3f})", flush=True)
                    heard += 1
                end = float(ends[-1])
        except AudioError as e:
            errors.append((path, str(e)))
            continue
        finally:
            seconds += end
        win = args.window or pred.length / pred.sr
        if 0 < end < win - 1e-9:
            notes.append(f"{path}: {end:.2f} s, shorter than one {win:g} s window: one padded "
                         f"window")
        for note in notes:
            print(f"predict: {note}", file=sys.stderr)
    return heard, seconds


class Terminated(Exception):
    """SIGTERM, as an exception: the CSV written so far is closed, one line is said."""


def terminate(signum, frame):
    raise Terminated


def main(argv=None) -> int:
    was = signal.signal(signal.SIGTERM, terminate)
    try:
        code = run(argv)
        sys.stdout.flush()  # a reader gone by now is heard here, not at the interpreter's exit
        return code
    except KeyboardInterrupt:
        print("predict: stopped (^C)", file=sys.stderr)
        return 130
    except Terminated:
        print("predict: stopped (SIGTERM)", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader of our output went away (`| head`)
        sys.stdout = open(os.devnull, "w")
        print("predict: the output was closed; stopped", file=sys.stderr)
        return 141
    finally:
        signal.signal(signal.SIGTERM, was)


def run(argv=None) -> int:
    args = parser().parse_args(argv)
    problem = window_problem(args.window, args.hop)
    if args.min_prob is not None and not 0 <= args.min_prob <= 1:  # NaN too
        problem = f"--min-prob {args.min_prob}: expected a probability in [0, 1]"
    if problem:
        print(f"predict: {problem}", file=sys.stderr)
        return 2
    if not Path(args.model).is_file():
        print(f"predict: {args.model}: no such model file (make one with export.py)",
              file=sys.stderr)
        return 2
    embed = Path(args.embed if args.embed.endswith(".npy") else args.embed + ".npy") \
        if args.embed else None
    if embed is not None and not embed.parent.is_dir():
        print(f"predict: --embed {args.embed}: no folder {embed.parent} to write it in",
              file=sys.stderr)
        return 2
    try:
        pred = Predictor(args.model, threads=args.threads)
        if embed is not None and "embedding" not in pred.outputs:
            raise ModelError(f"{args.model} has no 'embedding' output (exported before it was "
                             f"added): export the run again with export.py for --embed")
    except ModelError as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    stream = "-" in map(str, args.paths)
    if stream and (len(args.paths) > 1 or embed is not None):
        print("predict: - reads a stream from standard input: give it alone, without --embed",
              file=sys.stderr)
        return 2
    rule = rule_from(args, pred.rule if args.min_prob is None else
                     replace(pred.rule, threshold=args.min_prob))
    if rule.problem():
        print(f"predict: {rule.problem()}", file=sys.stderr)
        return 2
    files, errors = ([Path("-")] if stream else audio_files(args.paths)), []
    out = open(args.csv, "w", newline="") if args.csv else None
    write = csv.writer(out).writerow if out else (lambda row: None)
    try:
        if embed is not None:
            write_embeddings(pred, files, errors, embed)
        elif args.window is None and args.hop is None and not stream:
            write(["path", "said", *[f"{k}{i + 1}" for i in range(args.top_k)
                                     for k in ("label", "p")]])
            for path, said, top in pred.label_files(files, args.top_k, errors):
                rule_said = "" if pred.threshold is None else f"  -> {said}"  # the reject rule
                print(top_line(path, top) + rule_said)
                write([str(path), said, *[x for t in top for x in (t[0], f"{t[1]:.4f}")]])
        else:
            write(["path", "start", "end", "label", "p"])
            try:
                heard, seconds = listen(pred, files, args, rule, errors, write)
            except StreamError as e:
                print(f"predict: standard input is not a stream to read: {e} (expected raw "
                      f"16-bit 16 kHz mono PCM, or a 16-bit PCM WAV)", file=sys.stderr)
                return 2
            if seconds:  # on speech without the words: the false accepts per hour
                print(f"predict: {heard} detections in {seconds / 60:.1f} min of audio "
                      f"({heard * 3600 / seconds:.1f} per hour)")
    finally:
        if out:
            out.close()
    for path, reason in errors:
        print(f"{path}: skipped - {reason}", file=sys.stderr)
    if not files or len(errors) == len(files):
        print("predict: no readable audio among the paths given", file=sys.stderr)
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
