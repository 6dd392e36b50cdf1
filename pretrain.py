"""Self-supervised pretraining (BYOL-A) of a timm backbone on all the audio there is, labels unused.

    python pretrain.py --work WORK -m resnet18 -t 64 -e 30 --run byol     # train + test clips
    python pretrain.py --work WORK ... --ssl-data train                    # training clips only
    python pretrain.py --work WORK ... --unlabelled more_audio/ other/     # + any-length audio
    python train.py --work WORK -m resnet18 -t 64 --pretrained WORK/pretrain/byol/encoder.pth

BYOL for audio (Niizumi et al., BYOL-A): two views of each clip, each made by the project's
own augmentation (transform.Frontend: shift, reverb, gain, noise, pitch, FilterAugment ... as
the Config says), mixing with another clip in the power domain of the log-mel, and a random
resize crop of the log-mel image; an online network (backbone, projector, predictor) learns
to predict the projection of the other view by a momentum target network. Writes
WORK/pretrain/<run>/{encoder.pth (a timm state dict of the backbone), config.yaml,
history.csv (loss, probe accuracy: logistic regression on frozen embeddings, fold 0's
training rows -> its validation rows), curve.png, last.ckpt (--resume), command.txt}.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import shlex
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from arg import Config, make_parser, parse_config, write_yaml
from runs import pretrain_dir
from util import UsageError, launched_rank_zero, pick_device, setup_logging

log = logging.getLogger(__name__)
FIELDS = ("work", "seed", "size", "n_fft", "hop", "n_mels", "norm", "top_db", "model",
          "pretrained", "drop_path_rate", "channels_last", "epochs", "batch_size", "lr", "min_lr",
          "weight_decay", "warmup", "gpus", "precision", "run", "resume", "devices", "strategy",
          "num_nodes", "workers", "limit_batches", "ssl_data", "unlabelled", "ssl_tau",
          "ssl_dim", "probe_every")


# ----------------------------------------------------------------------------- data
def unlabelled_data(cfg: Config):
    """Every clip pretraining learns from: WORK's training clips, its readable test clips and
    background noise (--ssl-data all), and crops of the --unlabelled folders' audio."""
    from dataset import Clips, JoinedDataset, WaveDataset, read_table
    from audio import AudioError, audio_files, read_audio

    work, n = Path(cfg.work), cfg.clip_samples
    parts = [WaveDataset(Clips.of(work, "train"), length=n, crop="random")]
    recordings = []
    if cfg.ssl_data == "all":
        test = read_table(work / "test.csv")
        if (test.status == "ok").any():
            parts.append(WaveDataset(Clips.of(work, "test"), test.row[test.status == "ok"], None,
                                     n, "random"))
        if (work / "noise.npy").is_file():
            recordings.append(np.load(work / "noise.npy"))
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


# ----------------------------------------------------------------------------- views
def log_mixup(s: torch.Tensor, ratio: float = 0.4) -> torch.Tensor:
    """BYOL-A's mixup in log space: each dB log-mel (B, M, T) mixed with another clip's in the
    power domain, the other's share ~ U(0, ratio)."""
    lam = torch.rand(s.shape[0], 1, 1, device=s.device) * ratio
    other = s.roll(1, 0)
    return 10.0 * torch.log10((1 - lam) * 10 ** (s / 10) + lam * 10 ** (other / 10) + 1e-10)


