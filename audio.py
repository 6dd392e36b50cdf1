"""Reading audio, and the windows of a recording: the one reader every step uses.

preprocess.py decodes through `read_audio`, training and inference cut windows with
`window_starts`, and the offline bundle ships this file beside predict.py, so the torch-free
predictor resamples and windows exactly as training did. Needs numpy, soundfile and soxr.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3"}  # what soundfile reads


class AudioError(ValueError):
    """A file that cannot be used, with the reason: listed and skipped, never fatal. A reason
    starts with its kind: "file not found", "not audio (...)" or "empty (...)"."""


SHORTEST_WINDOW = 0.01  # seconds: a window or hop shorter than one 10-ms STFT frame is refused
# --window and --hop mean the same in inference.py and predict.py: one help each
WINDOW_HELP = ("label a recording window by window, each this many seconds, zero-padded or cut "
               "to the clip length the models were trained on")
HOP_HELP = "the step between two windows in seconds"


def window_problem(window: float | None, hop: float | None) -> str | None:
    """What is wrong with a --window / --hop pair in seconds (None: the default), or None: the
    one check inference.py and predict.py make before reading anything."""
    for name, v in (("--window", window), ("--hop", hop)):
        if v is None:
            continue
        if not math.isfinite(v) or v < SHORTEST_WINDOW:
            return (f"{name} {v:g}: expected seconds, at least {SHORTEST_WINDOW:g} (one STFT "
                    f"frame)")
    return None


def seconds_label(samples: int, sr: int) -> str:
    """A time in samples as seconds written exactly, with the decimals it needs: 5 for 80000
    at 16 kHz (BirdCLEF's row ids), 5.5, 12.0004375; distinct sample counts never share one."""
    decimals = next((d for d in range(10) if samples * 10 ** d % sr == 0), 9)
    return f"{samples / sr:.{decimals}f}"


def fit(y: np.ndarray, length: int) -> np.ndarray:
    """y cut, or zero-padded at the end, to `length` samples."""
    return y[:length] if len(y) >= length else np.pad(y, (0, length - len(y)))


def window_starts(n: int, win: int, hop: int) -> list[int]:
    """Start samples of the windows of a recording of `n` samples: every `hop` from 0 while a
    whole window fits, plus one that ends at the recording's end if the last one stops short;
    one window at 0 for a recording no longer than a window. The one definition of windows:
    inference.py's window rows and file averages, and this predictor's, use it."""
    starts = list(range(0, max(1, n - win + 1), max(1, hop)))
    if n > win and starts[-1] + win < n:
        starts.append(n - win)
    return starts


def recording_windows(y: np.ndarray, sr: int, length: int, window: float | None = None,
                      hop: float = 0.25, silence_db: float = 40.0):
    """A recording read window by window, as predict.py and `inference.py --other-speech` read
    it: (start samples, windows (N, length) float32 each of `window` seconds (default: the clip
    length) cut or padded to the clip length, every `hop` seconds (window_starts), silent (N,):
    the windows more than `silence_db` below the loudest one), and the window in samples."""
    win = int(round((window or length / sr) * sr))
    starts = window_starts(len(y), win, max(1, int(round(hop * sr))))
    frames = np.stack([fit(y[s:s + win], length) for s in starts])
    level = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-20)
    return starts, frames, level < level.max() - silence_db, win


def resample(y: np.ndarray, orig_sr: int, sr: int) -> np.ndarray:
    """soxr's high-quality resampler, cut or padded to ceil(len * sr / orig_sr) samples: what
    `librosa.load(sr=...)` does, and so what training heard (preprocess.py reads through here)."""
    import soxr

    if orig_sr == sr or len(y) == 0:
        return y
    n = int(np.ceil(len(y) * sr / orig_sr))
    return fit(soxr.resample(y, orig_sr, sr, quality="HQ").astype(np.float32), n)


