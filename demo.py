"""Synthesise a Speech-Commands-like dataset with espeak-ng, so the pipeline runs anywhere.

    python demo.py --out data/demo [--speakers 160] [--seed 0]

A "speaker" is one espeak-ng voice (English accent + variant) with its own pitch, pitch
range and rate. Each clip places the word at a random offset in 1 s at 16 kHz with a
random gain, and most clips get background noise (white/pink/brown/hum) at a random SNR;
about 10 % are shorter than 1 s, as in the real data. The layout is the contest's:

    OUT/train/<word>/<speaker>_nohash_<n>.wav     OUT/test/<id>.wav (unseen speakers)
    OUT/submission.csv (file_name,label empty)    OUT/solution.csv (the truth)
    OUT/_background_noise_/*.wav
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

log = logging.getLogger(__name__)

WORDS = ("bed bird cat dog down eight five four go happy house left marvin nine no off on "
         "one right seven sheila six stop three tree two up wow yes zero").split()
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "croak", "adam", "belinda", "john", "linda")
NOISES = ("white", "pink", "brown", "hum")
SR = 16000

# espeak-ng C API constants (speak_lib.h)
_SYNCHRONOUS, _POS_CHARACTER, _RATE, _PITCH, _RANGE = 2, 1, 1, 3, 4
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class Espeak:
    """The espeak-ng shared library from `espeakng-loader`, driven through ctypes."""

    def __init__(self):
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.sr = self.lib.espeak_Initialize(_SYNCHRONOUS, 0,
                                             espeakng_loader.get_data_path().encode(), 0)
        if self.sr <= 0:
            raise RuntimeError("espeak-ng failed to initialise (espeakng-loader data path)")
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = _CALLBACK(collect)  # keep a reference: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)

    def say(self, text: str, voice: str, pitch: int, prange: int, rate: int) -> np.ndarray:
        """float32 waveform at `self.sr` of `text` spoken by `voice` ("accent+variant")."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, prange)):
            self.lib.espeak_SetParameter(param, value, 0)
        self._chunks = []
        text_b = text.encode() + b"\0"
        self.lib.espeak_Synth(text_b, len(text_b), 0, _POS_CHARACTER, 0, 0, None, None)
        wav = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return wav.astype(np.float32) / 32768.0


def make_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise of `n` samples: white, pink (1/f), brown (1/f^2) or mains hum."""
    if kind == "hum":
        t = np.arange(n) / SR
        f0 = rng.choice([50.0, 60.0])
        x = sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3))
                for k in range(1, 6))
        x = x + 0.05 * rng.standard_normal(n)
    else:
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.maximum(np.fft.rfftfreq(n, 1 / SR), 20.0)
        spec *= {"white": 1.0, "pink": f ** -0.5, "brown": f ** -1.0}[kind]
        x = np.fft.irfft(spec, n)
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def trim(wav: np.ndarray, thresh: float = 0.01) -> np.ndarray:
    loud = np.flatnonzero(np.abs(wav) > thresh)
    return wav[loud[0]:loud[-1] + 1] if loud.size else wav


_ESPEAK: Espeak | None = None


def speak_speaker(job: tuple) -> list[tuple[str, np.ndarray]]:
    """All words of one speaker as (word, int16 clip) pairs; deterministic for (seed, idx)."""
    global _ESPEAK
    seed, idx = job
    if _ESPEAK is None:
        _ESPEAK = Espeak()
    import librosa

    rng = np.random.default_rng([seed, idx])
    voice = f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS)}"
    pitch, prange, rate = int(rng.integers(20, 80)), int(rng.integers(20, 90)), int(rng.integers(120, 230))
    out = []
    for word in WORDS:
        wav = trim(_ESPEAK.say(word, voice, pitch, prange, rate))
        wav = librosa.resample(wav, orig_sr=_ESPEAK.sr, target_sr=SR)
        length = SR if rng.random() > 0.1 else int(rng.uniform(0.55, 0.95) * SR)
        wav = wav[:length]
        clip = np.zeros(length, np.float32)
        start = int(rng.integers(0, length - len(wav) + 1))
        clip[start:start + len(wav)] = wav * 10 ** (rng.uniform(-12, 3) / 20)
        if rng.random() < 0.8:
            rms = np.sqrt(np.mean(clip ** 2)) + 1e-6
            snr = rng.uniform(5, 30)
            clip += make_noise(rng.choice(NOISES), length, rng) * rms / 10 ** (snr / 20)
        out.append((word, np.clip(clip * 32767, -32768, 32767).astype(np.int16)))
    return out


def make_dataset(out: str | Path, speakers: int = 160, seed: int = 0, test_share: float = 1 / 6,
                 workers: int | None = None, progress: bool = True) -> dict:
    """Write the demo dataset under `out`; returns counts."""
    out = Path(out)
    n_test = max(1, round(speakers * test_share))
    n_train = speakers - n_test
    if n_train < 1:
        raise ValueError("--speakers must be at least 2 (train and test need a speaker each)")
    workers = workers or os.cpu_count() or 1
    for word in WORDS:
        (out / "train" / word).mkdir(parents=True, exist_ok=True)
    (out / "test").mkdir(parents=True, exist_ok=True)
    noise_dir = out / "_background_noise_"
    noise_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for kind in NOISES:
        sf.write(noise_dir / f"{kind}_noise.wav", 0.3 * make_noise(kind, 10 * SR, rng) / 4,
                 SR, subtype="PCM_16")

    jobs = [(seed, i) for i in range(speakers)]
    solution = []
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(speak_speaker, jobs, chunksize=4)
        for (_, idx), clips in tqdm(zip(jobs, results), total=speakers, desc="speakers",
                                    disable=not progress):
            speaker = hashlib.sha1(f"{seed}-{idx}".encode()).hexdigest()[:8]
            for word, clip in clips:
                if idx < n_train:
                    sf.write(out / "train" / word / f"{speaker}_nohash_0.wav", clip, SR,
                             subtype="PCM_16")
                else:
                    name = hashlib.sha1(f"{speaker}-{word}".encode()).hexdigest()[:10] + ".wav"
                    sf.write(out / "test" / name, clip, SR, subtype="PCM_16")
                    solution.append((name, word))
    solution = pd.DataFrame(solution, columns=["file_name", "label"]).sort_values("file_name")
    solution.to_csv(out / "solution.csv", index=False)
    solution.assign(label="").to_csv(out / "submission.csv", index=False)
    return {"train": n_train * len(WORDS), "test": len(solution), "speakers": speakers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/demo", help="dataset folder to write")
    p.add_argument("--speakers", type=int, default=160,
                   help="number of speakers; each says all 30 words once (1/6 go to test)")
    p.add_argument("--seed", type=int, default=0, help="same seed -> same dataset")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = make_dataset(args.out, args.speakers, args.seed, workers=args.workers)
    log.info("demo dataset in %s: %d train clips, %d test clips, %d speakers",
             args.out, counts["train"], counts["test"], counts["speakers"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
