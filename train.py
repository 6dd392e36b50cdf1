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

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from arg import Config, make_parser, parse_config
from job import check_model, work_settings
from metrics import monitored
from runs import HISTORY, Run, Work
from util import (Stopped, UsageError, parse_gpus, pick_device, run_cli, setup_logging,
                  strip_options)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- every fold
def fold_status(fold_dir: Path, epochs: int, column: str) -> tuple[int, float, float]:
    """(epochs done, latest and best monitored score) of a fold, from its history.csv."""
    try:
        hist = pd.read_csv(fold_dir / HISTORY)
    except (OSError, pd.errors.EmptyDataError):
        return 0, float("nan"), float("nan")
    if not len(hist):
        return 0, float("nan"), float("nan")
    return min(epochs, len(hist)), float(hist[column].iloc[-1]), float(hist[column].max())


def train_all(cfg: Config, argv: list[str]) -> int:
    """Every fold as its own process, one per -g entry (a GPU, or -1 for a CPU worker),
    queued when there are more folds than entries; each fold logs to its folder. The bar
    counts epochs over all folds and shows each running fold's epoch and monitored score."""
    from tqdm import tqdm

    folds = Work(cfg.work).folds()
    check_model(cfg.model)
    slots = parse_gpus(cfg.gpus)
    if torch.cuda.device_count() == 0 and any(g >= 0 for g in slots):
        log.warning("no GPU is visible: the folds train on the CPU, %d at a time", len(slots))
        slots = [-1] * len(slots)
    pick_device(",".join(str(g) for g in slots if g >= 0) or "-1")  # validate the GPU ids
    cpu_slots = max(1, sum(g < 0 for g in slots))
    threads = max(1, (os.cpu_count() or 1) // cpu_slots)
    base = strip_options(argv, ("-f", "--fold", "-g", "--gpus"))
    run = Run(cfg.work, cfg.run_name)
    pending, running, results = list(folds), {}, []
    column = "val_" + monitored(cfg.multilabel)  # what picks each fold's best epoch
    name = "val mAP" if cfg.multilabel else "val acc"
    bar = tqdm(total=len(folds) * cfg.epochs, desc=f"{cfg.run_name}", unit="epoch",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} epochs [{elapsed}<{remaining}]{postfix}")
    finished_epochs = 0
    was = signal.signal(signal.SIGTERM, terminated)
    try:
        while pending or running:
            for i, slot in enumerate(slots):
                if pending and i not in running.values():
                    k = pending.pop(0)
                    fold_dir = run.fold(k)
                    fold_dir.mkdir(parents=True, exist_ok=True)
                    env = dict(os.environ, OMP_NUM_THREADS=str(threads) if slot < 0 else "4")
                    cmd = [sys.executable, str(Path(__file__).resolve()), *base, "-f", str(k),
                           "-g", str(slot), "--no-progress"]
                    logf = open(fold_dir / "train.log", "w")
                    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # signals come from here
                    running[proc] = i
                    proc.fold, proc.logf, proc.t0 = k, logf, time.time()
                    bar.write(f"fold {k} -> {'GPU ' + str(slot) if slot >= 0 else 'CPU'} "
                              f"(log: {fold_dir / 'train.log'})")
            time.sleep(0.5)
            status = {p.fold: fold_status(run.fold(p.fold), cfg.epochs, column) for p in running}
            shown = (finished_epochs + sum(e for e, _, _ in status.values()),
                     " | ".join(f"fold {k}: epoch {e}/{cfg.epochs}"
                                + (f" {name} {v:.3f}" if v == v else "")  # nan: not validated yet
                                for k, (e, v, _) in sorted(status.items())))
            if shown != (bar.n, bar.postfix):
                bar.n = shown[0]
                bar.set_postfix_str(shown[1])
            for proc in [p for p in running if p.poll() is not None]:
                del running[proc]
                proc.logf.close()
                done, _, best = fold_status(run.fold(proc.fold), cfg.epochs, column)
                results.append(dict(fold=proc.fold, status="ok" if proc.returncode == 0 else
                                    f"failed ({proc.returncode}), see train.log",
                                    **{f"best_{column}": best}, epochs=done,
                                    minutes=round((time.time() - proc.t0) / 60, 1)))
                finished_epochs += cfg.epochs
                if proc.returncode != 0:
                    tail = (run.fold(proc.fold) / "train.log").read_text().strip()
                    bar.write(f"fold {proc.fold} failed: {tail.splitlines()[-1] if tail else '?'}")
    except (KeyboardInterrupt, Stopped) as e:
        stop_folds(running, bar, e)
    finally:
        signal.signal(signal.SIGTERM, was)
    bar.n = finished_epochs
    bar.close()
    summary = pd.DataFrame(results).sort_values("fold")
    print(summary.to_string(index=False))
    if run.cv.is_file() and (summary.status == "ok").all():
        cv = json.loads(run.cv.read_text())
        said = f"CV mAP {cv['map']:.4f}" if cfg.multilabel else f"CV accuracy {cv['accuracy']:.4f}"
        print(f"{said} -> {run.cv}")
    return 0 if (summary.status == "ok").all() else 1


def terminated(signum, frame):
    raise Stopped("stopped by SIGTERM", 143)


def stop_folds(running: dict, bar, e: BaseException) -> None:
    """^C or SIGTERM to `-f all`: the same signal to every fold process (each in a session of
    its own, so a terminal's ^C reaches the parent alone), waiting until each has left its
    last.ckpt; then Stopped, 130 or 143. No fold outlives its parent; none writes result.json."""
    sig, code = (signal.SIGINT, 130) if isinstance(e, KeyboardInterrupt) else (signal.SIGTERM, 143)
    for proc in running:
        proc.send_signal(sig)
    bar.write(f"{signal.Signals(sig).name}: waiting for fold(s) "
              f"{', '.join(str(p.fold) for p in running)} to stop")
    for proc in running:
        proc.wait()
        proc.logf.close()
    bar.close()
    folds = ", ".join(str(p.fold) for p in sorted(running, key=lambda p: p.fold))
    raise Stopped(f"stopped by {signal.Signals(sig).name}" + (
        f": fold(s) {folds} stopped, each with its last.ckpt (--resume continues them)"
        if running else ""), code) from None


def steps(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = make_parser(__doc__.split("\n")[0], "train", config_file=True)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (logs to files)")
    cfg, args = parse_config(p, argv)
    setup_logging()
    cfg = work_settings(cfg, args.given)
    if cfg.fold == "all":
        return train_all(cfg, argv)
    if not cfg.fold.lstrip("-").isdigit():
        raise UsageError(f"-f {cfg.fold}: expected a fold number or 'all'")
    from fit import train_fold  # Lightning's import (~4 s) waits until a fold trains

    train_fold(cfg, int(cfg.fold), args.progress)
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "train", argv)


if __name__ == "__main__":
    raise SystemExit(main())
