"""A run's fold ensemble (+ TTA views, + the log-mel front end) -> one ONNX graph, and the
offline bundle that runs it with numpy, soundfile, soxr and onnxruntime alone.

    python export.py --work WORK --run RUN -f 5 -a y --out RUN.onnx
    python export.py --work WORK --run RUN -f 5 -a y --bundle RUN_bundle   # + predict.py, README
    python export.py --work WORK --runs CNN_RUN EMB_RUN -f 5 -a y           # two runs, one graph

The graph takes float32 waveforms (batch, samples) at the trained rate and length and
returns class probabilities `probs` (batch, classes): the soft mean over folds and views,
what `inference.py -f N -a y` computes with its default soft ensemble (a hard vote is not
exported); with --weights or --blend, the runs weighted (and calibrated) as inference.py
--weights or --fit-weights did. `embedding` (batch, features): the first fold's pooled vector
before its classifier, for search, clustering or a model of your own. The class names, sample
rate, clip length, weights and temperature are in the model's metadata. torch.stft exports as the ONNX STFT operator through torch's dynamo
exporter (the TorchScript exporter refuses it: "STFT does not currently support complex
types").
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from arg import add_members, config_from_args, make_parser
from audio import HOP
from ensemble import Ensemble, WithDecision, WithEmbedding, load_members
from predictor import OPEN
from reject import stored_rule
from runs import BLEND, Run, requested_folds
from transform import N_VIEWS
from util import UsageError, atomic_write, run_cli, setup_logging, write_text

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
BUNDLED = ("predict.py", "predictor.py", "audio.py")  # the predictor, its command line and the
# reader it shares with training


def export_onnx(models: list, tta: bool, out: Path, meta: dict, weights=None,
                temperature: float = 1.0) -> Path:
    """Export the ensemble (members weighted by `weights`, calibrated by `temperature`) with a
    dynamic batch axis; metadata: classes (JSON), sample_rate, clip_samples, clip_seconds and
    `meta`. With a `reject_threshold` in `meta`, a third output `said` applies the reject rule
    per row (WithDecision: the class index, -1 for "none of these")."""
    import onnx

    cfg = models[0].cfg
    length = cfg.clip_samples
    net = WithEmbedding(Ensemble([m.net for m in models], tta, weights, temperature))
    names = ["probs", "embedding"]
    if "reject_threshold" in meta:
        classes = models[0].classes
        net = WithDecision(net, meta["reject_threshold"],
                           [i for i, c in enumerate(classes) if c in OPEN], len(classes))
        names.append("said")
    net.eval()
    example = torch.zeros(2, length)
    with torch.no_grad():
        program = torch.onnx.export(net, (example,), dynamo=True, verbose=False,
                                    input_names=["wave"],
                                    output_names=names, opset_version=18,
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
    props = dict(classes=json.dumps(models[0].classes), sample_rate=str(cfg.sr),
                 clip_samples=str(length), clip_seconds=str(cfg.seconds),
                 **{k: str(v) for k, v in meta.items()})

    def write(tmp):
        program.save(str(tmp))
        model = onnx.load(str(tmp))
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(tmp))
    atomic_write(out, write)
    return out


def write_bundle(onnx_path: Path, folder: Path, meta: dict, classes: list[str]) -> None:
    """folder/: the .onnx, BUNDLED (predict.py, predictor.py, audio.py), requirements.txt and a
    README, nothing else needed."""
    import onnxruntime
    import soundfile
    import soxr

    folder.mkdir(parents=True, exist_ok=True)
    if onnx_path.resolve() != (folder / onnx_path.name).resolve():
        shutil.copy2(onnx_path, folder / onnx_path.name)
    for script in BUNDLED:
        shutil.copy2(ROOT / script, folder / script)
    write_text(f"numpy>={np.__version__.split('.')[0]}\nsoundfile>={soundfile.__version__}\n"
               f"soxr>={soxr.__version__}\nonnxruntime>={onnxruntime.__version__}\n",
               folder / "requirements.txt")
    name = onnx_path.name
    write_text(f"""# {meta['run']}: offline keyword classifier

{len(classes)} classes, {meta['sample_rate']} Hz clips of {meta['clip_seconds']} s; an ensemble
of {meta['folds']} fold model(s){f' with {N_VIEWS} test-time views' if meta['tta'] else ''}, log-mel front end
included. Needs Python 3.9+ and the four packages of `requirements.txt` (no torch).

```bash
pip install -r requirements.txt        # offline: pip download -r requirements.txt -d wheels
                                       # elsewhere, then pip install --no-index -f wheels ...
python predict.py {name} clip.wav folder/ --top-k 3
python predict.py {name} long_recording.wav --window 1 --hop {HOP:g} --csv windows.csv
arecord -f S16_LE -r 16000 | python predict.py {name} -   # a live stream: its detections
python predict.py {name} folder/ --embed vectors.npy   # embeddings (+ vectors.csv: the paths)
```

From Python:

```python
from predictor import Predictor
p = Predictor("{name}")
p.predict_files(["clip.wav"], top_k=3)          # [(path, [(label, probability), ...]), ...]
p.windows("long.wav", window=1.0, hop={HOP:g})      # [(start_s, end_s, label, probability), ...]
files, vectors = p.embed_files(["a.wav", "b.wav"])  # the first fold's pooled vectors
```

