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


HOP = 0.25  # seconds between two windows of a recording read for words (predict.py, inference.py)
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


def level_db(frames: np.ndarray) -> np.ndarray:
    """Each window's power in dB (a window padded to the clip length counts its zeros)."""
    return 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=-1) + 1e-20)


class Windows:
    """A recording or a stream cut into windows as it arrives, in constant memory: `feed(block)`
    returns the windows that block completes [(start sample, window (length,) float32,
    silent)], `finish()` the last one (as window_starts: one that ends at the recording's end
    where the hop stops short; one padded window for a recording shorter than a window). A
    window is silent more than `silence_db` below `loudest` (dB): a file's loudest window where
    it is known beforehand (`loudest_of` its blocks: a first pass, so a file is judged whole),
    else the loudest window so far (a stream)."""

    def __init__(self, sr: int, length: int, window: float | None = None, hop: float = HOP,
                 silence_db: float = 40.0, loudest: float | None = None):
        self.length, self.silence_db, self.loudest = length, silence_db, loudest
        self.win = int(round((window or length / sr) * sr))
        self.hop = max(1, int(round(hop * sr)))
        self.top = -np.inf if loudest is None else loudest
        self.buf, self.at, self.next, self.n, self.last = np.zeros(0, np.float32), 0, 0, 0, None

    def _starts(self, block: np.ndarray) -> list[int]:
        self.buf = np.concatenate([self.buf, np.asarray(block, np.float32)])
        self.n += len(block)
        starts = list(range(self.next, self.n - self.win + 1, self.hop))
        self.next = starts[-1] + self.hop if starts else self.next
        return starts

    def _frame(self, start: int) -> tuple[np.ndarray, float]:
        frame = fit(self.buf[start - self.at:start - self.at + self.win], self.length)
        self.last = start
        return frame, float(level_db(frame))

    def _trim(self) -> None:
        keep = max(0, min(self.next, self.n - self.win) - self.at)  # what later windows need
        self.buf, self.at = self.buf[keep:], self.at + keep

    def _take(self, start: int):
        frame, level = self._frame(start)
        if self.loudest is None:
            self.top = max(self.top, level)
        return start, frame, level < self.top - self.silence_db

    def _end(self) -> list[int]:
        if self.last is None:
            return [0] if self.n else []
        return [self.n - self.win] if self.n > self.win and self.last + self.win < self.n else []

    def feed(self, block: np.ndarray) -> list:
        out = [self._take(s) for s in self._starts(block)]
        self._trim()
        return out

    def finish(self) -> list:
        return [self._take(s) for s in self._end()]

    def loudest_of(self, blocks) -> float:
        """The level (dB) of the loudest window of a recording given as blocks (a first pass
        with this cut's window, hop and clip length)."""
        cut = Windows(1, self.length, None, 1, self.silence_db)
        cut.win, cut.hop = self.win, self.hop
        top = -np.inf
        for block in blocks:
            top = max([top, *(cut._frame(s)[1] for s in cut._starts(block))])
            cut._trim()
        return max([top, *(cut._frame(s)[1] for s in cut._end())])


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
    be used (a file holding under half of what its header promises is damaged: a write cut
    short). `info` gets the file's orig_sr, orig_channels and orig_seconds."""
    with _open(path) as f:
        orig_sr = f.samplerate
        y = f.read(dtype="float32", always_2d=True)
    promised = _promised_frames(path) or len(y)
    if len(y) == 0:
        raise AudioError("empty (0 samples)")
    if len(y) < promised / 2:
        raise AudioError(f"cut short (its header promises {promised / orig_sr:.3f} s, it holds "
                         f"{len(y) / orig_sr:.3f} s)")
    if info is not None:
        info.update(orig_sr=orig_sr, orig_channels=y.shape[1], orig_seconds=len(y) / orig_sr)
    y = y.mean(1) if y.shape[1] > 1 else y[:, 0]
    if not np.isfinite(y).all():
        raise AudioError("not audio (NaN or infinite samples)")
    return resample(y, orig_sr, sr)


BLOCK_SECONDS = 30.0  # how much of a recording is read at once (the memory a long one takes)


def read_blocks(path: str | Path, sr: int, seconds: float = BLOCK_SECONDS):
    """A recording read in blocks of `seconds`: float32 mono at `sr` (channels averaged,
    resampled by soxr as it streams), in constant memory whatever its length; AudioError as
    read_audio gives, before the first block."""
    import soxr

    f = _open(path)
    return _blocks(f, sr, max(1, int(seconds * f.samplerate)), soxr)


def read_info(path: str | Path) -> float:
    """A recording's length in seconds, read from its header; AudioError as read_blocks."""
    with _open(path) as f:
        return f.frames / f.samplerate


