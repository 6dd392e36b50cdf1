"""An exported model (export.py's ONNX graph) as a Python object, with numpy, soundfile, soxr and
onnxruntime alone: `Predictor("model.onnx")` reads its classes, rate and clip length from the
graph's metadata; `.predict_files([...])` labels files (a longer file: the mean of its
clip-length windows), `.windows(path, 1.0, 0.25)` labels a recording window by window,
`.embed_files([...])` gives the embeddings; `segments` merges windows into labelled spans.
The bundle ships it beside predict.py (its command line) and audio.py (the reader training
used).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from audio import HOP, Windows, file_windows, per_file, read_blocks


OPEN = ("_unknown_", "_silence_")  # the classes of what is not a word (preprocess.py --unknown)
NEVER = 1.0 + 1e-6  # a threshold no probability reaches: a rule that says no word at all


class ModelError(ValueError):
    """A file that is not a model export.py wrote, or lacks what was asked of it."""


class Predictor:
    """An exported ensemble: class names, sample rate and clip length from its metadata.
    ModelError when `model` is not one (a checkpoint, another ONNX graph)."""

    def __init__(self, model: str | Path, batch: int = 64, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model), opts,
                                                providers=["CPUExecutionProvider"])
            meta = self.session.get_modelmeta().custom_metadata_map
            self.classes = json.loads(meta["classes"])
            self.sr, self.length = int(meta["sample_rate"]), int(meta["clip_samples"])
            self.threshold = float(meta["reject_threshold"]) if "reject_threshold" in meta \
                else None  # the reject rule inference.py fitted (decide)
        except KeyError as e:
            raise ModelError(f"{model}: an ONNX graph without export.py's {e} metadata; "
                             f"export the run with export.py") from None
        except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, ...: not an ONNX file
            said = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
            raise ModelError(f"{model}: not an ONNX model ({said}); a run's best.ckpt is "
                             f"exported with export.py") from None
        self.outputs = {o.name for o in self.session.get_outputs()}
        self.batch = batch
        try:  # the rule over time inference.py fitted per hour, where it did (reject.json)
            self.rule = Rule.of(json.loads(meta["stream_rule"])) if "stream_rule" in meta else \
                Rule(0.5 if self.threshold is None else self.threshold)
        except (ValueError, TypeError, KeyError) as e:
            raise ModelError(f"{model}: its stream_rule metadata is damaged ({e}); export the "
                             f"run again with export.py") from None
        problem = self.rule.problem() or (None if self.threshold is None or 0 <= self.threshold
                                          <= 1 else f"threshold {self.threshold}: expected a "
                                                    f"probability in [0, 1]")
        if problem:
            raise ModelError(f"{model}: its reject rule is out of range ({problem}); fit it "
                             f"again with inference.py and export the run again")

    def _run(self, output: str, waves: np.ndarray) -> list[np.ndarray]:
        """One output of the graph (and only it: an embedding is not computed for labels) over
        `waves` in batches."""
        if output not in self.outputs:
            raise ModelError(f"this model has no {output!r} output (exported before it was "
                             f"added): export the run again with export.py")
        return [self.session.run([output], {"wave": np.ascontiguousarray(
            waves[i:i + self.batch], dtype=np.float32)})[0]
            for i in range(0, len(waves), self.batch)]

    def probs(self, waves: np.ndarray) -> np.ndarray:
        """(N, clip samples) float32 -> (N, classes) probabilities."""
        out = self._run("probs", waves)
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def embed(self, waves: np.ndarray) -> np.ndarray:
        """(N, clip samples) float32 -> (N, features): the model's `embedding` output (the
        first fold's pooled vector before its classifier)."""
        out = self._run("embedding", waves)
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def embed_files(self, paths, errors=None) -> tuple[list, np.ndarray]:
        """(readable files, their embeddings (N, features)): a file longer than the clip is
        the mean of its clip-length windows' embeddings."""
        good, waves, owner = file_windows(paths, self.sr, self.length, errors)
        return good, per_file(self.embed(waves), owner, len(good))

    def predict_files(self, paths, top_k: int = 3, errors=None):
        """[(path, [(label, probability), ...])] for the readable files among `paths`;
        (path, reason) of the others go to the `errors` list when given."""
        return [(p, top) for p, _, top in self.label_files(paths, top_k, errors)]

    def label_files(self, paths, top_k: int = 3, errors=None) -> list[tuple]:
        """label_files with this model: [(path, what it says, top k)]."""
        return label_files(paths, self.sr, self.length, self.probs, self.classes,
                           self.threshold, top_k, errors)

    def read(self, blocks, window: float | None = None, hop: float = HOP,
             silence_db: float = 40.0, loudest: float | None = None):
        """A recording or a stream given as blocks of samples at the model's rate, labelled
        as read_windows gives it."""
        return read_windows(blocks, self.probs, self.sr, self.length, window, hop, silence_db,
                            loudest)

    def rows(self, start, end, probs, silent) -> list[tuple]:
        """[(start s, end s, label, probability)] of labelled windows: the label is the model's
        reject rule (decide) where it has one, else the most probable class; "" (probability 1)
        for a silent window."""
        said = [self.classes.index(c) for c in decide(probs, self.classes, self.threshold)]
        return [(float(s), float(e), "" if quiet else self.classes[k], 1.0 if quiet else
                 float(p[k])) for s, e, k, p, quiet in zip(start, end, said, probs, silent)]

    def file_blocks(self, path, window: float | None = None, hop: float = HOP,
                    silence_db: float = 40.0):
        """A file's windows with this model (read_file_windows)."""
        return read_file_windows(path, self.probs, self.sr, self.length, window, hop,
                                 silence_db)

    def windows(self, path, window: float | None = None, hop: float = HOP, notes=None,
                silence_db: float = 40.0):
        """[(start s, end s, label, probability)] for windows of `window` seconds (default:
        the clip length) every `hop` seconds, read in blocks; each window is padded or cut to
        the clip length; labels as `rows` gives them. Windows more than `silence_db` below the
        loudest window are labelled "" (silence): the classes know no silence. A recording
        shorter than one window is one padded window (said in `notes`)."""
        out = [r for got in self.file_blocks(path, window, hop, silence_db)
               for r in self.rows(*got)]
        win = window or self.length / self.sr
        if len(out) == 1 and out[0][1] < win - 1e-9 and notes is not None:
            notes.append(f"{path}: {out[0][1]:.2f} s, shorter than one {win:g} s window: one "
                         f"padded window")
        return out




