"""An exported model (export.py's ONNX graph) as a Python object, with numpy, soundfile, soxr and
onnxruntime alone: `Predictor("model.onnx")` reads its classes, rate and clip length from the
graph's metadata; `.predict_files([...])` labels files (a longer file: the mean of its
clip-length windows), `.windows(path, 1.0, 0.25)` labels a recording window by window,
`.embed_files([...])` gives the embeddings; `segments` merges windows into labelled spans.
The bundle ships it beside predict.py (its command line) and audio.py (the reader training
used).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from audio import file_windows, per_file, predict_files, read_audio, recording_windows


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
        return predict_files(paths, self.sr, self.length, self.probs, self.classes, top_k, errors)

    def label_files(self, paths, top_k: int = 3, errors=None) -> list[tuple]:
        """[(path, what the model says, [(label, probability), ...] top k)]: what it says is
        the most probable class, or the model's reject rule where it has one (decide: the best
        word at or above its threshold, else `_unknown_` or `_silence_`)."""
        good, waves, owner = file_windows(paths, self.sr, self.length, errors)
        probs = per_file(self.probs(waves), owner, len(good)) if len(good) else \
            np.zeros((0, len(self.classes)))
        return [(p, said, [(self.classes[i], float(r[i])) for i in np.argsort(r)[::-1][:top_k]])
                for p, said, r in zip(good, decide(probs, self.classes, self.threshold), probs)]

    def windows(self, path, window: float | None = None, hop: float = 0.25, notes=None,
                silence_db: float = 40.0):
        """[(start s, end s, label, probability)] for windows of `window` seconds (default:
        the clip length) every `hop` seconds; each window is padded or cut to the clip length;
        its label is the most probable class, or the model's reject rule (decide) where it has
        one.
        Windows more than `silence_db` below the loudest window are labelled "" (silence):
        the classes know no silence. A recording shorter than one window is one padded window
        (said in `notes`)."""
        y = read_audio(path, self.sr)
        starts, frames, silent, win = recording_windows(y, self.sr, self.length, window, hop,
                                                        silence_db)
        if len(y) < win and notes is not None:
            notes.append(f"{path}: {len(y) / self.sr:.2f} s, shorter than one {win / self.sr:g} s "
                         f"window: one padded window")
        probs = self.probs(frames)
        said = [self.classes.index(c) for c in decide(probs, self.classes, self.threshold)]
        return [(s / self.sr, min(len(y), s + win) / self.sr, "" if quiet else self.classes[k],
                 1.0 if quiet else float(p[k]))
                for s, k, p, quiet in zip(starts, said, probs, silent)]


def segments(rows, min_prob: float = 0.5):
    """Consecutive windows with the same label and probability >= min_prob merged:
    [(start s, end s, label, mean probability, windows)]."""
    out = []
    for start, end, label, p in rows:
        if p < min_prob or not label:
            continue
        if out and out[-1][2] == label and start <= out[-1][1]:
            s, _, _, total, n = out[-1]
            out[-1] = (s, end, label, total + p, n + 1)
        else:
            out.append((start, end, label, p, 1))
    return [(s, e, label, total / n, n) for s, e, label, total, n in out]


OPEN = ("_unknown_", "_silence_")  # the classes of what is not a word (preprocess.py --unknown)


def decide(probs: np.ndarray, classes: list[str], threshold: float | None) -> list[str]:
    """The reject rule (inference.py fits its threshold on the OOF; export.py puts it in the
    model). Without a threshold: each row's most probable class. With one: the most probable
    word where its probability reaches `threshold` (even where _unknown_ or _silence_ is more
    probable), else the more probable of _unknown_ and _silence_ (`_unknown_` where the run
    learnt neither). One definition for inference.py, predict.py and the exported bundle."""
    if threshold is None:
        return [classes[t] for t in probs.argmax(1)]
    is_open = np.isin(classes, OPEN)
    word, other = (np.where(mask, probs, -1.0) for mask in (~is_open, is_open))
    fallback = [classes[t] if is_open.any() else OPEN[0] for t in other.argmax(1)]
    return [classes[w] if p >= threshold else f for w, p, f in
            zip(word.argmax(1), word.max(1), fallback)]
