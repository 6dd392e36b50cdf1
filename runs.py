"""Where everything lives, in one place: WORK's files (preprocess.py writes them, every later
step reads them), every path under WORK/runs/<run>/ that more than one script reads, and a
fold's state (finished, its config, the command that trains it).

    WORK/                     prep.json classes.json train.csv test.csv rejected.csv noise.npy
                              {train,test}_wave.npy {train,test}_offsets.npy
    WORK/runs/<run>/fold<k>/  best.ckpt last.ckpt history.csv curve.png oof.csv oof_tta.csv
                              config.yaml versions.json command.txt train.log .lock
                              result.json (last), or pruned.json (tune.py stopped it)
    WORK/runs/<run>/          cv.json report.html submission.csv test_probs.csv ...
    WORK/runs/blend_<a>+<b>/  the same for a blend of runs (inference.py --runs)
    WORK/runs/leaderboard.csv
    WORK/studies/<study>.db   a tune.py study (SQLite); <study>/ best.yaml trials.csv report.html
    WORK/pretrain/<name>/     encoder.pth config.yaml versions.json history.csv curve.png
                              last.ckpt (pretrain.py)
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

from util import UsageError, read_table, strip_options

TRAIN_ONLY = -1  # a train.csv fold that is never validated: its rows train every fold


def validation_folds(table) -> list[int]:
    """The folds of a train.csv table that are validated (every fold but TRAIN_ONLY rows')."""
    return sorted(int(k) for k in table.fold.unique() if k != TRAIN_ONLY)


# the names of a fold's, a run's and a pretraining run's files, here only
RESULT, BEST, LAST, HISTORY = "result.json", "best.ckpt", "last.ckpt", "history.csv"
CURVE, OOF, OOF_TTA, PRUNED = "curve.png", "oof.csv", "oof_tta.csv", "pruned.json"
CONFIG, COMMAND, VERSIONS = "config.yaml", "command.txt", "versions.json"
CV, TEST_SCORE, TEST_PROBS = "cv.json", "test_score.json", "test_probs.csv"
SUBMISSION, REPORT_TXT, REPORT_HTML = "submission.csv", "report.txt", "report.html"
CONFUSION, BLEND, EMBEDDINGS = "confusion.png", "blend.json", "embeddings.npy"
EMBEDDINGS_CSV, LEADERBOARD, ENCODER = "embeddings.csv", "leaderboard.csv", "encoder.pth"
REJECT = "reject.json"

# what inference.py, export.py and a run's last fold write from the folds: a fresh fold makes
# them stale, so it removes them (RUN.onnx too)
RUN_RESULTS = (CV, TEST_SCORE, TEST_PROBS, SUBMISSION, REPORT_TXT, REPORT_HTML, CONFUSION, BLEND,
               EMBEDDINGS, EMBEDDINGS_CSV, REJECT)

# what a fold writes (pruned.json: tune.py's pruner stopped it); a fresh (not resumed) fold
# starts without any of them
FOLD_RECORDS = (RESULT, BEST, LAST, HISTORY, CURVE, OOF, OOF_TTA, PRUNED)


class Work:
    """WORK/: the folder preprocess.py builds (prep.json last: a WORK without it is unfinished)
    and every later step reads."""

    OUTPUTS = ("classes.json", "train.csv", "train_wave.npy", "train_offsets.npy", "test.csv",
               "test_wave.npy", "test_offsets.npy", "rejected.csv")  # what prep.json vouches for

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.prep_json, self.classes_json = self.dir / "prep.json", self.dir / "classes.json"
        self.train_csv, self.test_csv = self.dir / "train.csv", self.dir / "test.csv"
        self.rejected, self.noise = self.dir / "rejected.csv", self.dir / "noise.npy"

    def wave(self, split: str) -> Path:
        """{split}_wave.npy: every sample of every clip of the split, back to back (int16)."""
        return self.dir / f"{split}_wave.npy"

    def offsets(self, split: str) -> Path:
        """{split}_offsets.npy: where each clip of the split starts (N + 1 entries)."""
        return self.dir / f"{split}_offsets.npy"

    def prep(self) -> dict:
        """prep.json: what preprocess.py was asked and found (rate, clip length, folds, data,
        rows, multilabel); UsageError when WORK is missing or half-built."""
        if not self.prep_json.is_file():
            state = "does not exist" if not self.dir.exists() else \
                "is not built, or its build was interrupted (no prep.json)"
            raise UsageError(f"{self.dir} {state}: run python preprocess.py --data DATA "
                             f"--work {self.dir}")
        prep = json.loads(self.prep_json.read_text())
        if "folds" in prep:  # a WORK built when the fold count was called `folds`
            prep.setdefault("n_folds", prep.pop("folds"))
        self.check_cache(prep)
        return prep

    def check_cache(self, prep: dict) -> None:
        """UsageError naming the file and the rebuild where a file prep.json vouches for is
        gone, or a split's cache holds other than the samples its offsets promise (a copy cut
        short, a file replaced): every step that opens WORK finds out before it starts."""
        fix = (f"rebuild the cache: python preprocess.py --data {prep.get('data') or 'DATA'} "
               f"--work {self.dir} --force")
        for name in self.OUTPUTS:
            if not (self.dir / name).is_file() and not name.endswith("_offsets.npy"):
                raise UsageError(f"{self.dir / name} is missing: {fix}")
        for split in ("train", "test"):
            try:
                held, size, shape = npy_layout(self.wave(split))
                if not self.offsets(split).is_file() and len(shape) != 2:  # [N, L]: an old one
                    raise UsageError(f"{self.offsets(split)} is missing: {fix}")
                promised = int(np.load(self.offsets(split))[-1]) if \
                    self.offsets(split).is_file() else held
            except (ValueError, OSError, IndexError, EOFError, KeyError) as e:
                raise UsageError(f"{self.wave(split)} or its offsets are damaged "
                                 f"({str(e).splitlines()[0][:80]}): {fix}") from None
            if size != self.wave(split).stat().st_size:
                raise UsageError(f"{self.wave(split)} is damaged: {self.wave(split).stat().st_size}"
                                 f" bytes where its header promises {size}: {fix}")
            if held != promised:
                raise UsageError(f"{self.wave(split)} holds {held} samples where "
                                 f"{self.offsets(split).name} promises {promised}: {fix}")

    def folds(self) -> list[int]:
        """The validated folds of a finished WORK."""
        self.prep()
        return validation_folds(read_table(self.train_csv))

    def classes(self) -> list[str]:
        if not self.classes_json.is_file():
            raise UsageError(f"{self.classes_json} not found: run `python preprocess.py --data "
                             f"DIR --work {self.dir}` first")
        return json.loads(self.classes_json.read_text())

    @property
    def runs(self) -> Path:
        return self.dir / "runs"

    def study(self, name: str) -> Path:
        """WORK/studies/<name>/: a tune.py study's best.yaml, trials.csv, plots, report.html."""
        return self.dir / "studies" / name

    def pretrain(self, name: str) -> Path:
        """WORK/pretrain/<name>/: encoder.pth, config.yaml, history.csv, curve.png, last.ckpt."""
        return self.dir / "pretrain" / name


def npy_layout(path: Path) -> tuple[int, int, tuple]:
    """(the values a .npy file's header promises, the bytes it should take, its shape) without
    reading its data."""
    with open(path, "rb") as f:
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
        shape, _, dtype = read(f)
        return int(np.prod(shape)), f.tell() + int(np.prod(shape)) * dtype.itemsize, shape


class Run:
    """WORK/runs/<name>: a run's folder, its folds' folders and the files other steps read."""

    def __init__(self, work: str | Path, name: str):
        self.work, self.name = Path(work), name
        self.dir = Work(work).runs / name

    @classmethod
    def at(cls, folder: str | Path) -> "Run":
        """The run whose folder is `folder` (WORK/runs/<name>)."""
        folder = Path(folder)
        return cls(folder.parent.parent, folder.name)

    @classmethod
    def blend(cls, work: str | Path, names: list[str]) -> "Run":
        """The folder of several runs blended (one run: that run's own)."""
        return cls(work, names[0] if len(names) == 1 else "blend_" + "+".join(names))

    def fold(self, k: int) -> Path:
        return self.dir / f"fold{k}"

    def folds(self) -> dict[int, Path]:
        """{k: fold folder} of every fold folder there is, finished or not."""
        return {int(p.name[4:]): p for p in sorted(self.dir.glob("fold*"))
                if p.is_dir() and p.name[4:].isdigit()}

    def checkpoint(self, k: int) -> Path:
        return self.fold(k) / BEST

    def results(self) -> list[Path]:
        """Where the run's outputs made from its folds go (RUN_RESULTS and RUN.onnx)."""
        return [self.dir / n for n in RUN_RESULTS] + [self.dir / f"{self.name}.onnx"]

    def oof(self, k: int, name: str = "oof") -> Path:
        """fold k's out-of-fold predictions: oof.csv, or oof_tta.csv with name='oof_tta'."""
        return self.fold(k) / f"{name}.csv"

    @property
    def test_probs(self) -> Path:
        return self.dir / TEST_PROBS

    @property
    def cv(self) -> Path:
        return self.dir / CV

    @property
    def test_score(self) -> Path:
        return self.dir / TEST_SCORE

    def checkpoints(self, folds: list[int]) -> list[Path]:
        """best.ckpt of each fold; UsageError naming each missing or unfinished one with the
        command that makes it."""
        paths = [self.checkpoint(k) for k in folds]
        bad = [p for p in paths if not (p.is_file() and fold_done(p.parent))]
        if bad:
            raise UsageError(f"{len(bad)} of {len(paths)} fold checkpoints are missing or "
                             f"unfinished:\n" + "\n".join(self._hint(p) for p in bad))
        return paths

    def _hint(self, path: Path) -> str:
        cmd = train_command(self, path.parent.name[4:])
        state = "unfinished (no result.json)" if path.is_file() else "missing"
        return f"  {path}: {state}\n    make it with: {cmd}" + (" --resume" * path.is_file())


# ----------------------------------------------------------------------------- fold state
def fold_done(fold_dir: Path) -> bool:
    """A fold is finished when train.py has written its result.json (last, after oof.csv); a
    fold tune.py's pruner stopped has pruned.json instead and never is."""
    return (Path(fold_dir) / RESULT).is_file()


def fold_pruned(fold_dir: Path) -> bool:
    return (Path(fold_dir) / PRUNED).is_file()


def read_config(fold_dir: Path) -> dict:
    """The settings a fold was trained with (its config.yaml), {} when it has none."""
    import yaml

    path = Path(fold_dir) / CONFIG
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def oof_missing(run: Run, folds: list[int], name: str) -> str:
    """Why run's `name`.csv (oof or oof_tta) cannot be read for `folds`, and the fix: a fold
    trained without TTA views has no oof_tta.csv (not unfinished: it finished as asked)."""
    missing = [k for k in folds if not run.oof(k, name).is_file()]
    plain = [k for k in missing if fold_done(run.fold(k)) and run.oof(k, "oof").is_file()]
    if name == "oof_tta" and plain:
        return (f"run {run.name}: fold(s) {', '.join(map(str, plain))} finished without test-time "
                f"views (trained without -a y), so there is no TTA OOF: use -a n here, or train "
                f"them again with -a y")
    if missing:
        return (f"run {run.name}: fold(s) {', '.join(map(str, missing))} have no {name}.csv; "
                f"train them: {train_command(run, str(missing[0]))}")
    open_folds = [k for k in folds if not fold_done(run.fold(k))]
    return (f"run {run.name}: fold(s) {', '.join(map(str, open_folds))} did not finish; train "
            f"them to the end: {train_command(run, str(open_folds[0]))} --resume")


def train_command(run: Run, fold: str) -> str:
    """The command that trains `fold` of a run: another fold's command.txt with -f changed,
    else one guessed from the run's MODEL_SIZE name."""
    for cmd in sorted(run.dir.glob("fold*/command.txt")):
        args = strip_options(shlex.split(cmd.read_text())[2:], ("-f", "--fold"))
        args = [a for a in args if a not in ("--no-progress", "--resume")]
        return shlex.join(["python", "train.py", *args, "-f", fold])
    model, _, size = run.name.rpartition("_")
    if model and size.isdigit():
        return f"python train.py --work {run.work} -m {model} -t {size} -f {fold} -g 0"
    return f"python train.py --work {run.work} --run {run.name} -m MODEL -t SIZE -f {fold} -g 0"


# ----------------------------------------------------------------------------- fold lists
def parse_folds(spec: str) -> list[int]:
    """'5' -> [0..4] (the seed's meaning); '0,2' -> [0, 2]; '3,' -> [3]."""
    try:
        folds = [int(s) for s in spec.split(",") if s.strip()] if "," in spec else \
            list(range(int(spec)))
    except ValueError:
        folds = []
    if not folds or len(set(folds)) < len(folds):
        raise UsageError(f"-f {spec}: expected a fold count of at least 1 (5: folds 0-4) or a "
                         f"list of distinct folds (0,2)")
    return folds


def requested_folds(work: Path, spec: str) -> list[int]:
    """The folds of `-f spec` (inference.py, export.py), each checked to be one of WORK's."""
    folds, have = parse_folds(spec), Work(work).folds()
    if not set(folds) <= set(have):
        raise UsageError(f"-f {spec}: {Work(work).train_csv} has folds "
                         f"{', '.join(map(str, have))}")
    return folds
