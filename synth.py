"""Synthetic speech datasets of any word list, made by demo.py (its command line): espeak-ng and
Kokoro-82M speakers (voices.py) saying the words, then degraded as a preset says.

A "speaker" is one espeak-ng voice (accent + variant) with its own pitch, pitch range and
rate. Each clip places the word at a random offset in 1 s at 16 kHz with a random gain;
most clips get noise at a random SNR; some are shorter than 1 s, as in the real data.

`--preset hard` (420 speakers, 10,080 train and 2,520 test clips, made in about 30 s on
2 cores) adds what makes real keyword data hard: every voice variant espeak-ng ships (103)
of which a fifth are heard only in test, a wider pitch / rate / volume spread, room
reverberation (synthetic impulse responses, 40 % of clips), band limiting (phone-like
microphones, 30 %), babble and music as well as coloured noise at SNRs down to 0 dB (85 %),
30 % of clips shorter than 1 s, and words cut at the clip edge (5 %). The
`_background_noise_` files are other recordings of the same noise kinds, never the ones
mixed into the clips. The layout is the contest's:

    OUT/train/<word>/<speaker>_nohash_<n>.wav     OUT/test/<id>.wav (unseen speakers)
    OUT/submission.csv (file_name,label empty)    OUT/solution.csv (the truth)
    OUT/_background_noise_/*.wav                  OUT/meta.csv (how each clip was made)
    OUT/voices.json (the voice variants of training speakers, and those heard only in test)

`--preset shift` (240 speakers: 5,040 train clips, 1,080 in-domain and 1,080 shifted test
clips) measures domain shift: training speakers use 4 English accents, half of the voice
variants, pitch 30-70 and rate 130-220, white/pink/hum noise and small rooms; half of the
test speakers are drawn the same way (in-domain), the other half use 6 other accents and
languages (Caribbean, Welsh, Lancastrian and New York English, Dutch, German) reading the
English words, the other half of the variants, pitch 0-100 and rate 90-320, brown noise,
babble and music, larger rooms, and channels never heard in training (telephone band with
mu-law, clipping, 4-6 bit depth, a codec-like low-pass). solution.csv has a `domain` column
(in / shift); inference.py --solution scores each domain.

The BirdCLEF-shaped soundscape set (demo.py --preset soundscape) is soundscapes.py's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

import voices
from voices import Espeak, KokoroVoice

log = logging.getLogger(__name__)

WORDS = ("bed bird cat dog down eight five four go happy house left marvin nine no off on "
         "one right seven sheila six stop three tree two up wow yes zero").split()
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "croak", "adam", "belinda", "john", "linda")
SR = 16000


@dataclass(frozen=True)
class Preset:
    """How a dataset is spoken and degraded. Ranges are (low, high), drawn uniformly."""
    speakers: int = 160
    test_share: float = 1 / 6
    accents: tuple = ACCENTS
    variants: tuple = VARIANTS           # () = every variant espeak-ng ships
    test_only_variants: float = 0.0      # share of variants heard only by test speakers
    pitch: tuple = (20, 80)              # espeak-ng pitch, pitch range, words per minute [lo, hi)
                                         # (or two ranges: lo1, hi1, lo2, hi2)
    prange: tuple = (20, 90)
    rate: tuple = (120, 230)
    gain_db: tuple = (-12.0, 3.0)
    p_short: float = 0.1                 # clips shorter than 1 s, and their length in s
    short: tuple = (0.55, 0.95)
    p_cut: float = 0.0                   # word partly outside the clip, up to max_cut of it
    max_cut: float = 0.4
    p_noise: float = 0.8
    snr: tuple = (5.0, 30.0)
    noises: tuple = ("white", "pink", "brown", "hum")
    p_reverb: float = 0.0
    rt60: tuple = (0.15, 0.9)            # reverberation time in s
    p_band: float = 0.0                  # band limiting: low-pass and high-pass corners in Hz
    lowpass: tuple = (2500.0, 7000.0)
    highpass: tuple = (80.0, 500.0)
    p_channel: float = 0.0               # a channel degradation, one of `channels`
    channels: tuple = ()                 # phone (300-3400 Hz + mu-law), clip, bits, codec
    shifted: "Preset | None" = None      # how the shifted test speakers are made (--preset shift)
    kokoro: int = 0                      # Kokoro-82M speakers besides the espeak-ng ones
    speed: tuple = (0.85, 1.2)           # their speaking speed
    seconds: float = 1.0                 # clip length (short clips: `short` x seconds)


SHIFT_TRAIN = dict(accents=("en", "en-us", "en-gb-x-rp", "en-gb-scotland"), variants=(),
                   test_only_variants=0.5, pitch=(30, 70), prange=(30, 80), rate=(130, 220),
                   gain_db=(-12.0, 3.0), p_noise=0.7, snr=(5.0, 30.0),
                   noises=("white", "pink", "hum"), p_reverb=0.3, rt60=(0.1, 0.5))
PRESETS = {
    "demo": Preset(),
    "hard": Preset(speakers=420, test_share=0.2, variants=(), test_only_variants=0.2,
                   pitch=(0, 100), prange=(0, 100), rate=(100, 320), gain_db=(-30.0, 6.0),
                   p_short=0.3, short=(0.4, 0.95), p_cut=0.05, max_cut=0.3, p_noise=0.85,
                   snr=(0.0, 30.0), noises=("white", "pink", "brown", "hum", "babble", "music"),
                   p_reverb=0.4, rt60=(0.1, 0.8), p_band=0.3),
    # training speakers from one part of what espeak-ng can do; the shifted test speakers
    # from the rest: other accents and languages, the other half of the voice variants,
    # pitch and rate outside the training range, other noises, channels never heard
    "shift": Preset(speakers=240, test_share=0.3, **SHIFT_TRAIN, shifted=Preset(
        accents=("en-029", "en-gb-x-gbcwmd", "en-gb-x-gbclan", "en-us-nyc", "nl", "de"),
        pitch=(0, 30, 70, 100), prange=(0, 100), rate=(90, 130, 220, 320), gain_db=(-20.0, 6.0),
        p_noise=0.7,
        snr=(5.0, 30.0), noises=("brown", "babble", "music"), p_reverb=0.3, rt60=(0.3, 0.9),
        p_channel=0.7, channels=("phone", "clip", "bits", "codec"))),
    # training speech for the real-voice benchmark (real.py, make real): every espeak-ng voice
    # variant over the English accents and 8 European languages reading the English words
    # (accented speech: the lever that helped most, docs/RESULTS.md), a wide prosody, and 108
    # Kokoro-82M speakers (its 54 voices and 54 two-voice mixes); a tenth of the speakers make
    # the synthetic test set
    "real": Preset(speakers=160, test_share=0.1, variants=(), pitch=(0, 100), prange=(0, 100),
                   rate=(100, 300), kokoro=108, p_reverb=0.3, rt60=(0.1, 0.6), p_band=0.2,
                   accents=ACCENTS + ("de", "fr", "nl", "es", "it", "pt", "pl", "sv")),
}

def unit_rms(x: np.ndarray) -> np.ndarray:
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def make_noise(kind: str, n: int, rng: np.random.Generator, espeak: Espeak | None = None,
               voices: tuple = ()) -> np.ndarray:
    """Unit-RMS noise of `n` samples: white, pink (1/f), brown (1/f^2), mains hum, music
    (random chords with note envelopes) or babble (overlapping words of several voices)."""
    t = np.arange(n) / SR
    if kind == "hum":
        f0 = rng.choice([50.0, 60.0])
        x = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3))
                for k in range(1, 6))
        x = x + 0.05 * rng.standard_normal(n)
    elif kind == "music":
        x = np.zeros(n)
        for start in range(0, n, int(SR * 0.25)):  # a new note every 250 ms
            f = 110 * 2 ** (rng.integers(0, 36) / 12)
            seg = t[: min(n - start, int(SR * rng.uniform(0.3, 1.2)))]
            note = sum(np.sin(2 * np.pi * f * h * seg) / h for h in (1, 2, 3))
            x[start:start + len(seg)] += note * np.exp(-seg * rng.uniform(2, 8))
    elif kind == "babble":
        x = np.zeros(n)
        for _ in range(6):  # six talkers, each a stream of random words
            pos = int(rng.integers(-SR // 2, SR // 4))
            voice = f"{rng.choice(ACCENTS)}+{rng.choice(voices or VARIANTS)}"
            while pos < n:
                w = espeak_at_sr(espeak, str(rng.choice(WORDS)), voice, rng)
                lo = max(0, -pos)
                seg = w[lo:n - pos] if pos + len(w) > 0 else w[:0]
                x[max(pos, 0):max(pos, 0) + len(seg)] += seg
                pos += len(w) + int(rng.integers(0, SR // 5))
    else:
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.maximum(np.fft.rfftfreq(n, 1 / SR), 20.0)
        spec *= {"white": 1.0, "pink": f ** -0.5, "brown": f ** -1.0}[kind]
        x = np.fft.irfft(spec, n)
    return unit_rms(x)


def espeak_at_sr(espeak: Espeak, word: str, voice: str, rng: np.random.Generator,
                 pitch=None, prange=None, rate=None) -> np.ndarray:
    """`word` said by `voice`, trimmed, resampled to SR (random prosody unless given)."""
    import librosa

    wav = trim(espeak.say(word, voice, int(rng.integers(20, 80)) if pitch is None else pitch,
                          int(rng.integers(20, 90)) if prange is None else prange,
                          int(rng.integers(140, 220)) if rate is None else rate))
    return librosa.resample(wav, orig_sr=espeak.sr, target_sr=SR)


def room_impulse(rt60: float, rng: np.random.Generator) -> np.ndarray:
    """A synthetic room impulse response: the direct path, then exponentially decaying noise
    that falls 60 dB in `rt60` seconds, with a random direct-to-reverberant ratio."""
    n = int(SR * rt60 * 1.1) + 1
    tail = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / (SR * rt60))
    tail[: int(SR * 0.002)] = 0  # the first reflections arrive a little after the direct path
    drr = 10 ** (rng.uniform(-6, 6) / 20)
    h = tail / np.sqrt(np.sum(tail ** 2)) / drr
    h[0] = 1.0
    return h


def fft_filter(x: np.ndarray, response) -> np.ndarray:
    """x filtered by a real magnitude response given as a function of frequency in Hz."""
    n = len(x)
    return np.fft.irfft(np.fft.rfft(x) * response(np.fft.rfftfreq(n, 1 / SR)), n)


def band_limit(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """4th-order Butterworth-shaped band-pass between `low` and `high` Hz (magnitude only)."""
    return fft_filter(x, lambda f: 1 / np.sqrt((1 + (f / high) ** 8)
                                              * (1 + (low / np.maximum(f, 1.0)) ** 8)))


def reverberate(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """x convolved with h by FFT, the tail kept, at x's RMS."""
    n = len(x) + len(h) - 1
    y = np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(h, n), n)
    return y * np.sqrt(np.mean(x ** 2) / (np.mean(y[: len(x)] ** 2) + 1e-12))


