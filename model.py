"""The network and its training module.

`AudioNet` is the whole network: waveform -> front end (augmentation in train mode, log-mel)
-> backbone (a timm model, or the speech embedding) -> head -> logits. Training, BYOL
pretraining (byol.py), the ONNX ensemble and prediction (ensemble.py) all use it through its
methods; nobody reaches into its parts, so another backbone family plugs in here alone.
`AudioClassifier` is the LightningModule of supervised training (the losses of a batch and
the optimiser); the books (validation scores, OOF, EMA, SWA, freezing, history) are callbacks
(callback.py). A checkpoint's hyper-parameters hold the whole Config and the class list, so
ensemble.load_checkpoint rebuilds and labels a trained model with no other input.
"""
from __future__ import annotations

import logging

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

import speech
from arg import Config
from checkpoints import PretrainedError, averaged_weights, load_backbone, upgrade_keys
from metrics import top1_label
from augment import mixup
from transform import Frontend
from util import UsageError

log = logging.getLogger(__name__)
EMBED_SCALE = {"float": 1.0, "int16": 32768.0}  # --embed-input: what the speech mel is fed


# ----------------------------------------------------------------------------- losses
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


# ----------------------------------------------------------------------------- backbones and weights
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
        log.info("--pretrained %s: %d of %d backbone weight tensors loaded, %d skipped (head "
                 "or not in %s), %d of another shape", pretrained, counts["loaded"],
                 counts["wanted"], counts["skipped"], cfg.model, counts["mismatched"])
    return net


# ----------------------------------------------------------------------------- the network
def first_layers(backbone: nn.Module, n: int) -> list[nn.Parameter]:
    """The parameters of the backbone's first `n` layer groups in the order of its group
    matcher (timm's: the stem, then block by block), the grouping timm's layer decay uses."""
    if n <= 0:
        return []
    from timm.models import group_parameters

    if not hasattr(backbone, "group_matcher"):
        raise UsageError(f"--freeze-layers: {type(backbone).__name__} has no layer groups "
                         f"(timm's group_matcher)")
    groups = list(group_parameters(backbone, backbone.group_matcher(coarse=False)).values())
    if n >= len(groups):
        raise UsageError(f"--freeze-layers {n}: the backbone has {len(groups)} layer groups; "
                         f"freeze fewer (or use --freeze-epochs to train the head alone)")
    params = dict(backbone.named_parameters())
    return [params[name] for group in groups[:n] for name in group]


def make_frontend(cfg: Config) -> Frontend:
    """The front end a network of `cfg` hears through (the speech embedding's own 32-band mel,
    else the log-mel of -t); what AudioNet builds, and what the run report draws."""
    if cfg.model != speech.NAME:
        return Frontend(cfg)
    if cfg.sr != speech.SR:
        raise UsageError(f"-m {speech.NAME} hears {speech.SR} Hz audio (its STFT and mel "
                         f"filterbank were made for it); WORK is at {cfg.sr} Hz: run "
                         f"preprocess.py --sr {speech.SR} into another --work")
    return Frontend(cfg, logmel=speech.SpeechMel(EMBED_SCALE[cfg.embed_input],
                                                 int(speech.PAD_SECONDS * cfg.sr)))


