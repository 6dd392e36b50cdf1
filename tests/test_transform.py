import librosa
import numpy as np
import pytest
import torch

from arg import Config
from augment import (FilterAugment, FreqMixStyle, MelJitter, SpecAugment, SpecWarp, WaveAugment,
                     add_at_snr, gain, mixup, rms, time_shift)
from transform import Frontend, LogMel, tta_views


def speech_like(n=4, seed=0):
    """Chirps with silence around them, at different levels: enough structure for parity."""
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    x = np.zeros((n, 16000))
    for i in range(n):
        on = slice(3000 + 500 * i, 11000 + 300 * i)
        x[i, on] = 0.3 * (i + 1) / n * np.sin(2 * np.pi * (200 + 2000 * t[on]) * t[on])
        x[i] += 1e-3 * rng.standard_normal(16000)
    return x


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-3), (torch.float32, 2e-3)])
@pytest.mark.parametrize("n_mels", [64, 224])
def test_logmel_matches_librosa(dtype, tol, n_mels):
    x = speech_like()
    m = LogMel(Config(n_fft=2048, hop_length=512, n_mels=n_mels, norm="none"))
    ours = m.db(torch.from_numpy(x).to(dtype)).double().numpy()
    ref = np.stack([librosa.power_to_db(librosa.feature.melspectrogram(
        y=y.astype(np.float64 if dtype == torch.float64 else np.float32), sr=16000,
        n_mels=n_mels)) for y in x])
    assert ours.shape == ref.shape == (4, n_mels, 32)
    assert np.abs(ours - ref).max() < tol


@pytest.mark.parametrize("size", [64, 128, 224])
def test_native_shapes(size):
    m = LogMel(Config(size=size))
    out = m(torch.randn(3, 16000))
    assert out.shape == (3, 1, size, size)
    # per-sample standardisation
    assert torch.allclose(out.mean((1, 2, 3)), torch.zeros(3), atol=1e-4)
    assert LogMel(Config(size=size), chans=3)(torch.randn(2, 16000)).shape == (2, 3, size, size)


def test_seed_resize_mode():
    m = LogMel(Config(size=64, resize=True))
    assert m.hop == 512 and m.frames == 32
    out = m(torch.from_numpy(speech_like()).float())
    assert out.shape == (4, 1, 64, 64)
    assert out.amin() > -0.2 and out.amax() < 1.2  # min-max then bicubic (slight overshoot)


def test_gain_scales_energy_by_db():
    x = torch.randn(4, 16000)
    y = gain(x, torch.tensor([6.0, -6.0, 0.0, 20.0]))
    ratio_db = 20 * torch.log10(rms(y) / rms(x)).squeeze()
    assert torch.allclose(ratio_db, torch.tensor([6.0, -6.0, 0.0, 20.0]), atol=1e-4)


def test_shift_moves_onset_and_zero_fills():
    x = torch.zeros(2, 1000)
    x[:, 300:400] = 1.0
    y = time_shift(x, torch.tensor([0.1, -0.25]))
    assert torch.nonzero(y[0]).min() == 400 and torch.nonzero(y[1]).min() == 50
    assert y.sum() == x.sum()  # nothing but a move
    z = time_shift(torch.ones(1, 1000), 0.1)
    assert z[0, :100].abs().sum() == 0 and z[0, 100:].eq(1).all()


def test_noise_hits_requested_snr():
    torch.manual_seed(0)
    x = torch.from_numpy(speech_like(4)).float()
    snr = torch.tensor([0.0, 10.0, 20.0, 30.0])
    noise = torch.randn_like(x)
    y = add_at_snr(x, noise, snr)
    got = 20 * torch.log10(rms(x) / rms(y - x)).squeeze()
    assert (got - snr).abs().max() < 0.5
    assert torch.equal(add_at_snr(x, noise, float("inf")), x)


