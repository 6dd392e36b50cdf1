"""The front end, batched, where the model runs: the log-mel (librosa-exact), the test-time
views, and `Frontend`, which puts the augmentations (augment.py) around the log-mel in order.

Waveforms are float (B, L) in [-1, 1); images are (B, C, n_mels, T). Each module takes its
settings from a `Config` (arg.py), the one place their defaults live.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from augment import (FilterAugment, FreqMixStyle, MelJitter, SpecAugment, SpecWarp, WaveAugment,
                     gain, time_shift, vtlp_warp)


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

    def __init__(self, cfg, chans: int = 1, block: int = 16):
        super().__init__()
        import librosa

        length, size, hop = cfg.clip_samples, cfg.size, cfg.hop_length
        self.n_mels = cfg.n_mels or size
        self.size, self.resize, self.norm, self.chans = size, cfg.resize, cfg.norm, chans
        self.top_db, self.n_fft = cfg.top_db, cfg.n_fft
        self.amin, self.ref_db = 1e-10, 0.0  # power floor and reference of the dB scale
        self.hop = 512 if cfg.resize and not hop else hop or auto_hop(length, size)
        # frames kept: SIZE natively when the hop was chosen for it; all of them otherwise
        self.frames = size if not (hop or cfg.resize) else 1 + length // self.hop
        fb = torch.from_numpy(librosa.filters.mel(sr=cfg.sr, n_fft=cfg.n_fft, n_mels=self.n_mels))
        self.register_buffer("fb", fb, persistent=False)  # (n_mels, n_fft // 2 + 1)
        self.register_buffer("window", torch.hann_window(cfg.n_fft, dtype=torch.float64),
                             persistent=False)
        self.blocks = filter_blocks(fb, block)

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

    def shifted(self, power: torch.Tensor, ratio: torch.Tensor, reach: float,
                alpha: torch.Tensor | None = None) -> torch.Tensor:
        """The mel power of `power` (B, F, T) with its frequency axis moved per sample: content
        at bin g goes to w(g) = g * ratio (pitch shift), then, with `alpha` (B,), through the
        vocal-tract-length warp vtlp_warp. Filter m of sample b is fb[m] read at w(g)
        (linearly interpolated, 0 past the top bin) and scaled by w'(g), since
        sum_f fb[m, f] P(w^-1(f)) = sum_g w'(g) fb[m, w(g)] P(g). Block-sparse like `mel`: a
        block's bins are widened to what any w(g) / g within [1 / reach, reach] can reach."""
        B, nf, nt = power.shape
        fbp = F.pad(self.fb.to(power.dtype), (1, 1))  # a zero each side of the bin axis
        ratio = ratio.to(power.dtype)[:, None]
        out = power.new_empty(B, self.n_mels, nt)
        for m0, m1, lo, hi in self.blocks:
            a, b = max(0, int((lo - 1) / reach)), min(nf, math.ceil(hi * reach) + 1)
            pos = torch.arange(a, b, device=power.device, dtype=power.dtype) * ratio
            slope = ratio.expand_as(pos)
            if alpha is not None:
                pos, warp_slope = vtlp_warp(pos, alpha.to(power.dtype), nf - 1)
                slope = slope * warp_slope
            i = pos.floor().long() + 1  # into the padded axis
            frac = (pos - pos.floor())[None]
            left, right = fbp[m0:m1, i.clamp(0, nf + 1)], fbp[m0:m1, (i + 1).clamp(0, nf + 1)]
            fb = torch.lerp(left, right, frac).permute(1, 0, 2) * slope[:, None, :]
            torch.matmul(fb, power[:, a:b], out=out[:, m0:m1])
        return out

    def db(self, x: torch.Tensor, warp=None) -> torch.Tensor:
        """(B, L) -> (B, n_mels, T) log-mel in dB (ref_db 0, amin 1e-10, top_db per sample);
        `warp` (a SpecWarp) makes the mel power from the power spectrogram in its place."""
        power = self.power(x)
        mel = self.mel(power) if warp is None else warp(power, self)
        s = 10.0 * torch.log10(mel.clamp_min(self.amin)) - self.ref_db
        if self.top_db is not None:
            s = torch.maximum(s, s.amax(dim=(-2, -1), keepdim=True) - self.top_db)
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image(self.db(x))

    def image(self, s: torch.Tensor) -> torch.Tensor:
        """dB log-mel (B, n_mels, T) -> the model's input image (B, chans, n_mels, frames)."""
        s = s[..., :self.frames].unsqueeze(1)
        if self.resize:  # the seed: min-max, then stretch the few frames to size x size
            s = normalise(s, "minmax")
            s = F.interpolate(s, size=(self.size, self.size), mode="bicubic", align_corners=False)
        else:
            s = normalise(s, self.norm)
        return s.expand(-1, self.chans, -1, -1) if self.chans > 1 else s


