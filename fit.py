"""One fold's training as a library: every check and the data and model of a fold (plan_fold),
its callbacks, the fit, and its records (result.json last). train.py runs it per fold from
the command line, tune.py per trial; neither script imports the other.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from arg import LEARNT, Config
from callback import EMA, FreezeBody, History, OOFWriter, SWA, ValidationCollector
from cache import Clips, Rows
from dataset import FoldData, load_noise, pseudo_labels
from ensemble import load_checkpoint, predict_waves
from job import Job, build_logger, check_model, check_resume, loader_workers, run_job
from model import AudioClassifier
from results import cv_summary, write_html
from runs import (BEST, FOLD_RECORDS, LAST, OOF, OOF_TTA, RESULT, Run, Work, fold_done,
                  train_command, validation_folds)
from util import UsageError, pick_device, write_csv, write_json

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- one fold
@dataclasses.dataclass
class Fold:
    """What one fold trains with, every check done and nothing written yet."""
    cfg: Config
    k: int
    run: Run
    accelerator: str
    devices: list[int] | int
    data: object  # dataset.FoldData
    model: object  # model.AudioClassifier
    resume_from: str | None = None
    teacher: str = ""  # the teacher's checkpoint
    pseudo_clips: int = 0

    @property
    def dir(self) -> Path:
        return self.run.fold(self.k)


def load_pseudo(cfg: Config, work: Work):
    """The pseudo-labelled test rows of --pseudo RUN, or None."""
    if not cfg.pseudo:
        return None
    source = Run(cfg.work, cfg.pseudo)
    if not source.test_probs.is_file():
        raise UsageError(f"--pseudo {cfg.pseudo}: {source.test_probs} not found; make it with: "
                         f"python inference.py --work {cfg.work} --run {cfg.pseudo} -f 5 -a y")
    return pseudo_labels(work.dir, source.test_probs, cfg.pseudo_threshold, work.classes())


def load_teacher(cfg: Config, k: int, work: Work, classes: list[str]):
    """(teacher model, its checkpoint) for --teacher RUN: its fold k, which never saw fold k's
    clips; (None, '') without --teacher."""
    if not cfg.teacher:
        return None, ""
    source = Run(cfg.work, cfg.teacher)
    path = source.checkpoint(k)
    if not path.is_file() or not fold_done(path.parent):
        raise UsageError(f"--teacher {cfg.teacher}: {path} is missing or its fold is unfinished; "
                         f"make it with: {train_command(source, str(k))}")
    teacher = load_checkpoint(path)
    if teacher.classes != classes:
        raise UsageError(f"--teacher {cfg.teacher}: {path} was trained on other classes than "
                         f"{work.classes_json}")
    if (teacher.cfg.sr, teacher.cfg.seconds) != (cfg.sr, cfg.seconds):
        raise UsageError(f"--teacher {cfg.teacher}: {path} hears {teacher.cfg.sr} Hz x "
                         f"{teacher.cfg.seconds} s clips, this run {cfg.sr} Hz x {cfg.seconds} s")
    return teacher, str(path)


def plan_fold(cfg: Config, k: int) -> Fold:
    """Every check, the data and the model of fold k; nothing is written."""
    import lightning as L

    check_model(cfg.model)
    work, run = Work(cfg.work), Run(cfg.work, cfg.run_name)
    accelerator, devices = pick_device(cfg.gpus, cfg.devices)
    last = run.fold(k) / LAST
    resume_from = str(last) if cfg.resume and last.is_file() else None
    if resume_from:
        check_resume(cfg, run.fold(k), "delete it to train the fold from the start, or train "
                                       "under another --run")
    pseudo = load_pseudo(cfg, work)
    workers = loader_workers(cfg, accelerator)
    data = FoldData(cfg, k, work, workers, pseudo)
    teacher, teacher_path = load_teacher(cfg, k, work, data.classes)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = AudioClassifier(cfg.part(*LEARNT), data.classes)  # what the checkpoint holds
    model.net.set_noise(load_noise(cfg.work))
    if teacher is not None:
        model.set_teacher(teacher)
        log.info("fold %d: distilling from %s (T=%g, weight %g)", k, teacher_path, cfg.kd_temp,
                 cfg.kd_weight)
    if pseudo is not None:
        log.info("fold %d: %d pseudo-labelled test clips (p >= %g) join the training set", k,
                 len(pseudo), cfg.pseudo_threshold)
    return Fold(cfg, k, run, accelerator, devices, data, model, resume_from, teacher_path,
                0 if pseudo is None else len(pseudo))


def fold_callbacks(fold: Fold) -> list:
    """The books of a fold: one validation collector that best.ckpt (weights of the best
    epoch), OOF and history read; last.ckpt (everything --resume needs); EMA or SWA;
    freezing."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg, d = fold.cfg, fold.dir
    collector = ValidationCollector(cfg.multilabel)
    best = ModelCheckpoint(dirpath=d, filename="best", monitor=collector.monitor, mode="max",
                           save_top_k=1, save_weights_only=True, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=d, filename="last", save_top_k=1,
                           enable_version_counter=False)  # no monitor: the newest epoch
    callbacks = [collector, best, last, History(d, f"{cfg.run_name} fold {fold.k}", fold.k),
                 OOFWriter(d, fold.data.val_table, fold.data.classes, collector)]
    if cfg.ema > 0:
        callbacks.append(EMA(cfg.ema, cfg))
    if cfg.swa > 0:
        callbacks.append(SWA(int(cfg.swa * cfg.epochs)))
    if cfg.freeze_epochs > 0:
        callbacks.append(FreezeBody(cfg.freeze_epochs))
    return callbacks


