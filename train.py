"""Train one fold on one GPU (or the CPU), every fold over several GPUs, or one fold with DDP.

    python train.py -t 224 -m res2next50 -f 0 -g 0            # fold 0 on GPU 0
    python train.py -t 224 -m res2next50 -f all -g 0,1,2,3,4  # 5 folds, one process per GPU
    python train.py -m resnet18 -t 64 -e 8 -f 0 -g -1         # CPU
    python train.py ... -f 0 --devices 4 --strategy ddp       # one fold over 4 GPUs
    python train.py ... -f 0 --resume                         # continue from last.ckpt

Writes WORK/runs/<run>/fold<k>/{best.ckpt,last.ckpt,history.csv,curve.png,oof.csv,config.json,
command.txt} and WORK/runs/<run>/cv.json once every fold has its oof.csv.
"""
from __future__ import annotations

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

from arg import Config, config_from_args, make_parser
from util import setup_logging, write_json

log = logging.getLogger(__name__)
FOLD_FILES = ("best.ckpt", "last.ckpt", "history.csv", "curve.png", "oof.csv", "oof_tta.csv")


class UsageError(Exception):
    """Bad request that nothing can continue from (exit code 2)."""


def parse_gpus(spec: str) -> list[int]:
    """'0,1' -> [0, 1]; '-1' or 'cpu' -> [-1]; 'cpu,cpu' -> two CPU workers."""
    return [-1 if g.strip() == "cpu" else int(g) for g in str(spec).split(",") if g.strip()]


def pick_device(cfg: Config) -> tuple[str, list[int] | int]:
    """('gpu', [ids]) or ('cpu', 1). No GPU at all -> CPU with a warning; a GPU index that
    is not there -> UsageError listing those that are."""
    gpus = parse_gpus(cfg.gpus)
    n = torch.cuda.device_count()
    if not gpus or all(g < 0 for g in gpus):
        return "cpu", 1
    if n == 0:
        log.warning("no GPU is visible: training on the CPU (pass -g -1 to say so)")
        return "cpu", 1
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


