"""The network and the LightningModules that train it.

`AudioNet` is the whole network: waveform -> front end (augmentation in train mode, log-mel)
-> backbone (a timm model) -> head -> logits. Training, BYOL pretraining, the ONNX ensemble
and prediction all use it through its methods; nobody reaches into its parts, so another
backbone family plugs in here alone. `AudioClassifier` (loss and optimiser of supervised
training) and `BYOL` (of self-supervised pretraining) are the LightningModules around it; the
books (validation scores, OOF, EMA, SWA, freezing, history) are callbacks (callback.py).

A checkpoint's hyper-parameters hold the whole Config and the class list, so
`load_checkpoint(path)` rebuilds and labels the model with no other input, and
`predict_waves` turns checkpoints and waveforms into probabilities.
"""
from __future__ import annotations

import copy
import logging
import math
import pickle
import re
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from tqdm import tqdm

from arg import Config
import speech
from metrics import top1_label
from transform import Frontend, mixup, tta_views
from util import UsageError

log = logging.getLogger(__name__)
BACKBONE = "net.backbone."  # where a run's checkpoint keeps the backbone's tensors
EMBED_SCALE = {"float": 1.0, "int16": 32768.0}  # --embed-input: what the speech mel is fed


class PretrainedError(UsageError):
    """--pretrained names weights that cannot be had or do not fit the model."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be used, or members that cannot be blended."""


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


def safe_load(path: str | Path, error: type[UsageError] = UsageError, what: str = "",
              fix: str = "train it again"):
    """torch.load with weights_only=True: tensors, numbers, strings, lists and dicts come
    back, and nothing in the file is run. A pickle that names any other global (a class, a
    function: what a crafted file uses to run code) is refused with `error`; so is a file
    that is truncated, empty or not a torch file at all, with `fix` as what to do."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise error(f"{what}{path}: no such file") from None
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)|global '?([\w.]+)", str(e))
        if m:  # a pickle that asks for a class or function by name
            raise error(f"{what}{path}: refused, it holds objects other than tensors and plain "
                        f"values (it names {m.group(1) or m.group(2)}); loading it could run "
                        f"code") from None
        lines = [x for x in str(e).splitlines() if x.strip() and "Weights only" not in x]
        reason = (lines[-2] if len(lines) > 1 else type(e).__name__)[:80]
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated zip, empty file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:80]
    raise error(f"{what}{path}: not a complete torch file (truncated, empty or another format: "
                f"{reason}); {fix}")


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
            sd = safe_load(path, PretrainedError, "--pretrained ",
                           "pass pretrain.py's encoder.pth, a run's best.ckpt or timm weights")
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
    sd = upgrade_keys(sd)
    if any(k.startswith(BACKBONE) for k in sd):  # a run's checkpoint: keep the backbone's
        sd = {k[len(BACKBONE):]: v for k, v in sd.items() if k.startswith(BACKBONE)}
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_backbone(net: torch.nn.Module, path: str | Path) -> dict:
    """Load the backbone tensors of `path` into the timm model `net`, the classifier left
    as initialised; an RGB stem is summed to one channel (as timm does). Only tensors that
    carry weights count (parameters and running statistics; BatchNorm's step counters are
    left out). Returns the counts loaded / skipped / mismatched / wanted (the backbone's
    weight tensors); PretrainedError when none of them loads."""
    def counted(d):
        return {k: v for k, v in d.items() if not k.endswith("num_batches_tracked")}

    everything, whole = read_weights(path), net.state_dict()
    sd, own = counted(everything), counted(whole)
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
    wanted = len(set(own) - head)
    if not take:
        raise PretrainedError(f"--pretrained {path}: none of its {len(sd)} weight tensors fits "
                              f"the {wanted} of {type(net).__name__}'s backbone ({skipped} "
                              f"skipped, {mismatched} of another shape): pass weights of the "
                              f"-m model")
    if len(take) < wanted / 2:
        log.warning("--pretrained %s: only %d of the backbone's %d weight tensors loaded; the "
                    "rest start from scratch (weights of another model?)", path, len(take),
                    wanted)
    counters = {k: v for k, v in everything.items() if k not in sd and k in whole
                and v.shape == whole[k].shape}  # loaded with their layers, never counted
    net.load_state_dict({**take, **counters}, strict=False)
    return dict(loaded=len(take), skipped=skipped, mismatched=mismatched, wanted=wanted)


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
    def predict_views(self, wave: torch.Tensor, views: dict) -> torch.Tensor:
        """Probabilities (V, B, C) for each deterministic view of the batch."""
        return torch.stack([self.probs(wave, fn) for fn in views.values()])

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


class Ensemble(nn.Module):
    """float32 waveforms (B, L) -> probabilities (B, C): for each view, the front end of each
    group of members that share one (a timm family and the speech embedding are two groups),
    every member's probabilities, averaged with the members' weights and the views, then
    calibrated by `temperature` (softmax(log p / T), inference.py's with_temperature; single
    label only). What export.py writes as ONNX."""

    def __init__(self, nets: list[AudioNet], tta: bool, weights=None, temperature: float = 1.0):
        super().__init__()
        self.temperature = float(temperature)
        self.nets = nn.ModuleList(n.for_export() for n in nets)
        self.multilabel = nets[0].cfg.multilabel
        self.views = list(tta_views(tta).values())
        keys = [repr(sorted(n.feature_settings().items())) for n in nets]
        self.front = [keys.index(k) for k in keys]  # the member whose front end each one uses
        w = torch.ones(len(nets)) if weights is None else torch.as_tensor(weights).float()
        self.register_buffer("weights", w / w.sum())

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        # the views stacked on the batch axis: each member appears once in the graph, not once
        # per view (5x fewer nodes; ONNX Runtime then loads and optimises it 5x faster)
        images = {}
        for k in sorted(set(self.front)):
            net = self.nets[k]
            x = net.waveform(wave)
            images[k] = torch.cat([net.images(x, view) for view in self.views])
        probs = 0.0
        for k, net in enumerate(self.nets):
            p = to_probs(net.logits(images[self.front[k]]), self.multilabel)
            probs = probs + self.weights[k] * p.reshape(len(self.views), wave.shape[0], -1).mean(0)
        if self.temperature != 1.0 and not self.multilabel:
            probs = torch.softmax(probs.clamp_min(1e-15).log() / self.temperature, -1)
        return probs

    def embed(self, wave: torch.Tensor) -> torch.Tensor:
        """The first member's embedding of the clip itself (no view): its pooled vector."""
        return self.nets[0].embed(wave)


