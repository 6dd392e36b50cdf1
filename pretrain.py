"""Self-supervised pretraining (BYOL-A) of a timm backbone on all the audio there is, labels unused.

    python pretrain.py --work WORK -m resnet18 -t 64 -e 30 --run byol     # train + test clips
    python pretrain.py --work WORK ... --ssl-data train                    # training clips only
    python pretrain.py --work WORK ... --unlabelled more_audio/ other/     # + any-length audio
    python train.py --work WORK -m resnet18 -t 64 --pretrained WORK/pretrain/byol/encoder.pth

BYOL for audio (Niizumi et al., BYOL-A): two views of each clip, each made by the project's
own augmentation (transform.Frontend: shift, reverb, gain, noise, pitch, FilterAugment ... as
the Config says), mixing with another clip in the power domain of the log-mel, and a random
resize crop of the log-mel image; an online network (backbone, projector, predictor) learns
to predict the projection of the other view by a momentum target network (model.BYOL). Writes
WORK/pretrain/<run>/{encoder.pth (a timm state dict of the backbone), config.yaml,
versions.json, history.csv (loss, probe accuracy: logistic regression on frozen embeddings,
fold 0's training rows -> its validation rows), curve.png, last.ckpt (--resume), command.txt}.
"""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from arg import Config, make_parser, parse_config
from job import (check_model, check_resume, loader_workers, make_trainer, owned, stopped,
                 work_settings, write_records)
from runs import Work
from util import UsageError, launched_rank_zero, pick_device, read_table, setup_logging

log = logging.getLogger(__name__)
FIELDS = ("work", "seed", "size", "n_fft", "hop_length", "n_mels", "norm", "top_db", "model",
          "pretrained", "drop_path_rate", "channels_last", "epochs", "batch_size", "lr", "min_lr",
          "weight_decay", "warmup", "gpus", "precision", "run", "resume", "devices", "strategy",
          "num_nodes", "workers", "limit_batches", "ssl_data", "unlabelled", "ssl_tau",
          "ssl_dim", "probe_every")


