"""The real-stream benchmark: keywords inside long recordings of real speech, as a detector
hears them, and held-out real speech without them to fit the detector's rule per hour.

    python stream.py data --fsdd ../shared/data/fsdd/recordings \
        --asterisk /usr/share/asterisk/sounds/en_US_f_Allison --out data/real

writes under OUT, at 8 kHz (the recordings' own rate):

  stream_fit.wav   speech without the keywords, for inference.py --other-speech and
                   --false-accepts-per-hour (the rule over time is fitted on it): the FSDD clips
                   of the other digits by the --fit-speakers, and half of the asterisk prompts
  stream_fit_keys.wav  the --fit-speakers' keyword utterances, each between quiet, with the
                   test stream's noise; stream_fit_keys.csv as stream_test.csv: for inference.py
                   --fit-keywords (the rule's smoothing, patience and hop are chosen on it)
  stream_test.wav  the keyword utterances (FSDD clips of --known by the other speakers), each
                   between stretches of other real speech (their other digits, the other half of
                   the prompts) and quiet, with background noise over the whole at --snr dB
                   (Picovoice's benchmark builds its stream this way); stream_test.csv: each
                   keyword's word, speaker, start and end (s), for inference.py --keyword-stream

No clip is in both recordings, no speaker's digits are in both, and a prompt whose transcript
(the asterisk-core-sounds-en package's core-sounds-en.txt.gz) says a keyword, or a digit, is
left out. The FSDD is CC BY-SA 4.0, the asterisk prompts CC BY-SA 3.0 (NOTICE): both are read
in place, and the recordings made from them stay outside the repository (data/).
"""
from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from arg import Parser
from audio import AUDIO_EXTS, read_audio
from layouts import DIGITS, FSDD_SR, fsdd_rows
from util import UsageError, run_cli, write_csv

ASTERISK = "/usr/share/asterisk/sounds/en_US_f_Allison"
TRANSCRIPTS = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
INSTALL = ("apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en (Debian; its "
           "prompts and their transcripts)")
NUMBER_WORDS = ("oh", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty",
                "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million")


def prompts(folder: Path, transcripts: Path, known: tuple) -> list[Path]:
    """The prompts of `folder` whose transcript says none of the digit or number words (nor
    a digit), sorted: real speech without the keywords."""
    if not folder.is_dir():
        raise UsageError(f"--asterisk {folder}: no such folder: {INSTALL}")
    if not transcripts.is_file():
        raise UsageError(f"--transcripts {transcripts}: no such file: {INSTALL}")
    said = {}
    with gzip.open(transcripts, "rt", errors="replace") as f:
        for line in f:
            name, colon, text = line.partition(":")
            if colon and not line.startswith(";"):
                said[name.strip()] = text.lower()
    banned = re.compile(r"\d|\b(" + "|".join((*DIGITS, *known, *NUMBER_WORDS)) + r")\b")
    keep = []
    for f in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTS):
        text = said.get(str(f.relative_to(folder).with_suffix("")))
        if text is not None and not banned.search(text):
            keep.append(f)
    if not keep:
        raise UsageError(f"--asterisk {folder}: no prompt with a transcript in {transcripts}")
    return keep


def gap(rng, lo: float, hi: float) -> np.ndarray:
    return np.zeros(int(rng.uniform(lo, hi) * FSDD_SR), np.float32)


def write_streams(fsdd: Path, asterisk: Path, transcripts: Path, noise: Path | None, out: Path,
                  known: tuple, fit_speakers: tuple, snr: float, seed: int = 0) -> dict:
    """OUT/stream_fit.wav, OUT/stream_fit_keys.wav (+ .csv) and OUT/stream_test.wav (+ .csv);
    their seconds."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    real = fsdd_rows(fsdd)
    odd = sorted(set(fit_speakers) - set(real.speaker))
    if odd or set(real.speaker) <= set(fit_speakers):
        raise UsageError(f"--fit-speakers {','.join(fit_speakers)}: some FSDD speakers, not all "
                         f"({', '.join(sorted(real.speaker.unique()))})")
    said = prompts(asterisk, transcripts, known)
    other = real[~real.label.isin(known)]
    fit = [*other[other.speaker.isin(fit_speakers)].path, *said[0::2]]
    rng.shuffle(fit)
    test_other = [*other[~other.speaker.isin(fit_speakers)].path, *said[1::2]]
    rng.shuffle(test_other)
    keys = real[real.label.isin(known) & ~real.speaker.isin(fit_speakers)].sample(
        frac=1.0, random_state=seed)
    out.mkdir(parents=True, exist_ok=True)
    parts = [x for p in fit for x in (read_audio(p, FSDD_SR), gap(rng, 0.2, 0.8))]
    sf.write(out / "stream_fit.wav", np.concatenate(parts), FSDD_SR, subtype="PCM_16")
    # the test stream: each keyword after a stretch of other speech (its share of the other
    # clips) and quiet, so that a keyword is never glued to another word
    y, rows = keyword_recording(keys, np.array_split(np.asarray(test_other, dtype=object),
                                                     len(keys)), noise, snr, rng)
    write_recording((y, rows), out / "stream_test.wav")
    fit_keys = real[real.label.isin(known) & real.speaker.isin(fit_speakers)].sample(
        frac=1.0, random_state=seed)  # its own draws: the two streams stay as they were
    held = keyword_recording(fit_keys, [[]] * len(fit_keys), noise, snr,
                             np.random.default_rng(seed + 1))
    write_recording(held, out / "stream_fit_keys.wav")
    return dict(fit=sf.info(out / "stream_fit.wav").duration, test=len(y) / FSDD_SR,
                keywords=len(rows), prompts=len(said), fit_keys=len(held[1]),
                fit_keys_seconds=len(held[0]) / FSDD_SR)


def keyword_recording(keys: pd.DataFrame, before: list, noise: Path | None, snr: float,
                      rng) -> tuple[np.ndarray, list[dict]]:
    """The FSDD clips of `keys` one after another, each after the clips of its `before` (other
    speech, 0.2-0.8 s apart) and 0.3-1 s of quiet, and before 0.3-1 s of quiet, with `noise`
    over the whole at `snr` dB; and each keyword's word, speaker, file_name, start and end."""
    parts, rows = [], []
    for (_, k), chunk in zip(keys.iterrows(), before):
        for p in chunk:
            parts += [read_audio(p, FSDD_SR), gap(rng, 0.2, 0.8)]
        parts.append(gap(rng, 0.3, 1.0))
        at = sum(map(len, parts))
        y = read_audio(k.path, FSDD_SR)
        rows.append(dict(word=k.label, speaker=k.speaker, file_name=k.file_name,
                         start=at / FSDD_SR, end=(at + len(y)) / FSDD_SR))
        parts += [y, gap(rng, 0.3, 1.0)]
    y = np.concatenate(parts)
    return (y if noise is None else with_noise(y, noise, snr, rng)), rows


