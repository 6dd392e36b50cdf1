"""Throughput and memory of today's pipeline, each figure beside its reference in one run.

Each figure is measured beside the one it is compared with, in the same run. (Earlier designs'
figures stay in docs/RESULTS.md with the commit that measured them; their code is not kept.)

    python bench.py --work WORK [-t 224] [--clips 512] [-g 0|-1]   # step, augment
    python bench.py --work WORK --sections augment,speech,ssl,codec
    python bench.py --work WORK --sections onnx --run RUN           # RUN's folds, exported
    python bench.py --sections scale,crops                         # make their own data
    python bench.py --work WORK --sections reject --run RUN --solution S.csv -a y
    python bench.py --work WORK --sections stream --run RUN --stream-minutes 1,15,60

step: a training step of AudioNet (model.AudioClassifier's network: front end, backbone,
head; its public methods) for resnet18 at 64x64 and res2next50 at -t, split into the front end
(augmentation + log-mel: AudioNet.waveform + images) and the rest, on the -g device.
augment: the front end's samples/s with one augmentation on for every sample, beside none.
codec: training batches read with --p-codec 1 (each clip through a codec and back, on the CPU
where the batch is read) beside --p-codec 0, per codec and for the default set.
speech: a training step and prediction of the speech embedding, frozen and fine-tuned, beside
resnet18 at 64x64. ssl: a BYOL-A step beside a supervised one.
pruners: a study made with --pruner none, its recorded curves replayed through each pruner
(search.replay): the epochs each would have run, the trials pruned, the best kept or not.
crops: training batches read from generated caches: 1-s clips, and random 1-s crops of 2-60 s
recordings. scale: demo data of each --scale-sizes, then preprocess, an epoch and inference,
each timed with its peak memory. onnx: RUN's folds exported with TTA: ONNX Runtime beside
PyTorch, labels alone (the `probs` output) beside labels and embedding (both outputs), and
the cold start of predict.py beside inference.py --predict. reject: the reject rule's score
on RUN (classes with _unknown_/_silence_): the best word's probability beside the energy of
the word logits, plain and temperature-scaled, each fitted on the OOF and read on the test.
stream: RUN exported; recordings of each --stream-minutes read by predict.py (a file, and piped
to `-`) and by inference.py --other-speech, each timed with its peak memory.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import soundfile as sf
import torch
import torch.nn.functional as F

from arg import Config, config_from_args, make_parser
from audio import CODECS, HOP
from byol import BYOL
from cache import Clips, Rows, training_clips
from dataset import WaveDataset, load_noise
from ensemble import Ensemble, fit_blend, load_members, predict_waves
from metrics import monitored
from model import AudioClassifier
from predictor import OPEN
from reject import compare_scores
from runs import BEST, HISTORY, OOF, Run, Work
from search import PRUNERS, replay
from submission import test_truth
from transform import N_VIEWS, tta_views
from util import UsageError, read_table, run_cli, setup_logging, torch_device

HERE = Path(__file__).resolve().parent


def rate(fn, n: int, repeat: int = 2) -> float:
    """samples/s of fn() processing n samples, best of `repeat` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def classifier(cfg: Config, device, noise=None) -> AudioClassifier:
    model = AudioClassifier(cfg.to_dict(), [str(i) for i in range(30)]).to(device).train()
    model.net.set_noise(noise)
    return model


def batch_of(waves, n: int, device) -> torch.Tensor:
    return torch.from_numpy(np.array(waves[:n])).to(device)


