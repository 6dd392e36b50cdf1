"""Throughput: features (the original per-sample pipeline vs the batched one), each
augmentation, and an exported ensemble (ONNX Runtime vs PyTorch, cold start).

    python bench.py --work WORK [-t 224] [--clips 512] [-g 0|-1]
    python bench.py --work WORK --sections augment            # one line per augmentation
    python bench.py --work WORK --sections onnx --run RUN     # RUN's 5 folds, exported

features:
(a) seed: per clip in 2 DataLoader workers, as the original ran: librosa.load -> shift, gain,
    Gaussian noise -> melspectrogram (hop 512) -> power_to_db -> min-max -> bicubic resize
    to t x t -> 3 channels;
(b) this project making the same features: cached int16 -> batched augment -> LogMel
    hop 512 -> min-max -> resize -> 3 channels, on the -g device;
(c) this project's default: native t frames, the default augmentation (the original's three
    + pitch shift, reverberation, FilterAugment).
Then the share of a training step spent in augment + features (default mode) for resnet18
at t=64 and res2next50 at t=224. The section ends with `feature_speedup <(b)/(a)>`.
augment: samples/s of the front end (log-mel at -t) with one augmentation on for every
sample, beside the front end with none, and pitch shift beside librosa.effects.pitch_shift
per clip (the original recipe's reason to leave pitch shift out).
frontend: a training step (resnet18 at -t) with --aug seed, with the default preset, and
with the default preset done the earlier way (pitch shift resampling every clip's full
spectrogram, reverberation computed for every clip): the epoch ratios and the speed-up.
ssl: samples/s of a BYOL-A pretraining step (pretrain.py) beside a supervised step.
speech: samples/s of a training step of the speech embedding (-m speech_embedding) frozen (its
head alone learns) and fine-tuned, beside resnet18 at 64x64, and of prediction (eval, no
gradients) for each.
crops (needs no --work): training batches read from the clip cache, samples/s, on generated
data on disk: (a) 1-s clips as rows of the earlier [N, L] cache, (b) the same clips in the
flat cache with offsets (dataset.Clips), (c) random 1-s crops of 2-60 s recordings in the flat
cache (what a soundscape epoch reads); ratios (b)/(a) and (c)/(a).
onnx: RUN's folds exported with TTA; clips/s of ONNX Runtime and of PyTorch (the same
ensemble, inference.py's way) at batch 1 and 64 on the CPU; the .onnx size; the cold start
(process start to printed label, one file) of predict.py and of `inference.py --predict`.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from arg import Config
from dataset import Clips, load_noise
from runs import Work
from transform import N_VIEWS, Frontend, SpecWarp
from util import read_table, setup_logging, torch_device

HERE = Path(__file__).resolve().parent


class SeedClips(Dataset):
    """The original recipe's per-sample feature pipeline (numpy + librosa per clip)."""

    def __init__(self, paths: list[str], size: int, seed: int = 0):
        self.paths, self.size, self.seed = paths, size, seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import librosa

        rng = np.random.default_rng([self.seed, i])
        y, sr = librosa.load(self.paths[i], sr=16000)
        y = np.pad(y, (0, max(0, 16000 - len(y))))[:16000]
        s = int(rng.uniform(-0.1, 0.1) * len(y))  # shift, zero fill
        y = np.roll(y, s)
        if s > 0:
            y[:s] = 0
        elif s < 0:
            y[s:] = 0
        y = y * 10 ** (rng.uniform(-5, 5) / 20)  # gain
        y = y + rng.standard_normal(len(y)).astype(np.float32) * np.sqrt(np.mean(y ** 2)) \
            / 10 ** (rng.uniform(10, 40) / 20)  # Gaussian noise at an SNR
        m = librosa.power_to_db(librosa.feature.melspectrogram(y=y, sr=sr, n_mels=self.size))
        m = (m - m.min()) / (m.max() - m.min() + 1e-6)
        img = F.interpolate(torch.from_numpy(m)[None, None], size=(self.size, self.size),
                            mode="bicubic", align_corners=False)[0]
        return img.expand(3, -1, -1).contiguous()


def rate(fn, n: int, repeat: int = 1) -> float:
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


def bench_seed(paths, size, batch, workers) -> float:
    dl = DataLoader(SeedClips(paths, size), batch_size=batch, num_workers=workers)

    def run():
        for _ in dl:
            pass
    return rate(run, len(paths))


