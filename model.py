"""The LightningModule: waveform batch -> (augment, log-mel on the device) -> timm backbone.

The checkpoint's hyper-parameters hold the whole Config and the class list, so
`load_checkpoint(path)` rebuilds and labels the model with no other input.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from arg import Config
from transform import Frontend, mixup
from util import classification_loss


class PretrainedError(RuntimeError):
    pass


def create_backbone(cfg: Config, num_classes: int, pretrained: str | None = None):
    """One timm factory call; `pretrained` is '', 'timm' (the hub) or a local weights file."""
    import timm

    pretrained = cfg.pretrained if pretrained is None else pretrained
    kw = dict(num_classes=num_classes, in_chans=1, drop_rate=cfg.drop_rate)
    if cfg.drop_path_rate > 0:
        kw["drop_path_rate"] = cfg.drop_path_rate
    if pretrained and pretrained != "timm":
        if not Path(pretrained).is_file():
            raise PretrainedError(f"--pretrained {pretrained}: no such weights file")
        kw["pretrained_cfg_overlay"] = dict(file=str(pretrained))
    try:
        return timm.create_model(cfg.model, pretrained=bool(pretrained), **kw)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise PretrainedError(f"timm has no model {cfg.model!r} (see timm.list_models())") from e
        raise
    except Exception as e:
        if pretrained == "timm":  # no hub reachable (LocalEntryNotFoundError, OSError, ...)
            raise PretrainedError(
                f"could not fetch pretrained {cfg.model} weights from the hub ({type(e).__name__}). "
                f"Download them where a hub is reachable and pass --pretrained path/to/file "
                f"(.pth or .safetensors), or train from scratch with --pretrained ''") from e
        raise


class AudioClassifier(L.LightningModule):
    def __init__(self, config: dict, classes: list[str], load_pretrained: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["load_pretrained"])
        self.cfg = cfg = Config.from_dict(config)
        self.classes = list(classes)
        n = len(classes)
        self.frontend = Frontend(cfg)
        self.net = create_backbone(cfg, n, None if load_pretrained else "")
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.net.compile()
        for stage in ("train", "val"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(n, average="micro"))
            setattr(self, f"{stage}_f1", MulticlassF1Score(n, average="macro"))
        self._val = []

    def set_noise(self, noise: torch.Tensor | None) -> None:
        """The background-noise bank (1-D float, WORK/noise.npy) for augmentation."""
        if noise is not None:
            self.frontend.wave_aug.noise = noise.to(self.device)

    def feature_settings(self) -> dict:
        c = self.cfg
        return dict(sr=c.sr, seconds=c.seconds, **self.frontend.logmel.settings())

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def forward(self, wave: torch.Tensor, view=None) -> torch.Tensor:
        return self.backbone(self.frontend(wave, view))

    @torch.no_grad()
    def predict_views(self, wave: torch.Tensor, views: dict) -> torch.Tensor:
        """Softmax probabilities (V, B, C) for each deterministic view of the batch."""
        return torch.stack([self(wave, fn).float().softmax(-1) for fn in views.values()])

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        wave, y, _ = batch
        x, target = self.frontend(wave), y
        if self.cfg.mixup > 0 and torch.rand(()) < self.cfg.p_mixup:
            x, target = mixup(x, F.one_hot(y, len(self.classes)).float(), self.cfg.mixup)
        logits = self.backbone(x)
        loss = classification_loss(logits, target, self.cfg.smoothing, self.cfg.ohem)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}: "
                f"the fold stops here, its last good checkpoint is kept. Try a lower -l1 "
                f"(now {self.cfg.lr}) or -p 32")
        self.train_acc(logits, y)
        self.train_f1(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict({"train_acc": self.train_acc, "train_f1": self.train_f1},
                      on_step=False, on_epoch=True)
        return loss

    def on_validation_epoch_start(self):
        self._val = []

    def validation_step(self, batch, batch_idx):
        wave, y, rows = batch
        logits = self(wave)
        self.log("val_loss", F.cross_entropy(logits.float(), y), on_epoch=True, prog_bar=True)
        self.val_acc(logits, y)
        self.val_f1(logits, y)
        self.log_dict({"val_acc": self.val_acc, "val_f1": self.val_f1}, on_epoch=True,
                      prog_bar=True)
        self._val.append((rows, y, logits.float().softmax(-1)))

    def gathered_val(self) -> tuple[torch.Tensor, ...]:
        """(rows, labels, probs) of the epoch's validation, from every process, each row once
        (DistributedSampler pads with repeats)."""
        val = [torch.cat(t) for t in zip(*self._val)]
        if self.trainer.world_size > 1:
            val = [self.all_gather(t).flatten(0, 1) for t in val]
        first = np.unique(val[0].cpu().numpy(), return_index=True)[1]
        return tuple(t[first] for t in val)

    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2
        from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

        c = self.cfg
        opt = create_optimizer_v2(self.net, opt=c.optimizer, lr=c.lr, weight_decay=c.weight_decay)
        total = max(2, int(self.trainer.estimated_stepping_batches))
        warm = min(total - 1, max(1, round(c.warmup * total / max(1, self.trainer.max_epochs))))
        sched = SequentialLR(opt, [LinearLR(opt, start_factor=0.01, total_iters=warm),
                                   CosineAnnealingLR(opt, T_max=total - warm, eta_min=c.min_lr)],
                             milestones=[warm])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> AudioClassifier:
    """Rebuild a trained model from its checkpoint alone (no pretrained download), in eval mode."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    model = AudioClassifier(hp["config"], hp["classes"], load_pretrained=False)
    model.load_state_dict(ckpt["state_dict"])
    model.ckpt_path = str(path)
    return model.to(device).eval()
