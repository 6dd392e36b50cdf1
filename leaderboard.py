"""The leaderboard of runs: every run under WORK/runs with what made it (model, size,
augmentation, epochs, EMA, pseudo-labels, teacher, initial weights, label share, the rest of
its recipe), its folds done, its CV and test scores and its training minutes, best CV first;
written to WORK/runs/leaderboard.csv (report.py prints it)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from results import _short, augmentation_label, label_index, load_oof, ranking_scores
from runs import ENCODER, LEADERBOARD, RESULT, Run, Work, fold_done, fold_pruned, read_config
from util import write_csv


def run_row(run_dir: Path, n_folds: int, classes: list[str]) -> dict | None:
    """One leaderboard row: what made the run and how it scored."""
    run = Run.at(run_dir)
    folds = run.folds()
    done = [k for k, d in folds.items() if fold_done(d)]
    if not folds:
        return None
    cfg = read_config(folds[done[0] if done else min(folds)])
    minutes = sum(json.loads((folds[k] / RESULT).read_text()).get("seconds", 0)
                  for k in done) / 60
    row = dict(run=run_dir.name, model=cfg.get("model", "?"), size=cfg.get("size"),
               aug=augmentation_label(cfg), epochs=cfg.get("epochs"), ema=cfg.get("ema", 0.0),
               pseudo=cfg.get("pseudo", ""), teacher=cfg.get("teacher", ""),
               init=initialised_from(cfg.get("pretrained", "")), labels=cfg.get("labels", 1.0),
               recipe=recipe_label(cfg),
               folds_done=f"{len(done)}/{n_folds}" + (" (pruned)" * any(
                   fold_pruned(d) for d in folds.values())))
    for name, key in (("oof", "cv"), ("oof_tta", "cv_tta")):
        got = load_oof([run_dir], done, name, classes) if done else None
        row[key] = (float((got[1].argmax(1) == label_index(got[0].label, classes)).mean())
                    if got else np.nan)
        row[f"{key}_map"] = ranking_scores(*got, classes).get("map", np.nan) if got else np.nan
    test = json.loads(run.test_score.read_text()) if run.test_score.is_file() else {}
    by = " ".join(f"{v} {a:.4f}" for accs in test.get("by", {}).values() for v, a in accs.items())
    row.update(test_acc=test.get("accuracy", np.nan), test_cmap=test.get("cmap_pad5", np.nan),
               test_by=by, test_with=test.get("with", ""),
               train_min=round(minutes, 1))
    return row


def recipe_label(cfg: dict) -> str:
    """The multilabel tools a run used: 'bce sed balance=0.5 swa=0.75 crop=start', or ''."""
    if not cfg.get("multilabel"):
        return ""
    parts = ["focal" if cfg.get("focal") else "bce"]
    parts += [("sed" if cfg.get("sed_output", "frames") == "frames" else "sed(clip)")] \
        if cfg.get("head") == "sed" else []
    parts += [f"{k}={_short(cfg[k])}" for k in ("balance", "swa") if cfg.get(k)]
    parts += ["crop=start"] if cfg.get("crop") == "start" else []
    return " ".join(parts)


def initialised_from(pretrained: str) -> str:
    """What a run's weights started from: scratch, timm, pretrain:<name> (pretrain.py's
    encoder), run:<run> (another run's checkpoint) or the weights file's name."""
    if not pretrained or pretrained == "timm":
        return pretrained or "scratch"
    p = Path(pretrained)
    if p.name == ENCODER and p.parent.parent.name == "pretrain":
        return f"pretrain:{p.parent.name}"
    if p.suffix == ".ckpt" and p.parent.name.startswith("fold"):
        return f"run:{p.parent.parent.name}"
    return p.name


def leaderboard(work: str | Path) -> pd.DataFrame:
    """Every run under WORK/runs with what made it and how it scored, best CV first; written
    to WORK/runs/leaderboard.csv."""
    work = Path(work)
    classes = Work(work).classes()
    n_folds = len(Work(work).folds())
    rows = [r for d in sorted(Work(work).runs.glob("*")) if d.is_dir()
            for r in [run_row(d, n_folds, classes)] if r]
    board = pd.DataFrame(rows, columns=["run", "model", "size", "aug", "epochs", "ema", "pseudo",
                                        "teacher", "init", "labels", "recipe", "folds_done",
                                        "cv", "cv_tta", "cv_map", "cv_tta_map", "test_acc",
                                        "test_cmap", "test_by", "test_with", "train_min"])
    rank = ["cv_map", "cv_tta_map"] if board.cv_map.notna().any() else ["cv", "cv_tta"]
    board = board.sort_values(rank, ascending=False, na_position="last")
    if len(board):
        write_csv(board, Work(work).runs / LEADERBOARD)
    return board.reset_index(drop=True)