def bench_batched(waves, cfg: Config, batch, device, chans=1) -> float:
    front = Frontend(cfg, chans=chans, noise=load_noise(cfg.work)).to(device).train()

    def run():
        for i in range(0, len(waves), batch):
            front(torch.from_numpy(np.array(waves[i:i + batch])).to(device))
        sync(device)
    return rate(run, len(waves), repeat=2)


def step_share(cfg: Config, waves, batch, device, front=None) -> tuple[float, float, float]:
    """(features s, fwd+bwd s, share) for one training step at cfg's augmentation (through
    `front`, a Frontend, when given)."""
    import timm

    front = front or Frontend(cfg, noise=load_noise(cfg.work))
    front = front.to(device).train()
    net = timm.create_model(cfg.model, num_classes=30, in_chans=1).to(device)
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(net.parameters())
    wave = torch.from_numpy(np.array(waves[:batch])).to(device)
    y = torch.randint(0, 30, (batch,), device=device)
    amp = dict(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda")

    def feats():
        x = front(wave)
        sync(device)
        return x

    def step(x):
        with torch.autocast(**amp):
            loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)

    x = feats()
    step(x)
    t_feat, t_step = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        x = feats()
        t1 = time.perf_counter()
        step(x)
        t_feat.append(t1 - t0)
        t_step.append(time.perf_counter() - t1)
    f, s = min(t_feat), min(t_step)
    return f, s, f / (f + s)


def main(argv=None) -> int:
    from arg import config_from_args, make_parser

    p = make_parser(__doc__.split("\n")[0], "bench")
    p.add_argument("--clips", type=int, default=512, help="clips per pipeline")
    p.add_argument("--seed-workers", type=int, default=2,
                   help="DataLoader workers of the original per-sample pipeline (a)")
    p.add_argument("--skip-steps", action="store_true", help="no training-step shares")
    p.add_argument("--sections", default="features,augment",
                   help="comma-separated: features, augment, frontend, scale, onnx, ssl, "
                        "crops, speech")
    p.add_argument("--scale-sizes", default="6000,60000",
                   help="scale: training clips of each generated set")
    p.add_argument("--scale-dir", default="work/scale", help="scale: where the sets go")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    setup_logging()
    args.work, args.size, args.batch_size, args.run = cfg.work, cfg.size, cfg.batch_size, cfg.run
    sections = args.sections.split(",")
    if "scale" in sections:  # makes its own data: needs no --work
        scale_section(args)
    if "crops" in sections:  # likewise
        crops_section(args)
    if not set(sections) - {"scale", "crops"}:
        return 0
    device = torch_device(cfg.gpus)
    torch.set_num_threads(os.cpu_count() or 1)
    table = read_table(Work(args.work).train_csv)
    n = min(args.clips, len(table))
    waves, said = training_clips(args.work, n)
    paths = list(table.path[:n])
    print(f"# {n} clips of {said}, t={args.size}, batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores, "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}")

    if "features" in sections:
        features(args, waves, paths, device)
    if "augment" in sections:
        augmentations(args, waves, device)
    if "onnx" in sections:
        onnx_section(args, waves)
    if "ssl" in sections:
        ssl_section(args, waves, device)
    if "speech" in sections:
        speech_section(args, waves, device)
    if "frontend" in sections:
        frontend_section(args, waves, device)
    return 0