def read_audio(path: str | Path, sr: int, info: dict | None = None) -> np.ndarray:
    """float32 mono waveform of `path` at `sr` (channels averaged); AudioError when it cannot
    be used. `info` gets the file's orig_sr, orig_channels and orig_seconds."""
    import soundfile as sf

    if not Path(path).is_file():
        raise AudioError("file not found")
    try:
        y, orig_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # LibsndfileError, RuntimeError, TypeError ...
        said = getattr(e, "error_string", None) or str(e).strip().splitlines()[0][:120]
        raise AudioError(f"not audio ({said.rstrip('.')})") from None
    if len(y) == 0:
        raise AudioError("empty (0 samples)")
    if info is not None:
        info.update(orig_sr=orig_sr, orig_channels=y.shape[1], orig_seconds=len(y) / orig_sr)
    y = y.mean(1) if y.shape[1] > 1 else y[:, 0]
    if not np.isfinite(y).all():
        raise AudioError("not audio (NaN or infinite samples)")
    return resample(y, orig_sr, sr)


CODECS = {  # name: (the rate it runs at, None: the clip's own; soundfile format, subtype)
    "gsm": (8000, "WAV", "GSM610"), "ulaw": (8000, "WAV", "ULAW"), "alaw": (8000, "WAV", "ALAW"),
    "ima_adpcm": (None, "WAV", "IMA_ADPCM"), "ms_adpcm": (None, "WAV", "MS_ADPCM"),
    "mp3": (None, "MP3", "MPEG_LAYER_III"), "vorbis": (None, "OGG", "VORBIS"),
    "opus": (None, "OGG", "OPUS"),
}


def codec(y: np.ndarray, sr: int, name: str) -> np.ndarray:
    """float32 `y` at `sr` encoded by codec `name` (CODECS) and decoded again, in memory, at
    `sr` and y's length: a phone line (GSM 6.10, G.711 mu-law and A-law, at 8 kHz: down and
    back up), ADPCM, or a compressed file (MP3, Vorbis, Opus)."""
    import io

    import soundfile as sf

    rate, fmt, subtype = CODECS[name]
    x = resample(y, sr, rate) if rate else y
    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1.0, 1.0), rate or sr, format=fmt, subtype=subtype)
    buf.seek(0)
    z, _ = sf.read(buf, dtype="float32")
    return fit(resample(z, rate, sr) if rate else z, len(y)).astype(np.float32)


def audio_files(paths) -> list[Path]:
    """The files given, and the audio files (AUDIO_EXTS) inside the folders given, sorted."""
    files = []
    for p in map(Path, paths):
        files += sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_EXTS) \
            if p.is_dir() else [p]
    return files


def file_windows(paths, sr: int, length: int, errors=None):
    """The readable files among `paths` read at `sr` and cut into `length`-sample windows
    (window_starts, hop = length; a shorter file is one zero-padded window): (files, windows
    (N, length) float32, owner: each window's index in files). (path, reason) of the others
    go to `errors` when given."""
    good, waves, owner = [], [], []
    for p in paths:
        try:
            y = read_audio(p, sr)
        except AudioError as e:
            if errors is not None:
                errors.append((p, str(e)))
            continue
        for s in window_starts(len(y), length, length):
            waves.append(fit(y[s:s + length], length))
            owner.append(len(good))
        good.append(p)
    return good, np.stack(waves) if waves else np.zeros((0, length), np.float32), \
        np.asarray(owner, dtype=np.int64)


def per_file(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """The mean of each file's windows' rows."""
    return np.stack([values[owner == i].mean(0) for i in range(n)]) if n else values[:0]


def predict_files(paths, sr: int, length: int, probs, classes: list[str], top_k: int = 3,
                  errors=None):
    """[(path, [(label, probability), ...])] for the readable files among `paths`, each read at
    `sr`; a file longer than `length` samples is the mean of its `length`-sample windows
    (file_windows), a shorter one is zero-padded. `probs` maps (N, length) float32 waveforms
    to (N, classes) probabilities; (path, reason) of the others go to `errors` when given.
    The one "label these files" path: Predictor here and `inference.py --predict` use it."""
    good, waves, owner = file_windows(paths, sr, length, errors)
    scores = per_file(probs(waves), owner, len(good)) if len(waves) else []
    return [(p, [(classes[i], float(s[i])) for i in np.argsort(s)[::-1][:top_k]])
            for p, s in zip(good, scores)]


def top_line(path, top) -> str:
    return f"{path}: " + "  ".join(f"{label} {p:.3f}" for label, p in top)
