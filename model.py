"""The LightningModule: waveform batch -> (augment, log-mel on the device) -> timm backbone.

The checkpoint's hyper-parameters hold the whole Config and the class list, so
`load_checkpoint(path)` rebuilds and labels the model with no other input, and
`predict_waves` turns checkpoints and waveforms into probabilities (train.py and
inference.py both use it).
"""
from __future__ import annotations

import logging
import pickle
import re
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

log = logging.getLogger(__name__)


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


def multilabel_loss(logits: torch.Tensor, target: torch.Tensor, focal: float = 0.0,
                    ohem: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy of each class (multi-hot or mixed targets), summed over the
    classes and averaged over the batch; focal (Lin et al.) weighs each term by (1 - p_t)^gamma.
    OHEM keeps the `ohem` share of the batch with the largest loss."""
    logits, target = logits.float(), target.float()
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if focal > 0:
        p = torch.sigmoid(logits)
        loss = loss * (1 - (target * p + (1 - target) * (1 - p))) ** focal
    loss = loss.sum(-1)
    if ohem < 1.0:
        loss = loss.topk(max(1, int(round(ohem * loss.numel())))).values
    return loss.mean()


def top1_label(y: torch.Tensor) -> torch.Tensor:
    """Class indices of labels that are indices already or multi-hot (the primary: the largest)."""
    return y if y.dim() == 1 else y.argmax(-1)


def multilabel_scores(probs: torch.Tensor, target: torch.Tensor) -> dict:
    """Macro average precision (mAP) and ROC-AUC over the classes that have at least one
    positive (and, for AUC, one negative) among the rows (torchmetrics)."""
    from torchmetrics.functional.classification import (multilabel_auroc,
                                                        multilabel_average_precision)

    t = (target > 0).int()
    n = t.shape[1]
    pos = t.sum(0)
    has, both = pos > 0, (pos > 0) & (pos < len(t))
    out = {}
    if has.any():
        ap = multilabel_average_precision(probs.float(), t, n, average=None)
        out["map"] = float(ap[has].mean())
    if both.any():
        auc = multilabel_auroc(probs.float(), t, n, average=None)
        out["auc"] = float(auc[both].mean())
    return out


def output_logits(out: torch.Tensor, head, sed_output: str = "frames") -> torch.Tensor:
    """Logits from the timm net's output: the output itself, or through a SED head each class's
    loudest frame (`sed_output` 'frames') or its attention-pooled clip score ('clip')."""
    if head is None:
        return out
    clip, frames = head(out)
    return frames.amax(-1) if sed_output == "frames" else clip


def to_probs(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Probabilities: a sigmoid per class (multilabel) or the softmax."""
    return logits.float().sigmoid() if multilabel else logits.float().softmax(-1)


class AttentionHead(torch.nn.Module):
    """SED head (Kong et al., PANNs; Cornell 2020 1st): the backbone's feature map averaged over
    frequency, a class score per time frame and an attention weight per frame; the clip's
    score is the attention-weighted sum of the frames'."""

    def __init__(self, channels: int, classes: int, drop: float = 0.2):
        super().__init__()
        self.drop = torch.nn.Dropout(drop)
        self.att = torch.nn.Conv1d(channels, classes, 1)
        self.cla = torch.nn.Conv1d(channels, classes, 1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, F, T) features -> clip logits (B, K) and frame logits (B, K, T)."""
        x = self.drop(feats.mean(2))
        w = torch.softmax(torch.tanh(self.att(x)), -1)
        frames = self.cla(x)
        return (w * frames).sum(-1), frames


# ----------------------------------------------------------------------------- model
def create_backbone(cfg: Config, num_classes: int, pretrained: str | None = None, **extra):
    """One timm factory call; `pretrained` is '', 'timm' (the hub) or a weights file, whose
    backbone tensors are loaded by `load_backbone` (the head stays new)."""
    import timm

    pretrained = cfg.pretrained if pretrained is None else pretrained
    kw = dict(num_classes=num_classes, in_chans=1, drop_rate=cfg.drop_rate, **extra)
    if cfg.drop_path_rate > 0:
        kw["drop_path_rate"] = cfg.drop_path_rate
    try:
        net = timm.create_model(cfg.model, pretrained=pretrained == "timm", **kw)
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
    if pretrained and pretrained != "timm":
        counts = load_backbone(net, pretrained)
        log.info("--pretrained %s: %d backbone tensors loaded, %d skipped (head or not in %s), "
                 "%d of another shape", pretrained, counts["loaded"], counts["skipped"],
                 cfg.model, counts["mismatched"])
    return net


def safe_load(path: str | Path, error: type[UsageError] = UsageError, what: str = ""):
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts come
    back, and nothing in the file is run. A pickle that names any other global (a class, a
    function: what a crafted file uses to run code) is refused with `error`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)|global '?([\w.]+)", str(e))
        named = f"it names {m.group(1) or m.group(2)}" if m else str(e).splitlines()[0][:80]
        raise error(f"{what}{path}: refused, it holds objects other than tensors and plain values "
                    f"({named}); loading it could run code") from None


def read_weights(path: str | Path) -> dict:
    """The tensors of a weights file: a timm state dict (.pth, .safetensors), pretrain.py's
    encoder.pth, or a run's checkpoint (its backbone `net.*`). Nothing in it is run: pickles
    are read with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"--pretrained {path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = safe_load(path, PretrainedError, "--pretrained ")
    except PretrainedError:
        raise
    except Exception as e:  # UnpicklingError, RuntimeError, SafetensorError, ...
        raise PretrainedError(f"--pretrained {path}: not a weights file this project can read "
                              f"({type(e).__name__}); pass pretrain.py's encoder.pth, a run's "
                              f"best.ckpt or a timm .pth/.safetensors file") from None
    for key in ("state_dict_ema", "state_dict", "model"):  # timm prefers the EMA weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise PretrainedError(f"--pretrained {path}: holds no tensors by name")
    if any(k.startswith("net.") for k in sd):  # a LightningModule's: keep the backbone's
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("net.")}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_backbone(net: torch.nn.Module, path: str | Path) -> dict:
    """Load the backbone tensors of `path` into the timm model `net`, the classifier left
    as initialised; an RGB stem is summed to one channel (as timm does). Returns the counts
    loaded / skipped / mismatched; PretrainedError when nothing loads into the backbone."""
    sd, own = read_weights(path), net.state_dict()
    head = {f"{n}.{p}" for n in [net.default_cfg.get("classifier", "")] if n
            for p in ("weight", "bias")}
    take, skipped, mismatched = {}, 0, 0
    for k, v in sd.items():
        if k in head or k not in own:
            skipped += 1
        elif v.shape == own[k].shape:
            take[k] = v
        elif v.dim() == 4 and v.shape[1] == 3 and own[k].shape[1] == 1 and \
                v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:]:
            take[k] = v.sum(1, keepdim=True)  # the RGB stem of image weights, as timm adapts it
        else:
            mismatched += 1
    if not take:
        raise PretrainedError(f"--pretrained {path}: none of its {len(sd)} tensors fits "
                              f"{type(net).__name__}'s backbone (another model? pass weights "
                              f"of the -m model)")
    net.load_state_dict(take, strict=False)
    return dict(loaded=len(take), skipped=skipped, mismatched=mismatched)


