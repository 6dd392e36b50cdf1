"""The run folder layout, in one place: every path under WORK/runs/<run>/ that more than one
script reads, and a fold's state (finished, its config, the command that trains it).

    WORK/runs/<run>/fold<k>/  best.ckpt last.ckpt history.csv curve.png oof.csv oof_tta.csv
                              config.yaml command.txt train.log .lock result.json (last)
    WORK/runs/<run>/          cv.json report.html submission.csv test_probs.csv ...
    WORK/runs/blend_<a>+<b>/  the same for a blend of runs (inference.py --runs)
    WORK/runs/leaderboard.csv
    WORK/pretrain/<name>/     encoder.pth config.yaml history.csv curve.png last.ckpt (pretrain.py)
"""
from __future__ import annotations

import shlex
from pathlib import Path

from util import UsageError, strip_options

# what a fold writes; a fresh (not resumed) fold starts without any of them
FOLD_RECORDS = ("result.json", "best.ckpt", "last.ckpt", "history.csv", "curve.png", "oof.csv",
                "oof_tta.csv")


def runs_dir(work: str | Path) -> Path:
    return Path(work) / "runs"


def pretrain_dir(work: str | Path, name: str) -> Path:
    """WORK/pretrain/<name>/: encoder.pth, config.yaml, history.csv, curve.png, last.ckpt."""
    return Path(work) / "pretrain" / name


class Run:
    """WORK/runs/<name>: a run's folder, its folds' folders and the files other steps read."""

    def __init__(self, work: str | Path, name: str):
        self.work, self.name = Path(work), name
        self.dir = runs_dir(work) / name

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
        return self.fold(k) / "best.ckpt"

    def oof(self, k: int, name: str = "oof") -> Path:
        """fold k's out-of-fold predictions: oof.csv, or oof_tta.csv with name='oof_tta'."""
        return self.fold(k) / f"{name}.csv"

    @property
    def test_probs(self) -> Path:
        return self.dir / "test_probs.csv"

    @property
    def cv(self) -> Path:
        return self.dir / "cv.json"

    @property
    def test_score(self) -> Path:
        return self.dir / "test_score.json"

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
    """A fold is finished when train.py has written its result.json (last, after oof.csv)."""
    return (Path(fold_dir) / "result.json").is_file()


def read_config(fold_dir: Path) -> dict:
    """The settings a fold was trained with (its config.yaml), {} when it has none."""
    import yaml

    path = Path(fold_dir) / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


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
        if "," in spec:
            return [int(s) for s in spec.split(",") if s.strip()]
        return list(range(int(spec)))
    except ValueError:
        raise UsageError(f"-f {spec}: expected a fold count (5) or a list (0,2)") from None


def requested_folds(work: Path, spec: str) -> list[int]:
    """The folds of `-f spec` (inference.py, export.py), each checked to be one of WORK's."""
    from dataset import work_folds

    folds, have = parse_folds(spec), work_folds(work)
    if not set(folds) <= set(have):
        raise UsageError(f"-f {spec}: {Path(work) / 'train.csv'} has folds "
                         f"{', '.join(map(str, have))}")
    return folds
