"""BYOL-A (Niizumi et al.), self-supervised pretraining of an AudioNet: its two views (the
front end's own augmentation, log-mixup on the dB log-mel, a random resize crop of the image),
the online / target / predictor module and its loss, the audio it learns from, and the linear
probe that says how much of the labels its embedding holds. pretrain.py runs it."""
from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from arg import Config
from audio import AudioError, audio_files, read_audio
from cache import Clips
from dataset import JoinedDataset, WaveDataset
from model import AudioNet, warmup_cosine
from runs import Work
from util import UsageError, read_table

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- views and loss
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


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean()


# ----------------------------------------------------------------------------- the module
class Projected(nn.Module):
    """Images -> the encoder's pooled features -> the projector (BYOL's online and target)."""

    def __init__(self, encoder: AudioNet, projector: nn.Module):
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder.pooled(img))


class BYOL(L.LightningModule):
    """BYOL-A (Niizumi et al.): two augmented views of each clip; the online encoder ->
    projector -> predictor learns to predict a momentum target's projection of the other view;
    loss 2 - 2 cos, both ways. The encoder is an AudioNet without a head."""

    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = cfg = Config.from_dict(config)
        encoder = AudioNet(cfg, 0)  # no classes: pooled features
        d = cfg.ssl_dim
        self.online = Projected(encoder, mlp(encoder.num_features, 4 * d, d))
        self.predictor = mlp(d, 4 * d, d)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)

    @property
    def encoder(self) -> AudioNet:
        return self.online.encoder

    def view(self, wave: torch.Tensor) -> torch.Tensor:
        """One augmented view: the front end's augmentation, log-mixup on the dB log-mel and a
        random resize crop of the image, between its own stages."""
        return self.encoder.images(self.encoder.waveform(wave), on_db=log_mixup,
                                   on_image=random_resize_crop)

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """The encoder's features of clean clips (eval mode: no augmentation)."""
        return self.encoder.embed(wave)

    def loss(self, wave: torch.Tensor) -> torch.Tensor:
        v1, v2 = self.view(wave), self.view(wave)
        p1, p2 = (self.predictor(self.online(v)) for v in (v1, v2))
        with torch.no_grad():
            z1, z2 = self.target(v1), self.target(v2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch[0])
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
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target.parameters()), list(self.online.parameters()),
                                 1 - tau)

    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        opt = create_optimizer_v2(nn.ModuleList([self.online, self.predictor]), opt="adamw",
                                  lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        return warmup_cosine(opt, self.trainer, self.cfg)


# ----------------------------------------------------------------------------- data and probe
def unlabelled_data(cfg: Config):
    """Every clip pretraining learns from: WORK's training clips, its readable test clips and
    background noise (--ssl-data all), and crops of the --unlabelled folders' audio."""
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


def probe_accuracy(module, work: Path, batch: int, most: int = 2000) -> float:
    """Logistic regression on frozen embeddings of fold 0's training rows (up to `most`),
    scored on its validation rows: how much of the labels the representation holds."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

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
