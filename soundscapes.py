"""The BirdCLEF-shaped benchmark of recordings with several labels, made by demo.py --preset
soundscape from synth.py's voices and noises.

`--preset soundscape` (about a minute) has the BirdCLEF shape: 10 words are the "species";
80 recorders (espeak voices) each make 6 training recordings of 2-60 s over their own
background noise, repeating one primary word and, in 36 % of recordings, one or two others
(secondary labels); primary labels follow a long tail (the commonest word 15x the rarest).
20 test soundscapes of 60 s from 10 other recorders hold 1-4 words each; solution.csv has a
0/1 column per word for each 2-s window (row_id = file stem + end second). The layout:

    OUT/train_metadata.csv (primary_label, secondary_labels, filename, author)
    OUT/train_audio/<word>/<id>.wav   OUT/test_soundscapes/<id>.wav
    OUT/sample_submission.csv (row_id + one column per word)   OUT/solution.csv (the truth)
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from tqdm import tqdm

from synth import ACCENTS, SR, espeak_at_sr, make_noise, uniform
from voices import Espeak

_ESPEAK: Espeak | None = None  # one per process


SOUNDSCAPE_WORDS = ("yes", "no", "up", "down", "left", "right", "stop", "go", "cat", "dog")


def _event_track(n: int, words: list, rng: np.random.Generator, voice: str, gap: tuple,
                 level_db: tuple) -> tuple[np.ndarray, list]:
    """`n` samples of words said one after another with random gaps; [(word, start, end)]."""
    x, events, pos = np.zeros(n, np.float32), [], int(rng.uniform(0, gap[1]) * SR)
    while pos < n:
        word = str(rng.choice(words))
        w = espeak_at_sr(_ESPEAK, word, voice, rng) * 10 ** (uniform(rng, level_db) / 20)
        seg = w[:n - pos]
        x[pos:pos + len(seg)] += seg
        events.append((word, pos, pos + len(seg)))
        pos += len(w) + int(uniform(rng, gap) * SR)
    return x, events


def speak_recorder(job: tuple) -> list:
    """One recorder's recordings: [(primary, [secondary], int16 audio, events)]."""
    global _ESPEAK
    seed, idx, plan, words, voices, test = job
    if _ESPEAK is None:
        _ESPEAK = Espeak()
    rng = np.random.default_rng([seed, 7, idx])
    voice = f"{rng.choice(ACCENTS)}+{rng.choice(voices)}"
    noise_kind = str(rng.choice(["pink", "brown", "hum", "white"]))
    out = []
    for k, (primary, seconds) in enumerate(plan):
        n = int(seconds * SR)
        noise = make_noise(noise_kind, n, rng) * 0.02 * 10 ** (rng.uniform(-10, 6) / 20)
        if test:  # 1-4 words, each in bursts somewhere in the minute; every word is in some
            first = words[(len(plan) * idx + k) % len(words)]
            others = [w for w in words if w != first]
            present = [first] + list(rng.choice(others, int(rng.integers(0, 4)), replace=False))
            x, events = np.zeros(n, np.float32), []
            for w in present:
                a = int(rng.uniform(0, 0.7) * n)
                b = min(n, a + int(rng.uniform(10, 30) * SR))
                track, ev = _event_track(b - a, [w], rng, voice, (0.5, 3.0), (-14, -4))
                x[a:b] += track
                events += [(e[0], e[1] + a, e[2] + a) for e in ev]
            out.append(("", [], x + noise, events))
            continue
        others = [w for w in words if w != primary]
        second = list(rng.choice(others, int(rng.integers(1, 3)), replace=False)) \
            if rng.random() < 0.36 else []
        x, events = _event_track(n, [primary], rng, voice, (0.3, 2.5), (-10, 0))
        for w in second:  # fainter and rarer than the primary
            track, ev = _event_track(n, [w], rng, voice, (2.0, 10.0), (-20, -8))
            x, events = x + track, events + ev
        out.append((primary, second, x + noise, events))
    return [(p, sec, np.clip(x * 32767, -32768, 32767).astype(np.int16), ev)
            for p, sec, x, ev in out]


def make_soundscapes(out: str | Path, seed: int = 0, workers: int | None = None,
                     progress: bool = True, words=SOUNDSCAPE_WORDS, recorders: int = 80,
                     per_recorder: int = 6, test_recorders: int = 10, soundscapes: int = 20,
                     window: float = 2.0) -> dict:
    """The BirdCLEF-shaped benchmark (module docstring); returns counts."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    words = list(words)
    tail = 1.0 / np.arange(1, len(words) + 1)  # long tail of primary labels
    variants = Espeak.variants()
    train_v = tuple(v for i, v in enumerate(variants) if i % 5)
    test_v = tuple(v for i, v in enumerate(variants) if not i % 5)
    jobs = []
    for i in range(recorders):
        primaries = rng.choice(words, per_recorder, p=tail / tail.sum())
        seconds = np.exp(rng.uniform(np.log(2), np.log(60), per_recorder)).round(2)
        jobs.append((seed, i, list(zip(primaries, seconds)), words, train_v, False))
    for i in range(test_recorders):
        jobs.append((seed, recorders + i, [("", 60.0)] * (soundscapes // test_recorders), words,
                     test_v, True))
    meta, sol = [], []
    (out / "test_soundscapes").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        for job, recs in tqdm(zip(jobs, pool.map(speak_recorder, jobs)), total=len(jobs),
                              desc="recorders", disable=not progress):
            author = f"rec{job[1]:03d}"
            for k, (primary, second, audio, events) in enumerate(recs):
                if job[5]:
                    stem = f"soundscape_{job[1]:03d}{k}"
                    sf.write(out / "test_soundscapes" / f"{stem}.wav", audio, SR, subtype="PCM_16")
                    win = int(window * SR)
                    for end in range(win, len(audio) + 1, win):  # a word counts where its middle is
                        row = {w: 0 for w in words}
                        for w, a, b in events:
                            row[w] |= int(end - win <= (a + b) // 2 < end)
                        sol.append({"row_id": f"{stem}_{end // SR}", **row})
                    continue
                name = f"{primary}/{author}_{k}.wav"
                (out / "train_audio" / primary).mkdir(parents=True, exist_ok=True)
                sf.write(out / "train_audio" / name, audio, SR, subtype="PCM_16")
                meta.append(dict(primary_label=primary, filename=name, author=author,
                                 secondary_labels=str([str(w) for w in second]),
                                 seconds=len(audio) / SR))
    pd.DataFrame(meta).to_csv(out / "train_metadata.csv", index=False)
    sol = pd.DataFrame(sol)
    sol.to_csv(out / "solution.csv", index=False)
    sol.assign(**{w: 0.0 for w in words}).to_csv(out / "sample_submission.csv", index=False)
    return {"train": len(meta), "test": soundscapes, "speakers": recorders + test_recorders}
