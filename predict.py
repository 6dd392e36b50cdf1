"""Label audio with an exported model (export.py): needs numpy, soundfile, soxr and onnxruntime.

    python predict.py MODEL.onnx clip.wav folder/ [--top-k 3]
    python predict.py MODEL.onnx long.wav --window 1 --hop 0.25 [--min-prob 0.5] [--csv out.csv]

Clips: each file is averaged to mono, resampled to the model's rate (soxr, as preprocess.py
does) and zero-padded to its clip length, as in training (a longer file: the mean of its
clip-length windows); one line per file with the top-k labels. Recordings:
with --window, one row per window (start, end, label, probability; label '' for windows
--silence-db below the loudest), then the segments: consecutive windows with the same label
and at least --min-prob merged, and how many word segments that makes per hour (on speech
without the words: the false accepts per hour). Unreadable and empty files are listed on
stderr and skipped.

As a module: predictor.py's `Predictor("model.onnx").predict_files([...])` and
`.windows(path, 1.0, 0.25)`.
"""
from __future__ import annotations

import argparse
import csv
import signal
import sys
from pathlib import Path

import numpy as np

from audio import HOP_HELP, WINDOW_HELP, AudioError, audio_files, top_line, window_problem
from predictor import OPEN, ModelError, Predictor, segments


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("model", help="the .onnx file written by export.py")
    ap.add_argument("paths", nargs="+", help="audio files or folders")
    ap.add_argument("--top-k", type=int, default=3, help="labels per file")
    ap.add_argument("--window", type=float, default=None, metavar="SECONDS",
                    help=f"{WINDOW_HELP} (default: the clip length)")
    ap.add_argument("--hop", type=float, default=None, metavar="SECONDS",
                    help=f"{HOP_HELP} (default: 0.25 with --window; --hop alone also labels by "
                         f"window)")
    ap.add_argument("--min-prob", type=float, default=None,
                    help="windows below this probability end a segment (default: the model's "
                         "reject threshold where it has one, else 0.5)")
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


def main(argv=None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `predict.py ... | head` ends quietly
    args = parser().parse_args(argv)
    problem = window_problem(args.window, args.hop)
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
    files, errors, rows, header = audio_files(args.paths), [], [], ["path"]
    if embed is not None:
        write_embeddings(pred, files, errors, embed)
    elif args.window is None and args.hop is None:
        for path, said, top in pred.label_files(files, args.top_k, errors):
            rule = "" if pred.threshold is None else f"  -> {said}"  # the model's reject rule
            print(top_line(path, top) + rule)
            rows.append([str(path), said, *[x for t in top for x in (t[0], f"{t[1]:.4f}")]])
        header = ["path", "said", *[f"{k}{i + 1}" for i in range(args.top_k)
                                    for k in ("label", "p")]]
    else:
        header = ["path", "start", "end", "label", "p"]
        heard, seconds = 0, 0.0  # word segments, and the seconds they were heard in
        for path in files:
            notes = []
            try:
                win = pred.windows(path, args.window, args.hop or 0.25, notes, args.silence_db)
            except AudioError as e:
                errors.append((path, str(e)))
                continue
            for note in notes:
                print(f"predict: {note}", file=sys.stderr)
            for s, e, label, p in win:
                print(f"{path}\t{s:.2f}\t{e:.2f}\t{label}\t{p:.3f}")
                rows.append([str(path), f"{s:.3f}", f"{e:.3f}", label, f"{p:.4f}"])
            least = args.min_prob if args.min_prob is not None else \
                pred.threshold if pred.threshold is not None else 0.5
            for s, e, label, p, n in segments(win, least):
                print(f"{path}: segment {s:.2f}-{e:.2f} s {label} ({p:.3f}, {n} windows)")
                heard += label not in OPEN
            seconds += win[-1][1]
        if seconds:  # on speech without the words: the false accepts per hour
            print(f"predict: {heard} word segments in {seconds / 60:.1f} min of audio "
                  f"({heard * 3600 / seconds:.1f} per hour)")
    for path, reason in errors:
        print(f"{path}: skipped - {reason}", file=sys.stderr)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    if not files or len(errors) == len(files):
        print("predict: no readable audio among the paths given", file=sys.stderr)
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
