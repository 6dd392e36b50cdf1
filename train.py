"""Train one fold on one GPU (or the CPU), every fold over several GPUs, or one fold with DDP.

    python train.py -t 224 -m res2next50 -f 0 -g 0            # fold 0 on GPU 0
    python train.py -t 224 -m res2next50 -f all -g 0,1,2,3,4  # 5 folds, one process per GPU
    python train.py -m resnet18 -t 64 -e 8 -f 0 -g -1         # CPU
    python train.py ... -f 0 --devices 4 --strategy ddp       # one fold over 4 GPUs (or -g cpu)
    python train.py ... -f 0 --resume                         # continue from last.ckpt
    python train.py --config WORK/runs/RUN/fold0/config.yaml  # the same fold again

Writes WORK/runs/<run>/fold<k>/{best.ckpt,last.ckpt,history.csv,curve.png,oof.csv,config.yaml,
command.txt,result.json} (result.json last: a fold without it is unfinished), and
WORK/runs/<run>/{cv.json,report.html} once every fold is done.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from arg import RESUME_SAFE, Config, make_parser, parse_config, write_yaml
from util import (FoldLock, UsageError, launched_rank_zero, setup_logging, strip_options,
                  write_json)

log = logging.getLogger(__name__)
FOLD_FILES = ("result.json", "best.ckpt", "last.ckpt", "history.csv", "curve.png", "oof.csv",
              "oof_tta.csv")
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",),
                   "wandb": ("wandb",)}


def parse_gpus(spec: str) -> list[int]:
    """'0,1' -> [0, 1]; '-1' or 'cpu' -> [-1]; 'cpu,cpu' -> two CPU workers."""
    try:
        return [-1 if g.strip() == "cpu" else int(g) for g in str(spec).split(",") if g.strip()]
    except ValueError:
        raise UsageError(f"-g {spec}: expected GPU indices (0 or 0,1), -1 or cpu") from None


def pick_device(cfg: Config) -> tuple[str, list[int] | int]:
    """('gpu', [ids]) or ('cpu', processes). No GPU at all -> CPU with a warning; a GPU index
    that is not there -> UsageError listing those that are."""
    gpus = parse_gpus(cfg.gpus)
    n = torch.cuda.device_count()
    if not gpus or all(g < 0 for g in gpus):
        return "cpu", cfg.devices
    if n == 0:
        log.warning("no GPU is visible: training on the CPU (pass -g -1 to say so)")
        return "cpu", cfg.devices
    missing = [g for g in gpus if g >= n]
    if missing:
        have = ", ".join(f"{i} ({torch.cuda.get_device_name(i)})" for i in range(n))
        raise UsageError(f"GPU {missing} requested with -g {cfg.gpus}, but the visible GPUs "
                         f"are: {have}. Use -g with one of those, or -g -1 for the CPU")
    if cfg.devices > 1:
        ids = gpus if len(gpus) == cfg.devices else list(range(cfg.devices))
        if max(ids) >= n:
            raise UsageError(f"--devices {cfg.devices} needs {cfg.devices} GPUs; {n} visible")
        return "gpu", ids
    return "gpu", gpus[:1]


def lightning_precision(p: str, accelerator: str) -> str:
    if accelerator == "cpu" and p == "16":
        return "32-true"  # fp16 autocast does not exist on CPU (Lightning would use bf16)
    return {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true"}[p]


# ----------------------------------------------------------------------------- checks
def check_model(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise UsageError(f"-m {name}: timm has no such model"
                         + (f"; did you mean {', '.join(close)}?" if close else
                            " (python -c 'import timm; print(timm.list_models(\"*res*\"))' lists them)"))


def check_resume(cfg: Config, fold_dir: Path) -> None:
    """--resume continues only the fold it was: refuse, naming them, settings that differ
    in anything but RESUME_SAFE."""
    from report import read_config

    saved = read_config(fold_dir)
    if not saved or not (fold_dir / "last.ckpt").is_file():
        return
    old = Config.from_dict(saved).to_dict()
    diff = {k: (old[k], v) for k, v in cfg.to_dict().items()
            if k not in RESUME_SAFE and old.get(k) != v}
    if diff:
        said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"--resume: {fold_dir} was trained with other settings ({said}). Only "
                         f"{', '.join(RESUME_SAFE)} may change on --resume: resume with the same "
                         f"flags (--config {fold_dir / 'config.yaml'}), or train under a new --run")


def teacher_checkpoint(cfg: Config, fold: int) -> Path:
    """The teacher of fold k is the teacher run's fold k: it never saw fold k's clips."""
    from report import fold_done, train_command

    path = Path(cfg.work) / "runs" / cfg.teacher / f"fold{fold}" / "best.ckpt"
    if not path.is_file() or not fold_done(path.parent):
        raise UsageError(f"--teacher {cfg.teacher}: {path} is missing or its fold is unfinished; "
                         f"make it with: {train_command(path.parent.parent, Path(cfg.work), str(fold))}")
    return path


def build_logger(cfg: Config, fold_dir: Path, fold: int):
    """The Lightning logger of --logger (False for none); UsageError with the pip command when
    its package is not installed."""
    import importlib.util

    from lightning.pytorch import loggers

    if cfg.logger == "none":
        return False
    need = LOGGER_PACKAGES.get(cfg.logger, ())
    if need and not any(importlib.util.find_spec(p) for p in need):
        raise UsageError(f"--logger {cfg.logger} needs the {need[0]} package: "
                         f"pip install {need[0]}")
    name = f"{cfg.run_name}_fold{fold}"
    if cfg.logger == "csv":
        return loggers.CSVLogger(fold_dir, name="csv_logs")
    if cfg.logger == "tensorboard":
        return loggers.TensorBoardLogger(fold_dir, name="tensorboard")
    if cfg.logger == "mlflow":  # a local file store in WORK/mlruns unless told otherwise
        uri = (Path(cfg.work) / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks for this
        return loggers.MLFlowLogger(experiment_name=cfg.run_name, run_name=f"fold{fold}",
                                    tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", uri))
    return loggers.WandbLogger(project="uac", name=name, save_dir=str(fold_dir))


# ----------------------------------------------------------------------------- one fold
def train_fold(cfg: Config, fold: int, progress: bool = True) -> dict:
    """Fit one fold; returns its summary (best val accuracy, epochs, seconds). Every check
    runs before anything is written."""
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, TQDMProgressBar

    from callback import AtomicCheckpointIO, History, OOFWriter
    from dataset import FoldData, load_noise, pseudo_labels, read_classes, work_folds
    from model import AudioClassifier, load_checkpoint
    from report import cv_summary, write_html

    work = Path(cfg.work)
    work_folds(work)
    check_model(cfg.model)
    accelerator, devices = pick_device(cfg)
    precision = lightning_precision(cfg.precision, accelerator)
    run_dir = work / "runs" / cfg.run_name
    fold_dir = run_dir / f"fold{fold}"
    rank_zero = launched_rank_zero()
    resume_from = str(fold_dir / "last.ckpt") if cfg.resume and (fold_dir / "last.ckpt").is_file() \
        else None
    if resume_from:
        check_resume(cfg, fold_dir)
    logger = build_logger(cfg, fold_dir, fold)

    pseudo = None
    if cfg.pseudo:
        probs = work / "runs" / cfg.pseudo / "test_probs.csv"
        if not probs.is_file():
            raise UsageError(f"--pseudo {cfg.pseudo}: {probs} not found; make it with: python "
                             f"inference.py --work {work} --run {cfg.pseudo} -f 5 -a y")
        pseudo = pseudo_labels(work, probs, cfg.pseudo_threshold, read_classes(work))
    workers = cfg.workers if cfg.workers >= 0 else (4 if accelerator == "gpu" else 0)
    data = FoldData(work, fold, cfg.batch_size, workers, pseudo)
    teacher = None
    if cfg.teacher:
        teacher_path = teacher_checkpoint(cfg, fold)
        teacher = load_checkpoint(teacher_path)
        if teacher.classes != data.classes:
            raise UsageError(f"--teacher {cfg.teacher}: {teacher_path} was trained on other "
                             f"classes than {work / 'classes.json'}")
        if (teacher.cfg.sr, teacher.cfg.seconds) != (cfg.sr, cfg.seconds):
            raise UsageError(f"--teacher {cfg.teacher}: {teacher_path} hears {teacher.cfg.sr} Hz "
                             f"x {teacher.cfg.seconds} s clips, this run {cfg.sr} Hz x "
                             f"{cfg.seconds} s")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = AudioClassifier(cfg.to_dict(), data.classes)
    model.set_noise(load_noise(work))
    if teacher is not None:
        model.set_teacher(teacher)
        log.info("fold %d: distilling from %s (T=%g, weight %g)", fold, teacher_path,
                 cfg.kd_temp, cfg.kd_weight)
    if pseudo is not None:
        log.info("fold %d: %d pseudo-labelled test clips (p >= %g) join the training set",
                 fold, len(pseudo), cfg.pseudo_threshold)

    # nothing was written so far; from here on this process owns the fold folder
    lock = None
    if rank_zero:
        lock = FoldLock(fold_dir).acquire()
        if resume_from:
            log.info("fold %d: resuming from %s", fold, resume_from)
        else:
            if cfg.resume:
                log.warning("fold %d: --resume but no %s yet: starting from scratch", fold,
                            fold_dir / "last.ckpt")
            for name in FOLD_FILES:
                (fold_dir / name).unlink(missing_ok=True)
        write_yaml(cfg, fold_dir / "config.yaml")
        (fold_dir / "command.txt").write_text(shlex.join([sys.executable, *sys.argv]) + "\n")
    if accelerator == "cpu" and devices > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // devices))

    # best.ckpt: weights of the best epoch; last.ckpt: everything --resume needs
    best = ModelCheckpoint(dirpath=fold_dir, filename="best", monitor="val_acc", mode="max",
                           save_top_k=1, save_weights_only=True, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=fold_dir, filename="last", save_top_k=1,
                           enable_version_counter=False)  # no monitor: the newest epoch
    callbacks = [best, last, History(fold_dir, f"{cfg.run_name} fold {fold}", fold),
                 OOFWriter(fold_dir, data.val_table, data.classes)]
    if cfg.ema > 0:  # start once the learning-rate warmup is over
        steps = len(data.train_ds) // cfg.batch_size
        lim = cfg.limit_batches
        steps = max(1, int(lim) if lim > 1 else int(steps * lim))
        callbacks.append(EMAWeightAveraging(decay=cfg.ema,
                                            update_starting_at_step=int(cfg.warmup * steps)))
    if progress:
        callbacks.append(TQDMProgressBar(leave=True))
    strategy = cfg.strategy
    if strategy == "auto" and (devices if isinstance(devices, int) else len(devices)) * \
            cfg.num_nodes > 1:
        strategy = "ddp"
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=cfg.num_nodes,
        precision=precision, max_epochs=cfg.epochs, callbacks=callbacks, logger=logger,
        plugins=[AtomicCheckpointIO()], deterministic=accelerator == "cpu",
        benchmark=accelerator == "gpu", num_sanity_val_steps=0,
        limit_train_batches=cfg.limit_batches, enable_progress_bar=progress,
        enable_model_summary=False, default_root_dir=fold_dir)
    t0 = time.time()
    trainer.fit(model, datamodule=data, ckpt_path=resume_from)
    seconds = time.time() - t0
    result = dict(fold=fold, val_acc=float(best.best_model_score or float("nan")),
                  epochs=trainer.current_epoch, seconds=round(seconds, 1), device=accelerator,
                  processes=trainer.world_size, ema=cfg.ema,
                  teacher=str(teacher_path) if teacher is not None else "",
                  pseudo_clips=0 if pseudo is None else len(pseudo))
    if trainer.is_global_zero:
        if cfg.tta == "y":
            device = torch.device(f"cuda:{devices[0]}" if accelerator == "gpu" else "cpu")
            write_oof_tta(fold_dir, work, data.classes, device, cfg.batch_size * 2)
        result["seconds"] = round(time.time() - t0, 1)
        write_json(result, fold_dir / "result.json")  # last: the fold is finished
        log.info("fold %d: best val_acc %.4f, %d epochs in %.0f s -> %s", fold, result["val_acc"],
                 result["epochs"], seconds, fold_dir)
        folds = sorted(data.table.fold.unique().tolist())
        cv = cv_summary([run_dir], data.classes, folds, run_dir)
        if cv:
            log.info("all %d folds done: CV accuracy %.4f -> %s", len(folds), cv["accuracy"],
                     run_dir / "cv.json")
            made = write_html(run_dir, work)
            if made:
                log.info("run report: %s", made)
    if lock:
        lock.release()
    return result


def write_oof_tta(fold_dir: Path, work: Path, classes: list[str], device, batch: int) -> None:
    """oof_tta.csv: oof.csv's rows predicted by best.ckpt with the TTA views averaged (once,
    after training, rather than at every validation)."""
    import numpy as np

    from model import predict_waves
    from util import write_csv

    oof = pd.read_csv(fold_dir / "oof.csv", keep_default_na=False)
    waves = np.load(work / "train_wave.npy", mmap_mode="r")[oof.row.to_numpy()]
    probs = predict_waves([fold_dir / "best.ckpt"], waves, True, device, batch)[0][0]
    oof[classes] = probs
    write_csv(oof, fold_dir / "oof_tta.csv")


# ----------------------------------------------------------------------------- every fold
def fold_status(fold_dir: Path, epochs: int) -> tuple[int, float]:
    """(epochs done, latest val accuracy) of a running fold, from its history.csv."""
    try:
        hist = pd.read_csv(fold_dir / "history.csv")
    except (OSError, pd.errors.EmptyDataError):
        return 0, float("nan")
    return min(epochs, len(hist)), float(hist.val_acc.iloc[-1]) if len(hist) else float("nan")


def train_all(cfg: Config, argv: list[str]) -> int:
    """Every fold as its own process, one per -g entry (a GPU, or -1 for a CPU worker),
    queued when there are more folds than entries; each fold logs to its folder. The bar
    counts epochs over all folds and shows each running fold's epoch and val accuracy."""
    from tqdm import tqdm

    from dataset import work_folds

    folds = work_folds(Path(cfg.work))
    check_model(cfg.model)
    slots = parse_gpus(cfg.gpus)
    if torch.cuda.device_count() == 0 and any(g >= 0 for g in slots):
        log.warning("no GPU is visible: the folds train on the CPU, %d at a time", len(slots))
        slots = [-1] * len(slots)
    pick_device(Config(gpus=",".join(str(g) for g in slots if g >= 0) or "-1"))  # validate ids
    cpu_slots = max(1, sum(g < 0 for g in slots))
    threads = max(1, (os.cpu_count() or 1) // cpu_slots)
    base = strip_options(argv, ("-f", "--fold", "-g", "--gpus"))
    run_dir = Path(cfg.work) / "runs" / cfg.run_name
    pending, running, results = list(folds), {}, []
    bar = tqdm(total=len(folds) * cfg.epochs, desc=f"{cfg.run_name}", unit="epoch",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} epochs [{elapsed}<{remaining}]{postfix}")
    finished_epochs = 0
    while pending or running:
        for i, slot in enumerate(slots):
            if pending and i not in running.values():
                k = pending.pop(0)
                fold_dir = run_dir / f"fold{k}"
                fold_dir.mkdir(parents=True, exist_ok=True)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads) if slot < 0 else "4")
                cmd = [sys.executable, str(Path(__file__).resolve()), *base, "-f", str(k),
                       "-g", str(slot), "--no-progress"]
                logf = open(fold_dir / "train.log", "w")
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
                running[proc] = i
                proc.fold, proc.logf, proc.t0 = k, logf, time.time()
                bar.write(f"fold {k} -> {'GPU ' + str(slot) if slot >= 0 else 'CPU'} "
                          f"(log: {fold_dir / 'train.log'})")
        time.sleep(0.5)
        status = {p.fold: fold_status(run_dir / f"fold{p.fold}", cfg.epochs) for p in running}
        shown = (finished_epochs + sum(e for e, _ in status.values()),
                 " | ".join(f"fold {k}: epoch {e}/{cfg.epochs}"
                            + (f" val {acc:.3f}" if acc == acc else "")  # nan: not validated yet
                            for k, (e, acc) in sorted(status.items())))
        if shown != (bar.n, bar.postfix):
            bar.n = shown[0]
            bar.set_postfix_str(shown[1])
        for proc in [p for p in running if p.poll() is not None]:
            del running[proc]
            proc.logf.close()
            done, acc = fold_status(run_dir / f"fold{proc.fold}", cfg.epochs)
            hist_path = run_dir / f"fold{proc.fold}" / "history.csv"
            best = pd.read_csv(hist_path).val_acc.max() if hist_path.is_file() else float("nan")
            results.append(dict(fold=proc.fold, status="ok" if proc.returncode == 0 else
                                f"failed ({proc.returncode}), see train.log",
                                best_val_acc=best, epochs=done,
                                minutes=round((time.time() - proc.t0) / 60, 1)))
            finished_epochs += cfg.epochs
            if proc.returncode != 0:
                tail = (run_dir / f"fold{proc.fold}" / "train.log").read_text().strip()
                bar.write(f"fold {proc.fold} failed: {tail.splitlines()[-1] if tail else '?'}")
    bar.n = finished_epochs
    bar.close()
    summary = pd.DataFrame(results).sort_values("fold")
    print(summary.to_string(index=False))
    cv_path = run_dir / "cv.json"
    if cv_path.is_file() and (summary.status == "ok").all():
        print(f"CV accuracy {json.loads(cv_path.read_text())['accuracy']:.4f} -> {cv_path}")
    return 0 if (summary.status == "ok").all() else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = make_parser(__doc__.split("\n")[0], config_file=True)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (logs to files)")
    cfg, args = parse_config(p, argv)
    setup_logging()
    from model import CheckpointError, PretrainedError

    try:
        if cfg.fold == "all":
            return train_all(cfg, argv)
        if not cfg.fold.lstrip("-").isdigit():
            raise UsageError(f"-f {cfg.fold}: expected a fold number or 'all'")
        train_fold(cfg, int(cfg.fold), args.progress)
    except (UsageError, FileNotFoundError, ValueError, PretrainedError, CheckpointError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"train: fold {cfg.fold}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