def training_clips(work, n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """The first n training clips as training reads them: the clip length of WORK's prep.json,
    a random crop of a longer clip (dataset.Clips.random_starts), zero-padded if shorter;
    and the length in words for the header."""
    prep = Work(work).prep()
    length = Config(sr=prep["sr"], seconds=prep["seconds"]).clip_samples
    clips, rows = Clips.of(work, "train"), np.arange(n)
    torch.manual_seed(seed)
    waves = clips.read(rows, length, clips.random_starts(rows, length))
    said = f"{length} samples ({prep['seconds']:g} s at {prep['sr']} Hz, as training reads them)"
    return waves, said


def crops_section(args, n: int = 4096, sr: int = 16000) -> None:
    """Batches of the earlier fixed-row cache beside the flat cache of clips of any length."""
    from dataset import WaveDataset

    rng = np.random.default_rng(0)
    batch = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fixed = rng.integers(-3000, 3000, (n, sr)).astype(np.int16)
        np.save(tmp / "rows_wave.npy", fixed)  # the earlier [N, L] cache
        np.save(tmp / "clips_wave.npy", fixed.reshape(-1))
        np.save(tmp / "clips_offsets.npy", np.arange(n + 1, dtype=np.int64) * sr)
        seconds = np.exp(rng.uniform(np.log(2), np.log(60), 200))
        recs = [rng.integers(-3000, 3000, int(s * sr)).astype(np.int16) for s in seconds]
        np.save(tmp / "recs_wave.npy", np.concatenate(recs))
        np.save(tmp / "recs_offsets.npy",
                np.concatenate([[0], np.cumsum([len(r) for r in recs])]).astype(np.int64))
        del fixed, recs
        rows_mm = np.load(tmp / "rows_wave.npy", mmap_mode="r")

        def old_batch(idx):  # the earlier WaveDataset: sorted rows in one memmap read
            order = np.argsort(idx)
            out = np.empty((len(idx), sr), np.int16)
            out[order] = rows_mm[idx[order]]
            return out

        flat = WaveDataset(Clips(tmp / "clips_wave.npy", tmp / "clips_offsets.npy"), None, None,
                           sr, "random")
        crops = WaveDataset(Clips(tmp / "recs_wave.npy", tmp / "recs_offsets.npy"),
                            np.repeat(np.arange(200), 20), None, sr, "random")
        epochs = {"a": (old_batch, n), "b": (flat.__getitems__, n), "c": (crops.__getitems__,
                                                                          len(crops))}
        got = {}
        for key, (read, size) in epochs.items():
            batches = [rng.permutation(size)[:batch * 32].reshape(32, batch)]

            def epoch():
                for idx in batches[0]:
                    read(idx)
            got[key] = rate(epoch, batch * 32, repeat=3)
    print(f"crops: (a) fixed rows {got['a']:,.0f} samples/s, (b) flat cache of the same 1-s "
          f"clips {got['b']:,.0f} ({got['b'] / got['a']:.2f}x), (c) random 1-s crops of 2-60 s "
          f"recordings {got['c']:,.0f} ({got['c'] / got['a']:.2f}x); batch {batch}")


def ssl_section(args, waves, device) -> None:
    """samples/s of one BYOL-A pretraining step (two views, online + target networks) beside
    one supervised step (one view), resnet18 at -t, batch -b, on the -g device."""
    from byol import BYOL
    from model import AudioClassifier

    cfg = Config(work=args.work, size=args.size, model="resnet18")
    wave = torch.from_numpy(np.array(waves[:args.batch_size])).to(device)
    y = torch.randint(0, 30, (len(wave),), device=device)
    ssl = BYOL(cfg.to_dict()).to(device).train()
    sup = AudioClassifier(cfg.to_dict(), [str(i) for i in range(30)]).to(device).train()
    opts = [torch.optim.AdamW(m.parameters()) for m in (ssl, sup)]

    def ssl_step():
        ssl.loss(wave).backward()
        opts[0].step()
        opts[0].zero_grad(set_to_none=True)
        sync(device)

    def sup_step():
        F.cross_entropy(sup(wave), y).backward()
        opts[1].step()
        opts[1].zero_grad(set_to_none=True)
        sync(device)

    a, b = rate(ssl_step, len(wave), repeat=3), rate(sup_step, len(wave), repeat=3)
    print(f"ssl: resnet18@{args.size} batch {len(wave)}: BYOL-A step {a:.1f} samples/s, "
          f"supervised step {b:.1f} samples/s -> an SSL epoch costs {b / a:.1f}x a supervised one")


def speech_section(args, waves, device) -> None:
    """samples/s of a training step (forward, backward, AdamW) and of prediction: resnet18 at
    64x64, the speech embedding with its CNN frozen, and fine-tuned; batch -b, the -g device,
    the default augmentation."""
    from model import AudioClassifier

    wave = torch.from_numpy(np.array(waves[:args.batch_size])).to(device)
    y = torch.randint(0, 30, (len(wave),), device=device)
    rows = []
    for name, cfg, frozen in (("resnet18 64x64", Config(model="resnet18", size=64), False),
                              ("speech embedding, frozen", Config(model="speech_embedding"), True),
                              ("speech embedding, fine-tuned", Config(model="speech_embedding"),
                               False)):
        model = AudioClassifier(cfg.to_dict(), [str(i) for i in range(30)]).to(device).train()
        model.net.freeze_body(frozen)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

        def step():
            F.cross_entropy(model(wave), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)

        def predict():
            with torch.no_grad():
                model(wave)
            sync(device)

        train = rate(step, len(wave), repeat=3)
        model.eval()
        rows.append((name, train, rate(predict, len(wave), repeat=3)))
    for name, train, pred in rows:
        print(f"speech: {name:30s} train step {train:7.1f} samples/s ({train / rows[0][1]:.2f}x "
              f"resnet18), predict {pred:7.1f} samples/s (batch {len(wave)})")


AUGMENTATIONS = {  # the Config settings that turn one augmentation on for every sample
    "time shift": dict(p_shift=1.0), "gain": dict(p_gain=1.0), "Gaussian noise": dict(p_noise=1.0),
    "background noise": dict(p_bg=1.0), "reverb": dict(p_reverb=1.0),
    "pitch shift": dict(p_pitch=1.0), "time stretch": dict(p_stretch=1.0),
    "FilterAugment": dict(p_filter=1.0), "mel range jitter": dict(p_mel_jitter=1.0),
    "Freq-MixStyle": dict(p_mixstyle=1.0), "SpecAugment": dict(p_spec=1.0),
}


def augmentations(args, waves, device) -> None:
    """One line per augmentation: the front end's samples/s with it on for every sample."""
    import librosa

    cfg = Config.preset("none", work=args.work, size=args.size)
    none = bench_batched(waves, cfg, args.batch_size, device)
    print(f"augment: front end alone (log-mel {args.size}x{args.size}, no augmentation) "
          f": {none:9.1f} samples/s")
    rates = {}
    for name, on in AUGMENTATIONS.items():
        r = rates[name] = bench_batched(waves, dataclasses.replace(cfg, **on), args.batch_size,
                                        device)
        print(f"augment: + {name:<18} on every sample : {r:9.1f} samples/s "
              f"({1e3 / r - 1e3 / none:+.2f} ms per sample)")
    clips = np.asarray(waves[:32], dtype=np.float32) / 32768.0
    librosa.effects.pitch_shift(clips[0], sr=cfg.sr, n_steps=1.5)  # warm-up: first-call costs
    t0 = time.perf_counter()
    for y in clips:
        librosa.effects.pitch_shift(y, sr=cfg.sr, n_steps=1.5)
    per_clip = len(clips) / (time.perf_counter() - t0)
    added = 1.0 / max(1e-9, 1.0 / rates["pitch shift"] - 1.0 / none)  # the shift alone
    print(f"augment: pitch shift alone: librosa.effects.pitch_shift per clip {per_clip:.1f} "
          f"clips/s (warm); batched here (its added cost) {added:.1f} samples/s "
          f"-> {added / per_clip:.1f}x")


class EarlierWarp(SpecWarp):
    """The earlier pitch shift, kept to measure against: every clip's full power spectrogram
    (n_fft/2 + 1 rows) resampled, the unchosen ones by 0 semitones."""

    def forward(self, power, logmel, semitones=None, factor=None):
        from transform import _coin, _uniform, resample_axis

        if self.training and self.p_pitch > 0:
            B, nf, _ = power.shape
            semis = _uniform(B, -self.pitch, self.pitch, power.device) * _coin(B, self.p_pitch,
                                                                              power.device)
            ratio = 2.0 ** (semis / 12.0)
            power = resample_axis(power, torch.arange(nf, device=power.device) / ratio[:, None], 1)
        return logmel.mel(power)


def earlier_frontend(cfg: Config) -> Frontend:
    """The default front end as it was: pitch shift by resampling (EarlierWarp) and the room
    convolution computed for every clip, the unchosen ones then put back."""
    from transform import _coin, _uniform, reverberate, room_impulses

    front = Frontend(cfg, noise=load_noise(cfg.work))
    front.warp = EarlierWarp(cfg)
    aug = front.wave_aug

    def reverb_every_clip(x):
        lo, hi = aug.reverb_rt60
        B = x.shape[0]
        rir = room_impulses(_uniform(B, lo, hi, x.device), aug.sr, int(aug.sr * hi * 1.1) + 1)
        return torch.where(_coin(B, aug.p_reverb, x.device)[:, None], reverberate(x, rir), x)

    aug.reverb = reverb_every_clip
    return front


def frontend_section(args, waves, device) -> None:
    """One training step (front end + resnet18 at -t, batch -b) with the original's three
    augmentations (--aug seed), with the default preset, and with the default preset the
    earlier way (earlier_frontend): what an epoch costs with each."""
    cfg = Config(work=args.work, size=args.size, model="resnet18")
    seed = Config.preset("seed", work=args.work, size=args.size, model="resnet18")
    fronts = {"--aug seed": (seed, None), "default": (cfg, None),
              "default, earlier way": (cfg, earlier_frontend(cfg))}
    front_s, step_s = {}, []
    for name, (c, front) in fronts.items():
        f, s, _ = step_share(c, waves, args.batch_size, device, front)
        front_s[name] = f
        step_s.append(s)
        print(f"frontend: {name:<21} front end {1e3 * f:7.1f} ms + fwd/bwd {1e3 * s:7.1f} ms "
              f"per batch of {args.batch_size}")
    # the forward/backward pass does not depend on the augmentation (same images): its
    # median over the three keeps the timing noise of one measurement out of the ratios
    s = float(np.median(step_s))
    seed, new, old = (front_s[k] + s for k in fronts)
    print(f"frontend: a default epoch costs {new / seed:.2f}x a --aug seed epoch (the earlier "
          f"way {old / seed:.2f}x; fwd/bwd {1e3 * s:.0f} ms per batch); the default front end "
          f"is {front_s['default, earlier way'] / front_s['default']:.2f}x faster than the "
          f"earlier way")


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed) resident MB of one process; (0, 0) once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0, 0.0
    kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines())
          if k in ("RssAnon", "RssFile")}
    return kb.get("RssAnon", 0) / 1024, kb.get("RssFile", 0) / 1024