def train_fold(cfg: Config, fold: int, progress: bool = True) -> dict:
    """Fit one fold; returns its summary (best val accuracy, epochs, seconds)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from callback import AtomicCheckpointIO, History, OOFWriter, cv_summary
    from dataset import FoldData, load_noise
    from model import AudioClassifier

    accelerator, devices = pick_device(cfg)
    precision = lightning_precision(cfg.precision, accelerator)
    work = Path(cfg.work)
    run_dir = work / "runs" / cfg.run_name
    fold_dir = run_dir / f"fold{fold}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    last = fold_dir / "last.ckpt"
    resume_from = None
    if cfg.resume and last.is_file():
        resume_from = str(last)
        log.info("fold %d: resuming from %s", fold, last)
    else:
        if cfg.resume:
            log.warning("fold %d: --resume but no %s yet: starting from scratch", fold, last)
        for name in FOLD_FILES:
            (fold_dir / name).unlink(missing_ok=True)
    write_json(cfg.to_dict(), fold_dir / "config.json")
    (fold_dir / "command.txt").write_text(shlex.join([sys.executable, *sys.argv]) + "\n")

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    workers = cfg.workers if cfg.workers >= 0 else (4 if accelerator == "gpu" else 0)
    data = FoldData(work, fold, cfg.batch_size, workers)
    model = AudioClassifier(cfg.to_dict(), data.classes)
    model.set_noise(load_noise(work))
    # best.ckpt: weights of the best epoch; last.ckpt: everything --resume needs
    best = ModelCheckpoint(dirpath=fold_dir, filename="best", monitor="val_acc", mode="max",
                           save_top_k=1, save_weights_only=True, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=fold_dir, filename="last", save_top_k=1,
                           enable_version_counter=False)  # no monitor: the newest epoch
    callbacks = [best, last, History(fold_dir, f"{cfg.run_name} fold {fold}"),
                 OOFWriter(fold_dir, data.val_table, data.classes)]
    if progress:
        callbacks.append(TQDMProgressBar(leave=True))
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=cfg.strategy, num_nodes=cfg.num_nodes,
        precision=precision, max_epochs=cfg.epochs, callbacks=callbacks, logger=False,
        plugins=[AtomicCheckpointIO()], deterministic=accelerator == "cpu",
        benchmark=accelerator == "gpu", num_sanity_val_steps=0,
        limit_train_batches=cfg.limit_batches, enable_progress_bar=progress,
        enable_model_summary=False, default_root_dir=fold_dir)
    t0 = time.time()
    trainer.fit(model, datamodule=data, ckpt_path=resume_from)
    seconds = time.time() - t0
    result = dict(fold=fold, val_acc=float(best.best_model_score or float("nan")),
                  epochs=trainer.current_epoch, seconds=round(seconds, 1), device=accelerator)
    if trainer.is_global_zero:
        if cfg.tta == "y":
            device = torch.device(f"cuda:{devices[0]}" if accelerator == "gpu" else "cpu")
            write_oof_tta(fold_dir, work, data.classes, device, cfg.batch_size * 2)
        log.info("fold %d: best val_acc %.4f, %d epochs in %.0f s -> %s", fold, result["val_acc"],
                 result["epochs"], seconds, fold_dir)
        folds = sorted(data.table.fold.unique().tolist())
        cv = cv_summary([run_dir], data.classes, folds, run_dir)
        if cv:
            log.info("all %d folds done: CV accuracy %.4f -> %s", len(folds), cv["accuracy"],
                     run_dir / "cv.json")
    return result


def write_oof_tta(fold_dir: Path, work: Path, classes: list[str], device, batch: int) -> None:
    """oof_tta.csv: oof.csv's rows predicted by best.ckpt with the TTA views averaged (once,
    after training, rather than at every validation)."""
    import numpy as np

    from inference import predict_waves
    from util import write_csv

    oof = pd.read_csv(fold_dir / "oof.csv", keep_default_na=False)
    waves = np.load(work / "train_wave.npy", mmap_mode="r")[oof.row.to_numpy()]
    probs = predict_waves([fold_dir / "best.ckpt"], waves, True, device, batch)[0][0]
    oof[classes] = probs
    write_csv(oof, fold_dir / "oof_tta.csv")


def _strip(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the options `names` and their values."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok in names:
            skip = True
        elif not tok.startswith(tuple(f"{n}=" for n in names if n.startswith("--"))):
            out.append(tok)
    return out


def train_all(cfg: Config, argv: list[str]) -> int:
    """Every fold as its own process, one per -g entry (a GPU, or -1 for a CPU worker),
    queued when there are more folds than entries; each fold logs to its folder."""
    from tqdm import tqdm

    from dataset import read_table

    table = read_table(Path(cfg.work) / "train.csv")
    folds = sorted(table.fold.unique().tolist())
    slots = parse_gpus(cfg.gpus)
    if torch.cuda.device_count() == 0 and any(g >= 0 for g in slots):
        log.warning("no GPU is visible: the folds train on the CPU, %d at a time", len(slots))
        slots = [-1] * len(slots)
    pick_device(Config(gpus=",".join(str(g) for g in slots if g >= 0) or "-1"))  # validate ids
    cpu_slots = max(1, sum(g < 0 for g in slots))
    threads = max(1, (os.cpu_count() or 1) // cpu_slots)
    base = _strip(argv, ("-f", "--fold", "-g", "--gpus"))
    run_dir = Path(cfg.work) / "runs" / cfg.run_name
    pending, running, results = list(folds), {}, []
    bar = tqdm(total=len(folds), desc=f"{cfg.run_name}: folds", unit="fold")
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
        for proc in [p for p in running if p.poll() is not None]:
            del running[proc]
            proc.logf.close()
            hist_path = run_dir / f"fold{proc.fold}" / "history.csv"
            hist = pd.read_csv(hist_path) if hist_path.is_file() else pd.DataFrame()
            results.append(dict(fold=proc.fold, status="ok" if proc.returncode == 0 else
                                f"failed ({proc.returncode}), see train.log",
                                best_val_acc=hist.val_acc.max() if len(hist) else float("nan"),
                                epochs=len(hist), minutes=round((time.time() - proc.t0) / 60, 1)))
            bar.update(1)
    bar.close()
    summary = pd.DataFrame(results).sort_values("fold")
    print(summary.to_string(index=False))
    cv_path = run_dir / "cv.json"
    if cv_path.is_file():
        print(f"CV accuracy {json.loads(cv_path.read_text())['accuracy']:.4f} -> {cv_path}")
    return 0 if (summary.status == "ok").all() else 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = make_parser(__doc__.split("\n")[0])
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (logs to files)")
    args = p.parse_args(argv)
    setup_logging()
    cfg = config_from_args(args)
    try:
        if cfg.fold == "all":
            return train_all(cfg, argv)
        train_fold(cfg, int(cfg.fold), args.progress)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"train: fold {cfg.fold}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