class AudioClassifier(L.LightningModule):
    def __init__(self, config: dict, classes: list[str], load_pretrained: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["load_pretrained"])
        self.cfg = cfg = Config.from_dict(config)
        self.classes = list(classes)
        n = len(classes)
        self.frontend = Frontend(cfg)
        sed = cfg.head == "sed"  # the timm model gives its feature map, the head classifies
        self.net = create_backbone(cfg, 0 if sed else n, None if load_pretrained else "",
                                   **(dict(global_pool="") if sed else {}))
        self.head = AttentionHead(self.net.num_features, n, cfg.drop_rate) if sed else None
        if cfg.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.net.compile()
        for stage in ("train", "val"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(n, average="micro"))
            setattr(self, f"{stage}_f1", MulticlassF1Score(n, average="macro"))
        self._val, self._gathered, self._scores = [], None, None
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

    def on_train_epoch_start(self):
        """--freeze-epochs K: the head alone learns for K epochs, then every layer."""
        if self.cfg.freeze_epochs > 0:
            head = set(map(id, (self.head or self.net.get_classifier()).parameters()))
            frozen = self.current_epoch < self.cfg.freeze_epochs
            for p in self.net.parameters():
                if id(p) not in head:
                    p.requires_grad_(not frozen)

    def feature_settings(self) -> dict:
        c = self.cfg
        return dict(sr=c.sr, seconds=c.seconds, **self.frontend.logmel.settings())

    def _net(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def classify(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-mel images -> logits, and the SED head's frame logits (None without it)."""
        out = self._net(x)
        return self.head(out) if self.head is not None else (out, None)

    def backbone(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of what the model outputs at validation and test: a SED head's loudest frame
        of each class (--sed-output frames) or its attention-pooled clip score."""
        return output_logits(self._net(x), self.head, self.cfg.sed_output)

    def forward(self, wave: torch.Tensor, view=None) -> torch.Tensor:
        return self.backbone(self.frontend(wave, view))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return to_probs(logits, self.cfg.multilabel)

    @property
    def monitor(self) -> str:
        """The validation score best.ckpt keeps: mAP for multilabel data, else accuracy."""
        return "val_map" if self.cfg.multilabel else "val_acc"

    def val_scores(self) -> dict:
        """The epoch's validation scores over the whole fold (gathered_val), computed once an
        epoch for OOFWriter and the logged val_map / val_auc alike: acc, and map and auc for
        multilabel data."""
        if self._scores is None:
            _, y, probs, *target = self.gathered_val()
            self._scores = {"acc": float((probs.argmax(1) == y).float().mean())}
            if self.cfg.multilabel:
                self._scores.update(multilabel_scores(probs, target[0]))
        return self._scores

    def val_score(self) -> float:
        """The score best.ckpt keeps (`monitor`) of this epoch's validation."""
        return self.val_scores().get("map" if self.cfg.multilabel else "acc", 0.0)

    @torch.no_grad()
    def predict_views(self, wave: torch.Tensor, views: dict) -> torch.Tensor:
        """Probabilities (V, B, C) for each deterministic view of the batch."""
        return torch.stack([self.probs(self(wave, fn)) for fn in views.values()])

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
        if c.multilabel and c.mixup > 0 and torch.rand(()) < c.p_mixup:
            x, target = mixup(x, y.float(), c.mixup, union=True)
        elif c.mixup > 0 and torch.rand(()) < c.p_mixup:
            n = len(self.classes)
            soft = F.one_hot(y, n).float()
            x, mixed = mixup(x, soft if teacher is None else torch.cat([soft, teacher], 1), c.mixup)
            target, teacher = (mixed, None) if teacher is None else (mixed[:, :n], mixed[:, n:])
        logits, frames = self.classify(x)
        if c.multilabel:  # SED: the clip's loss plus the loudest frame's (BirdCLEF 2023 1st)
            loss = multilabel_loss(logits, target, c.focal, c.ohem)
            if frames is not None:
                loss = loss + 0.5 * multilabel_loss(frames.amax(-1), target, c.focal, c.ohem)
        else:
            loss = classification_loss(logits, target, c.smoothing, c.ohem, teacher, c.kd_weight,
                                       c.kd_temp)
        y = top1_label(y)
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
        self._val, self._gathered, self._scores = [], None, None

    def validation_step(self, batch, batch_idx):
        wave, target, rows = batch
        y = top1_label(target)
        logits = self(wave)
        if not torch.isfinite(logits).all():
            raise FloatingPointError(
                f"validation predictions are not finite at epoch {self.current_epoch} while the "
                f"training loss was: the fold stops here, its last good checkpoint is kept. "
                f"Try a lower -l1 (now {self.cfg.lr}) or -p 32")
        loss = (multilabel_loss(logits, target) if self.cfg.multilabel
                else F.cross_entropy(logits.float(), y))
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.val_acc(logits, y)
        self.val_f1(logits, y)
        self.log_dict({"val_acc": self.val_acc, "val_f1": self.val_f1}, on_epoch=True,
                      prog_bar=True)
        probs = self.probs(logits)
        self._val.append((rows, y, probs) + ((target,) if self.cfg.multilabel else ()))

    def on_validation_epoch_end(self):
        """Multilabel: macro mAP and ROC-AUC of the whole validation fold (not batch means)."""
        if self.cfg.multilabel and self._val and not self.trainer.sanity_checking:
            scores = self.val_scores()
            self.log_dict({f"val_{k}": scores[k] for k in ("map", "auc") if k in scores},
                          prog_bar=True, sync_dist=False)

    def gathered_val(self) -> tuple[torch.Tensor, ...]:
        """(rows, labels, probs) of the epoch's validation, from every process, each row once
        (DistributedSampler pads with repeats); gathered once an epoch. Multilabel: the
        targets too."""
        if self._gathered is None:
            val = [torch.cat(t) for t in zip(*self._val)]
            if self.trainer.world_size > 1:
                val = [self.all_gather(t).flatten(0, 1) for t in val]
            first = np.unique(val[0].cpu().numpy(), return_index=True)[1]
            self._gathered = tuple(t[first] for t in val)
        return self._gathered

    def on_save_checkpoint(self, checkpoint):
        """best.ckpt is weights-only, and Lightning skips callbacks' checkpoint hooks for those:
        hand the EMA callback the checkpoint here so that it holds the averaged weights too."""
        from lightning.pytorch.callbacks import WeightAveraging

        if "optimizer_states" in checkpoint or self._trainer is None:
            return
        for cb in self.trainer.callbacks:
            if isinstance(cb, WeightAveraging) and cb._average_model is not None:
                cb.on_save_checkpoint(self.trainer, self, checkpoint)
                checkpoint.pop("current_model_state", None)
                checkpoint.pop("averaging_state", None)

    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2

        c = self.cfg
        opt = create_optimizer_v2(self.net, opt=c.optimizer, lr=c.lr, weight_decay=c.weight_decay,
                                  layer_decay=c.layer_decay or None)
        if self.head is not None:
            opt.add_param_group(dict(params=list(self.head.parameters()), lr=c.lr,
                                     weight_decay=c.weight_decay))
        return warmup_cosine(opt, self.trainer, c)


def warmup_cosine(opt, trainer, cfg: Config) -> dict:
    """Lightning's optimiser config: linear warm-up over `cfg.warmup` epochs, then cosine to
    `cfg.min_lr`, stepped per batch."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    total = max(2, int(trainer.estimated_stepping_batches))
    warm = min(total - 1, max(1, round(cfg.warmup * total / max(1, trainer.max_epochs))))
    sched = SequentialLR(opt, [LinearLR(opt, start_factor=0.01, total_iters=warm),
                               CosineAnnealingLR(opt, T_max=total - warm, eta_min=cfg.min_lr)],
                         milestones=[warm])
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> AudioClassifier:
    """Rebuild a trained model from its checkpoint alone (no pretrained download), in eval mode.
    Nothing in the file is run (`safe_load`)."""
    try:
        ckpt = safe_load(path, CheckpointError)
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