def degrade(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A channel the training data never went through: a telephone (300-3400 Hz band, 8-bit
    mu-law), hard clipping, a low bit depth, or a codec-like steep low-pass."""
    peak = np.abs(x).max() + 1e-9
    if kind == "phone":
        y = band_limit(x, 300.0, 3400.0)
        y = y / (np.abs(y).max() + 1e-9)
        mu = 255.0
        q = np.round(np.sign(y) * np.log1p(mu * np.abs(y)) / np.log1p(mu) * 127) / 127
        return (np.sign(q) * np.expm1(np.abs(q) * np.log1p(mu)) / mu * peak).astype(np.float32)
    if kind == "clip":
        t = peak / rng.uniform(3.0, 10.0)
        return (np.clip(x, -t, t) * (peak / t) ** 0.5).astype(np.float32)
    if kind == "bits":
        levels = 2 ** int(rng.integers(4, 7)) / 2
        return (np.round(x / peak * levels) / levels * peak).astype(np.float32)
    cut = rng.uniform(2000.0, 3500.0)  # codec: a steep low-pass
    return fft_filter(x, lambda f: 1 / np.sqrt(1 + (f / cut) ** 24)).astype(np.float32)


def trim(wav: np.ndarray, thresh: float = 0.01) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wav) > thresh)
    return wav[loud[0]:loud[-1] + 1] if loud.size else wav


def draw_int(rng: np.random.Generator, ranges: tuple) -> int:
    """An integer from [lo, hi), or from one of two ranges (lo1, hi1, lo2, hi2) at random."""
    k = 2 * int(rng.integers(0, len(ranges) // 2))
    return int(rng.integers(ranges[k], ranges[k + 1]))


def uniform(rng: np.random.Generator, lo_hi: tuple) -> float:
    return float(rng.uniform(*lo_hi))


_ESPEAK: Espeak | None = None


def label_of(phrase: str) -> str:
    """A phrase's class label: its words joined by '_' ("smart mirror" -> smart_mirror)."""
    return "_".join(phrase.split())


def kokoro_speakers(n: int, seed: int, speed: tuple) -> list[KokoroVoice]:
    """`n` Kokoro speakers: the 54 voices alone (in a seeded order), then two-voice mixes
    (30-70 % of the first), each at its own speed drawn from `speed`."""
    names = voices.voice_names()
    rng = np.random.default_rng([seed, len(names)])
    names = [str(v) for v in rng.permutation(names)]
    out = []
    for j in range(n):
        s = round(uniform(rng, speed), 3)
        if j < len(names):
            out.append(KokoroVoice(names[j], speed=s))
        else:
            a, b = rng.choice(names, 2, replace=False)
            out.append(KokoroVoice(str(a), str(b), round(float(rng.uniform(0.3, 0.7)), 3), s))
    return out


def speak_speaker(job: tuple) -> list[tuple[str, np.ndarray, dict]]:
    """Every phrase of one speaker as (phrase, int16 clip, what was done to it); deterministic
    for the job. An espeak-ng speaker draws its voice and prosody; a Kokoro speaker's clips
    come from the cache (voices.synthesise made them)."""
    global _ESPEAK
    seed, idx, preset, words, variants, kokoro, cache = job
    if _ESPEAK is None:
        _ESPEAK = Espeak()
    p: Preset = preset
    rng = np.random.default_rng([seed, idx])
    if kokoro is None:
        voice = f"{rng.choice(p.accents)}+{rng.choice(variants)}"
        prosody = dict(pitch=draw_int(rng, p.pitch), prange=draw_int(rng, p.prange),
                       rate=draw_int(rng, p.rate))
    else:
        voice = f"kokoro:{kokoro.a}" + (f"+{kokoro.b}:{kokoro.mix:g}" if kokoro.b else "")
        prosody = dict(speed=kokoro.speed)
    out = []
    for word in words:
        meta = dict(voice=voice, **prosody, rt60=0.0, cut=0.0, lowpass=0.0, noise="", snr=np.inf,
                    channel="")
        wav = espeak_at_sr(_ESPEAK, word, voice, rng, **prosody) if kokoro is None else \
            trim(voices.cached(cache, kokoro, word))
        if p.p_reverb and rng.random() < p.p_reverb:
            meta["rt60"] = uniform(rng, p.rt60)
            wav = reverberate(wav, room_impulse(meta["rt60"], rng))
        full = int(round(p.seconds * SR))
        length = full if rng.random() >= p.p_short else int(uniform(rng, p.short) * full)
        clip = np.zeros(length, np.float32)
        if p.p_cut and rng.random() < p.p_cut:  # part of the word falls outside the clip
            meta["cut"] = rng.uniform(0, p.max_cut)
            start = int(rng.choice([-1, 1]) * meta["cut"] * len(wav))
            start = start if start < 0 else length - len(wav) + start
        else:
            start = int(rng.integers(0, max(1, length - len(wav) + 1)))
        lo, hi = max(0, start), min(length, start + len(wav))
        meta["word_start"], meta["word_end"] = lo / SR, hi / SR  # the word's part of the clip
        if hi > lo:
            clip[lo:hi] = wav[lo - start:hi - start]
        meta["gain_db"] = uniform(rng, p.gain_db)
        clip *= 10 ** (meta["gain_db"] / 20)
        if p.p_band and rng.random() < p.p_band:
            meta["highpass"], meta["lowpass"] = uniform(rng, p.highpass), uniform(rng, p.lowpass)
            clip = band_limit(clip, meta["highpass"], meta["lowpass"])
        if p.p_channel and rng.random() < p.p_channel:
            meta["channel"] = str(rng.choice(p.channels))
            clip = degrade(clip, meta["channel"], rng)
        if rng.random() < p.p_noise:
            rms = np.sqrt(np.mean(clip ** 2)) + 1e-6
            meta["snr"] = uniform(rng, p.snr)
            meta["noise"] = str(rng.choice(p.noises))
            noise = make_noise(meta["noise"], length, rng, _ESPEAK, variants)
            clip = clip + noise * rms / 10 ** (meta["snr"] / 20)
        meta["seconds"] = length / SR
        out.append((word, np.clip(clip * 32767, -32768, 32767).astype(np.int16), meta))
    return out


WORD_LIST = "/usr/share/dict/american-english"  # Debian's wamerican


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the insertions, deletions and substitutions from a to b."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def read_word_list(path: str | Path) -> list[str]:
    """The lower-case words of a word list (one a line; names and possessives left out)."""
    words = {w.strip() for w in Path(path).read_text(errors="replace").splitlines()}
    return sorted(w for w in words if w.isalpha() and w.islower())


def near_misses(phrases: list[str], words: list[str], n: int,
                espeak: Espeak | None = None) -> pd.DataFrame:
    """For each phrase, the `n` entries nearest to it in espeak-ng's phonemes (edit distance
    over IPA, stress left out): single words for a word; for a phrase, the phrase with one
    word swapped for one near it. Never a phrase itself, another phrase, anything that sounds
    the same as one (a homophone: distance 0) or holds one whole (zeros, for zero: a window of
    it holds the keyword); of words that sound alike, the first. Columns keyword (the label),
    near_miss, distance, phonemes."""
    espeak = espeak or Espeak()
    own = {espeak.phonemes(p).replace(" ", "") for p in phrases}
    lowered = {p.lower() for p in phrases}

    def holds_one(ph: str) -> bool:
        return holds_any(ph, own)

    said, heard = {}, set()  # one word for each way of sounding: the first in the list
    for w in words:
        ph = espeak.phonemes(w)
        if ph not in heard and not holds_one(ph):
            said[w] = ph
            heard.add(ph)

    def nearest(target: str, k: int) -> list[tuple[int, str]]:
        near = [(edit_distance(target, ph), w) for w, ph in said.items()
                if abs(len(ph) - len(target)) <= 2 and w not in lowered]
        return sorted(near)[:k]

    rows = []
    for phrase in phrases:
        parts = phrase.split()
        target = espeak.phonemes(phrase)
        if len(parts) == 1:
            found = nearest(target, 4 * n + len(phrases))
        else:  # one word of the phrase swapped for a word that sounds near it
            swaps = {" ".join(parts[:i] + [w] + parts[i + 1:])
                     for i, p in enumerate(parts) for _, w in nearest(espeak.phonemes(p), n)}
            found = sorted((edit_distance(target, espeak.phonemes(c)), c) for c in swaps)
        kept = []
        for d, c in found:
            ph = said.get(c) or espeak.phonemes(c)
            if d > 0 and not holds_one(ph) and c.lower() not in lowered:
                kept.append(dict(keyword=label_of(phrase), near_miss=c, distance=d, phonemes=ph))
            if len(kept) == n:
                break
        rows += kept
    return pd.DataFrame(rows, columns=["keyword", "near_miss", "distance", "phonemes"])


def write_halves(out: Path, label: str, speaker: str, clip: np.ndarray, meta: dict) -> list:
    """The first and the last half of a keyword's clip (the other half of the word muted):
    pieces of the keyword, which a detector must not take for it. Returns meta rows."""
    lo, hi = int(meta["word_start"] * SR), int(meta["word_end"] * SR)
    mid, rows = (lo + hi) // 2, []
    for half, mute in (("first_half", slice(mid, hi)), ("last_half", slice(lo, mid))):
        piece = clip.copy()
        piece[mute] = 0
        path = Path(NEAR_MISS) / label / f"{half}_{speaker}.wav"
        sf.write(out / path, piece, SR, subtype="PCM_16")
        rows.append(dict(path=str(path), speaker=speaker, word=f"{label}:{half}", **meta))
    return rows


OTHER_SPEECH = "other_speech"  # OUT/other_speech/: long recordings without the keywords
OTHER_LANGUAGES = ("en-us", "en-gb-x-rp", "de", "fr", "es", "it", "nl", "pl", "pt", "ru", "sv",
                   "tr", "hi", "cmn")
OTHER_CHANNELS = ("clean", "phone", "gsm", "ulaw", "mp3", "vorbis")


def without_keywords(phrases: list[str], words: list[str], espeak: Espeak) -> list[str]:
    """The words of a list that neither are one of the phrases' words nor hold one's sound
    whole (zeros for zero): what other speech may say."""
    own = {espeak.phonemes(w).replace(" ", "") for p in phrases for w in p.split()}
    banned = {w.lower() for p in phrases for w in p.split()}
    return [w for w in words if w not in banned and not holds_any(espeak.phonemes(w), own)]


def holds_any(phonemes: str, sounds: set[str]) -> bool:
    """Whether `phonemes` (word breaks aside) hold one of `sounds` whole."""
    return any(s in phonemes.replace(" ", "") for s in sounds)


def make_other_speech(out: str | Path, phrases: list[str], words: list[str], minutes: int,
                      seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """OUT/other_speech/: `minutes` one-minute recordings of other speech, each an espeak-ng
    voice of one of OTHER_LANGUAGES (English words read in that language's sounds) saying
    words of `words` that are not a keyword (without_keywords) with 0.05-0.4 s between them,
    through one of OTHER_CHANNELS (a telephone band with mu-law, or a codec: audio.codec);
    other_speech.csv says each one's voice, channel and words. Learnt as _unknown_
    (preprocess.py --unknown OUT/other_speech), each is read as the windows it holds."""
    from audio import codec

    espeak = Espeak()
    allowed = without_keywords(phrases, words, espeak)
    folder = Path(out) / OTHER_SPEECH
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = np.random.default_rng([seed, 7]), []
    for i in tqdm(range(minutes), desc="other speech", unit="min", disable=not progress):
        voice = f"{rng.choice(OTHER_LANGUAGES)}+{rng.choice(VARIANTS)}"
        prosody = dict(pitch=int(rng.integers(20, 80)), prange=int(rng.integers(20, 80)),
                       rate=int(rng.integers(130, 260)))
        parts, said, n = [], [], 60 * SR
        while sum(map(len, parts)) < n:
            word = str(rng.choice(allowed))
            parts += [espeak_at_sr(espeak, word, voice, rng, **prosody),
                      np.zeros(int(rng.uniform(0.05, 0.4) * SR), np.float32)]
            said.append(word)
        talk = np.concatenate(parts)[:n]
        talk = 0.5 * talk / (np.abs(talk).max() + 1e-9) * 10 ** (rng.uniform(-20, 0) / 20)
        channel = str(rng.choice(OTHER_CHANNELS))
        if channel == "phone":
            talk = degrade(talk, "phone", rng)
        elif channel != "clean":
            talk = codec(talk, SR, channel)
        name = f"talk_{i:04d}_{voice.replace('+', '_')}_{channel}.wav"
        sf.write(folder / name, np.clip(talk, -1, 1), SR, subtype="PCM_16")
        rows.append(dict(file=name, voice=voice, channel=channel, words=" ".join(said), **prosody))
    table = pd.DataFrame(rows)
    table.to_csv(Path(out) / f"{OTHER_SPEECH}.csv", index=False)
    return table


NEAR_MISS = "near_miss"  # OUT/near_miss/<keyword>/: preprocess.py --unknown OUT/near_miss


def make_dataset(out: str | Path, speakers: int | None = None, seed: int = 0,
                 test_share: float | None = None, workers: int | None = None,
                 progress: bool = True, preset: str | Preset = "demo",
                 words: tuple | list = WORDS, kokoro: int | None = None,
                 seconds: float | None = None, cache: str | Path = "data/tts_cache",
                 near_miss: pd.DataFrame | None = None) -> dict:
    """Write a dataset under `out` with the `preset`'s voices and degradations (speakers,
    test_share, kokoro and seconds override it); returns counts. `words` are phrases, each
    said whole and labelled label_of(phrase); Kokoro's clips are cached under `cache`.
    `near_miss` (near_misses' table): its words said by every espeak-ng training speaker, and
    the halves of each keyword clip of theirs, under OUT/near_miss/<keyword>/ (near_miss.csv
    says what each holds)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    p = dataclasses.replace(p, speakers=speakers or p.speakers,
                            test_share=p.test_share if test_share is None else test_share,
                            kokoro=p.kokoro if kokoro is None else kokoro,
                            seconds=seconds or p.seconds)
    out = Path(out)
    n_test = max(1, round(p.speakers * p.test_share))
    n_train = p.speakers - n_test
    if n_train < 1:
        raise ValueError("--speakers must be at least 2 (train and test need a speaker each)")
    workers = workers or os.cpu_count() or 1
    kokoro_voices = kokoro_speakers(p.kokoro, seed, p.speed) if p.kokoro else []
    if kokoro_voices:  # the slow part, cached and resumable, before anything is written
        voices.synthesise([(v, w) for v in kokoro_voices for w in words], Path(cache), workers,
                          progress)
    for word in words:
        (out / "train" / label_of(word)).mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    noise_dir = out / "_background_noise_"
    noise_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    variants = p.variants or Espeak.variants()
    n_held = round(len(variants) * p.test_only_variants)
    held_out = {str(v) for v in rng.choice(variants, n_held, replace=False)} if n_held else set()
    train_voices = tuple(v for v in variants if v not in held_out)
    espeak = Espeak() if "babble" in p.noises else None
    for kind in p.noises:
        noise = make_noise(kind, 10 * SR, rng, espeak, train_voices)
        sf.write(noise_dir / f"{kind}_noise.wav", 0.3 * noise / 4, SR, subtype="PCM_16")

    words = tuple(words)
    jobs = [(seed, i, p, words, train_voices if i < n_train else tuple(variants), None, cache)
            for i in range(p.speakers)]
    n_in = n_train + n_test // 2  # --preset shift: speakers from n_in on are the shifted ones
    if p.shifted is not None:  # the in-domain test speakers speak like the training ones
        jobs = [(seed, i, p, words, train_voices, None, cache) if i < n_in else
                (seed, i, p.shifted, words, tuple(sorted(held_out)), None, cache)
                for i in range(p.speakers)]
    # Kokoro speakers after the espeak-ng ones; the last test_share of them are heard in test
    n_kokoro_train = len(kokoro_voices) - round(len(kokoro_voices) * p.test_share)
    jobs += [(seed, p.speakers + j, p, words, train_voices, v, cache)
             for j, v in enumerate(kokoro_voices)]
    in_train = [i < n_train or p.speakers <= i < p.speakers + n_kokoro_train
                for i in range(len(jobs))]
    solution, metas = [], []
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(speak_speaker, jobs, chunksize=4)
        for (_, idx, *_), clips in tqdm(zip(jobs, results), total=len(jobs), desc="speakers",
                                        disable=not progress):
            speaker = hashlib.sha1(f"{seed}-{idx}".encode()).hexdigest()[:8]
            for word, clip, meta in clips:
                label = label_of(word)
                if in_train[idx]:
                    path = Path("train") / label / f"{speaker}_nohash_0.wav"
                else:
                    name = hashlib.sha1(f"{speaker}-{word}".encode()).hexdigest()[:10] + ".wav"
                    path = Path("test") / name
                    solution.append((name, label, "shift" if n_in <= idx < p.speakers else "in"))
                sf.write(out / path, clip, SR, subtype="PCM_16")
                metas.append(dict(path=str(path), speaker=speaker, word=label, **meta))
                if near_miss is not None and in_train[idx] and idx < p.speakers:
                    (out / NEAR_MISS / label).mkdir(parents=True, exist_ok=True)
                    metas += write_halves(out, label, speaker, clip, meta)
        if near_miss is not None:
            metas += say_near_misses(out, near_miss, [j for j in jobs[:p.speakers]
                                                      if in_train[j[1]]], pool, progress)
    solution = pd.DataFrame(solution, columns=["file_name", "label", "domain"])
    if p.shifted is None:  # a domain column only where test speakers differ in kind
        solution = solution.drop(columns="domain")
    solution = solution.sort_values("file_name")
    solution.to_csv(out / "solution.csv", index=False)
    solution[["file_name"]].assign(label="").to_csv(out / "submission.csv", index=False)
    pd.DataFrame(metas).to_csv(out / "meta.csv", index=False)
    (out / "voices.json").write_text(json.dumps(dict(
        train=train_voices, test_only=sorted(held_out),
        kokoro=[dataclasses.asdict(v) | dict(train=j < n_kokoro_train)
                for j, v in enumerate(kokoro_voices)]), indent=1))
    counts = {"train": sum(in_train) * len(words), "test": len(solution), "speakers": len(jobs)}
    if near_miss is not None:
        near_miss.to_csv(out / f"{NEAR_MISS}.csv", index=False)
        counts["near_miss"] = sum(str(m["path"]).startswith(NEAR_MISS) for m in metas)
    return counts


def say_near_misses(out: Path, table: pd.DataFrame, jobs: list, pool, progress: bool) -> list:
    """The near-miss words of `table` said by the speakers of `jobs` (speak_speaker's: the
    same voice and manner as their keywords), written under OUT/near_miss/<keyword>/."""
    said = tuple(dict.fromkeys(table.near_miss))
    keyword = dict(zip(table.near_miss, table.keyword))
    jobs = [(seed, idx, p, said, variants, None, cache)
            for seed, idx, p, _, variants, _, cache in jobs]
    metas = []
    for (seed, idx, *_), clips in tqdm(zip(jobs, pool.map(speak_speaker, jobs, chunksize=4)),
                                       total=len(jobs), desc="near misses", disable=not progress):
        speaker = hashlib.sha1(f"{seed}-{idx}".encode()).hexdigest()[:8]
        for word, clip, meta in clips:
            path = Path(NEAR_MISS) / keyword[word] / f"{label_of(word)}_{speaker}.wav"
            (out / path.parent).mkdir(parents=True, exist_ok=True)
            sf.write(out / path, clip, SR, subtype="PCM_16")
            metas.append(dict(path=str(path), speaker=speaker, word=label_of(word), **meta))
    return metas