def label_files(paths, sr: int, length: int, probs, classes: list[str],
                threshold: float | None, top_k: int = 3, errors=None) -> list[tuple]:
    """[(path, what the model says, [(label, probability), ...] top k)] for the readable files
    among `paths`, each read at `sr`: a file longer than `length` samples is the mean of its
    `length`-sample windows (file_windows), a shorter one is zero-padded; what it says is the
    reject rule (decide at `threshold`; None: the most probable class). `probs` maps (N,
    length) float32 waveforms to (N, classes) probabilities; (path, reason) of the unreadable
    files go to `errors` when given. The one "label these files" path: Predictor (predict.py,
    the bundle) and `inference.py --predict` use it."""
    good, waves, owner = file_windows(paths, sr, length, errors)
    scores = per_file(probs(waves), owner, len(good)) if len(good) else \
        np.zeros((0, len(classes)))
    return [(p, said, [(classes[i], float(r[i])) for i in np.argsort(r)[::-1][:top_k]])
            for p, said, r in zip(good, decide(scores, classes, threshold), scores)]


def read_windows(blocks, probs, sr: int, length: int, window: float | None = None,
                 hop: float = HOP, silence_db: float = 40.0, loudest: float | None = None):
    """A recording or a stream given as blocks of samples at `sr`, cut into windows
    (audio.Windows) and labelled by `probs` ((N, length) float32 -> (N, classes)) as each block
    completes them: yields (start s, end s, probs (B, classes), silent (B,)) per block, in
    constant memory. The one reading of a recording: predict.py's, inference.py's."""
    cut = Windows(sr, length, window, hop, silence_db, loudest)
    for block in itertools.chain(blocks, [None]):
        got = cut.feed(block) if block is not None else cut.finish()
        if got:
            starts = np.asarray([s for s, _, _ in got])
            yield (starts / sr, np.minimum(starts + cut.win, cut.n) / sr,
                   probs(np.stack([f for _, f, _ in got])),
                   np.asarray([q for _, _, q in got], bool))