def write_recording(got: tuple, path: Path) -> None:
    """A keyword_recording as PATH (16-bit WAV at the FSDD's rate) and PATH's .csv."""
    import soundfile as sf

    sf.write(path, got[0], FSDD_SR, subtype="PCM_16")
    write_csv(pd.DataFrame(got[1]), path.with_suffix(".csv"))


def with_noise(y: np.ndarray, folder: Path, snr: float, rng) -> np.ndarray:
    """`y` with the noise files of `folder` (end to end, repeated) over the whole of it, at
    `snr` dB below the speech's power (measured where it is not quiet)."""
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in AUDIO_EXTS)
    if not files:
        raise UsageError(f"--noise {folder}: no audio files")
    bank = np.concatenate([read_audio(p, FSDD_SR) for p in files])
    bank = np.roll(np.tile(bank, len(y) // len(bank) + 1), int(rng.integers(len(bank))))[:len(y)]
    loud = y[np.abs(y) > 1e-3]
    gain = np.sqrt(np.mean(loud ** 2) / (np.mean(bank ** 2) + 1e-12) / 10 ** (snr / 10))
    return np.clip(y + gain * bank, -1, 1).astype(np.float32)


def steps(argv) -> int:
    p = Parser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="job", required=True)
    d = sub.add_parser("data", help="write the benchmark's recordings", allow_abbrev=False)
    d.add_argument("--fsdd", default="../shared/data/fsdd/recordings",
                   help="the FSDD's recordings folder")
    d.add_argument("--asterisk", default=ASTERISK, help="the asterisk prompts' folder")
    d.add_argument("--transcripts", default=TRANSCRIPTS, help="their core-sounds-en.txt.gz")
    d.add_argument("--noise", default="",
                   help="a folder of background noise laid over the test stream (default: none)")
    d.add_argument("--snr", type=float, default=10.0, help="speech over that noise, in dB")
    d.add_argument("--out", required=True, help="folder for the recordings")
    d.add_argument("--known", default=",".join(DIGITS[:5]),
                   help="the keywords: digit words (default: zero..four, as real.py's open set)")
    d.add_argument("--fit-speakers", default="george,jackson,lucas",
                   help="the FSDD speakers whose other digits are in stream_fit.wav; the "
                        "others' keywords and other digits are in stream_test.wav")
    args = p.parse_args(argv)
    known = tuple(w.strip() for w in args.known.split(",") if w.strip())
    if not known or set(known) - set(DIGITS):
        raise UsageError(f"--known {args.known}: some of the ten digit words")
    if not np.isfinite(args.snr):
        raise UsageError(f"--snr {args.snr}: expected dB")
    got = write_streams(Path(args.fsdd), Path(args.asterisk), Path(args.transcripts),
                        Path(args.noise) if args.noise else None, Path(args.out), known,
                        tuple(s.strip() for s in args.fit_speakers.split(",")), args.snr)
    print(f"{Path(args.out) / 'stream_fit.wav'}: {got['fit'] / 60:.1f} min of speech without "
          f"the keywords ({got['prompts']} prompts kept)")
    print(f"{Path(args.out) / 'stream_fit_keys.wav'}: {got['fit_keys_seconds'] / 60:.1f} min, "
          f"{got['fit_keys']} keywords of the fit speakers (stream_fit_keys.csv)")
    print(f"{Path(args.out) / 'stream_test.wav'}: {got['test'] / 60:.1f} min, "
          f"{got['keywords']} keywords (stream_test.csv)")
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "stream", argv)


if __name__ == "__main__":
    sys.exit(main())
