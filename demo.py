"""Synthesise a Speech-Commands-like dataset (espeak-ng and Kokoro-82M voices), so the
pipeline runs anywhere, nothing downloaded.

    python demo.py --out data/demo                      # the demo: 160 speakers, easy
    python demo.py --preset hard --out data/hard        # the benchmark that ranks recipes
    python demo.py --preset shift --out data/shift      # in-domain vs shifted test speakers
    python demo.py --preset real --out data/real/synth  # training speech of the real-voice
                                                        # benchmark (real.py): + 108 Kokoro speakers
    python demo.py --preset soundscape --out data/soundscape   # recordings, several labels
    python demo.py --out data/yesno --words yes,no --speakers 40
    python demo.py --out data/mine --words "alexa,smart mirror" --kokoro 54 --clip-seconds 1.5
    python demo.py --out data/wake --words "hey uac" --near-miss 20   # + OUT/near_miss/
    python demo.py --out data/wake --words "hey uac" --talk-minutes 60  # + OUT/other_speech/

What each preset speaks and how it degrades the clips, and the layouts written: synth.py.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from arg import Parser
from soundscapes import make_soundscapes
from synth import (PRESETS, WORD_LIST, WORDS, label_of, make_dataset, make_other_speech,
                   near_misses, read_word_list)
from util import run_cli
from voices import Espeak

log = logging.getLogger(__name__)


def words_problem(words: list[str]) -> str | None:
    """What is wrong with a --words list (None: nothing): a label must be a folder name, and
    two phrases must not share one."""
    if not words:
        return "--words: no words given"
    labels = [label_of(w) for w in words]
    bad = [w for w in words if any(c in w for c in '/\\:*?"<>|') or w.startswith((".", "_"))]
    if bad:
        return (f"--words: {bad[0]!r} cannot name a class folder (no / \\ : * ? \" < > |, "
                f"no leading . or _)")
    twice = sorted({w for w in labels if labels.count(w) > 1})
    if twice:
        return f"--words: the label {twice[0]} is given twice"
    return None


def steps(argv) -> int:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/demo", help="dataset folder to write")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS) + ["soundscape"],
                   help="demo: clean and quick; hard: the benchmark that tells recipes apart; "
                        "shift: test speakers, accents and channels unlike any in training")
    p.add_argument("--speakers", type=int, default=None,
                   help="number of speakers, each saying every word once (default: the preset's, "
                        "160 for demo, 420 for hard); a share of them go to test")
    p.add_argument("--words", default=",".join(WORDS),
                   help="comma-separated words or phrases to say; a phrase's label joins its "
                        "words with _ ('smart mirror' -> smart_mirror)")
    p.add_argument("--kokoro", type=int, default=None, metavar="N",
                   help="N Kokoro-82M speakers (neural TTS: its 54 voices, then two-voice mixes) "
                        "besides the espeak-ng ones (default: the preset's; make kokoro "
                        "installs its voices)")
    p.add_argument("--clip-seconds", type=float, default=None,
                   help="length of every clip made, in s (default: the preset's, 1; longer for "
                        "phrases, and preprocess.py --seconds the same)")
    p.add_argument("--accents", default=None,
                   help="comma-separated espeak-ng languages and accents the espeak speakers "
                        "read the words with (default: the preset's English accents; e.g. "
                        "en-us,de,fr: English words read by German and French voices)")
    p.add_argument("--cache", default="data/tts_cache",
                   help="where Kokoro's clips are kept: a second run (or a killed one) says only "
                        "what is missing")
    p.add_argument("--near-miss", type=int, default=0, metavar="N",
                   help="also say, by every espeak-ng training speaker, the N words of --word-list "
                        "nearest to each of --words in espeak-ng's phonemes, and the first and "
                        "last half of each keyword, under OUT/near_miss/ (preprocess.py --unknown "
                        "OUT/near_miss learns them as _unknown_); 0 = none")
    p.add_argument("--word-list", default=WORD_LIST,
                   help="the words near misses and other talk are drawn from, one a line "
                        "(default: Debian's wamerican list)")
    p.add_argument("--talk-minutes", type=int, default=0, metavar="MINUTES",
                   help="also write MINUTES one-minute recordings of other speech under "
                        "OUT/other_speech/: espeak-ng voices of 14 languages saying words of "
                        "--word-list that are none of --words, through a telephone band or a "
                        "codec (preprocess.py --unknown OUT/other_speech reads each as the "
                        "windows it holds); 0 = none")
    p.add_argument("--seed", type=int, default=0, help="same seed -> same dataset")
    p.add_argument("--jobs", type=int, default=None,
                   help="processes at work at once (default: all cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    words = [" ".join(w.split()) for w in args.words.split(",") if w.strip()]
    if words_problem(words):
        p.error(words_problem(words))
    accents = tuple(a.strip() for a in (args.accents or "").split(",") if a.strip())
    unknown = [a for a in accents if a not in Espeak.languages()]
    if args.accents is not None and (unknown or not accents):
        p.error(f"--accents {args.accents}: " + (f"espeak-ng has no {unknown[0]!r} (it has "
                                                 f"{', '.join(Espeak.languages()[:12])} ...)"
                                                 if unknown else "no accent given"))
    if args.kokoro is not None and args.kokoro < 0:
        p.error(f"--kokoro {args.kokoro}: expected 0 or more speakers")
    if args.clip_seconds is not None and not 0.1 <= args.clip_seconds <= 60:
        p.error(f"--clip-seconds {args.clip_seconds:g}: expected 0.1 to 60")
    if args.near_miss < 0:
        p.error(f"--near-miss {args.near_miss}: expected 0 or more words")
    if args.talk_minutes < 0:
        p.error(f"--talk-minutes {args.talk_minutes}: expected 0 or more minutes")
    if (args.near_miss or args.talk_minutes) and not Path(args.word_list).is_file():
        p.error(f"--word-list {args.word_list}: no such file (apt-get install wamerican, or "
                f"give --word-list FILE with one word a line)")
    word_list = read_word_list(args.word_list) if args.near_miss or args.talk_minutes else []
    table = None
    if args.near_miss:
        if args.preset == "soundscape":
            p.error("--near-miss: the soundscape preset says no keywords")
        table = near_misses(words, word_list, args.near_miss)
        short = [w for w in words if (table.keyword == label_of(w)).sum() < args.near_miss]
        if short:
            p.error(f"--near-miss {args.near_miss}: {args.word_list} holds fewer words near "
                    f"{short[0]!r} than that")
    if args.preset == "soundscape":
        counts = make_soundscapes(args.out, args.seed, args.jobs)
        log.info("soundscape dataset in %s: %d training recordings, %d test soundscapes",
                 args.out, counts["train"], counts["test"])
        return 0
    preset = PRESETS[args.preset] if not accents else dataclasses.replace(
        PRESETS[args.preset], accents=accents)
    counts = make_dataset(args.out, args.speakers, args.seed, workers=args.jobs, preset=preset,
                          words=words, kokoro=args.kokoro, seconds=args.clip_seconds,
                          cache=args.cache, near_miss=table)
    log.info("%s dataset in %s: %d train clips, %d test clips, %d speakers", args.preset,
             args.out, counts["train"], counts["test"], counts["speakers"])
    if args.talk_minutes:
        talk = make_other_speech(args.out, words, word_list, args.talk_minutes, args.seed)
        log.info("other speech: %d min under %s (%s)", len(talk), Path(args.out) / "other_speech",
                 ", ".join(f"{n} {c}" for c, n in talk.channel.value_counts().items()))
    if table is not None:
        log.info("near misses: %d clips under %s (%s); preprocess.py --unknown %s learns them "
                 "as _unknown_", counts["near_miss"], Path(args.out) / "near_miss",
                 ", ".join(f"{k}: {', '.join(g.near_miss)}" for k, g in table.groupby("keyword")),
                 Path(args.out) / "near_miss")
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "demo", argv)


if __name__ == "__main__":
    raise SystemExit(main())
