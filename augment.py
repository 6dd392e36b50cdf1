"""Every augmentation, as batched torch modules and functions that run where the model runs.

Waveforms are float (B, L) in [-1, 1); spectrograms (B, F, T) power, (B, M, T) dB log-mel;
images (B, C, M, T). Every random draw is per sample and comes from torch's global RNG, so
`torch.manual_seed` (or Lightning's `seed_everything`) makes a batch reproducible on any
device; each module does nothing in eval mode and takes its settings from a `Config` (arg.py),
the one place their defaults live: `SpecAugment(Config(p_spec=1))`. transform.Frontend puts
them in order around the log-mel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- waveform
def vtlp_warp(f: torch.Tensor, alpha: torch.Tensor, top: float,
              corner: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocal-tract-length perturbation's frequency warp (Jaitly & Hinton, 2013) of the
    frequencies `f` (B, n) by `alpha` (B,): alpha * f up to the corner f0 = corner * top *
    min(alpha, 1) / alpha, then the straight line from there to `top` (top stays top, nothing
    folds over). Returns (warped f, dw/df)."""
    a = alpha[:, None]
    f0 = corner * top * a.clamp(max=1.0) / a
    upper = (top - a * f0) / (top - f0)
    below = f <= f0
    return torch.where(below, a * f, a * f0 + upper * (f - f0)), torch.where(below, a, upper)


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


def room_impulses(rt60: torch.Tensor, sr: int, length: int) -> torch.Tensor:
    """(B, length) synthetic room impulse responses: the direct path, then Gaussian noise
    decaying 60 dB in `rt60` seconds (per sample), at a direct-to-reverberant ratio drawn
    from -3..10 dB."""
    B, dev = rt60.shape[0], rt60.device
    t = torch.arange(length, device=dev) / sr
    tail = torch.randn(B, length, device=dev) * torch.exp(-6.9 * t / rt60[:, None])
    tail[:, : max(1, int(0.002 * sr))] = 0  # reflections start a little after the direct path
    drr = 10.0 ** (_uniform(B, -3.0, 10.0, dev) / 20.0)
    h = tail / (tail.square().sum(-1, keepdim=True).sqrt() * drr[:, None])
    h[:, 0] = 1.0
    return h