def test_background_noise_from_bank_hits_snr():
    torch.manual_seed(1)
    bank = torch.randn(50000) * 0.05
    aug = WaveAugment(Config.preset("none", p_bg=1.0, bg_snr=(12.0, 12.0)), noise=bank)
    x = torch.from_numpy(speech_like(4)).float()
    y = aug.train()(x)
    got = 20 * torch.log10(rms(x) / rms(y - x)).squeeze()
    assert (got - 12.0).abs().max() < 0.5
    assert torch.equal(aug.eval()(x), x)  # eval mode: untouched


def test_specaugment_zeroes_bands_only():
    torch.manual_seed(0)
    s = torch.randn(8, 1, 64, 64) + 5.0  # nothing is 0 before masking
    out = SpecAugment(Config(spec_masks=2, spec_width=0.2, p_spec=1.0)).train()(s)
    zero = out == 0
    assert zero.any()
    assert torch.equal(out[~zero], s[~zero])  # the rest is untouched
    for b in range(8):
        z = zero[b, 0]
        full_rows, full_cols = z.all(1), z.all(0)
        # every zero lies in a fully masked frequency row or time column
        assert torch.equal(z, full_rows[:, None] | full_cols[None, :])
        assert full_rows.sum() <= 2 * int(0.2 * 64) and full_cols.sum() <= 2 * int(0.2 * 64)
    assert torch.equal(SpecAugment(Config(p_spec=1.0)).eval()(s), s)


def test_same_seed_same_batch():
    cfg = Config.preset("all", size=64, p_shift=1, p_gain=1, p_noise=1, p_bg=1, p_spec=1)
    front = Frontend(cfg, noise=torch.randn(40000) * 0.1).train()
    x = (torch.from_numpy(speech_like(4)) * 32767).short()
    torch.manual_seed(7)
    a = front(x)
    torch.manual_seed(7)
    b = front(x)
    torch.manual_seed(8)
    c = front(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mixup_soft_targets():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2).clone()
    y = torch.nn.functional.one_hot(torch.arange(8), 8).float()
    xm, ym = mixup(x, y, 0.4)
    assert torch.allclose(ym.sum(1), torch.ones(8))
    assert (ym.max(1).values >= 0.5).all()  # each sample keeps the larger share of itself
    # the input mix uses the same weights as the targets
    assert torch.allclose(xm[:, 0, 0, 0], ym @ torch.arange(8.0), atol=1e-5)


def test_tta_views_are_deterministic_and_distinct():
    x = torch.from_numpy(speech_like(2)).float()
    views = tta_views(True)
    assert list(views) == ["identity", "shift-10%", "shift+10%", "gain+5dB", "gain-5dB"]
    outs = [v(x) for v in views.values()]
    assert all(torch.equal(v(x), o) for v, o in zip(views.values(), outs))
    for o in outs[1:]:
        assert not torch.allclose(o, outs[0])
    assert list(tta_views(False)) == ["identity"]


def test_runs_on_meta_device():
    front = Frontend(Config.preset("all", size=64)).to("meta").train()
    out = front(torch.zeros(4, 16000, dtype=torch.int16, device="meta"))
    assert out.shape == (4, 1, 64, 64) and out.device.type == "meta"


# ----------------------------------------------------------------------------- newer augmentations
def tone(freq=1000.0, on=(0.0, 1.0), n=1):
    t = np.arange(16000) / 16000
    x = np.where((t >= on[0]) & (t < on[1]), np.sin(2 * np.pi * freq * t), 0.0)
    return torch.from_numpy(np.tile(x, (n, 1)))


def peak_hz(power: torch.Tensor) -> float:
    """Frequency of the spectral peak of (F, T) power, with parabolic interpolation."""
    spec = power.mean(-1)
    k = int(spec.argmax())
    a, b, c = spec[k - 1:k + 2].log()
    return float(k + 0.5 * (a - c) / (a - 2 * b + c)) * 16000 / 2048


def active_seconds(power: torch.Tensor, hop: int) -> float:
    """Onset-to-offset duration of (F, T) power: first to last frame within 30 dB of the max."""
    e = power.sum(0)
    on = torch.nonzero(e > e.max() * 1e-3).flatten()
    return float(on[-1] - on[0]) * hop / 16000


