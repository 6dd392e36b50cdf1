"""The LightningModule: waveform batch -> (augment, log-mel on the device) -> timm backbone.

The checkpoint's hyper-parameters hold the whole Config and the class list, so
`load_checkpoint(path)` rebuilds and labels the model with no other input, and
`predict_waves` turns checkpoints and waveforms into probabilities (train.py and
inference.py both use it).
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from tqdm import tqdm

from arg import Config
from transform import Frontend, mixup, tta_views
from util import UsageError


class PretrainedError(UsageError):
    """--pretrained names weights that cannot be had or do not fit the model."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be used, or members that cannot be blended."""


# ----------------------------------------------------------------------------- loss
def classification_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0,
                        ohem: float = 1.0, teacher: torch.Tensor | None = None,
                        kd_weight: float = 0.5, kd_temp: float = 2.0) -> torch.Tensor:
    """Cross-entropy with label smoothing; `target` is class indices or soft (mixup) targets.
    With `teacher` (the teacher's probabilities at temperature kd_temp) each sample's loss is
    (1 - kd_weight) * CE + kd_weight * T^2 * KL(teacher || student at T) (Hinton et al.).
    OHEM keeps the `ohem` share of the batch with the largest loss (1.0 = all)."""
    loss = F.cross_entropy(logits.float(), target, label_smoothing=smoothing, reduction="none")
    if teacher is not None:
        log_student = F.log_softmax(logits.float() / kd_temp, -1)
        kl = F.kl_div(log_student, teacher.float(), reduction="none").sum(-1)
        loss = (1 - kd_weight) * loss + kd_weight * kd_temp ** 2 * kl
    if ohem < 1.0:
        k = max(1, int(round(ohem * loss.numel())))
        loss = loss.topk(k).values
    return loss.mean()


# ----------------------------------------------------------------------------- model
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
        if pretrained and pretrained != "timm":
            raise PretrainedError(
                f"--pretrained {pretrained}: its weights do not fit {cfg.model} "
                f"({str(e).splitlines()[0][:160]}); pass the timm weights file of {cfg.model}")
        raise
    except Exception as e:
        if pretrained == "timm":  # no hub reachable (LocalEntryNotFoundError, OSError, ...)
            raise PretrainedError(
                f"could not fetch pretrained {cfg.model} weights from the hub ({type(e).__name__}). "
                f"Download them where a hub is reachable and pass --pretrained path/to/file "
                f"(.pth or .safetensors), or train from scratch with --pretrained ''") from e
        if pretrained:
            raise PretrainedError(f"--pretrained {pretrained}: not a weights file timm can read "
                                  f"({type(e).__name__}); pass a .pth or .safetensors file of "
                                  f"{cfg.model}'s weights") from e
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
        self._teacher: list[AudioClassifier] = []  # a list: not a submodule, not in checkpoints

    def set_noise(self, noise: torch.Tensor | None) -> None:
        """The background-noise bank (1-D float, WORK/noise.npy) for augmentation."""
        if noise is not None:
            self.frontend.wave_aug.noise = noise.to(self.device)

    def set_teacher(self, teacher: "AudioClassifier") -> None:
        """A frozen model whose softened probabilities the student learns from (distillation)."""
        teacher.eval().requires_grad_(False)
        self._teacher = [teacher]

    def on_fit_start(self):
        for t in self._teacher:
            t.to(self.device)

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
        c = self.cfg
        wave, y, _ = batch
        wave = self.frontend.waveform(wave)  # augmented: the teacher hears what the student hears
        x, target = self.frontend.features(wave), y
        teacher = None
        if self._teacher:
            with torch.no_grad():
                teacher = (self._teacher[0](wave).float() / c.kd_temp).softmax(-1)
        if c.mixup > 0 and torch.rand(()) < c.p_mixup:
            n = len(self.classes)
            soft = F.one_hot(y, n).float()
            x, mixed = mixup(x, soft if teacher is None else torch.cat([soft, teacher], 1), c.mixup)
            target, teacher = (mixed, None) if teacher is None else (mixed[:, :n], mixed[:, n:])
        logits = self.backbone(x)
        loss = classification_loss(logits, target, c.smoothing, c.ohem, teacher, c.kd_weight,
                                   c.kd_temp)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}: "
                f"the fold stops here, its last good checkpoint is kept. Try a lower -l1 "
                f"(now {c.lr}) or -p 32")
        self.train_acc(logits, y)
        self.train_f1(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict({"train_acc": self.train_acc, "train_f1": self.train_f1},
                      on_step=False, on_epoch=True)
        return loss

    def on_validation_epoch_start(self):
        self._val = []

    def validation_step(self, batch, batch_idx):
        wave, y, rows = batch
        logits = self(wave)
        self.log("val_loss", F.cross_entropy(logits.float(), y), on_epoch=True, prog_bar=True,
                 sync_dist=True)
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

    def on_save_checkpoint(self, checkpoint):
        """best.ckpt is weights-only, and Lightning skips callbacks' checkpoint hooks for those:
        hand the EMA callback the checkpoint here so that it holds the averaged weights too."""
        from lightning.pytorch.callbacks import WeightAveraging

        if "optimizer_states" in checkpoint or self._trainer is None:
            return
        for cb in self.trainer.callbacks:
            if isinstance(cb, WeightAveraging) and cb._average_model is not None:
                cb.on_save_checkpoint(self.trainer, self, checkpoint)
                del checkpoint["current_model_state"], checkpoint["averaging_state"]

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


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> AudioClassifier:
    """Rebuild a trained model from its checkpoint alone (no pretrained download), in eval mode."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        hp = ckpt["hyper_parameters"]
        model = AudioClassifier(hp["config"], hp["classes"], load_pretrained=False)
        model.load_state_dict(ckpt["state_dict"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except (KeyError, TypeError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a checkpoint of this project "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    model.ckpt_path = str(path)
    return model.to(device).eval()


def check_compatible(ref: AudioClassifier, ref_path, other: AudioClassifier, path) -> None:
    """Refuse a member whose classes or feature settings differ from the reference's."""
    if other.classes != ref.classes:
        raise CheckpointError(f"class lists differ: {ref_path} has {len(ref.classes)} classes, "
                              f"{path} has {len(other.classes)}; they cannot be blended")
    a, b = ref.feature_settings(), other.feature_settings()
    diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
    if diff:
        raise CheckpointError(f"feature settings differ between {ref_path} and {path}: "
                              + ", ".join(f"{k} {x} vs {y}" for k, (x, y) in diff.items()))


def predict_waves(paths: list[Path], waves: np.ndarray, tta: bool, device: torch.device,
                  batch: int, desc: str = "") -> tuple[np.ndarray, list[str]]:
    """(M, N, C) probabilities, each member averaged over its views; models loaded one at a
    time, once each, and checked against the first. Returns the class list too."""
    views = tta_views(tta)
    out, first = [], None
    amp = dict(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")
    for path in tqdm(paths, desc=desc or "folds", unit="model", disable=None):
        model = load_checkpoint(path, device)
        if first is None:
            first = model
        check_compatible(first, paths[0], model, path)
        probs = []
        with torch.no_grad(), torch.autocast(**amp):
            for i in range(0, len(waves), batch):
                wave = torch.from_numpy(np.array(waves[i:i + batch])).to(device)
                probs.append(model.predict_views(wave, views).mean(0).cpu().numpy())
        out.append(np.concatenate(probs) if probs else np.zeros((0, len(model.classes))))
        model.cpu()  # free the device; the first stays (on the CPU) as the reference
    return np.stack(out), first.classes
