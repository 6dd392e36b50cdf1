"""Find the clips, decode each once, validate, split into folds and cache the waveforms.

    python preprocess.py --data DIR --work WORK [--n-folds 5] [--seed 2020] [--sr 16000] [--seconds 1.0]
    python preprocess.py --manifest clips.csv --work WORK          # path,label[,group,fold,split]

Each clip is kept whole (at most --max-seconds); --seconds is the training crop.
Accepted layouts:
  birdclef         DIR/train_metadata.csv (primary_label, secondary_labels, filename, author),
                   DIR/train_audio/, DIR/test_soundscapes/ (scored per window), sample_submission.csv
  contest          DIR/train/<label>/*.wav, DIR/test/*.wav, DIR/submission.csv (file_name,label)
  speech commands  DIR/<label>/*.wav, DIR/testing_list.txt (becomes the test set, labels kept)
  manifest         a CSV of path,label with optional secondary (space-separated labels), group,
                   fold and split (train/test) columns; an empty group is the file's speaker
                   (Speech Commands names) or stem, an empty fold is drawn as without the
                   column, and fold -1 trains in every fold, never validated (external data)
Background noise comes from --noise DIR, else from a `_background_noise_/` folder in DIR or
DIR/train (folder layouts) or beside the manifest; prep.json records which.

Writes WORK/classes.json, train.csv, train_wave.npy + train_offsets.npy, test.csv, test_wave.npy +
test_offsets.npy, noise.npy, rejected.csv and prep.json (the fingerprint that lets a re-run reuse WORK).
"""
from __future__ import annotations

import logging

from arg import config_from_args, make_parser
from layouts import prepare
from util import run_cli

log = logging.getLogger(__name__)


def steps(argv) -> int:
    p = make_parser(__doc__.split("\n")[0], "preprocess")
    p.add_argument("--force", action="store_true", help="rebuild WORK even if it is up to date")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes at work at once (default: all cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_args(args)
    s = prepare(cfg, force=args.force, workers=args.jobs)
    log.info("%s (%s layout): %d classes, %d train clips (%.0f s) in %d folds%s, %d test clips, "
             "%.0f s of background noise, %d rejected", cfg.work, s["layout"], s["classes"],
             s["train"], s.get("train_seconds", 0), s["n_folds"],
             ", several labels per clip" if s.get("multilabel") else "", s["test"],
             s["noise_seconds"], s["rejected"])
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "preprocess", argv)


if __name__ == "__main__":
    raise SystemExit(main())