# ----------------------------------------------------------------------------- sections
def step_section(args, waves, device) -> None:
    """A training step of AudioNet through its public methods: front end, then the rest."""
    noise = load_noise(args.work)
    for model, size, batch in (("resnet18", 64, 64), ("res2next50", args.size,
                                                      16 if device.type == "cpu" else 128)):
        net = classifier(Config(work=args.work, model=model, size=size), device, noise).net
        opt = torch.optim.AdamW(net.parameters())
        wave, y = batch_of(waves, batch, device), torch.randint(0, 30, (batch,), device=device)

        def front():
            x = net.images(net.waveform(wave))
            sync(device)
            return x

        def rest(x):
            F.cross_entropy(net.logits(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)

        f = 1 / rate(front, 1, repeat=3)
        x = front()
        s = 1 / rate(lambda: rest(x), 1, repeat=3)
        print(f"step: {model}@{size} batch {batch}: front end {f * 1e3:.1f} ms, backbone+head "
              f"fwd/bwd {s * 1e3:.1f} ms -> the front end is {100 * f / (f + s):.1f} % of a step")


AUGMENTATIONS = {  # the Config settings that turn one augmentation on for every sample
    "time shift": dict(p_shift=1.0), "gain": dict(p_gain=1.0), "Gaussian noise": dict(p_noise=1.0),
    "background noise": dict(p_bg=1.0), "reverb": dict(p_reverb=1.0),
    "pitch shift": dict(p_pitch=1.0), "time stretch": dict(p_stretch=1.0),
    "speed": dict(p_speed=1.0), "VTLP": dict(p_vtlp=1.0), "FilterAugment": dict(p_filter=1.0),
    "mel range jitter": dict(p_mel_jitter=1.0), "Freq-MixStyle": dict(p_mixstyle=1.0),
    "SpecAugment": dict(p_spec=1.0),
}


def augment_section(args, waves, device) -> None:
    """One line per augmentation: the front end's samples/s with it on for every sample."""
    noise = load_noise(args.work)

    def front_rate(cfg):
        net = classifier(cfg, device, noise).net
        return rate(lambda: [net.images(net.waveform(batch_of(waves[i:], args.batch_size,
                                                               device)))
                             for i in range(0, len(waves), args.batch_size)], len(waves))

    base = Config.preset("none", work=args.work, size=args.size, model="resnet18")
    none = front_rate(base)
    print(f"augment: front end alone (log-mel {args.size}x{args.size}): {none:9.1f} samples/s")
    for name, on in AUGMENTATIONS.items():
        r = front_rate(Config.preset("none", work=args.work, size=args.size, model="resnet18",
                                     **on))
        print(f"augment: + {name:<18} on every sample: {r:9.1f} samples/s "
              f"({1e3 / r - 1e3 / none:+.3f} ms per sample)")


def codec_section(args, waves, device) -> None:
    """Training batches read from WORK's cache, each clip through a codec and back (what
    --p-codec costs the loader, which runs in the DataLoader workers on a GPU machine)."""
    clips = Clips.of(args.work, "train")
    rows, length = np.arange(min(len(clips), len(waves))), waves.shape[1]

    def read_rate(codecs, p):
        ds = WaveDataset(clips, rows, None, length, "start", codecs, p)
        return rate(lambda: [ds.__getitems__(list(range(i, min(i + args.batch_size, len(rows)))))
                             for i in range(0, len(rows), args.batch_size)], len(rows), repeat=1)

    plain = read_rate((), 0.0)
    print(f"codec: batches as read, no codec: {plain:9.0f} clips/s")
    for name in (*CODECS, "default set"):
        codecs = Config().codecs if name == "default set" else (name,)
        r = read_rate(codecs, 1.0)
        print(f"codec: every clip through {name:<11}: {r:9.0f} clips/s "
              f"({1e3 / r - 1e3 / plain:+.2f} ms per clip)")


def speech_section(args, waves, device) -> None:
    """A training step and prediction: resnet18 at 64x64, the speech embedding frozen and
    fine-tuned; batch -b, the default augmentation."""
    wave = batch_of(waves, args.batch_size, device)
    y = torch.randint(0, 30, (len(wave),), device=device)
    rows = []
    for name, cfg, frozen in (("resnet18 64x64", Config(model="resnet18", size=64), False),
                              ("speech embedding, frozen", Config(model="speech_embedding"), True),
                              ("speech embedding, fine-tuned", Config(model="speech_embedding"),
                               False)):
        model = classifier(cfg, device)
        model.net.freeze_body(frozen)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

        def step():
            F.cross_entropy(model(wave), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)

        def predict():
            with torch.no_grad():
                model.net.probs(wave)
            sync(device)

        train = rate(step, len(wave), repeat=3)
        model.eval()
        rows.append((name, train, rate(predict, len(wave), repeat=3)))
    for name, train, pred in rows:
        print(f"speech: {name:30s} train step {train:7.1f} samples/s ({train / rows[0][1]:.2f}x "
              f"resnet18), predict {pred:7.1f} samples/s (batch {len(wave)})")


def ssl_section(args, waves, device) -> None:
    """samples/s of one BYOL-A step (two views, online + target networks) beside one
    supervised step, resnet18 at -t, batch -b."""
    cfg = Config(work=args.work, size=args.size, model="resnet18")
    wave = batch_of(waves, args.batch_size, device)
    y = torch.randint(0, 30, (len(wave),), device=device)
    ssl, sup = BYOL(cfg.to_dict()).to(device).train(), classifier(cfg, device)
    opts = [torch.optim.AdamW(m.parameters()) for m in (ssl, sup)]

    def step(loss, opt):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    a = rate(lambda: step(ssl.loss(wave), opts[0]), len(wave), repeat=3)
    b = rate(lambda: step(F.cross_entropy(sup(wave), y), opts[1]), len(wave), repeat=3)
    print(f"ssl: resnet18@{args.size} batch {len(wave)}: BYOL-A step {a:.1f} samples/s, "
          f"supervised step {b:.1f} samples/s -> an SSL epoch costs {b / a:.1f}x a supervised one")


def crops_section(args, n: int = 4096, sr: int = 16000) -> None:
    """Training batches from generated caches: 1-s clips, random 1-s crops of recordings."""
    rng = np.random.default_rng(0)
    got = {}
    clips = Clips.from_arrays(list(rng.integers(-3000, 3000, (n, sr), dtype=np.int16)))
    recs = Clips.from_arrays([rng.integers(-3000, 3000, int(s * sr), dtype=np.int16)
                              for s in np.exp(rng.uniform(np.log(2), np.log(60), 200))])
    for key, ds in (("1-s clips", WaveDataset(clips, None, None, sr, "random")),
                    ("crops of 2-60 s recordings", WaveDataset(
                        recs, np.repeat(np.arange(200), 20), None, sr, "random"))):
        batches = rng.permutation(len(ds))[:args.batch_size * 32].reshape(32, -1)
        got[key] = rate(lambda: [ds.__getitems__(list(b)) for b in batches], batches.size,
                        repeat=3)
    a, b = got.values()
    print(f"crops: 1-s clips {a:,.0f} samples/s, random 1-s crops of 2-60 s recordings "
          f"{b:,.0f} ({b / a:.2f}x); batch {args.batch_size}")


def measured(cmd: list[str], every: float = 0.1) -> dict:
    """Run cmd; its wall seconds and peak resident memory of its process tree, sampled every
    `every` s: `anon` (its own memory) and `file` (memory-mapped cache pages)."""
    def tree(pid):
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            out.append(p)
            for task in Path(f"/proc/{p}/task").glob("*"):
                try:
                    todo += [int(c) for c in (task / "children").read_text().split()]
                except OSError:
                    pass
        return out

    def rss(pid):
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return 0.0, 0.0
        kb = {k: int(v.split()[0]) for k, v in (x.split(":", 1) for x in lines)
              if k in ("RssAnon", "RssFile")}
        return kb.get("RssAnon", 0) / 1024, kb.get("RssFile", 0) / 1024

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    anon = file = 0.0
    while proc.poll() is None:
        now = [rss(p) for p in tree(proc.pid)]
        anon, file = max(anon, sum(a for a, _ in now)), max(file, sum(f for _, f in now))
        time.sleep(every)
    if proc.returncode:
        raise SystemExit(f"bench: {shlex.join(cmd)} exited {proc.returncode}\n"
                         f"{proc.stderr.read()[-2000:]}")
    return dict(seconds=time.perf_counter() - t0, anon=anon, file=file)


def scale_section(args) -> None:
    """For each --scale-sizes (training clips; a sixth as many test clips): demo data,
    preprocess, one epoch of train.py (resnet18 64x64, batch 64, 40 batches + the fold-0
    validation) and inference with TTA, each timed with its peak memory."""
    py, root = sys.executable, Path(args.scale_dir)
    for n in [int(x) for x in args.scale_sizes.split(",")]:
        data, work = root / f"data_{n}", root / f"work_{n}"
        if not (data / "solution.csv").is_file():
            measured([py, str(HERE / "demo.py"), "--out", str(data), "--speakers",
                      str(max(2, round(n * 1.2 / 30)))])
        prep = measured([py, str(HERE / "preprocess.py"), "--data", str(data), "--work",
                         str(work), "--force"])
        n_train, n_test = (len(read_table(t)) for t in (Work(work).train_csv, Work(work).test_csv))
        train = measured([py, str(HERE / "train.py"), "--work", str(work), "-m", "resnet18",
                          "-t", "64", "-b", "64", "-e", "1", "-f", "0", "-g", "cpu", "--run",
                          "scale", "--limit-batches", "40", "--no-progress"])
        infer = measured([py, str(HERE / "inference.py"), "--work", str(work), "--run", "scale",
                          "-f", "1", "-a", "y", "-g", "-1"])
        cache = sum(f.stat().st_size for f in work.glob("*.npy")) / 2 ** 20
        print(f"scale: {n_train:7d} train + {n_test:6d} test clips (cache {cache:.0f} MB) | "
              f"preprocess {prep['seconds']:6.1f} s, peak {prep['anon']:6.0f} MB own + "
              f"{prep['file']:5.0f} MB mapped | train epoch (40 batches) "
              f"{train['seconds']:6.1f} s, peak {train['anon']:6.0f} MB | inference x{N_VIEWS} "
              f"views {infer['seconds']:6.1f} s = {n_test / infer['seconds']:6.1f} clips/s, peak "
              f"{infer['anon']:6.0f} MB", flush=True)


def onnx_section(args, waves) -> None:
    """RUN's folds exported with TTA: ONNX Runtime vs PyTorch on the CPU, labels alone vs
    labels and embedding, and the cold start of predict.py vs inference.py --predict."""
    import onnxruntime as ort

    if not args.run:
        raise SystemExit("bench: --sections onnx needs --run RUN (a run with finished folds)")
    folds = Work(args.work).folds()
    models = load_members(Run(args.work, args.run).checkpoints(folds))
    out = Path(tempfile.mkdtemp()) / f"{args.run}.onnx"
    subprocess.run([sys.executable, str(HERE / "export.py"), "--work", str(args.work), "--run",
                    args.run, "-f", ",".join(map(str, folds)), "-a", "y", "--out", str(out)],
                   check=True, capture_output=True)
    print(f"onnx: {out.name}: {len(folds)} folds x {N_VIEWS} views, "
          f"{out.stat().st_size / 1e6:.1f} MB")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    net = Ensemble([m.net for m in models], True).eval()  # the exported graph, in PyTorch
    x = (np.asarray(waves[:64]) / 32768.0).astype(np.float32)
    for batch in (1, 64):
        n = 64 if batch == 64 else 16
        rt = rate(lambda: [session.run(["probs"], {"wave": x[i:i + batch]})
                           for i in range(0, n, batch)], n)
        both = rate(lambda: [session.run(None, {"wave": x[i:i + batch]})
                             for i in range(0, n, batch)], n)
        with torch.no_grad():
            pt = rate(lambda: [net(torch.from_numpy(x[i:i + batch])) for i in range(0, n, batch)],
                      n)
        print(f"onnx: batch {batch:>2}: onnxruntime labels {rt:8.1f} clips/s (labels + "
              f"embedding {both:8.1f}: {rt / both:.2f}x), PyTorch {pt:8.1f} -> {rt / pt:.1f}x")
    wav = out.with_suffix(".wav")
    sf.write(wav, x[0], models[0].cfg.sr, subtype="PCM_16")

    def cold(cmd):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return time.perf_counter() - t0
    a = cold([sys.executable, str(HERE / "predict.py"), str(out), str(wav)])
    b = cold([sys.executable, str(HERE / "inference.py"), "--work", str(args.work), "--run",
              args.run, "-f", str(len(folds)), "-a", "y", "-g", "-1", "--predict", str(wav)])
    print(f"onnx: cold start, one file to its printed label: predict.py {a:.1f} s, "
          f"inference.py --predict {b:.1f} s -> {b / a:.1f}x")


def recorded_curve(work: str, study: str, trial, monitor: str):
    """The trial with its learning curve: the values it reported, else (a --pruner none study
    made before tune.py reported them) its first fold's `monitor` column in history.csv."""
    if not trial.intermediate_values:
        run = Run(work, f"{study}-{trial.number}")
        folds = run.folds()
        hist = read_table(run.fold(min(folds)) / HISTORY) if folds else None
        if hist is None or monitor not in hist:
            raise UsageError(f"--replay-study {study}: trial {trial.number} has no learning "
                             f"curve (no reported values, no {monitor} in {run.dir}/fold*/"
                             f"{HISTORY})")
        trial.intermediate_values = dict(enumerate(hist[monitor].astype(float)))
    return trial


def pruners_section(args) -> None:
    """--replay-study NAME's recorded curves (its complete trials, every epoch: a study made
    with --pruner none) replayed through each pruner tune.py offers (search.replay)."""
    name = args.replay_study
    db = Path(args.work).resolve() / "studies" / f"{name}.db"
    if not name or not db.is_file():
        raise UsageError(f"--sections pruners: {'no study ' + str(db) if name else 'which study?'}"
                         f" (give --replay-study NAME, a tune.py study in WORK/studies/ made "
                         f"with --pruner none)")
    try:
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}")
    except KeyError:
        raise UsageError(f"--replay-study {name}: {db} holds no study of that name") from None
    monitor = "val_" + monitored(bool(Work(args.work).prep().get("multilabel")))  # as tune.py
    done = [recorded_curve(args.work, name, t, monitor) for t in study.get_trials()
            if t.state.name == "COMPLETE"]
    if not done:
        raise UsageError(f"--replay-study {name}: no complete trial to replay")
    startup = args.replay_startup
    for pruner in PRUNERS:
        got = replay(done, pruner, startup)
        print(f"pruners: {pruner:8s} (--startup {startup}): {got['epochs']} of {got['of']} epochs,"
              f" {len(got['pruned'])} of {len(done)} trials pruned {got['pruned']}, the "
              f"best trial {'kept' if got['best_kept'] else 'PRUNED'}")