def _open(path: str | Path):
    """An open soundfile.SoundFile of a file that holds samples; AudioError otherwise."""
    import soundfile as sf

    if not Path(path).is_file():
        raise AudioError("file not found")
    try:
        f = sf.SoundFile(str(path))
    except Exception as e:  # LibsndfileError, RuntimeError, TypeError ...
        said = getattr(e, "error_string", None) or str(e).strip().splitlines()[0][:120]
        raise AudioError(f"not audio ({said.rstrip('.')})") from None
    if f.frames == 0:
        f.close()
        raise AudioError("empty (0 samples)")
    return f


def _blocks(f, sr: int, step: int, soxr):
    stream = soxr.ResampleStream(f.samplerate, sr, 1, dtype="float32", quality="HQ") \
        if f.samplerate != sr else None
    with f:
        while True:
            x = f.read(step, dtype="float32", always_2d=True).mean(1)
            last = len(x) < step or f.tell() >= f.frames
            if not np.isfinite(x).all():
                raise AudioError("not audio (NaN or infinite samples)")
            yield stream.resample_chunk(x, last=last) if stream else x
            if last:
                return


class StreamError(ValueError):
    """A pipe that is not 16-bit PCM: raw (16 kHz mono) or a WAV header before it."""


def pipe_blocks(fd: int, sr: int, block: int = 64000):
    """Audio arriving on a pipe (file descriptor `fd`), yielded as it comes (whatever each read
    brings, at most `block` bytes: 2 s of 16 kHz 16-bit mono; a live source gives less, at
    once, so a window is heard as soon as its last sample arrives), as float32 mono at
    `sr`: raw 16-bit little-endian PCM, 16 kHz mono, or a WAV file (its header says the rate and
    channels; a header written before the length was known is fine). StreamError for another
    format."""
    import os

    import soxr

    head = b""
    while len(head) < 12:
        got = os.read(fd, 12 - len(head))
        if not got:
            break
        head += got
    rate, channels, rest = 16000, 1, head
    if head[:4] == b"RIFF":
        if head[8:12] != b"WAVE":
            raise StreamError("a RIFF stream that is not WAVE")

        def read(n: int) -> bytes:
            out = b""
            while len(out) < n:
                got = os.read(fd, n - len(out))
                if not got:
                    raise StreamError("a WAV header cut short")
                out += got
            return out

        tag, bits, rate, channels, _ = _wav_header(read)
        if tag not in (1, 0xFFFE) or bits != 16:
            raise StreamError(f"a WAV of format {tag}, {bits} bits: expected 16-bit PCM")
        rest = b""
    stream = soxr.ResampleStream(rate, sr, 1, dtype="float32", quality="HQ") \
        if rate != sr else None
    frame, carry = 2 * channels, rest
    while True:
        got = os.read(fd, block)
        data = carry + got
        n = len(data) // frame * frame
        carry = data[n:]
        x = np.frombuffer(data[:n], "<i2").reshape(-1, channels).mean(1).astype(np.float32)
        x /= 32768.0
        if stream is not None:
            x = stream.resample_chunk(x, last=not got)
        if len(x):
            yield x
        if not got:
            return


def _wav_header(read) -> tuple[int, int, int, int, int]:
    """(format tag, bits per sample, rate, channels, data bytes the header promises) of a WAV
    after its 12-byte RIFF head, read through `read(n)` (n bytes, or StreamError)."""
    import struct

    fmt = None
    while True:
        kind, size = struct.unpack("<4sI", read(8))
        if kind == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", read(size + size % 2)[:16])
            fmt = (tag, bits, rate, channels)
        elif kind == b"data":
            if fmt is None:
                raise StreamError("a WAV without its fmt chunk")
            return (*fmt, size)
        else:
            read(size + size % 2)


def _promised_frames(path: str | Path) -> int | None:
    """The frames a WAV file's header promises (None: not a WAV, or one that does not say)."""
    with open(path, "rb") as f:
        def read(n: int) -> bytes:
            got = f.read(n)
            if len(got) < n:
                raise StreamError("a WAV header cut short")
            return got
        try:
            if read(12)[8:] != b"WAVE":
                return None
            _, bits, _, channels, size = _wav_header(read)
        except (StreamError, ValueError):  # struct.error is a ValueError
            return None
    frame = channels * bits // 8
    return size // frame if frame and size != 0xFFFFFFFF else None


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


def word_span(wave: np.ndarray, frame: int = 160, within_db: float = 30.0) -> tuple[int, int]:
    """[start, end) in samples of the sound of a clip: from the first to the last 10 ms frame
    (at 16 kHz) within `within_db` of its loudest frame; the whole clip when it is silent."""
    n = len(wave) // frame * frame
    if n == 0:
        return 0, len(wave)
    power = (wave[:n].astype(np.float64).reshape(-1, frame) ** 2).mean(1)
    if power.max() <= 0:
        return 0, len(wave)
    loud = np.flatnonzero(power >= power.max() * 10 ** (-within_db / 10))
    return int(loud[0] * frame), int((loud[-1] + 1) * frame)


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


def top_line(path, top) -> str:
    return f"{path}: " + "  ".join(f"{label} {p:.3f}" for label, p in top)