def filter_blocks(fb: torch.Tensor, block: int) -> list[tuple[int, int, int, int]]:
    """The filterbank (M, F) in blocks of `block` filters, each with the range of FFT bins its
    filters touch: (first mel, last mel + 1, first bin, last bin + 1)."""
    blocks = []
    for m0 in range(0, fb.shape[0], block):
        m1 = min(m0 + block, fb.shape[0])
        nz = torch.nonzero(fb[m0:m1].sum(0)).flatten()
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 1)
        blocks.append((m0, m1, lo, hi))
    return blocks


def normalise(s: torch.Tensor, how: str) -> torch.Tensor:
    dims = tuple(range(1, s.dim()))
    if how == "standard":
        return (s - s.mean(dims, keepdim=True)) / (s.std(dims, keepdim=True) + 1e-5)
    if how == "minmax":
        lo, hi = s.amin(dims, keepdim=True), s.amax(dims, keepdim=True)
        return (s - lo) / (hi - lo + 1e-6)
    return s


# ----------------------------------------------------------------------------- TTA
TTA_VIEWS = {  # deterministic views of a waveform batch, applied before the log-mel
    "identity": lambda x: x,
    "shift-10%": lambda x: time_shift(x, -0.1),
    "shift+10%": lambda x: time_shift(x, 0.1),
    "gain+5dB": lambda x: gain(x, 5.0),
    "gain-5dB": lambda x: gain(x, -5.0),
}


N_VIEWS = len(TTA_VIEWS)  # what -a y averages: the clip and its four views


def tta_views(tta: bool) -> dict:
    """The identity alone, or the identity plus the four views of the original recipe."""
    return TTA_VIEWS if tta else {"identity": TTA_VIEWS["identity"]}


# ----------------------------------------------------------------------------- all of it
class Frontend(nn.Module):
    """int16 or float waveforms -> augmented (in train mode) normalised log-mel images:
    waveform (shift, reverb, gain, noise) -> power spectrogram (pitch shift, time stretch)
    -> dB log-mel (FilterAugment, mel range jitter) -> image (Freq-MixStyle, SpecAugment).
    Runs in float32 with autocast off: the STFT and dB conversion need the precision."""

    def __init__(self, cfg, chans: int = 1, noise: torch.Tensor | None = None,
                 logmel: LogMel | None = None):
        super().__init__()
        self.wave_aug = WaveAugment(cfg, noise)
        self.logmel = logmel if logmel is not None else LogMel(cfg, chans)  # or speech.SpeechMel
        self.warp = SpecWarp(cfg)
        self.filter_aug = FilterAugment(cfg)
        self.mel_jitter = MelJitter(cfg)
        self.mixstyle = FreqMixStyle(cfg)
        self.spec_aug = SpecAugment(cfg)

    @staticmethod
    def _no_amp(device: torch.device):
        dev = device.type
        return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) \
            else contextlib.nullcontext()

    def waveform(self, wave: torch.Tensor) -> torch.Tensor:
        """int16 or float (B, L) -> float in [-1, 1), augmented in train mode."""
        with self._no_amp(wave.device):
            x = wave.float() / 32768.0 if not wave.is_floating_point() else wave.float()
            return self.wave_aug(x)

    def features(self, x: torch.Tensor, on_db=None, on_image=None) -> torch.Tensor:
        """Float waveforms (B, L) -> images, with the spectrogram augmentations in train mode;
        `on_db` acts on the augmented dB log-mel (B, M, T), `on_image` on the image before
        Freq-MixStyle and SpecAugment (BYOL-A's log-mixup and random resize crop)."""
        with self._no_amp(x.device):
            s = self.logmel.db(x, self.warp if self.training else None)
            s = self.mel_jitter(self.filter_aug(s))
            img = self.logmel.image(on_db(s) if on_db is not None else s)
            img = on_image(img) if on_image is not None else img
            return self.spec_aug(self.mixstyle(img))

    def forward(self, wave: torch.Tensor, view=None) -> torch.Tensor:
        x = self.waveform(wave)
        return self.features(view(x) if view is not None else x)