def compare_run(work, run: str, solution: str, tta: bool, device) -> tuple[pd.DataFrame, str]:
    """reject.compare_scores on a run (classes with _unknown_ or _silence_): each fold's OOF
    rows and the test set (`solution`, else test.csv's labels) through its best.ckpt, the logits
    averaged (`tta`: the TTA views), the folds' averaged on the test set; the temperature is
    the OOF log-loss's. Returns the table and a line saying what was read."""
    classes = Work(work).classes()
    if not set(OPEN) & set(classes):
        raise UsageError(f"--sections reject: the classes of {Work(work).classes_json} hold no "
                         f"{' or '.join(OPEN)}: no reject rule to compare")
    test = read_table(Work(work).test_csv)
    truth, _ = test_truth(test, solution, classes)
    if truth is None:
        raise UsageError("--sections reject reads the test set's true labels: give --solution "
                         "CSV (file_name,label)")
    folds = [d for d in Run(work, run).folds().values() if (d / OOF).is_file()]
    if not folds:
        raise UsageError(f"--sections reject: run {run} has no fold with its {OOF}")
    prep = Work(work).prep()
    length = Config(sr=prep["sr"], seconds=prep["seconds"]).clip_samples

    def logits_probs(path: Path, split: str, rows) -> tuple[np.ndarray, np.ndarray]:
        probs, _, logits = predict_waves([path], Rows(Clips.of(work, split), rows, length), tta,
                                         device, 128, f"{path.parent.name} {split}", True)
        return logits[0], probs[0]

    oofs = [read_table(d / OOF) for d in folds]
    got = [logits_probs(d / BEST, "train", o.row) for d, o in zip(folds, oofs)]
    tests = [logits_probs(d / BEST, "test", np.arange(len(test))) for d in folds]
    oof = dict(logits=np.concatenate([g[0] for g in got]), probs=np.concatenate(
        [g[1] for g in got]), truth=np.concatenate([o.label.to_numpy() for o in oofs]))
    t = fit_blend(oof["probs"][None], np.asarray([classes.index(c) for c in oof["truth"]]))[
        "temperature"]
    table = compare_scores(oof, dict(logits=np.mean([x[0] for x in tests], 0),
                                     probs=np.mean([x[1] for x in tests], 0), truth=truth),
                           classes, t)
    return table, (f"{run}, {len(folds)} fold(s), {len(tta_views(tta))} view(s); OOF "
                   f"{len(oof['truth'])} clips, test {len(test)}; temperature {t:.2f} (OOF "
                   f"log-loss)")