class WithEmbedding(nn.Module):
    """An Ensemble whose graph has a second output: (probabilities, the first member's
    embedding)."""

    def __init__(self, ensemble: Ensemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ensemble(wave), self.ensemble.embed(wave)


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


def upgrade_keys(state: dict) -> dict:
    """A state dict of a checkpoint written before the network was one module (backbone at
    `net.*`, SED head at `head.*`) in today's names (`net.backbone.*`, `net.head.*`)."""
    if not any(k.startswith("net.") for k in state) or any(k.startswith(BACKBONE) for k in state):
        return state
    return {("net.backbone." + k[4:] if k.startswith("net.") else
             "net." + k if k.startswith("head.") else k): v for k, v in state.items()}


def averaged_weights(module, checkpoint: dict) -> None:
    """Put the averaging callback's weights (EMA, SWA) into a weights-only checkpoint, which
    Lightning writes without calling callbacks' checkpoint hooks; a full checkpoint (last.ckpt)
    gets them from the callback itself."""
    if "optimizer_states" in checkpoint or module._trainer is None:
        return
    from lightning.pytorch.callbacks import WeightAveraging

    for cb in module.trainer.callbacks:
        if isinstance(cb, WeightAveraging) and cb._average_model is not None:
            cb.on_save_checkpoint(module.trainer, module, checkpoint)
            checkpoint.pop("current_model_state", None)
            checkpoint.pop("averaging_state", None)


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


# ----------------------------------------------------------------------------- BYOL-A
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


# ----------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> AudioClassifier:
    """Rebuild a trained model from its checkpoint alone (no pretrained download), in eval mode.
    Nothing in the file is run (`safe_load`)."""
    try:
        ckpt = safe_load(path, CheckpointError, fix="train that fold again (its command.txt "
                                                    "says how)")
        hp = ckpt["hyper_parameters"]
        model = AudioClassifier(hp["config"], hp["classes"], load_pretrained=False)
        model.load_state_dict(upgrade_keys(ckpt["state_dict"]))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except (KeyError, TypeError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a checkpoint of this project "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    model.ckpt_path = str(path)
    return model.to(device).eval()


def load_members(paths: list[Path]) -> list[AudioClassifier]:
    """The checkpoints of an ensemble, each checked against the first."""
    models = [load_checkpoint(p) for p in paths]
    for m, p in zip(models[1:], paths[1:]):
        check_compatible(models[0], paths[0], m, p)
    return models


def check_compatible(ref: AudioClassifier, ref_path, other: AudioClassifier, path) -> None:
    """Refuse a member whose classes or input (sample rate, clip length) differ from the
    reference's. Front ends may differ (a timm run and a speech-embedding run blend): each
    member makes its own features, and the ONNX Ensemble shares a front end only within a
    group of members whose feature settings agree."""
    if other.classes != ref.classes:
        raise CheckpointError(f"class lists differ: {ref_path} has {len(ref.classes)} classes, "
                              f"{path} has {len(other.classes)}; they cannot be blended")
    a, b = ref.net.feature_settings(), other.net.feature_settings()
    diff = {k: (a[k], b.get(k)) for k in ("sr", "seconds") if a[k] != b.get(k)}
    if diff:
        raise CheckpointError(f"members hear other clips: {ref_path} and {path} differ in "
                              + ", ".join(f"{k} {x} vs {y}" for k, (x, y) in diff.items()))


def embed_waves(path: Path, waves, device: torch.device, batch: int) -> np.ndarray:
    """(N, D) embeddings of `waves` (an array or dataset.Rows) by one checkpoint's network:
    the pooled vector its classifier reads (AudioNet.embed), eval mode, no views."""
    model = load_checkpoint(path, device)
    out = []
    with torch.no_grad():
        for i in range(0, len(waves), batch):
            wave = torch.from_numpy(np.array(waves[i:i + batch])).to(device)
            out.append(model.net.embed(wave).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.net.num_features), np.float32)


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
                probs.append(model.net.predict_views(wave, views).mean(0).cpu().numpy())
        out.append(np.concatenate(probs) if probs else np.zeros((0, len(model.classes))))
        model.cpu()  # free the device; the first stays (on the CPU) as the reference
    return np.stack(out), first.classes