def mel_peak_bin(mel: torch.Tensor) -> float:
    """The mel band of the spectral peak of (M, T) mel power, with parabolic interpolation."""
    return peak_hz(mel) * 2048 / 16000


@pytest.mark.parametrize("semitones", [-2.0, 1.0, 3.0])
def test_pitch_shift_moves_a_tone_by_the_asked_semitones(semitones):
    """The shifted 1 kHz tone's mel image peaks where a tone played at 1 kHz x 2**(s/12) does."""
    lm = LogMel(Config(n_fft=2048, hop_length=128, n_mels=128))
    shifted = SpecWarp(Config())(lm.power(tone(1000.0)), lm,
                                 semitones=torch.tensor([semitones], dtype=torch.float64))
    played = lm.mel(lm.power(tone(1000.0 * 2 ** (semitones / 12))))
    assert abs(mel_peak_bin(shifted[0]) - mel_peak_bin(played[0])) < 0.25
    assert abs(mel_peak_bin(shifted[0]) - mel_peak_bin(lm.mel(lm.power(tone(1000.0)))[0])) > 1


@pytest.mark.parametrize("semitones", [-2.0, -0.7, 1.3, 2.0])
def test_pitch_shift_at_the_filterbank_equals_resampling_the_spectrogram(semitones):
    """The shifted filterbank gives the image that resampling the power spectrogram gave (the
    earlier method): every harmonic of a 200 Hz voice-like tone peaks within a mel band of
    where it did, and the images agree to a fraction of a dB."""
    from augment import resample_axis

    lm = LogMel(Config(size=64))
    t = np.arange(16000) / 16000
    voice = sum(np.sin(2 * np.pi * 200 * h * t) / h for h in range(1, 30))
    power = lm.power(torch.from_numpy(voice)[None])
    r = 2 ** (semitones / 12)
    resampled = lm.mel(resample_axis(power, (torch.arange(power.shape[1]) / r)[None].double(), 1))
    at_fb = SpecWarp(Config())(power, lm, semitones=torch.tensor([semitones]).double())
    a, b = (10 * m.clamp_min(1e-10).log10()[0] for m in (resampled, at_fb))

    def peaks(db):
        s = db.mean(-1)
        return [i for i in range(1, len(s) - 1) if s[i] > s[i - 1] and s[i] > s[i + 1]
                and s[i] > s.max() - 30]

    assert len(peaks(a)) >= 10 and len(peaks(a)) == len(peaks(b))
    assert max(abs(i - j) for i, j in zip(peaks(a), peaks(b))) <= 1  # within a mel band
    loud = a > a.max() - 40
    assert (a - b).abs()[loud].median() < 0.2 and (a - b).abs()[loud].max() < 3.0


@pytest.mark.parametrize("factor", [0.8, 1.25])
def test_time_stretch_scales_the_duration(factor):
    hop = 128
    lm = LogMel(Config(n_fft=512, hop_length=hop, n_mels=64))
    power = lm.power(tone(440.0, on=(0.3, 0.6)))
    stretched = SpecWarp(Config())(power, lm, factor=torch.tensor([factor], dtype=power.dtype))
    before, after = active_seconds(lm.mel(power)[0], hop), active_seconds(stretched[0], hop)
    assert abs(after / before - factor) < 0.04
    assert stretched.shape == lm.mel(power).shape
    # on the mel rows it is exactly the stretch of the power spectrogram, filtered after
    from augment import resample_axis

    nt = power.shape[-1]
    c, t = (nt - 1) / 2, torch.arange(nt, dtype=torch.float64)
    on_power = lm.mel(resample_axis(power, (c + (t - c) / factor)[None].double(), 2))
    assert torch.allclose(stretched, on_power, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha,hz", [(1.1, 1000.0), (0.9, 1000.0), (1.1, 7000.0),
                                      (0.9, 7500.0)])