def reject_section(args, device) -> None:
    """Which score the reject rule should threshold, on RUN: compare_run."""
    if not args.run:
        raise UsageError("--sections reject needs --run RUN (a run with _unknown_/_silence_)")
    table, said = compare_run(Path(args.work), args.run, args.solution, args.tta == "y", device)
    print(f"reject: {said}")
    print("| " + " | ".join(table.columns) + " |\n" + "| --- " * len(table.columns) + "|")
    for row in table.itertuples(index=False):
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row)
              + " |")


def long_recording(work: str, path: Path, minutes: float, sr: int) -> Path:
    """`minutes` of WORK's test clips end to end (repeated), written to `path` in blocks."""
    clips = Clips.of(work, "test")
    with sf.SoundFile(path, "w", sr, 1, "PCM_16") as f:
        left, i = int(minutes * 60 * sr), 0
        while left > 0:
            y = clips.clip(i % len(clips))[:left]
            f.write(y)
            left, i = left - len(y), i + 1
    return path


def stream_section(args) -> None:
    """RUN exported, then recordings of each --stream-minutes read in blocks: by predict.py
    (a file, and the same audio piped to `-` as raw PCM) and by inference.py --other-speech:
    wall time and peak memory of each (their memory must not grow with the length)."""
    if not args.run:
        raise UsageError("--sections stream needs --run RUN (a run with _unknown_/_silence_)")
    folds = Work(args.work).folds()
    tmp = Path(tempfile.mkdtemp())
    model = tmp / f"{args.run}.onnx"
    subprocess.run([sys.executable, str(HERE / "export.py"), "--work", str(args.work), "--run",
                    args.run, "-f", str(len(folds)), "-a", args.tta, "--out", str(model)],
                   check=True, capture_output=True)
    sr = Work(args.work).prep()["sr"]
    for minutes in [float(m) for m in args.stream_minutes.split(",")]:
        wav = long_recording(args.work, tmp / f"talk_{minutes:g}.wav", minutes, sr)
        got = {"predict.py file": [sys.executable, str(HERE / "predict.py"), str(model),
                                   str(wav), "--hop", str(HOP)],
               "predict.py - (a pipe)": ["bash", "-c", f"cat {shlex.quote(str(wav))} | "
                                         f"{shlex.quote(sys.executable)} {HERE / 'predict.py'} "
                                         f"{shlex.quote(str(model))} -"],
               "inference.py --other-speech": [
                   sys.executable, str(HERE / "inference.py"), "--work", str(args.work), "--run",
                   args.run, "-f", str(len(folds)), "-a", args.tta, "-g", "-1", "--out",
                   str(tmp / "inference"), "--other-speech", str(wav)]}
        for name, cmd in got.items():
            m = measured(cmd)
            print(f"stream: {minutes:6g} min, {name:28s} {m['seconds']:7.1f} s "
                  f"({minutes * 60 / m['seconds']:6.1f}x real time), peak {m['anon']:6.0f} MB "
                  f"own + {m['file']:5.0f} MB mapped", flush=True)
        wav.unlink()