def random_resize_crop(x: torch.Tensor, virtual=(1.0, 1.5), scale=(0.6, 1.5)) -> torch.Tensor:
    """BYOL-A's random resize crop of images (B, C, F, T), per sample: a crop of 0.6-1.5 times
    each axis from a canvas 1.0 x the frequency and 1.5 x the time axis (zeros outside),
    resized back (bilinear) by one batched affine grid sample."""
    B, dev = x.shape[0], x.device
    lo, hi = scale
    half = [min(v, 1.0) for v in virtual]  # the canvas, in the image's [-1, 1] units
    sf = (torch.rand(B, device=dev) * (hi - lo) + lo).clamp(max=virtual[0])
    st = (torch.rand(B, device=dev) * (hi - lo) + lo).clamp(max=virtual[1])
    cy = (torch.rand(B, device=dev) * 2 - 1) * (virtual[0] - sf).clamp(min=0) * half[0]
    cx = (torch.rand(B, device=dev) * 2 - 1) * (virtual[1] - st).clamp(min=0)
    theta = torch.zeros(B, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = st, cx, sf, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


# ----------------------------------------------------------------------------- the module
class BYOL(L.LightningModule):
    """Online encoder -> projector -> predictor, a momentum target (encoder -> projector);
    the loss is 2 - 2 cos(prediction of one view, target projection of the other), both ways."""

    def __init__(self, config: dict):
        super().__init__()
        from model import create_backbone
        from transform import Frontend

        self.save_hyperparameters()
        self.cfg = cfg = Config.from_dict(config)
        self.frontend = Frontend(cfg)
        self.encoder = create_backbone(cfg, 0)  # num_classes 0: pooled features
        if cfg.channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        d = cfg.ssl_dim
        self.projector = mlp(self.encoder.num_features, 4 * d, d)
        self.predictor = mlp(d, 4 * d, d)
        self.target = copy.deepcopy(nn.Sequential(self.encoder, self.projector))
        self.target.requires_grad_(False)

    def view(self, wave: torch.Tensor) -> torch.Tensor:
        """One augmented view: the Frontend's augmentation, log-mixup, random resize crop."""
        f = self.frontend
        with f._no_amp(wave.device):
            s = f.logmel.db(f.waveform(wave), f.warp)
            s = log_mixup(f.mel_jitter(f.filter_aug(s)))
            img = random_resize_crop(f.logmel.image(s))
            img = f.spec_aug(f.mixstyle(img))
        return img.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else img

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """Frozen-encoder features of clean clips (eval mode: no augmentation)."""
        img = self.frontend(wave)
        if self.cfg.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        return self.encoder(img)

    def training_step(self, batch, batch_idx):
        wave = batch[0]
        v1, v2 = self.view(wave), self.view(wave)
        p1, p2 = (self.predictor(self.projector(self.encoder(v))) for v in (v1, v2))
        with torch.no_grad():
            z1, z2 = self.target(v1), self.target(v2)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.global_step}: "
                                     f"try a lower -l1 (now {self.cfg.lr}) or -p 32")
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        """The target follows the online network; its momentum goes from ssl_tau to 1 on a
        cosine over the run (BYOL)."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        tau = 1 - (1 - self.cfg.ssl_tau) * (math.cos(math.pi * self.global_step / total) + 1) / 2
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = list(self.target.parameters())
        with torch.no_grad():
            torch._foreach_lerp_(target, online, 1 - tau)

    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        from model import warmup_cosine

        online = nn.ModuleList([self.encoder, self.projector, self.predictor])
        opt = create_optimizer_v2(online, opt="adamw", lr=self.cfg.lr,
                                  weight_decay=self.cfg.weight_decay)
        return warmup_cosine(opt, self.trainer, self.cfg)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean()


# ----------------------------------------------------------------------------- probe
def probe_accuracy(module: BYOL, work: Path, batch: int, most: int = 2000) -> float:
    """Logistic regression on frozen embeddings of fold 0's training rows (up to `most`),
    scored on its validation rows: how much of the labels the representation holds."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from dataset import Clips, read_table

    table = read_table(work / "train.csv")
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
def pretrain(cfg: Config, progress: bool = True) -> Path:
    """Pretrain and write WORK/pretrain/<run>/encoder.pth; returns its path."""
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from callback import AtomicCheckpointIO, History
    from dataset import loader
    from model import CheckpointError, safe_load
    from train import check_model, lightning_precision, work_settings
    from util import FoldLock, atomic_write, write_text

    cfg = work_settings(cfg)
    check_model(cfg.model)
    out = pretrain_dir(cfg.work, cfg.run_name)
    accelerator, devices = pick_device(cfg.gpus, cfg.devices)
    data = unlabelled_data(cfg)
    last = out / "last.ckpt"
    resume = str(last) if cfg.resume and last.is_file() else None
    if resume:
        safe_load(last, CheckpointError, "--resume ")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = BYOL(cfg.to_dict())
    rank_zero = launched_rank_zero()
    with FoldLock(out) if rank_zero else contextlib.nullcontext():
        if rank_zero:
            write_yaml(cfg, out / "config.yaml")
            write_text(shlex.join([sys.executable, *sys.argv]) + "\n", out / "command.txt")
            if not resume:
                (out / "history.csv").unlink(missing_ok=True)
        workers = cfg.workers if cfg.workers >= 0 else (4 if accelerator == "gpu" else 0)
        callbacks = [Probe(Path(cfg.work), cfg.probe_every, cfg.batch_size * 2),
                     History(out, f"{cfg.run_name}: BYOL-A pretraining",
                             columns=["epoch", "lr", "train_loss", "probe_acc", "seconds"]),
                     ModelCheckpoint(dirpath=out, filename="last", enable_version_counter=False)]
        if progress:
            callbacks.append(TQDMProgressBar(leave=True))
        n = devices if isinstance(devices, int) else len(devices)
        trainer = L.Trainer(
            accelerator=accelerator, devices=devices, num_nodes=cfg.num_nodes,
            strategy="ddp" if cfg.strategy == "auto" and n * cfg.num_nodes > 1 else cfg.strategy,
            precision=lightning_precision(cfg.precision, accelerator), max_epochs=cfg.epochs,
            callbacks=callbacks, logger=False, plugins=[AtomicCheckpointIO()],
            limit_train_batches=cfg.limit_batches, enable_progress_bar=progress,
            enable_model_summary=False, default_root_dir=out, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=loader(data, cfg.batch_size, True, workers,
                                                     drop_last=len(data) > cfg.batch_size),
                    ckpt_path=resume, weights_only=True)
        if trainer.is_global_zero:
            state = {k: v.detach().cpu().contiguous() for k, v in
                     module.encoder.state_dict().items()}
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
    cfg, args = parse_config(p, argv)
    setup_logging()
    try:
        path = pretrain(cfg, args.progress)
    except UsageError as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 1
    if launched_rank_zero():
        log.info("encoder: %s (fine-tune with: python train.py --work %s -m %s -t %d "
                 "--pretrained %s)", path, cfg.work, cfg.model, cfg.size, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