def test_vtlp_moves_a_tone_along_its_piecewise_linear_warp(alpha, hz):
    """Below the corner a tone moves to alpha x its frequency; above it, along the line that
    keeps the top bin where it is (7 kHz at alpha 1.1 -> 7266 Hz, not 7.7 kHz)."""
    lm = LogMel(Config(n_fft=2048, hop_length=128, n_mels=128))
    warped = SpecWarp(Config())(lm.power(tone(hz)), lm, alpha=torch.tensor([alpha]).double())
    top, f0 = 8000.0, 0.8 * 8000.0 * min(alpha, 1.0) / alpha
    want = alpha * hz if hz <= f0 else alpha * f0 + (top - alpha * f0) / (top - f0) * (hz - f0)
    played = lm.mel(lm.power(tone(want)))
    assert abs(mel_peak_bin(warped[0]) - mel_peak_bin(played[0])) < 0.3
    assert abs(want - alpha * hz) > 300 or hz < f0  # the upper tones are off the plain scaling


def test_speed_perturbation_moves_pitch_and_duration_together():
    """p_speed: each clip s times faster, s in [1 - speed, 1 + speed]: its frequencies times s
    and its durations over s, the same s for both."""
    torch.manual_seed(3)
    warp = SpecWarp(only(p_speed=1.0, speed=0.1))
    on, ratio, alpha, reach, factor = warp.draw(64, "cpu")
    assert len(on) == 64 and alpha is None and torch.allclose(ratio * factor, torch.ones(64))
    assert ratio.min() >= 0.9 and ratio.max() <= 1.1 and ratio.std() > 0.03
    assert reach >= 1 / 0.9 - 1e-9
    hop = 128
    lm = LogMel(Config(n_fft=2048, hop_length=hop, n_mels=128))
    power = lm.power(tone(1000.0, on=(0.3, 0.6)))
    mel = SpecWarp(Config())(power, lm, semitones=torch.tensor([12 * np.log2(1.1)]),
                             factor=torch.tensor([1 / 1.1]))
    assert abs(active_seconds(mel[0], hop) / active_seconds(lm.mel(power)[0], hop) - 1 / 1.1) < 0.04
    assert abs(mel_peak_bin(mel[0]) - mel_peak_bin(lm.mel(lm.power(tone(1100.0)))[0])) < 0.3


@pytest.mark.parametrize("on", [dict(p_pitch=1.0), dict(p_stretch=1.0), dict(p_speed=1.0),
                                dict(p_vtlp=1.0)])
def test_spec_warp_changes_every_sample_in_train_mode_and_none_in_eval(on):
    torch.manual_seed(1)
    lm = LogMel(Config(size=64))
    power = lm.power(torch.from_numpy(speech_like(6)).float())
    warp = SpecWarp(only(**on))
    plain = lm.mel(power)
    y = warp.train()(power, lm)
    assert y.shape == plain.shape and torch.isfinite(y).all()
    assert ((y - plain).flatten(1).abs().amax(1) > 1e-3 * plain.amax()).all()
    assert torch.equal(warp.eval()(power, lm), plain)
    assert torch.equal(SpecWarp(only()).train()(power, lm), plain)  # probability 0: untouched


def test_reverb_keeps_the_length_and_adds_a_decaying_tail():
    torch.manual_seed(0)
    x = tone(700.0, on=(0.1, 0.2), n=4).float()
    aug = WaveAugment(Config.preset("none", p_reverb=1.0, reverb_rt60=(0.5, 0.5))).train()
    y = aug(x)
    assert y.shape == x.shape
    assert torch.allclose(rms(y), rms(x), rtol=1e-3)  # the level is kept
    tail = y[:, 3200:8000].reshape(4, 6, 800).square().mean(-1)  # 50 ms windows after the burst
    assert (x[:, 3200:] == 0).all() and (tail[:, 0] > 1e-4).all()  # the dry clip is silent there
    assert (tail[:, 1:] < tail[:, :-1]).float().mean() > 0.8  # and the tail decays
    assert torch.equal(aug.eval()(x), x)


def only(**on) -> Config:
    """Every augmentation off but the ones set here."""
    return Config.preset("none", **on)


