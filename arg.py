"""The one `Config` dataclass and the argparse parser built from it.

Every default lives here once. A field's metadata gives its flags, its group and a one-line
help; `make_parser(groups)` turns the groups a script needs into argparse groups, and
`config_from_args` turns parsed arguments back into a `Config`.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


def opt(default, help: str, group: str, flags: tuple[str, ...] = (), **kw):
    return field(default=default, metadata=dict(help=help, group=group, flags=flags, **kw))


@dataclass
class Config:
    # data / preprocess
    data: str = opt("data/demo", "dataset folder (contest or Speech Commands layout)", "data")
    work: str = opt("work", "work folder written by preprocess.py; runs go in WORK/runs/", "data")
    manifest: str = opt("", "CSV with path,label[,group,fold] instead of a folder layout", "data")
    folds: int = opt(5, "number of cross-validation folds", "data")
    sr: int = opt(16000, "sample rate every clip is converted to", "data")
    seconds: float = opt(1.0, "clip length: shorter clips are zero-padded, longer cropped", "data")
    seed: int = opt(2020, "one seed for folds, weights, augmentation and data order", "data")

    # features
    size: int = opt(224, "image size: mel bands and time frames (the seed's -t)", "features",
                    ("-t", "--size"))
    n_fft: int = opt(2048, "STFT size", "features")
    hop: int = opt(0, "STFT hop; 0 = chosen so the clip has exactly SIZE frames", "features")
    n_mels: int = opt(0, "mel bands; 0 = SIZE", "features")
    resize: bool = opt(False, "seed mode: hop 512 (32 frames) bicubic-resized to SIZE", "features")
    norm: str = opt("standard", "per-sample normalisation of the log-mel", "features",
                    choices=("standard", "minmax", "none"))
    top_db: float = opt(80.0, "per-sample dynamic range floor in dB (librosa's top_db)", "features")

    # augmentation (probabilities p_*, ranges)
    aug: str = opt("default", "preset: default (all below), seed (the original's shift, gain and "
                   "Gaussian noise only), none; seed/none set the other p_* to 0",
                   "augmentation", choices=("default", "seed", "none"))
    shift: float = opt(0.1, "time shift, max fraction of the clip (zero fill)", "augmentation")
    p_shift: float = opt(0.5, "time shift probability", "augmentation")
    gain_db: float = opt(5.0, "gain, max dB up or down", "augmentation")
    p_gain: float = opt(0.5, "gain probability", "augmentation")
    noise_snr: tuple = opt((10.0, 40.0), "Gaussian noise SNR range in dB", "augmentation",
                           nargs=2, type=float)
    p_noise: float = opt(0.3, "Gaussian noise probability", "augmentation")
    bg_snr: tuple = opt((0.0, 20.0), "background noise (WORK/noise.npy) SNR range in dB",
                        "augmentation", nargs=2, type=float)
    p_bg: float = opt(0.4, "background noise probability", "augmentation")
    spec_masks: int = opt(2, "SpecAugment masks on each axis", "augmentation")
    spec_width: float = opt(0.1, "SpecAugment max mask width, fraction of the axis", "augmentation")
    p_spec: float = opt(0.5, "SpecAugment probability", "augmentation")
    mixup: float = opt(0.2, "mixup Beta(alpha, alpha); 0 = off", "augmentation")
    p_mixup: float = opt(0.3, "mixup probability per batch", "augmentation")

    # model
    model: str = opt("res2next50", "any timm model name", "model", ("-m", "--model"))
    pretrained: str = opt("", "'' (from scratch), 'timm' (hub) or a local weights file", "model")
    drop_rate: float = opt(0.2, "dropout before the classifier", "model")
    drop_path_rate: float = opt(0.05, "stochastic depth", "model")
    channels_last: bool = opt(True, "channels_last memory format", "model")
    compile: bool = opt(False, "torch.compile the backbone", "model")

    # optimisation
    epochs: int = opt(30, "epochs", "optim", ("-e", "--epochs"))
    batch_size: int = opt(64, "batch size", "optim", ("-b", "--batch-size"))
    lr: float = opt(1e-3, "peak learning rate", "optim", ("-l1", "--lr"))
    min_lr: float = opt(1e-5, "final learning rate of the cosine schedule", "optim",
                        ("-l2", "--min-lr"))
    weight_decay: float = opt(1e-2, "AdamW weight decay", "optim", ("-d", "--weight-decay"))
    optimizer: str = opt("adamw", "optimiser", "optim", choices=("adamw", "adam"))
    warmup: float = opt(0.5, "linear warmup length in epochs", "optim")
    smoothing: float = opt(0.0, "label smoothing", "optim", ("-s", "--smoothing"))
    ohem: float = opt(1.0, "OHEM: keep this share of the hardest samples per batch", "optim",
                      ("-o", "--ohem"))

    # run
    fold: str = opt("0", "fold index, or 'all' (one process per -g entry)", "run", ("-f", "--fold"))
    gpus: str = opt("0", "GPU index or list (0,1,2); -1 or cpu = the CPU (cpu,cpu: two CPU workers)",
                    "run", ("-g", "--gpus"))
    precision: str = opt("16", "16 (mixed), bf16 (mixed) or 32", "run", ("-p", "--precision"),
                         choices=("16", "bf16", "32"))
    tta: str = opt("n", "also write TTA out-of-fold predictions (y/n)", "run", ("-a", "--tta"),
                   choices=("y", "n"))
    run: str = opt("", "run name; default MODEL_SIZE", "run")
    resume: bool = opt(False, "continue from the fold's last.ckpt", "run")
    devices: int = opt(1, "GPUs for one fold (DDP when > 1)", "run")
    strategy: str = opt("auto", "Lightning strategy (auto, ddp, ...)", "run")
    num_nodes: int = opt(1, "machines for DDP", "run")
    workers: int = opt(-1, "DataLoader workers; -1 = 4 on GPU, 0 on CPU", "run")
    limit_batches: float = opt(1.0, "share (or count) of batches per epoch, for quick checks",
                               "run")

    @property
    def run_name(self) -> str:
        return self.run or f"{self.model}_{self.size}"

    def __post_init__(self):
        self.noise_snr, self.bg_snr = tuple(self.noise_snr), tuple(self.bg_snr)
        if self.aug == "seed":  # the original recipe: shift 0.1, gain 5 dB, Gaussian noise
            self.p_bg = self.p_spec = self.p_mixup = 0.0
        elif self.aug == "none":
            self.p_shift = self.p_gain = self.p_noise = self.p_bg = self.p_spec = 0.0
            self.p_mixup = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a yes/no value, got {s!r}")


def make_parser(description: str, groups=("data", "features", "augmentation", "model", "optim",
                                          "run"), parser: argparse.ArgumentParser | None = None):
    """argparse parser with one group per Config group named in `groups`."""
    p = parser or argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    made = {}
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        group = meta.pop("group")
        if group not in groups:
            continue
        g = made.setdefault(group, p.add_argument_group(group))
        flags = meta.pop("flags") or (f"--{f.name.replace('_', '-')}",)
        kw = dict(default=f.default, dest=f.name, help=meta.pop("help"), **meta)
        if isinstance(f.default, bool):
            kw.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
        elif "type" not in kw:
            kw["type"] = type(f.default)
        g.add_argument(*flags, **kw)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in names})