def read_file_windows(path, probs, sr: int, length: int, window: float | None = None,
                      hop: float = HOP, silence_db: float = 40.0):
    """A file's windows as read_windows yields them, read in blocks and judged silent against
    the file's loudest window (a first pass over its blocks, so that a file is judged whole);
    AudioError before anything is read. predict.py's files and inference.py's recordings."""
    loudest = Windows(sr, length, window, hop, silence_db).loudest_of(read_blocks(path, sr))
    return read_windows(read_blocks(path, sr), probs, sr, length, window, hop, silence_db,
                        loudest)


def best_word(probs: np.ndarray, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's most probable word (not _unknown_ nor _silence_) and its probability."""
    word = np.where(np.isin(classes, OPEN), -1.0, probs)
    return word.argmax(1), word.max(1)


def accepts(p, threshold: float):
    """The reject rule's one comparison: a word is said where its score reaches the threshold."""
    return np.asarray(p) >= threshold


def decide(probs: np.ndarray, classes: list[str], threshold: float | None) -> list[str]:
    """The reject rule (inference.py fits its threshold on the OOF; export.py puts it in the
    model). Without a threshold: each row's most probable class. With one: the most probable
    word where its probability reaches `threshold` (even where _unknown_ or _silence_ is more
    probable), else the more probable of _unknown_ and _silence_ (`_unknown_` where the run
    learnt neither). One definition for inference.py, predict.py and the exported bundle."""
    if threshold is None:
        return [classes[t] for t in probs.argmax(1)]
    is_open = np.isin(classes, OPEN)
    other = np.where(is_open, probs, -1.0).argmax(1)
    fallback = [classes[t] if is_open.any() else OPEN[0] for t in other]
    w, p = best_word(probs, classes)
    return [classes[i] if ok else f for i, ok, f in zip(w, accepts(p, threshold), fallback)]


# ----------------------------------------------------------------------------- over time
@dataclass(frozen=True)
class Rule:
    """The reject rule over time, as a stream is read: each window's word probabilities
    averaged over the last `smooth` windows; a word fires where that mean reaches `threshold`
    in `patience` windows in a row; a detection is the first window of a firing run (a run
    counts once), unless it falls within `refractory` seconds of the last detection. The
    windows are read every `hop` seconds (smoothing and patience count windows at that hop).
    smooth = patience = 1, refractory 0: each run of windows that decide takes for one word."""
    threshold: float
    smooth: int = 1
    patience: int = 1
    refractory: float = 1.0
    hop: float = HOP

    @classmethod
    def of(cls, stored: dict) -> "Rule":
        """The rule a dict holds (reject.json's `stream`, the model's `stream_rule`), its other
        keys left aside; KeyError or TypeError where one of its four is missing or odd. A rule
        stored without a hop (exported before the hop was fitted) was fitted at HOP."""
        return cls(**{k: stored[k] for k in ("threshold", "smooth", "patience", "refractory")},
                   hop=stored.get("hop", HOP))

    def problem(self) -> str | None:
        """What is wrong with these values (None: nothing), in the flags' words."""
        if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold <= NEVER):
            return f"threshold {self.threshold}: expected a probability in [0, 1]"
        for name, n in (("smooth", self.smooth), ("patience", self.patience)):
            if not isinstance(n, (int, np.integer)) or n < 1:
                return f"--{name} {n}: expected a number of windows, 1 or more"
        if not (isinstance(self.refractory, (int, float)) and math.isfinite(self.refractory)
                and self.refractory >= 0):
            return f"--refractory {self.refractory}: expected seconds, 0 or more"
        if not (isinstance(self.hop, (int, float)) and math.isfinite(self.hop) and self.hop > 0):
            return f"hop {self.hop}: expected seconds above 0"
        return None


RULE_FLAGS = dict(
    smooth=dict(type=int, metavar="N", help="the rule over time: each word's probability "
                "averaged over the last N windows (default: the model's fitted rule, else 1)"),
    patience=dict(type=int, metavar="N", help="a word is heard where that average reaches the "
                  "threshold in N windows in a row (default: the model's, else 1)"),
    refractory=dict(type=float, metavar="SECONDS", help="after a detection, none for this many "
                    "seconds; a run of windows that hear one word counts once (default: the "
                    "model's, else 1.0)"))  # predict.py's and inference.py's, one text each