Classes: {', '.join(classes)}
{reject_note(meta)}""", folder / "README.md")


def reject_note(meta: dict) -> str:
    """The bundle README's paragraph on the reject rule, where the model has one."""
    if "reject_threshold" not in meta:
        return ""
    return (f"\nSaying \"none of these\": the most probable word is taken when its probability "
            f"reaches {float(meta['reject_threshold']):.4f}, else `_unknown_` or `_silence_` "
            f"(the rule fitted on the validation clips for a share of other speech let in). "
            f"predict.py prints it after `->`; the graph's third output `said` gives it per clip "
            f"(a class index).\n" + stream_note(meta))


def stream_note(meta: dict) -> str:
    """The bundle README's paragraph on the rule over time, where one was fitted per hour."""
    if "stream_rule" not in meta:
        return ""
    rule = json.loads(meta["stream_rule"])
    return (f"\nIn a recording or a stream (predict.py with --window/--hop, or `-`), read in "
            f"windows every {rule.get('hop', HOP):g} s, a word is "
            f"heard where its probability, averaged over {rule['smooth']} window(s), reaches "
            f"{rule['threshold']:.3f} in {rule['patience']} window(s) in a row, at most once "
            f"per {rule['refractory']:g} s: the rule fitted on long recordings of other speech "
            f"for a number of false accepts per hour (--min-prob, --smooth, --patience, "
            f"--refractory and --hop change it).\n")


def run_weights(work: Path, runs: list[str], folds: list[int], tta: bool, args) -> tuple:
    """(a weight per run, temperature): --weights, or --blend's blend.json (inference.py
    --fit-weights), which must have been fitted for these runs, folds and views."""
    if args.blend and args.weights:
        raise UsageError("--blend takes the fitted weights: drop --weights")
    if args.blend:
        path = Run.blend(work, runs).dir / BLEND
        if not path.is_file():
            raise UsageError(f"--blend: no {path}; fit it with inference.py --work {work} --runs "
                             f"{' '.join(runs)} -f {args.folds} --fit-weights")
        blend = json.loads(path.read_text())
        if (blend.get("runs"), blend.get("folds"), blend.get("tta")) != (runs, folds, tta):
            raise UsageError(f"--blend: {path} was fitted for runs {blend.get('runs')}, folds "
                             f"{blend.get('folds')}, TTA {blend.get('tta')}: export those, or "
                             f"fit again for these")
        return np.asarray(blend["weights"], float), float(blend["temperature"])
    weights = np.asarray(args.weights or [1.0] * len(runs), float)
    if len(weights) != len(runs):
        raise UsageError(f"{len(weights)} --weights for {len(runs)} runs")
    if (weights < 0).any() or not weights.sum() > 0:
        raise UsageError(f"--weights {' '.join(map(str, args.weights))}: expected weights of 0 "
                         f"or more, not all 0")
    return weights, 1.0


def reject_meta(work: Path, runs: list[str], folds: list[int], tta: bool, weights: np.ndarray,
                temperature: float) -> dict:
    """The reject rule inference.py fitted for this ensemble (reject.stored_rule) as the
    model's `reject_threshold` (the graph's `said` output; predict.py applies it), and its rule
    over time fitted per hour where there is one (`stream_rule`: predict.py's detections); {}
    without one."""
    rule = stored_rule(work, runs, folds, tta, weights, temperature)
    if rule is None:
        return {}
    meta = dict(reject_threshold=rule["threshold"])
    if rule["stream"] is not None:
        meta["stream_rule"] = json.dumps(asdict(rule["stream"]))
    return meta


def steps(argv) -> int:
    p = make_parser(__doc__.split("\n")[0], "export")
    add_members(p)
    p.add_argument("--blend", action="store_true",
                   help="the weights and temperature inference.py --fit-weights fitted for these "
                        "runs and folds (their blend.json)")
    p.add_argument("--out", default="", help="the .onnx file (default WORK/runs/RUN/RUN.onnx)")
    p.add_argument("--bundle", default="", metavar="DIR",
                   help="also write DIR with the .onnx, predict.py, predictor.py, audio.py, "
                        "requirements.txt "
                        "and README.md")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    for name in ("onnx_ir", "onnxscript"):  # their passes log every initializer at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    work, tta = Path(cfg.work), cfg.tta == "y"
    runs = args.runs or ([cfg.run] if cfg.run else [])
    if not runs:
        raise UsageError("--run RUN (or --runs A B): which run to export (a folder of "
                         "WORK/runs)")
    folds = requested_folds(work, args.folds)
    weights, temperature = run_weights(work, runs, folds, tta, args)
    models = load_members([p for r in runs for p in Run(work, r).checkpoints(folds)])
    name = Run.blend(work, runs).name
    out = Path(args.out) if args.out else Run.blend(work, runs).dir / f"{name}.onnx"
    meta = dict(run=name, folds=len(folds), tta=tta, weights=json.dumps(weights.tolist()),
                temperature=temperature,
                **reject_meta(work, runs, folds, tta, weights, temperature))
    export_onnx(models, tta, out, meta, np.repeat(weights, len(folds)), temperature)
    first = models[0].cfg
    log.info("export: %s (%.1f MB): %d fold(s)%s, input wave (batch, %d) at %d Hz",
             out, out.stat().st_size / 1e6, len(folds), f" x {N_VIEWS} views" if tta else "",
             first.clip_samples, first.sr)
    if args.bundle:
        write_bundle(out, Path(args.bundle), dict(meta, sample_rate=first.sr,
                                                  clip_seconds=first.seconds), models[0].classes)
        log.info("bundle: %s (model, %s, requirements.txt, README.md)", args.bundle,
                 ", ".join(BUNDLED))
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "export", argv)


if __name__ == "__main__":
    raise SystemExit(main())