def reverberate(x: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """x (B, L) convolved with rir (B, R) by FFT, cut to L samples (the tail inside the clip
    is kept), at x's RMS."""
    L = x.shape[-1]
    n = 1 << (L + rir.shape[-1] - 1).bit_length()
    y = torch.fft.irfft(torch.fft.rfft(x, n) * torch.fft.rfft(rir, n), n)[..., :L]
    return y * rms(x) / (rms(y) + 1e-8)


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


def _chosen(n: int, p: float, device) -> torch.Tensor:
    """Indices of the samples an augmentation of probability p acts on, so that the costly
    ones run on those alone: each sample is chosen with probability p, the count p * n
    rounded up or down at random (drawn on the host: no wait on the device)."""
    k = min(n, int(p * n + float(torch.rand(()))))
    return torch.rand(n, device=device).argsort()[:k]


class WaveAugment(nn.Module):
    """Per-sample random time shift, reverberation, gain, background noise and Gaussian
    noise, batched. Does nothing in eval mode. `noise` is the 1-D background bank from
    WORK/noise.npy."""

    def __init__(self, cfg, noise: torch.Tensor | None = None):
        super().__init__()
        self.shift, self.p_shift = cfg.shift, cfg.p_shift
        self.gain_db, self.p_gain = cfg.gain_db, cfg.p_gain
        self.noise_snr, self.p_noise = cfg.noise_snr, cfg.p_noise
        self.bg_snr, self.p_bg = cfg.bg_snr, cfg.p_bg
        self.reverb_rt60, self.p_reverb, self.sr = cfg.reverb_rt60, cfg.p_reverb, cfg.sr
        self.register_buffer("noise", torch.zeros(0) if noise is None else noise.float(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        B, L, dev = x.shape[0], x.shape[-1], x.device
        if self.p_shift > 0:
            x = time_shift(x, _uniform(B, -self.shift, self.shift, dev) * _coin(B, self.p_shift, dev))
        if self.p_reverb > 0:
            x = self.reverb(x)
        if self.p_gain > 0:
            x = gain(x, _uniform(B, -self.gain_db, self.gain_db, dev) * _coin(B, self.p_gain, dev))
        if self.p_bg > 0 and self.noise.numel():
            snr = _uniform(B, *self.bg_snr, dev).masked_fill(~_coin(B, self.p_bg, dev), math.inf)
            x = add_at_snr(x, random_segments(self.noise.to(x.dtype), B, L), snr)
        if self.p_noise > 0:
            snr = _uniform(B, *self.noise_snr, dev).masked_fill(~_coin(B, self.p_noise, dev), math.inf)
            x = add_at_snr(x, torch.randn_like(x), snr)
        return x

    def reverb(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen samples convolved with rooms of random reverberation time (the others
        cost nothing)."""
        lo, hi = self.reverb_rt60
        on = _chosen(x.shape[0], self.p_reverb, x.device)
        rir = room_impulses(_uniform(len(on), lo, hi, x.device), self.sr,
                            int(self.sr * hi * 1.1) + 1)
        return x.index_copy(0, on, reverberate(x[on], rir))


# ----------------------------------------------------------------------------- spectrogram
def resample_axis(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    """x read at fractional positions `pos` (B, n) along `dim` by linear interpolation, per
    sample; positions outside the axis read 0."""
    B, size = x.shape[0], x.shape[dim]
    shape = [B] + [1] * (x.dim() - 1)
    shape[dim] = pos.shape[1]
    full = list(x.shape)
    full[dim] = pos.shape[1]
    xp = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [1, 1])  # a zero at each end of the axis
    lo = pos.floor()
    w = (pos - lo).to(x.dtype).view(shape).expand(full)
    i = lo.long() + 1  # index into the padded axis

    def take(k):
        return xp.gather(dim, k.clamp(0, size + 1).view(shape).expand(full))

    return torch.lerp(take(i), take(i + 1), w)


class SpecWarp(nn.Module):
    """Pitch shift, time stretch, speed perturbation and vocal-tract-length perturbation
    (VTLP), per sample, batched, done where they cost least: `forward(power, logmel)` turns the
    power spectrogram (B, F, T) into the mel power (B, M, T) that the warped clip would give.

    Pitch shift by s semitones (ratio r = 2**(s/12)) is the power spectrogram read at bin
    f / r (the harmonics and formants move, as with librosa's pitch_shift). Instead of
    resampling the F = n_fft/2 + 1 rows of every clip, each chosen clip gets its own
    filterbank, the mel filters read at f * r and scaled by r (`LogMel.shifted`):
    sum_f fb[m, f] P(f / r) = sum_g r fb[m, g r] P(g). Same image, block-sparse matmuls.
    Time stretch by factor s reads frame t from c + (t - c) / s about the clip centre c, so
    a sound lasting d lasts s * d (a phase vocoder's magnitude); it commutes with the mel
    filterbank, so it is done on the M mel rows rather than the F bins.
    Speed perturbation by s (the clip played s times faster, as resampling does: Kaldi's
    0.9 / 1.0 / 1.1) is both: the frequencies times s and the duration over s. VTLP warps the
    frequency axis by alpha up to a corner and linearly above it (vtlp_warp), through the
    same per-clip filterbank.
    Does nothing in eval mode unless `semitones` or `factor` are given. Only the chosen
    clips pay for the shift (`_chosen`)."""

    def __init__(self, cfg):
        super().__init__()
        self.pitch, self.p_pitch = cfg.pitch, cfg.p_pitch
        self.stretch, self.p_stretch = cfg.stretch, cfg.p_stretch
        self.speed, self.p_speed = cfg.speed, cfg.p_speed
        self.vtlp, self.p_vtlp = cfg.vtlp, cfg.p_vtlp

    def forward(self, power: torch.Tensor, logmel, semitones=None, factor=None,
                alpha=None) -> torch.Tensor:
        """Power (B, F, T) -> mel power (B, M, T); `semitones`, `factor` and `alpha` (per
        sample) fix the pitch shift, time stretch and VTLP warp of every sample, otherwise they
        are drawn in train mode (`draw`)."""
        B, nf, nt = power.shape
        dev = power.device
        on = ratio = None
        if semitones is not None or factor is not None or alpha is not None:
            if semitones is not None or alpha is not None:
                on = torch.arange(B, device=dev)
                ratio = 2.0 ** (_per_sample(power, 0.0 if semitones is None else semitones) / 12)
                alpha = None if alpha is None else _per_sample(power, alpha)
                reach = float(torch.maximum(ratio, 1 / ratio).max()) * (
                    1.0 if alpha is None else float(torch.maximum(alpha, 1 / alpha).max()))
            factor = None if factor is None else _per_sample(power, factor)
        elif self.training:
            on, ratio, alpha, reach, factor = self.draw(B, dev)
        mel = logmel.mel(power)
        if on is not None:
            moved = logmel.shifted(power[on], ratio, reach, alpha)
            mel = mel.index_copy(0, on, moved)
        if factor is not None:
            c = (nt - 1) / 2
            t = torch.arange(nt, device=dev)
            mel = resample_axis(mel, c + (t - c) / factor[:, None].to(mel.dtype), 2)
        return mel

    def draw(self, B: int, dev) -> tuple:
        """Train mode's random warps: (the samples whose frequencies move, their ratio and
        VTLP alpha, the largest w(g) / g any can reach, every sample's duration factor); None
        for what no probability asks, and an axis whose probability is 0 is not touched. Pitch
        shift alone moves only the chosen samples (`_chosen`: no wait on the device); speed
        perturbation and VTLP give every sample its filterbank."""
        on = ratio = alpha = factor = None
        reach = 1.0
        if self.p_pitch > 0:
            on = _chosen(B, self.p_pitch, dev)
            ratio = 2.0 ** (_uniform(len(on), -self.pitch, self.pitch, dev) / 12.0)
            reach = 2.0 ** (self.pitch / 12.0)
        if self.p_stretch > 0:
            factor = 1 + _uniform(B, -self.stretch, self.stretch, dev) * _coin(B, self.p_stretch,
                                                                              dev)
        if self.p_speed > 0 or self.p_vtlp > 0:
            every = torch.ones(B, device=dev)
            on, ratio = torch.arange(B, device=dev), every if on is None else every.index_copy(
                0, on, ratio)
        if self.p_speed > 0:  # s times faster: frequencies x s, durations / s
            s = 1 + _uniform(B, -self.speed, self.speed, dev) * _coin(B, self.p_speed, dev)
            ratio, factor = ratio * s, (1 / s) if factor is None else factor / s
            reach /= 1 - self.speed
        if self.p_vtlp > 0:
            alpha = 1 + _uniform(B, -self.vtlp, self.vtlp, dev) * _coin(B, self.p_vtlp, dev)
            reach /= 1 - self.vtlp
        return on, ratio, alpha, reach, factor


class FilterAugment(nn.Module):
    """Random gains over frequency bands of the dB log-mel (B, M, T) (Nam et al., 2022, the
    linear type): `bands` bands with random edges, a gain in [-db, db] at each edge, linear in
    between. Does nothing in eval mode."""

    def __init__(self, cfg):
        super().__init__()
        self.db, self.bands, self.p = cfg.filter_db, max(1, cfg.filter_bands), cfg.p_filter

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return s
        B, M, _ = s.shape
        dev = s.device
        inner = torch.rand(B, self.bands - 1, device=dev).sort(1).values * (M - 1)
        edges = torch.cat([inner.new_zeros(B, 1), inner, inner.new_full((B, 1), M - 1)], 1)
        gains = _uniform(B * (self.bands + 1), -self.db, self.db, dev).view(B, -1)
        gains = gains * _coin(B, self.p, dev)[:, None]
        m = torch.arange(M, device=dev, dtype=s.dtype).expand(B, M).contiguous()
        j = torch.searchsorted(edges, m, right=True).clamp(1, self.bands)
        e0, e1 = edges.gather(1, j - 1), edges.gather(1, j)
        g0, g1 = gains.gather(1, j - 1), gains.gather(1, j)
        w = ((m - e0) / (e1 - e0).clamp_min(1e-6)).clamp(0, 1)
        return s + (g0 + (g1 - g0) * w)[:, :, None]


class MelJitter(nn.Module):
    """Mel range (fmin / fmax) jitter on the dB log-mel (B, M, T): mel bands are evenly spaced
    in mel, so a filterbank over a narrower [fmin', fmax'] is, band for band, an affine map of
    the mel axis; each chosen sample reads its M bands from [lo, hi] with lo up to `jitter` of
    the axis above the bottom and hi as far below the top. Does nothing in eval mode."""

    def __init__(self, cfg):
        super().__init__()
        self.jitter, self.p = cfg.mel_jitter, cfg.p_mel_jitter

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return s
        B, M, _ = s.shape
        dev = s.device
        on = _coin(B, self.p, dev)
        lo = _uniform(B, 0, self.jitter * (M - 1), dev) * on
        hi = (M - 1) - _uniform(B, 0, self.jitter * (M - 1), dev) * on
        pos = lo[:, None] + torch.arange(M, device=dev) / (M - 1) * (hi - lo)[:, None]
        return torch.where(on[:, None, None], resample_axis(s, pos, 1), s)


class FreqMixStyle(nn.Module):
    """Freq-MixStyle (Schmid et al., 2023): each chosen sample's per-frequency mean and
    standard deviation (over channels and time) are mixed with a random partner's,
    lam ~ Beta(alpha, alpha). Does nothing in eval mode."""

    def __init__(self, cfg):
        super().__init__()
        self.alpha, self.p = cfg.mixstyle, cfg.p_mixstyle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return x
        B = x.shape[0]
        on = _coin(B, self.p, x.device)
        mu = x.mean(dim=(1, 3), keepdim=True)
        sig = (x.var(dim=(1, 3), keepdim=True) + 1e-6).sqrt()
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((B,)).to(x.device, x.dtype)
        lam = lam.view(B, 1, 1, 1)
        order = torch.randperm(B, device=x.device)  # partners along a random cycle: never itself
        perm = torch.empty_like(order)
        perm[order] = order.roll(1)
        mixed = (x - mu) / sig * (lam * sig + (1 - lam) * sig[perm]) + lam * mu + (1 - lam) * mu[perm]
        return torch.where(on.view(B, 1, 1, 1), mixed, x)


class SpecAugment(nn.Module):
    """`masks` frequency and `masks` time masks per sample, each up to `width` of its axis,
    set to 0 (the mean of a standardised image). Does nothing in eval mode."""

    def __init__(self, cfg):
        super().__init__()
        self.masks, self.width, self.p = cfg.spec_masks, cfg.spec_width, cfg.p_spec

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


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float,
          union: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner: lam ~ Beta(alpha, alpha) per sample, applied to
    the inputs and the (soft) targets alike; with `union` (multilabel) the target is the
    union of both label sets (the larger of the two targets): both sounds are there."""
    B = x.shape[0]
    lam = torch.distributions.Beta(alpha, alpha).sample((B,)).to(x.device, x.dtype)
    lam = torch.maximum(lam, 1 - lam)  # the sample keeps the larger share of itself
    perm = torch.randperm(B, device=x.device)
    lx = lam.view(B, *([1] * (x.dim() - 1)))
    if union:
        return lx * x + (1 - lx) * x[perm], torch.maximum(y, y[perm])
    return lx * x + (1 - lx) * x[perm], lam[:, None] * y + (1 - lam[:, None]) * y[perm]