def add_rule_flags(group) -> None:
    """--smooth, --patience and --refractory on an argparse parser or group."""
    for name, kw in RULE_FLAGS.items():
        group.add_argument(f"--{name}", default=None, **kw)


def rule_from(args, rule: Rule) -> Rule:
    """`rule` with the values the flags give (add_rule_flags; None: kept)."""
    return replace(rule, **{k: getattr(args, k) for k in RULE_FLAGS
                            if getattr(args, k) is not None})


class Detector:
    """The rule over time (Rule) applied to a stream of windows as they come, in constant
    memory: `feed(probs, silent, ends)` returns the detections those windows make
    [(end second, word, score)]. It keeps the last windows that smoothing and patience look
    back on, whether the last window fired and for which word, and the last detection's time,
    so that blocks of any size give what the whole recording gives at once. Silent windows
    hold no word. `gate` and `fire` are its two halves (the per-hour fit computes the first
    once and the second at many thresholds)."""

    def __init__(self, classes: list[str], rule: Rule):
        self.classes, self.rule = classes, rule
        self.words = np.flatnonzero(~np.isin(classes, OPEN))
        self.tail = np.zeros((0, len(self.words)))
        self.seen_word, self.seen_score = np.zeros(0, int), np.zeros(0)
        self.firing, self.last = -1, -np.inf  # the word the last window fired for; a time

    def gate(self, probs: np.ndarray, silent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(each window's word (an index into classes), its gate score: the lowest of its
        smoothed probability over the last `patience` windows where they are all that word,
        else 0)."""
        s, k = self.rule.smooth, self.rule.patience
        p = np.where(np.asarray(silent, bool)[:, None], 0.0, probs[:, self.words])
        both = np.concatenate([self.tail, p])
        at = np.arange(len(self.tail), len(both))
        total, n = np.zeros((len(at), both.shape[1])), np.zeros(len(at))
        for back in range(s):  # the same sums in the same order whatever the blocks
            ok = at - back >= 0
            total += np.where(ok[:, None], both[np.maximum(at - back, 0)], 0.0)
            n += ok
        mean = total / np.maximum(n, 1)[:, None]
        self.tail = both[max(0, len(both) - s + 1):]
        word, score = mean.argmax(1), mean.max(1, initial=0.0)
        seen_w = np.concatenate([self.seen_word, word])
        seen_s = np.concatenate([self.seen_score, score])
        gate, n = score, len(self.seen_word)
        for back in range(1, k):
            i = np.arange(n, len(seen_w)) - back
            same = (i >= 0) & (seen_w[np.maximum(i, 0)] == word)
            gate = np.where(same, np.minimum(gate, seen_s[np.maximum(i, 0)]), 0.0)
        keep = max(0, len(seen_w) - k + 1)
        self.seen_word, self.seen_score = seen_w[keep:], seen_s[keep:]
        return self.words[word], gate

    def fire(self, word: np.ndarray, gate: np.ndarray, ends: np.ndarray) -> list[tuple]:
        """The detections [(end second, word, score)] of windows whose `gate` was computed."""
        on = accepts(gate, self.rule.threshold)
        before = np.r_[self.firing, np.where(on, word, -1)[:-1]]
        runs = np.flatnonzero(on & (before != word))  # the first window of each firing run
        if len(word):
            self.firing = int(word[-1]) if on[-1] else -1
        t, wait = np.asarray(ends, float)[runs], self.rule.refractory
        out, i = [], int(np.searchsorted(t, self.last + wait))
        while i < len(runs):
            out.append((float(t[i]), self.classes[word[runs[i]]], float(gate[runs[i]])))
            self.last = t[i]
            i = int(np.searchsorted(t, self.last + wait)) if wait > 0 else i + 1
        return out

    def feed(self, probs: np.ndarray, silent: np.ndarray, ends: np.ndarray) -> list[tuple]:
        return self.fire(*self.gate(probs, silent), ends)