class AudioNet(nn.Module):
    """int16 or float waveforms (B, L) -> logits (B, classes): the front end (transform.Frontend:
    augmentation in train mode, log-mel image), a timm backbone and a head (timm's pooling +
    linear, or the SED AttentionHead). classes=0: no head, `forward` gives pooled features.

    forward(wave, view) -> logits, as validation and test read them; embed(wave) -> pooled
    features. Training calls the stages in turn (waveform, images, logits_and_frames) because
    the teacher hears the augmented waveform and mixup mixes images. The class is long because
    it is the whole interface callers have: no one reaches into its parts, so what they need
    (noise bank, parameter groups, freezing, export layout) is asked of it here."""

    def __init__(self, cfg: Config, classes: int, pretrained: str | None = None):
        super().__init__()
        self.cfg = cfg
        sed = cfg.head == "sed" and classes > 0  # the backbone gives its feature map
        self.speech = cfg.model == speech.NAME  # Google's speech embedding, else a timm model
        self.frontend = make_frontend(cfg)
        if self.speech:  # the weights come with it; --pretrained may replace the CNN's
            self.backbone = speech.SpeechEmbedding()
            pretrained = cfg.pretrained if pretrained is None else pretrained
            if pretrained and pretrained != "timm":
                counts = load_backbone(self.backbone, pretrained)
                log.info("--pretrained %s: %d of %d speech embedding weight tensors loaded",
                         pretrained, counts["loaded"], counts["wanted"])
        else:
            self.backbone = create_backbone(cfg, 0 if sed else classes, pretrained,
                                            **(dict(global_pool="") if sed else {}))
        n = self.backbone.num_features
        pool_head = speech.AttentionPoolHead if cfg.head == "attention" else speech.MeanMaxHead
        self.head = AttentionHead(n, classes, cfg.drop_rate) if sed else \
            pool_head(n, classes, cfg.drop_rate) if self.speech and classes else None
        self.fixed = {id(p) for p in first_layers(self.backbone, cfg.freeze_layers)}
        self.freeze_body(False)
        self.channels_last = cfg.channels_last and not self.speech
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.backbone.compile()

    @property
    def num_features(self) -> int:
        """The size of `embed`'s vectors."""
        return self.backbone.num_features * (2 if self.speech and not isinstance(
            self.head, (AttentionHead, speech.AttentionPoolHead)) else 1)

    # the stages, in order
    def waveform(self, wave: torch.Tensor) -> torch.Tensor:
        """int16 or float (B, L) -> float in [-1, 1), augmented in train mode."""
        return self.frontend.waveform(wave)

    def images(self, x: torch.Tensor, view=None, on_db=None, on_image=None) -> torch.Tensor:
        """Float waveforms -> log-mel images (a TTA `view` first; `on_db` / `on_image` act on
        the dB log-mel and the image between the front end's own stages: BYOL's views)."""
        return self.frontend.features(view(x) if view is not None else x, on_db, on_image)

    def _backbone(self, img: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        return self.backbone(img)

    def logits_and_frames(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images -> clip logits, and the SED head's frame logits (None without it)."""
        out = self._backbone(img)
        if isinstance(self.head, AttentionHead):
            return self.head(out)
        return (self.head(out) if self.head is not None else out), None

    def logits(self, img: torch.Tensor) -> torch.Tensor:
        """Images -> the logits validation and test read: a SED head's loudest frame of each
        class (--sed-output frames) or its attention-pooled clip score (clip)."""
        clip, frames = self.logits_and_frames(img)
        return frames.amax(-1) if frames is not None and self.cfg.sed_output == "frames" else clip

    def pooled(self, img: torch.Tensor) -> torch.Tensor:
        """Images -> the backbone's pooled features (B, num_features): what the classifier
        reads (mean and max of the speech embeddings; the SED feature map's mean)."""
        if self.speech and not isinstance(self.head, AttentionHead):
            pool = self.head.pool if self.head is not None else speech.MeanMaxHead.pooled
            return pool(self._backbone(img))
        if self.head is not None:
            return self._backbone(img).mean((2, 3))
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        b = self.backbone
        return b.forward_head(b.forward_features(img), pre_logits=True)

    # the whole network
    def forward(self, wave: torch.Tensor, view=None) -> torch.Tensor:
        """Waveforms -> logits (or pooled features when built with classes=0)."""
        return self.logits(self.images(self.waveform(wave), view))

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """Waveforms -> pooled features (B, num_features)."""
        return self.pooled(self.images(self.waveform(wave)))

    def probs(self, wave: torch.Tensor, view=None) -> torch.Tensor:
        return to_probs(self(wave, view), self.cfg.multilabel)

    @torch.no_grad()
    def view_logits(self, wave: torch.Tensor, views: dict) -> torch.Tensor:
        """Logits (V, B, C) for each deterministic view of the batch."""
        return torch.stack([self(wave, fn) for fn in views.values()])

    def predict_views(self, wave: torch.Tensor, views: dict) -> torch.Tensor:
        """Probabilities (V, B, C) for each deterministic view of the batch."""
        return to_probs(self.view_logits(wave, views), self.cfg.multilabel)

    # what the scripts ask of it
    def set_noise(self, noise: torch.Tensor | None) -> None:
        """The background-noise bank (1-D float, WORK/noise.npy) for augmentation."""
        if noise is not None:
            self.frontend.wave_aug.noise = noise.to(self.frontend.logmel.fb.device)

    def feature_settings(self) -> dict:
        """What two members must agree on to share a front end in an ensemble."""
        c = self.cfg
        return dict(sr=c.sr, seconds=c.seconds, **self.frontend.logmel.settings())

    def head_parameters(self) -> list[nn.Parameter]:
        return list((self.head or self.backbone.get_classifier()).parameters())

    def freeze_body(self, frozen: bool) -> None:
        """Every parameter but the head's learns (False) or not (True): --freeze-epochs; those of
        the first --freeze-layers groups never learn."""
        head = set(map(id, self.head_parameters()))
        for p in self.backbone.parameters():
            if id(p) not in head:
                p.requires_grad_(not frozen and id(p) not in self.fixed)

    def optimizer(self, name: str, lr: float, weight_decay: float, layer_decay: float = 0.0):
        """timm's optimiser over the backbone (no decay on norms and biases; layer-wise lr decay
        by timm's group matcher when layer_decay > 0), the SED head as one more group."""
        from timm.optim import create_optimizer_v2

        opt = create_optimizer_v2(self.backbone, opt=name, lr=lr, weight_decay=weight_decay,
                                  layer_decay=layer_decay or None)
        for group in opt.param_groups:  # timm leaves lr_scale to its own schedulers: apply it
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.head is not None:
            opt.add_param_group(dict(params=list(self.head.parameters()), lr=lr,
                                     weight_decay=weight_decay))
        return opt

    def backbone_state(self) -> dict:
        """The backbone's tensors by timm's names (pretrain.py's encoder.pth)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}

    def for_export(self) -> "AudioNet":
        """The plain memory layout (channels_last is a CUDA-speed detail), in eval mode."""
        self.backbone.to(memory_format=torch.contiguous_format)
        self.channels_last = False
        return self.eval()


# ----------------------------------------------------------------------------- training
def warmup_steps(trainer, cfg: Config) -> int:
    """Optimizer steps of the learning-rate warm-up (cfg.warmup epochs), counted as the trainer
    counts its own steps (per process): the schedule and the EMA start both use it."""
    total = max(2, int(trainer.estimated_stepping_batches))
    return min(total - 1, max(1, round(cfg.warmup * total / max(1, trainer.max_epochs))))


def warmup_cosine(opt, trainer, cfg: Config) -> dict:
    """Lightning's optimiser config: linear warm-up over `cfg.warmup` epochs, then cosine to
    `cfg.min_lr`, stepped per batch."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    total = max(2, int(trainer.estimated_stepping_batches))
    warm = warmup_steps(trainer, cfg)
    sched = SequentialLR(opt, [LinearLR(opt, start_factor=0.01, total_iters=warm),
                               CosineAnnealingLR(opt, T_max=total - warm, eta_min=cfg.min_lr)],
                         milestones=[warm])
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class AudioClassifier(L.LightningModule):
    """Supervised training of an AudioNet: the loss of a batch (cross-entropy or BCE/focal,
    mixup, distillation, the SED frame term) and the optimiser. Validation returns each
    batch's rows, targets and probabilities; callback.ValidationCollector scores them."""

    def __init__(self, config: dict, classes: list[str], load_pretrained: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["load_pretrained"])
        self.cfg = Config.from_dict(config)
        self.classes = list(classes)
        self.net = AudioNet(self.cfg, len(classes), None if load_pretrained else "")
        self.train_acc = MulticlassAccuracy(len(classes), average="micro")
        self.train_f1 = MulticlassF1Score(len(classes), average="macro")
        self._teacher: list[AudioClassifier] = []  # a list: not a submodule, not in checkpoints

    def set_teacher(self, teacher: "AudioClassifier") -> None:
        """A frozen model whose softened probabilities the student learns from (distillation)."""
        teacher.eval().requires_grad_(False)
        self._teacher = [teacher]

    def on_fit_start(self):
        for t in self._teacher:
            t.to(self.device)

    def forward(self, wave: torch.Tensor, view=None) -> torch.Tensor:
        return self.net(wave, view)

    def training_step(self, batch, batch_idx):
        c = self.cfg
        wave, y, _ = batch
        wave = self.net.waveform(wave)  # augmented: the teacher hears what the student hears
        x, target, teacher = self.net.images(wave), y, None
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
        logits, frames = self.net.logits_and_frames(x)
        if c.multilabel:  # SED: the clip's loss plus the loudest frame's (BirdCLEF 2023 1st)
            loss = multilabel_loss(logits, target, c.focal, c.ohem)
            if frames is not None:
                loss = loss + 0.5 * multilabel_loss(frames.amax(-1), target, c.focal, c.ohem)
        else:
            loss = classification_loss(logits, target, c.smoothing, c.ohem, teacher, c.kd_weight,
                                       c.kd_temp)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}: "
                f"the fold stops here, its last good checkpoint is kept. Try a lower -l1 "
                f"(now {c.lr}) or -p 32")
        y = top1_label(y)
        self.train_acc(logits, y)
        self.train_f1(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict({"train_acc": self.train_acc, "train_f1": self.train_f1},
                      on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        wave, target, rows = batch
        logits = self(wave)
        if not torch.isfinite(logits).all():
            raise FloatingPointError(
                f"validation predictions are not finite at epoch {self.current_epoch} while the "
                f"training loss was: the fold stops here, its last good checkpoint is kept. "
                f"Try a lower -l1 (now {self.cfg.lr}) or -p 32")
        loss = (multilabel_loss(logits, target) if self.cfg.multilabel
                else F.cross_entropy(logits.float(), top1_label(target)))
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        return dict(rows=rows, target=target, probs=to_probs(logits, self.cfg.multilabel))

    def on_save_checkpoint(self, checkpoint):
        """best.ckpt is weights-only, and Lightning skips callbacks' checkpoint hooks for those:
        the averaging callback (EMA, SWA) puts its weights in here."""
        averaged_weights(self, checkpoint)

    def on_load_checkpoint(self, checkpoint):
        checkpoint["state_dict"] = upgrade_keys(checkpoint["state_dict"])

    def configure_optimizers(self):
        c = self.cfg
        opt = self.net.optimizer(c.optimizer, c.lr, c.weight_decay, c.layer_decay)
        return warmup_cosine(opt, self.trainer, c)