def batch_for(kind):
    """A (module, input) pair for each newer augmentation, forced on for every sample."""
    torch.manual_seed(1)
    lm = LogMel(Config(size=64, norm="none"))
    wave = torch.from_numpy(speech_like(6)).float()
    db = lm.db(wave)
    return {
        "reverb": (WaveAugment(only(p_reverb=1.0)), wave),
        "filter": (FilterAugment(only(p_filter=1.0)), db),
        "mel_jitter": (MelJitter(only(p_mel_jitter=1.0)), db),
        "mixstyle": (FreqMixStyle(only(mixstyle=1.0, p_mixstyle=1.0)), lm.image(db)),
    }[kind]


@pytest.mark.parametrize("kind", ["reverb", "filter", "mel_jitter", "mixstyle"])
def test_augmentation_changes_in_train_mode_and_is_identity_in_eval(kind):
    module, x = batch_for(kind)
    y = module.train()(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    changed = (y - x).flatten(1).abs().amax(1) > 1e-3
    assert changed.all(), f"{kind}: {int((~changed).sum())} samples unchanged"
    assert torch.equal(module.eval()(x), x)


def test_filter_augment_gains_are_bounded_and_smooth():
    module, db = batch_for("filter")
    diff = module.train()(db) - db
    assert diff.abs().max() <= 6.0 + 1e-4
    assert torch.allclose(diff, diff[..., :1].expand_as(diff), atol=1e-4)  # one curve over frequency
    assert diff[:, 1:, 0].sub(diff[:, :-1, 0]).abs().max() < 6.0  # piecewise linear, no jumps


def test_presets_fill_only_what_is_not_given(tmp_path):
    from arg import make_parser, parse_config, write_yaml

    p = make_parser("x", "train", config_file=True)
    cfg, _ = parse_config(p, ["--aug", "seed", "--p-pitch", "0.5", "--p-noise", "0.1"])
    assert cfg.p_pitch == 0.5 and cfg.p_noise == 0.1 and cfg.p_shift == 0.5
    assert cfg.p_bg == cfg.p_spec == cfg.p_mixup == cfg.p_reverb == 0.0
    assert parse_config(p, ["--aug", "none"])[0].p_shift == 0.0
    assert parse_config(p, [])[0] == Config()  # the default preset is the field defaults
    long = parse_config(p, ["--aug", "long", "--p-bg", "0.2"])[0]  # default + bg + mel jitter
    assert (long.p_bg, long.p_mel_jitter, long.p_pitch, long.p_spec) == (0.2, 0.5, 0.5, 0.0)
    write_yaml(cfg, tmp_path / "c.yaml")
    again, _ = parse_config(p, ["--config", str(tmp_path / "c.yaml")])
    assert again == cfg
    assert parse_config(p, ["--config", str(tmp_path / "c.yaml"), "-e", "3"])[0].epochs == 3


def test_modules_take_their_defaults_from_config():
    """Config is the one source of augmentation settings: a module built from the default
    Config holds Config's defaults, and every Config field it reads changes it."""
    cfg = Config()
    front = Frontend(cfg)
    wave, warp = front.wave_aug, front.warp
    assert (wave.p_shift, wave.p_gain, wave.p_noise, wave.p_bg, wave.p_reverb) == \
        (cfg.p_shift, cfg.p_gain, cfg.p_noise, cfg.p_bg, cfg.p_reverb) == (0.5, 0.5, 0.3, 0.0, 0.5)
    assert (warp.p_pitch, front.filter_aug.p, front.spec_aug.p) == (0.5, 0.5, 0.0)
    other = Frontend(Config.preset("all", bg_snr=(3.0, 4.0), spec_width=0.3, filter_bands=7))
    assert other.wave_aug.bg_snr == (3.0, 4.0) and other.spec_aug.width == 0.3
    assert other.filter_aug.bands == 7 and other.wave_aug.p_bg == 0.5
    import inspect

    for cls in (WaveAugment, SpecWarp, FilterAugment, MelJitter, FreqMixStyle, SpecAugment, LogMel):
        params = inspect.signature(cls).parameters
        assert "cfg" in params and params["cfg"].default is inspect.Parameter.empty, cls
        assert not {"p", "p_bg", "p_pitch", "p_reverb", "width", "masks"} & set(params), cls