SECTIONS = {"step": step_section, "augment": augment_section, "codec": codec_section,
            "speech": speech_section, "ssl": ssl_section}


def steps(argv) -> int:
    p = make_parser(__doc__.split("\n")[0], "bench")
    p.add_argument("--clips", type=int, default=512, help="clips per measurement")
    p.add_argument("--sections", default="step,augment",
                   help=f"comma-separated: {', '.join(SECTIONS)}, onnx, crops, scale, pruners, "
                        f"reject, stream")
    p.add_argument("--stream-minutes", default="1,15,60",
                   help="stream: the lengths of the recordings read")
    p.add_argument("--replay-study", default="",
                   help="pruners: the tune.py study to replay (made with --pruner none)")
    p.add_argument("--replay-startup", type=int, default=4,
                   help="pruners: the --startup of tune.py to replay with")
    p.add_argument("--scale-sizes", default="6000,60000",
                   help="scale: training clips of each generated set")
    p.add_argument("--scale-dir", default="work/scale", help="scale: where the sets go")
    p.add_argument("--solution", default="", help="CSV file_name,label to score the test set")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    args.work, args.size, args.batch_size, args.run = cfg.work, cfg.size, cfg.batch_size, cfg.run
    args.tta = cfg.tta
    sections = args.sections.split(",")
    unknown = set(sections) - {*SECTIONS, "onnx", "crops", "scale", "pruners", "reject", "stream"}
    if unknown:
        p.error(f"--sections: no section {', '.join(sorted(unknown))}")
    if "scale" in sections:  # make their own data: need no --work
        scale_section(args)
    if "crops" in sections:
        crops_section(args)
    if "pruners" in sections:  # reads a study, no clips
        pruners_section(args)
    if "stream" in sections:  # runs the scripts on RUN
        stream_section(args)
    if not set(sections) - {"scale", "crops", "pruners", "stream"}:
        return 0
    device = torch_device(cfg.gpus)
    if "reject" in sections:  # reads RUN's checkpoints and clips
        reject_section(args, device)
    if not set(sections) - {"scale", "crops", "pruners", "reject", "stream"}:
        return 0
    torch.set_num_threads(os.cpu_count() or 1)
    waves, said = training_clips(args.work, min(args.clips, len(Clips.of(args.work, "train"))))
    print(f"# {len(waves)} clips of {said}, t={args.size}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}")
    for name in sections:
        if name in SECTIONS:
            SECTIONS[name](args, waves, device)
    if "onnx" in sections:
        onnx_section(args, waves)
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "bench", argv)


if __name__ == "__main__":
    raise SystemExit(main())
