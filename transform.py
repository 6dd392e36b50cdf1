"""Batched torch features and augmentation: they run where the model runs, on whole batches.

Waveforms are float (B, L) in [-1, 1); images are (B, C, n_mels, T). Every random draw is
per sample and comes from torch's global RNG, so `torch.manual_seed` (or Lightning's
`seed_everything`) makes a batch reproducible on any device.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- log-mel
def auto_hop(length: int, frames: int) -> int:
    """The largest hop giving at least `frames` STFT frames (center=True) for `length` samples;
    LogMel drops the 1-3 surplus frames at the end instead of resizing the time axis."""
    return max(1, length // (frames - 1))


class LogMel(nn.Module):
    """Waveform (B, L) -> normalised log-mel image (B, chans, n_mels, T).

    `db(x)` alone equals `librosa.power_to_db(librosa.feature.melspectrogram(y, sr, n_fft,
    hop_length, n_mels))` per sample (zero-padded centred STFT, Slaney mel, top_db per
    sample). The mel matmul is done in blocks of filters over only the FFT bins those
    filters touch: the filterbank is ~99 % zeros at 224 mels.
    """

    def __init__(self, sr: int = 16000, n_fft: int = 2048, hop: int = 0, n_mels: int = 0,
                 size: int = 224, seconds: float = 1.0, resize: bool = False,
                 norm: str = "standard", top_db: float | None = 80.0, chans: int = 1,
                 block: int = 16):
        super().__init__()
        import librosa

        length = round(sr * seconds)
        self.n_mels = n_mels or size
        self.size, self.resize, self.norm, self.top_db, self.chans = size, resize, norm, top_db, chans
        self.n_fft = n_fft
        self.hop = 512 if resize and not hop else hop or auto_hop(length, size)
        # frames kept: SIZE natively when the hop was chosen for it; all of them otherwise
        self.frames = size if not (hop or resize) else 1 + length // self.hop
        fb = torch.from_numpy(librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=self.n_mels))
        self.register_buffer("fb", fb, persistent=False)  # (n_mels, n_fft // 2 + 1)
        self.register_buffer("window", torch.hann_window(n_fft, dtype=torch.float64),
                             persistent=False)
        self.blocks = []  # (first mel, last mel + 1, first bin, last bin + 1)
        for m0 in range(0, self.n_mels, block):
            m1 = min(m0 + block, self.n_mels)
            nz = torch.nonzero(fb[m0:m1].sum(0)).flatten()
            lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 1)
            self.blocks.append((m0, m1, lo, hi))

    def settings(self) -> dict:
        """What a checkpoint must agree on to be blended with another."""
        return dict(n_fft=self.n_fft, hop=self.hop, n_mels=self.n_mels, frames=self.frames,
                    size=self.size, resize=self.resize, norm=self.norm, top_db=self.top_db)

    def power(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, self.n_fft, self.hop, window=self.window.to(x.dtype), center=True,
                          pad_mode="constant", return_complex=True)
        return spec.real.square() + spec.imag.square()  # (B, F, T)

    def mel(self, power: torch.Tensor) -> torch.Tensor:
        fb = self.fb.to(power.dtype)
        out = power.new_empty(power.shape[0], self.n_mels, power.shape[-1])
        for m0, m1, lo, hi in self.blocks:
            torch.matmul(fb[m0:m1, lo:hi], power[:, lo:hi], out=out[:, m0:m1])
        return out

    def db(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, n_mels, T) log-mel in dB (ref 1.0, amin 1e-10, per-sample top_db)."""
        s = 10.0 * torch.log10(self.mel(self.power(x)).clamp_min(1e-10))
        if self.top_db is not None:
            s = torch.maximum(s, s.amax(dim=(-2, -1), keepdim=True) - self.top_db)
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.db(x)[..., :self.frames].unsqueeze(1)
        if self.resize:  # the seed: min-max, then stretch the few frames to size x size
            s = normalise(s, "minmax")
            s = F.interpolate(s, size=(self.size, self.size), mode="bicubic", align_corners=False)
        else:
            s = normalise(s, self.norm)
        return s.expand(-1, self.chans, -1, -1) if self.chans > 1 else s


