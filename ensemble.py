"""Trained members and how they are combined: a checkpoint rebuilt into its model
(`load_checkpoint`, nothing in the file run), members checked against each other, their
probabilities and embeddings over waveforms in batches (`predict_waves`, `embed_waves`), the
blend maths (soft mean, hard vote, OOF-fitted weights and temperature), and the exported graph
(`Ensemble`: folds x views x front ends in one module, which export.py writes as ONNX)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from checkpoints import CheckpointError, safe_load, upgrade_keys
from metrics import calibration_error, log_loss
from model import AudioClassifier, AudioNet, to_probs
from results import label_index, load_oof
from runs import Run, oof_missing
from transform import tta_views
from util import UsageError


# ----------------------------------------------------------------------------- the exported graph
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


class WithDecision(nn.Module):
    """A WithEmbedding whose graph has a third output, the reject rule (predictor.decide) per
    row: `said`, the index of the most probable word where its probability reaches `threshold`,
    else of the more probable `open` class (_unknown_, _silence_), or -1 ("none of these")
    where the model has none."""

    def __init__(self, net: WithEmbedding, threshold: float, open_classes: list[int],
                 n_classes: int):
        super().__init__()
        self.net, self.threshold = net, float(threshold)
        is_open = torch.zeros(n_classes, dtype=torch.bool)
        is_open[open_classes] = True
        self.register_buffer("is_open", is_open)

    def forward(self, wave: torch.Tensor):
        probs, embedding = self.net(wave)
        best, word = probs.masked_fill(self.is_open, -1.0).max(1)
        other_p, other = probs.masked_fill(~self.is_open, -1.0).max(1)
        fallback = torch.where(other_p >= 0, other, torch.full_like(other, -1))
        return probs, embedding, torch.where(best >= self.threshold, word, fallback)


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
    """(N, D) embeddings of `waves` (an array or cache.Rows) by one checkpoint's network:
    the pooled vector its classifier reads (AudioNet.embed), eval mode, no views."""
    model = load_checkpoint(path, device)
    out = []
    with torch.no_grad():
        for i in range(0, len(waves), batch):
            wave = torch.from_numpy(np.array(waves[i:i + batch])).to(device)
            out.append(model.net.embed(wave).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.net.num_features), np.float32)


def predict_waves(paths: list[Path], waves: np.ndarray, tta: bool, device: torch.device,
                  batch: int, desc: str = "", with_logits: bool = False) -> tuple:
    """(M, N, C) probabilities, each member averaged over its views; models loaded one at a
    time, once each, and checked against the first. Returns the class list too, and with
    `with_logits` the (M, N, C) logits averaged over the views (the reject scores' energy)."""
    out, logits, first = [], [], None
    for path in tqdm(paths, desc=desc or "folds", unit="model", disable=None):
        model = load_checkpoint(path, device)
        if first is None:
            first = model
        check_compatible(first, paths[0], model, path)
        probs, z = member_probs(model, waves, tta, device, batch, with_logits)
        out.append(probs)
        logits.append(z)
        model.cpu()  # free the device; the first stays (on the CPU) as the reference
    if with_logits:
        return np.stack(out), first.classes, np.stack(logits)
    return np.stack(out), first.classes


def member_probs(model: AudioClassifier, waves, tta: bool, device: torch.device, batch: int,
                 with_logits: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """One loaded member's (N, C) probabilities over `waves` averaged over its views (and the
    views' averaged logits, with `with_logits`), in batches."""
    views = tta_views(tta)
    amp = dict(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")
    probs, zs = [], []
    with torch.no_grad(), torch.autocast(**amp):
        for i in range(0, len(waves), batch):
            wave = torch.from_numpy(np.array(waves[i:i + batch])).to(device)
            z = model.net.view_logits(wave, views).float()
            probs.append(to_probs(z, model.cfg.multilabel).mean(0).cpu().numpy())
            if with_logits:
                zs.append(z.mean(0).cpu().numpy())
    empty = np.zeros((0, len(model.classes)))
    return (np.concatenate(probs) if probs else empty,
            (np.concatenate(zs) if zs else empty) if with_logits else None)


# ----------------------------------------------------------------------------- blends
def ensemble(probs: np.ndarray, how: str = "soft", weights=None) -> tuple[np.ndarray, np.ndarray]:
    """probs (M, N, C) of M members -> (labels (N,), scores (N, C)).
    soft: weighted mean of the probabilities. hard: weighted majority vote of the members'
    argmax; ties go to the tied class with the highest mean probability."""
    m = probs.shape[0]
    w = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean = np.tensordot(w, probs, axes=1)
    if how == "soft":
        return mean.argmax(1), mean
    votes = np.zeros_like(mean)
    for k in range(m):
        np.add.at(votes, (np.arange(probs.shape[1]), probs[k].argmax(1)), w[k])
    tied = np.isclose(votes, votes.max(1, keepdims=True))
    return np.where(tied, mean, -1.0).argmax(1), votes


def with_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """softmax(log(p) / t): the same ranking, confidence scaled (t > 1 softens)."""
    z = np.log(np.clip(probs, 1e-15, 1.0)) / t
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def fit_blend(probs: np.ndarray, y: np.ndarray) -> dict:
    """Run weights (on the simplex) minimising the OOF log-loss of the weighted mean of
    probs (R, N, C), then a temperature minimising the blend's log-loss (scipy.optimize)."""
    from scipy.optimize import minimize, minimize_scalar

    r = probs.shape[0]
    p_true = probs[:, np.arange(len(y)), y]  # (R, N): only the true class counts in log-loss

    def nll(z):
        w = np.exp(z - z.max())
        return -np.log(np.clip((w / w.sum()) @ p_true, 1e-15, 1.0)).mean()

    z = minimize(nll, np.zeros(r), method="L-BFGS-B").x if r > 1 else np.zeros(1)
    w = np.exp(z - z.max())
    w = w / w.sum()
    equal, blend = probs.mean(0), np.tensordot(w, probs, axes=1)
    t = minimize_scalar(lambda t: log_loss(with_temperature(blend, t), y), bounds=(0.05, 20.0),
                        method="bounded").x
    calibrated = with_temperature(blend, t)
    return dict(weights=w.tolist(), temperature=float(t),
                oof_log_loss=dict(equal=log_loss(equal, y), fitted=log_loss(blend, y),
                                  calibrated=log_loss(calibrated, y)),
                oof_accuracy=dict(equal=float((equal.argmax(1) == y).mean()),
                                  fitted=float((blend.argmax(1) == y).mean())),
                oof_ece=dict(before=calibration_error(blend, y),
                             after=calibration_error(calibrated, y)))


def oof_for_blend(work: Path, runs: list[str], folds: list[int], name: str,
                  classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(R, N, C) OOF probabilities of each run and the labels, refusing runs whose OOF covers
    other rows."""
    tables, probs = [], []
    for r in (Run(work, name) for name in runs):
        got = load_oof([r.dir], folds, name, classes)
        if got is None:
            raise UsageError(f"--fit-weights: {oof_missing(r, folds, name)}")
        tables.append(got[0])
        probs.append(got[1])
    for r, t in zip(runs[1:], tables[1:]):
        if not np.array_equal(t.row.to_numpy(), tables[0].row.to_numpy()):
            raise UsageError(f"--fit-weights: the OOF of {runs[0]} and {r} cover different rows "
                             f"(other folds or another WORK); blend runs of the same WORK")
    return np.stack(probs), label_index(tables[0].label, classes)