def measured(cmd: list[str], every: float = 0.1) -> dict:
    """Run cmd; its wall seconds and peak resident memory, sampled every `every` s: `anon`
    (the process tree's own memory, summed over it, the figure that must not grow with the
    data) and `file` (memory-mapped cache pages the kernel may drop at any time)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    anon = file = 0.0
    while proc.poll() is None:
        rss = [rss_mb(p) for p in process_tree(proc.pid)]
        anon, file = max(anon, sum(a for a, _ in rss)), max(file, sum(f for _, f in rss))
        time.sleep(every)
    err = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"bench: {shlex.join(cmd)} exited {proc.returncode}\n{err[-2000:]}")
    return dict(seconds=time.perf_counter() - t0, anon=anon, file=file)


def scale_section(args) -> None:
    """For each size in --scale-sizes (training clips; a sixth as many again are test clips,
    as in the contest): demo.py's data, then preprocess, one epoch of train.py (resnet18 at
    64x64, batch 64, --limit-batches 40 and the whole fold-0 validation) and inference with
    TTA, each timed with its peak memory; then the growth per 10x data."""
    py, root = sys.executable, Path(args.scale_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.scale_sizes.split(",")]:
        data, work = root / f"data_{n}", root / f"work_{n}"
        speakers = max(2, round(n * 1.2 / 30))
        row = dict(clips=n)
        if not (data / "solution.csv").is_file():
            row["demo_s"] = measured([py, str(HERE / "demo.py"), "--out", str(data),
                                      "--speakers", str(speakers)])["seconds"]
        prep = measured([py, str(HERE / "preprocess.py"), "--data", str(data), "--work",
                         str(work), "--force"])
        table = read_table(Work(work).train_csv)
        n_test = len(read_table(Work(work).test_csv))
        cache = sum(f.stat().st_size for f in work.glob("*.npy")) / 2 ** 20
        train = measured([py, str(HERE / "train.py"), "--work", str(work), "-m", "resnet18",
                          "-t", "64", "-b", "64", "-e", "1", "-f", "0", "-g", "cpu", "--run",
                          "scale", "-a", "n", "--limit-batches", "40", "--no-progress"])
        n_val = int((table.fold == 0).sum())
        infer = measured([py, str(HERE / "inference.py"), "--work", str(work), "--run", "scale",
                          "-f", "1", "-a", "y", "-g", "-1", "--solution",
                          str(data / "solution.csv")])
        row.update(train_clips=len(table), test_clips=n_test, cache_mb=cache,
                   prep_s=prep["seconds"], prep_anon=prep["anon"], prep_file=prep["file"],
                   epoch_s=train["seconds"], train_anon=train["anon"],
                   train_samples_s=(40 * 64 + n_val) / train["seconds"],
                   infer_s=infer["seconds"], infer_anon=infer["anon"],
                   infer_clips_s=n_test / infer["seconds"])
        rows.append(row)
        made = f"made in {row['demo_s']:.0f} s, " if "demo_s" in row else ""
        print(f"scale: {len(table):7d} train + {n_test:6d} test clips ({made}cache "
              f"{cache:.0f} MB) | "
              f"preprocess {prep['seconds']:6.1f} s, peak {prep['anon']:6.0f} MB own + "
              f"{prep['file']:5.0f} MB mapped | train (40 batches + {n_val} val clips) "
              f"{train['seconds']:6.1f} s, peak {train['anon']:6.0f} MB | inference x{N_VIEWS} views "
              f"{infer['seconds']:6.1f} s = {row['infer_clips_s']:6.1f} clips/s, peak "
              f"{infer['anon']:6.0f} MB", flush=True)
    for a, b in zip(rows, rows[1:]):
        per10 = np.log(10) / np.log(b["train_clips"] / a["train_clips"])
        g = {k: (b[k] / a[k]) ** per10 for k in ("prep_s", "prep_anon", "cache_mb", "epoch_s",
                                                 "train_anon", "infer_s", "infer_anon")}
        print(f"scale: per 10x data ({a['train_clips']} -> {b['train_clips']}): "
              + ", ".join(f"{k} x{v:.2f}" for k, v in g.items()))


def cold_start(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def onnx_section(args, waves) -> None:
    """ONNX Runtime vs PyTorch on the CPU for RUN's folds with TTA, size and cold start."""
    import onnxruntime as ort

    from ensemble import Ensemble, load_members
    from runs import Run

    if not args.run:
        raise SystemExit("bench: --sections onnx needs --run RUN (a run with finished folds)")
    work = Path(args.work)
    folds = Work(work).folds()
    models = load_members(Run(work, args.run).checkpoints(folds))
    out = Path(tempfile.mkdtemp()) / f"{args.run}.onnx"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "export.py"), "--work",
                    str(work), "--run", args.run, "-f", ",".join(map(str, folds)), "-a", "y",
                    "--out", str(out)], check=True, capture_output=True)
    print(f"onnx: {out.name}: {len(folds)} folds x {N_VIEWS} views, "
          f"{out.stat().st_size / 1e6:.1f} MB")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    net = Ensemble([m.net for m in models], True).eval()  # the exported graph, in PyTorch
    x = (np.asarray(waves[:64]) / 32768.0).astype(np.float32)
    for batch in (1, 64):
        n = 64 if batch == 64 else 16
        rt = rate(lambda: [session.run(None, {"wave": x[i:i + batch]})
                           for i in range(0, n, batch)], n)
        with torch.no_grad():
            pt = rate(lambda: [net(torch.from_numpy(x[i:i + batch])) for i in range(0, n, batch)],
                      n)
        print(f"onnx: batch {batch:>2}: onnxruntime {rt:8.1f} clips/s, PyTorch {pt:8.1f} clips/s "
              f"-> {rt / pt:.1f}x")
    wav = Path(tempfile.mkdtemp()) / "clip.wav"
    import soundfile as sf

    sf.write(wav, x[0], models[0].cfg.sr, subtype="PCM_16")
    here = Path(__file__).resolve().parent
    a = cold_start([sys.executable, str(here / "predict.py"), str(out), str(wav)])
    b = cold_start([sys.executable, str(here / "inference.py"), "--work", str(work), "--run",
                    args.run, "-f", str(len(folds)), "-a", "y", "-g", "-1", "--predict", str(wav)])
    print(f"onnx: cold start, one file to its printed label: predict.py {a:.1f} s, "
          f"inference.py --predict {b:.1f} s -> {b / a:.1f}x")