def normalise(s: torch.Tensor, how: str) -> torch.Tensor:
    dims = tuple(range(1, s.dim()))
    if how == "standard":
        return (s - s.mean(dims, keepdim=True)) / (s.std(dims, keepdim=True) + 1e-5)
    if how == "minmax":
        lo, hi = s.amin(dims, keepdim=True), s.amax(dims, keepdim=True)
        return (s - lo) / (hi - lo + 1e-6)
    return s


# ----------------------------------------------------------------------------- waveform ops
def _per_sample(x: torch.Tensor, v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=x.dtype, device=x.device).expand(x.shape[0])


def time_shift(x: torch.Tensor, frac) -> torch.Tensor:
    """Move each clip later by frac * L samples (earlier if negative); vacated samples are 0."""
    L = x.shape[-1]
    n = torch.round(_per_sample(x, frac) * L).long()
    idx = torch.arange(L, device=x.device).expand(x.shape[0], L) - n[:, None]
    valid = (idx >= 0) & (idx < L)
    return torch.gather(x, 1, idx.clamp(0, L - 1)) * valid


def gain(x: torch.Tensor, db) -> torch.Tensor:
    return x * 10.0 ** (_per_sample(x, db)[:, None] / 20.0)


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean(-1, keepdim=True).sqrt()


def add_at_snr(x: torch.Tensor, noise: torch.Tensor, snr_db) -> torch.Tensor:
    """x + noise scaled so that 20 log10(rms(x) / rms(noise)) = snr_db per sample
    (snr_db = +inf adds nothing; a silent clip gets no noise)."""
    scale = rms(x) / (rms(noise) + 1e-8) / 10.0 ** (_per_sample(x, snr_db)[:, None] / 20.0)
    return x + noise * scale


