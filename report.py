"""The leaderboard of every run in WORK, and a run's report.html rewritten.

    python report.py --work WORK                 # leaderboard of every run -> WORK/runs/leaderboard.csv
    python report.py --work WORK --run RUN       # (re)write RUN's report.html too
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from arg import make_parser
from leaderboard import leaderboard
from results import write_html
from runs import Run, Work
from util import UsageError, run_cli, setup_logging

log = logging.getLogger(__name__)


def steps(argv) -> int:
    p = make_parser(__doc__.split("\n")[0], "report")
    args = p.parse_args(argv)
    setup_logging()
    work = Path(getattr(args, "work", "work"))
    if not Work(work).runs.is_dir():
        raise UsageError(f"{Work(work).runs} not found: train a run first (python train.py "
                         f"--work {work} ...)")
    if getattr(args, "run", ""):
        made = write_html(Run(work, args.run).dir, work)
        if made is None:
            raise UsageError(f"{Run(work, args.run).dir} has no finished folds with oof.csv yet")
        log.info("report: %s (%.1f MB)", made, made.stat().st_size / 1e6)
    board = leaderboard(work)
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.max_colwidth", 40):
        shown = board.assign(train_min=board.train_min.map("{:.1f}".format))
        print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"-> {Work(work).runs / 'leaderboard.csv'}")
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "report", argv)


if __name__ == "__main__":
    raise SystemExit(main())