def features(args, waves, paths, device) -> None:
    base = Config(work=args.work, size=args.size)
    seed_cfg = Config.preset("seed", work=args.work, size=args.size, resize=True, norm="minmax")
    a = bench_seed(paths, args.size, args.batch_size, args.seed_workers)
    print(f"(a) seed per-sample, librosa, {args.seed_workers} workers : {a:9.1f} samples/s")
    b = bench_batched(waves, seed_cfg, args.batch_size, device, chans=3)
    print(f"(b) batched, same seed features          : {b:9.1f} samples/s")
    c = bench_batched(waves, base, args.batch_size, device)
    print(f"(c) batched, default native {args.size}x{args.size}      : {c:9.1f} samples/s")
    if not args.skip_steps:
        for model, size, batch in (("resnet18", 64, 64), ("res2next50", 224, 16 if device.type == "cpu" else 128)):
            f, s, share = step_share(dataclasses.replace(base, model=model, size=size), waves,
                                     batch, device)
            print(f"step share {model}@{size} batch {batch}: augment+features {f * 1e3:.1f} ms, "
                  f"fwd+bwd {s * 1e3:.1f} ms -> {100 * share:.1f} % of the step")
    print(f"feature_speedup {b / a:.1f}")


if __name__ == "__main__":
    raise SystemExit(main())
