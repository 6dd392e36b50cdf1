"""Self-supervised pretraining (BYOL-A) of a timm backbone on all the audio there is, labels unused.

    python pretrain.py --work WORK -m resnet18 -t 64 -e 30 --run byol     # train + test clips
    python pretrain.py --work WORK ... --ssl-data train                    # training clips only
    python pretrain.py --work WORK ... --unlabelled more_audio/ other/     # + any-length audio
    python train.py --work WORK -m resnet18 -t 64 --pretrained WORK/pretrain/byol/encoder.pth

BYOL for audio (Niizumi et al., BYOL-A): two views of each clip, each made by the project's
own augmentation (transform.Frontend: shift, reverb, gain, noise, pitch, FilterAugment ... as
the Config says), mixing with another clip in the power domain of the log-mel, and a random
resize crop of the log-mel image; an online network (backbone, projector, predictor) learns
to predict the projection of the other view by a momentum target network (byol.BYOL). Writes
WORK/pretrain/<run>/{encoder.pth (a timm state dict of the backbone), config.yaml,
versions.json, history.csv (loss, probe accuracy: logistic regression on frozen embeddings,
fold 0's training rows -> its validation rows), curve.png, last.ckpt (--resume), command.txt}.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from arg import LEARNT, Config, make_parser, parse_config
from byol import BYOL, Probe, unlabelled_data
from callback import History
from dataset import loader
from job import Job, check_model, check_resume, loader_workers, run_job, work_settings
from runs import CONFIG, CURVE, ENCODER, HISTORY, LAST, Work
from util import UsageError, atomic_write, launched_rank_zero, pick_device, run_cli, setup_logging

log = logging.getLogger(__name__)
RECORDS = (ENCODER, LAST, HISTORY, CURVE, CONFIG)  # of a pretraining run


def check_start(cfg: Config, out: Path, force: bool) -> str | None:
    """The checkpoint a run resumes from, or None for a fresh start. A fresh start where a run
    already is refuses (its encoder and checkpoint would sit beside the new config) unless
    --force replaces it; --resume refuses settings other than the saved run's."""
    last = out / LAST
    if cfg.resume and last.is_file():
        check_resume(cfg, out, "delete it to pretrain from the start, or pretrain under another "
                               "--run")
        return str(last)
    there = [n for n in RECORDS[:2] if (out / n).is_file()]
    if there and not force and launched_rank_zero():
        raise UsageError(f"{out} already holds a pretraining run ({', '.join(there)}): add "
                         f"--resume to continue it, pass another --run, or --force to replace it")
    return None


def pretrain(cfg: Config, progress: bool = True, force: bool = False) -> Path:
    """Pretrain and write WORK/pretrain/<run>/encoder.pth; returns its path."""
    cfg = work_settings(cfg)
    check_model(cfg.model)
    out = Work(cfg.work).pretrain(cfg.run_name)
    place = pick_device(cfg.gpus, cfg.devices)
    accelerator = place[0]
    data = unlabelled_data(cfg)
    resume = check_start(cfg, out, force)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = BYOL(cfg.part(*LEARNT, "pretrain"))
    batches = loader(data, cfg.batch_size, True, loader_workers(cfg, accelerator),
                     drop_last=len(data) > cfg.batch_size)
    job = Job(cfg, out, module, dict(train_dataloaders=batches), "pretrain.py",
              f"run {cfg.run_name}", place, resume_from=resume,
              stale=tuple(out / n for n in RECORDS))  # a fresh start (or --force) clears them
    callbacks = [Probe(Path(cfg.work), cfg.probe_every, cfg.batch_size * 2),
                 History(out, f"{cfg.run_name}: BYOL-A pretraining",
                         columns=["epoch", "lr", "train_loss", "probe_acc", "seconds"]),
                 ModelCheckpoint(dirpath=out, filename="last", enable_version_counter=False)]

    def save_encoder(trainer) -> Path:
        if trainer.is_global_zero:
            state = module.encoder.backbone_state()
            atomic_write(out / ENCODER, lambda tmp: torch.save(state, tmp))
        return out / ENCODER
    return run_job(job, callbacks, progress, save_encoder)


def steps(argv) -> int:
    p = make_parser(__doc__.split("\n")[0], "pretrain", config_file=True)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (logs to files)")
    p.add_argument("--force", action="store_true",
                   help="replace a pretraining run of the same --run name")
    cfg, args = parse_config(p, argv)
    setup_logging()
    path = pretrain(cfg, args.progress, args.force)
    if launched_rank_zero():
        log.info("encoder: %s (fine-tune with: python train.py --work %s -m %s -t %d "
                 "--pretrained %s)", path, cfg.work, cfg.model, cfg.size, path)
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "pretrain", argv)


if __name__ == "__main__":
    raise SystemExit(main())