# ----------------------------------------------------------------------------- data
def unlabelled_data(cfg: Config):
    """Every clip pretraining learns from: WORK's training clips, its readable test clips and
    background noise (--ssl-data all), and crops of the --unlabelled folders' audio."""
    from audio import AudioError, audio_files, read_audio
    from dataset import Clips, JoinedDataset, WaveDataset

    work, n = Work(cfg.work), cfg.clip_samples
    parts = [WaveDataset(Clips.of(work.dir, "train"), length=n, crop="random")]
    recordings = []
    if cfg.ssl_data == "all":
        test = read_table(work.test_csv)
        if (test.status == "ok").any():
            parts.append(WaveDataset(Clips.of(work.dir, "test"), test.row[test.status == "ok"], None,
                                     n, "random"))
        if work.noise.is_file():
            recordings.append(np.load(work.noise))
    for folder in cfg.unlabelled:
        files = audio_files([folder])
        if not Path(folder).is_dir() or not files:
            raise UsageError(f"--unlabelled {folder}: not a folder with audio files in it")
        for f in files:
            try:
                y = read_audio(f, cfg.sr)
            except AudioError as e:
                log.warning("--unlabelled: %s skipped (%s)", f, e)
                continue
            recordings.append(np.clip(np.round(y * 32768), -32768, 32767).astype(np.int16))
    if recordings:  # one random crop per clip length of audio, each epoch
        rows = np.repeat(np.arange(len(recordings)), [max(1, len(r) // n) for r in recordings])
        parts.append(WaveDataset(Clips.from_arrays(recordings), rows, None, n, "random"))
    return JoinedDataset(*parts)


# ----------------------------------------------------------------------------- probe
def probe_accuracy(module, work: Path, batch: int, most: int = 2000) -> float:
    """Logistic regression on frozen embeddings of fold 0's training rows (up to `most`),
    scored on its validation rows: how much of the labels the representation holds."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from dataset import Clips

    table = read_table(Work(work).train_csv)
    train = table[table.fold != 0].sample(frac=1.0, random_state=0).head(most).sort_values("row")
    val = table[table.fold == 0]
    clips, n = Clips.of(work, "train"), module.cfg.clip_samples
    was = module.training
    module.eval()
    feats = []
    with torch.no_grad():
        for rows in (train.row.to_numpy(), val.row.to_numpy()):  # ascending: memmap order
            out = [module.embed(torch.from_numpy(clips.read(rows[i:i + batch], n))
                                .to(module.device)).float().cpu()
                   for i in range(0, len(rows), batch)]
            feats.append(torch.cat(out).numpy())
    module.train(was)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    with warnings.catch_warnings():  # an unconverged fit still ranks representations
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(feats[0], train.y.to_numpy())
    return float(clf.score(feats[1], val.y.to_numpy()))


class Probe(Callback):
    """probe_acc every `every` epochs and at the last: put where History reads metrics."""

    def __init__(self, work: Path, every: int, batch: int):
        self.work, self.every, self.batch = work, max(1, every), batch

    def on_train_epoch_start(self, trainer, pl_module):
        trainer.callback_metrics.pop("probe_acc", None)  # an epoch without a probe shows none

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch + 1
        if not trainer.is_global_zero or (epoch % self.every and epoch != trainer.max_epochs):
            return
        acc = probe_accuracy(pl_module, self.work, self.batch)
        trainer.callback_metrics["probe_acc"] = torch.tensor(acc)
        log.info("epoch %d: probe accuracy %.4f (fold 0, frozen embeddings)", epoch, acc)


# ----------------------------------------------------------------------------- main
RECORDS = ("encoder.pth", "last.ckpt", "history.csv", "curve.png", "config.yaml")  # of a run


def check_start(cfg: Config, out: Path, force: bool) -> str | None:
    """The checkpoint a run resumes from, or None for a fresh start. A fresh start where a run
    already is refuses (its encoder and checkpoint would sit beside the new config) unless
    --force replaces it; --resume refuses settings other than the saved run's."""
    last = out / "last.ckpt"
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
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callback import History
    from dataset import loader
    from model import BYOL
    from util import atomic_write

    cfg = work_settings(cfg)
    check_model(cfg.model)
    out = Work(cfg.work).pretrain(cfg.run_name)
    accelerator, devices = pick_device(cfg.gpus, cfg.devices)
    data = unlabelled_data(cfg)
    resume = check_start(cfg, out, force)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = BYOL(cfg.to_dict())
    with owned(out):
        if launched_rank_zero():
            if not resume:  # a fresh start (or --force): nothing of an earlier run stays
                for name in RECORDS:
                    (out / name).unlink(missing_ok=True)
            write_records(out, cfg)
        callbacks = [Probe(Path(cfg.work), cfg.probe_every, cfg.batch_size * 2),
                     History(out, f"{cfg.run_name}: BYOL-A pretraining",
                             columns=["epoch", "lr", "train_loss", "probe_acc", "seconds"]),
                     ModelCheckpoint(dirpath=out, filename="last", enable_version_counter=False)]
        trainer = make_trainer(cfg, accelerator, devices, out, callbacks, progress)
        workers = loader_workers(cfg, accelerator)
        trainer.fit(module, train_dataloaders=loader(data, cfg.batch_size, True, workers,
                                                     drop_last=len(data) > cfg.batch_size),
                    ckpt_path=resume, weights_only=True)
        if trainer.is_global_zero:
            state = module.encoder.backbone_state()
            atomic_write(out / "encoder.pth", lambda tmp: torch.save(state, tmp))
    return out / "encoder.pth"


def main(argv=None) -> int:
    from arg import FIELDS as CONFIG

    augmentation = tuple(n for n, f in CONFIG.items() if f.metadata["group"] == "augmentation")
    p = make_parser(__doc__.split("\n")[0], groups=("data", "features", "augmentation", "model",
                                                    "optim", "run", "pretrain"),
                    only=FIELDS + augmentation, config_file=True)
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (logs to files)")
    p.add_argument("--force", action="store_true",
                   help="replace a pretraining run of the same --run name")
    cfg, args = parse_config(p, argv)
    setup_logging()
    try:
        path = pretrain(cfg, args.progress, args.force)
    except UsageError as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 1
    except (SIGTERMException, KeyboardInterrupt) as e:
        return stopped("pretrain", e, f"run {cfg.run_name}")
    if launched_rank_zero():
        log.info("encoder: %s (fine-tune with: python train.py --work %s -m %s -t %d "
                 "--pretrained %s)", path, cfg.work, cfg.model, cfg.size, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