def finish_fold(fold: Fold, trainer, t0: float) -> dict:
    """result.json (last: the fold is finished), the TTA OOF with -a y, and the run's CV and
    report once every fold is done."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    cfg, best = fold.cfg, trainer.checkpoint_callback
    score = float("nan") if best.best_model_score is None else float(best.best_model_score)
    result = dict(fold=fold.k, **{best.monitor: score},  # a best score of 0.0 is 0.0
                  epochs=trainer.current_epoch, seconds=round(time.time() - t0, 1),
                  device=fold.accelerator, processes=trainer.world_size, ema=cfg.ema,
                  teacher=fold.teacher, pseudo_clips=fold.pseudo_clips)
    ema = [c for c in trainer.callbacks if isinstance(c, EMAWeightAveraging)]
    if ema:  # the optimizer step the average started at (the warm-up's end, per process)
        result["ema_start_step"] = ema[0].update_starting_at_step
    if not trainer.is_global_zero:
        return result
    if cfg.tta == "y":
        gpu = fold.accelerator == "gpu"
        device = torch.device(f"cuda:{fold.devices[0]}" if gpu else "cpu")
        write_oof_tta(fold.dir, Path(cfg.work), fold.data.classes, device, cfg.batch_size * 2,
                      cfg.clip_samples)
    write_json(dict(result, seconds=round(time.time() - t0, 1)), fold.dir / RESULT)
    log.info("fold %d: best %s %.4f, %d epochs in %.0f s -> %s", fold.k, best.monitor,
             result[best.monitor], result["epochs"], result["seconds"], fold.dir)
    folds = validation_folds(fold.data.table)
    cv = cv_summary([fold.run.dir], fold.data.classes, folds, fold.run.dir)
    if cv:
        key = "map" if cfg.multilabel else "accuracy"
        log.info("all %d folds done: CV %s %.4f -> %s", len(folds),
                 "mAP" if cfg.multilabel else "accuracy", cv[key], fold.run.cv)
        made = write_html(fold.run.dir, Path(cfg.work))
        if made:
            log.info("run report: %s", made)
    return result


def train_fold(cfg: Config, k: int, progress: bool = True, extra_callbacks=()) -> dict:
    """Fit fold k; returns its summary (best val accuracy, epochs, seconds). Every check runs
    before anything is written; from the lock on, this process owns the fold folder.
    `extra_callbacks`: more Lightning callbacks (tune.py's pruning)."""
    fold = plan_fold(cfg, k)
    # a fresh fold starts without its earlier records, and its run without the results made
    # from the earlier folds (the leaderboard would pair the old test score with the new CV,
    # --pseudo would read the old test_probs.csv)
    job = Job(cfg, fold.dir, fold.model, dict(datamodule=fold.data), "train.py", f"fold {k}",
              (fold.accelerator, fold.devices), fold=k, resume_from=fold.resume_from,
              stale=tuple(fold.dir / n for n in FOLD_RECORDS) + tuple(fold.run.results()))
    t0 = time.time()
    return run_job(job, fold_callbacks(fold) + list(extra_callbacks), progress,
                   lambda trainer: finish_fold(fold, trainer, t0),
                   build_logger(cfg, fold.dir, f"fold{k}"))


def write_oof_tta(fold_dir: Path, work: Path, classes: list[str], device, batch: int,
                  length: int) -> None:
    """oof_tta.csv: oof.csv's rows predicted by best.ckpt with the TTA views averaged (once,
    after training, rather than at every validation)."""
    oof = pd.read_csv(fold_dir / OOF, keep_default_na=False)
    waves = Rows(Clips.of(work, "train"), oof.row, length)
    probs = predict_waves([fold_dir / BEST], waves, True, device, batch)[0][0]
    oof[classes] = probs
    write_csv(oof, fold_dir / OOF_TTA)