def random_segments(bank: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """n random windows of `length` samples from a 1-D noise bank (tiled if shorter)."""
    if bank.numel() < length + 1:
        bank = bank.repeat(length // max(1, bank.numel()) + 2)
    start = torch.randint(0, bank.numel() - length, (n,), device=bank.device)
    return bank[start[:, None] + torch.arange(length, device=bank.device)]


def _uniform(n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def _coin(n: int, p: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


class WaveAugment(nn.Module):
    """Per-sample random time shift, gain, Gaussian noise and background noise, batched.
    Does nothing in eval mode. `noise` is the 1-D background bank from WORK/noise.npy."""

    def __init__(self, shift=0.1, p_shift=0.5, gain_db=5.0, p_gain=0.5, noise_snr=(10, 40),
                 p_noise=0.3, bg_snr=(0, 20), p_bg=0.4, noise: torch.Tensor | None = None):
        super().__init__()
        self.shift, self.p_shift, self.gain_db, self.p_gain = shift, p_shift, gain_db, p_gain
        self.noise_snr, self.p_noise, self.bg_snr, self.p_bg = noise_snr, p_noise, bg_snr, p_bg
        self.register_buffer("noise", torch.zeros(0) if noise is None else noise.float(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        B, L, dev = x.shape[0], x.shape[-1], x.device
        if self.p_shift > 0:
            x = time_shift(x, _uniform(B, -self.shift, self.shift, dev) * _coin(B, self.p_shift, dev))
        if self.p_gain > 0:
            x = gain(x, _uniform(B, -self.gain_db, self.gain_db, dev) * _coin(B, self.p_gain, dev))
        if self.p_bg > 0 and self.noise.numel():
            snr = _uniform(B, *self.bg_snr, dev).masked_fill(~_coin(B, self.p_bg, dev), math.inf)
            x = add_at_snr(x, random_segments(self.noise.to(x.dtype), B, L), snr)
        if self.p_noise > 0:
            snr = _uniform(B, *self.noise_snr, dev).masked_fill(~_coin(B, self.p_noise, dev), math.inf)
            x = add_at_snr(x, torch.randn_like(x), snr)
        return x


class SpecAugment(nn.Module):
    """`masks` frequency and `masks` time masks per sample, each up to `width` of its axis,
    set to 0 (the mean of a standardised image). Does nothing in eval mode."""

    def __init__(self, masks: int = 2, width: float = 0.1, p: float = 0.5):
        super().__init__()
        self.masks, self.width, self.p = masks, width, p

    @staticmethod
    def band_mask(B: int, n: int, max_w: int, apply: torch.Tensor) -> torch.Tensor:
        w = torch.randint(0, max_w + 1, (B,), device=apply.device)
        start = (torch.rand(B, device=apply.device) * (n - w + 1)).long()
        pos = torch.arange(n, device=apply.device)
        return (pos >= start[:, None]) & (pos < (start + w)[:, None]) & apply[:, None]

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0 or self.masks <= 0:
            return s
        B, _, nf, nt = s.shape
        apply = _coin(B, self.p, s.device)
        fmask = torch.zeros(B, nf, dtype=torch.bool, device=s.device)
        tmask = torch.zeros(B, nt, dtype=torch.bool, device=s.device)
        for _ in range(self.masks):
            fmask |= self.band_mask(B, nf, int(self.width * nf), apply)
            tmask |= self.band_mask(B, nt, int(self.width * nt), apply)
        return s.masked_fill(fmask[:, None, :, None] | tmask[:, None, None, :], 0.0)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner: lam ~ Beta(alpha, alpha) per sample, applied to
    the inputs and the (soft) targets alike."""
    B = x.shape[0]
    lam = torch.distributions.Beta(alpha, alpha).sample((B,)).to(x.device, x.dtype)
    lam = torch.maximum(lam, 1 - lam)  # the sample keeps the larger share of itself
    perm = torch.randperm(B, device=x.device)
    lx = lam.view(B, *([1] * (x.dim() - 1)))
    return lx * x + (1 - lx) * x[perm], lam[:, None] * y + (1 - lam[:, None]) * y[perm]


# ----------------------------------------------------------------------------- TTA
TTA_VIEWS = {  # deterministic views of a waveform batch, applied before the log-mel
    "identity": lambda x: x,
    "shift-10%": lambda x: time_shift(x, -0.1),
    "shift+10%": lambda x: time_shift(x, 0.1),
    "gain+5dB": lambda x: gain(x, 5.0),
    "gain-5dB": lambda x: gain(x, -5.0),
}


def tta_views(tta: bool) -> dict:
    """The identity alone, or the identity plus the four views of the original recipe."""
    return TTA_VIEWS if tta else {"identity": TTA_VIEWS["identity"]}


# ----------------------------------------------------------------------------- all of it
class Frontend(nn.Module):
    """int16 or float waveforms -> augmented (in train mode) normalised log-mel images.
    Runs in float32 with autocast off: the STFT and dB conversion need the precision."""

    def __init__(self, cfg, chans: int = 1, noise: torch.Tensor | None = None):
        super().__init__()
        self.wave_aug = WaveAugment(cfg.shift, cfg.p_shift, cfg.gain_db, cfg.p_gain, cfg.noise_snr,
                                    cfg.p_noise, cfg.bg_snr, cfg.p_bg, noise)
        self.logmel = LogMel(cfg.sr, cfg.n_fft, cfg.hop, cfg.n_mels, cfg.size, cfg.seconds,
                             cfg.resize, cfg.norm, cfg.top_db, chans)
        self.spec_aug = SpecAugment(cfg.spec_masks, cfg.spec_width, cfg.p_spec)

    def forward(self, wave: torch.Tensor, view=None) -> torch.Tensor:
        dev = wave.device.type
        no_amp = torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) \
            else contextlib.nullcontext()
        with no_amp:
            x = wave.float() / 32768.0 if not wave.is_floating_point() else wave.float()
            x = self.wave_aug(x)
            if view is not None:
                x = view(x)
            return self.spec_aug(self.logmel(x))
