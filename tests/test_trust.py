"""Files that could run code are refused on every path that loads one, and faults end with one
clear line: a full disk, a non-finite validation, a class with fewer clips than folds."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, cached, refused


class Payload:
    """What a crafted checkpoint carries: unpickling it would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(path, marker, like=None):
    """A checkpoint at `path` that looks like `like` (a real one) but carries a payload."""
    ckpt = torch.load(like, map_location="cpu", weights_only=True) if like else {}
    ckpt["hyper_parameters"] = {"config": Payload(marker), "classes": ["a", "b"]}
    torch.save(ckpt, path)


@pytest.fixture()
def planted(e2e, tmp_path):
    """A copy of the end-to-end WORK whose run's fold-0 checkpoints (best and last) carry a
    payload; returns (work, marker)."""
    work = tmp_path / "work"
    shutil.copytree(e2e["work"], work)
    marker = tmp_path / "payload_ran"
    fold = work / "runs" / "resnet18_32" / "fold0"
    for name in ("best.ckpt", "last.ckpt"):
        plant(fold / name, marker, like=fold / name)
    return work, marker


def refused_payload(marker, script, *args) -> str:
    err = refused(script, *args)
    assert not marker.exists(), "the payload ran"
    assert "refused" in err and "could run code" in err and "posix.mkdir" in err, err
    return err


def test_inference_refuses_a_checkpoint_that_could_run_code(planted):
    work, marker = planted
    assert "best.ckpt" in refused_payload(marker, "inference.py", "--work", work, "-m",
                                          "resnet18", "-t", "32", "-f", "2", "-g", "cpu")


def test_export_refuses_it(planted):
    work, marker = planted
    refused_payload(marker, "export.py", "--work", work, "--run", "resnet18_32", "-f", "2")
    assert not (work / "runs" / "resnet18_32" / "resnet18_32.onnx").exists()


def test_teacher_and_pretrained_refuse_it(planted):
    work, marker = planted
    base = ["--work", work, *TINY, "-g", "cpu", "-f", "0", "--no-progress"]
    refused_payload(marker, "train.py", *base, "--run", "student", "--teacher", "resnet18_32")
    ckpt = work / "runs" / "resnet18_32" / "fold0" / "best.ckpt"
    err = refused_payload(marker, "train.py", *base, "--run", "tuned", "--pretrained", ckpt)
    assert err.startswith("train: --pretrained")
    assert not (work / "runs" / "student").exists() and not (work / "runs" / "tuned").exists()


def test_resume_refuses_it_and_leaves_the_fold(planted):
    work, marker = planted
    fold = work / "runs" / "resnet18_32" / "fold0"
    before = {p.name: p.stat().st_mtime_ns for p in fold.iterdir()}
    assert "--resume" in refused_payload(marker, "train.py", "--config", fold / "config.yaml",
                                         "--work", work, "-f", "0", "-g", "cpu", "--resume",
                                         "--no-progress")
    assert {p.name: p.stat().st_mtime_ns for p in fold.iterdir()} == before


def test_pretrain_resume_refuses_it(planted):
    work, marker = planted
    out = work / "pretrain" / "byol"
    out.mkdir(parents=True)
    plant(out / "last.ckpt", marker)
    refused_payload(marker, "pretrain.py", "--work", work, "-m", "resnet18", "-t", "32", "-g",
                    "cpu", "--run", "byol", "--resume", "--no-progress")
    assert not (out / "encoder.pth").exists()


def test_the_project_s_own_checkpoints_load_without_pickled_code(e2e):
    """weights_only=True is no loss: every file a run writes loads with it."""
    from ensemble import load_checkpoint

    for fold in sorted(e2e["run"].glob("fold*")):
        for name in ("best.ckpt", "last.ckpt"):
            torch.load(fold / name, map_location="cpu", weights_only=True)
        assert load_checkpoint(fold / "best.ckpt").classes == sorted(
            p.name for p in (e2e["data"] / "train").iterdir() if not p.name.startswith("_"))


# ----------------------------------------------------------------------------- faults
@pytest.fixture(scope="module")
def work(e2e, tmp_path_factory):
    work = tmp_path_factory.mktemp("trust") / "work"
    shutil.copytree(e2e["work"], work, ignore=shutil.ignore_patterns("runs"))
    return work


def test_non_finite_validation_stops_the_fold_and_keeps_the_last_good_checkpoint(
        work, monkeypatch):
    """A model whose validation output turns NaN at epoch 1 (its training loss stays finite):
    a FloatingPointError naming the fold (run_cli: exit 1, one line), and epoch 0's
    checkpoints still load."""
    from arg import make_parser, parse_config
    from ensemble import load_checkpoint
    from fit import train_fold
    from job import work_settings
    from model import AudioClassifier

    forward = AudioClassifier.forward

    def nan_in_validation(self, wave, view=None):
        out = forward(self, wave, view)
        return out * float("nan") if not self.training and self.current_epoch >= 1 else out

    monkeypatch.setattr(AudioClassifier, "forward", nan_in_validation)
    cfg, _ = parse_config(make_parser("x", "train"), list(map(str, [
        "--work", work, *TINY, "-e", "3", "-f", "0", "-g", "cpu", "--run", "nan_val"])))
    with pytest.raises(FloatingPointError) as e:
        train_fold(work_settings(cfg), 0, progress=False)
    assert str(e.value).startswith("fold 0: validation predictions are not finite at epoch 1")
    fold = work / "runs" / "nan_val" / "fold0"
    assert not (fold / "result.json").exists()  # the fold is not finished
    last = torch.load(fold / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0
    model = load_checkpoint(fold / "best.ckpt")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_class_with_fewer_clips_than_folds_is_named_and_still_trains(demo_data, tmp_path):
    """Two clips of a class for 5 folds: preprocess names it and the folds without it, and a
    fold with no validation clip of it trains and writes its records."""
    import json

    import pandas as pd

    from conftest import run_script

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for d in (demo_data / "train").iterdir():
        (data / "train" / d.name).symlink_to(d)
    (data / "train" / "rare").mkdir()
    for i, clip in enumerate(sorted((demo_data / "train" / "yes").iterdir())[:2]):
        shutil.copy(clip, data / "train" / "rare" / f"rare{i}_nohash_0.wav")
    work = tmp_path / "work"
    proc = run_script("preprocess.py", "--data", data, "--work", work, "--n-folds", 5)
    said = [line for line in proc.stderr.splitlines() if "'rare'" in line]
    table = pd.read_csv(work / "train.csv")
    held = sorted(table[table.label == "rare"].fold.unique())
    without = [k for k in range(5) if k not in held]
    assert said == [f"preprocess: class 'rare': 2 clip(s) from 2 speaker(s) for 5 folds; folds "
                    f"{', '.join(map(str, without))} have no validation clip of it"
                    + (f", and fold {held[0]} trains without it" if len(held) == 1 else "")]
    assert "least populated" not in proc.stderr
    assert json.loads((work / "prep.json").read_text())["fold_gaps"] == [said[0][12:]]
    run_script("train.py", "--work", work, *TINY, "-f", without[0], "-g", "cpu", "--no-progress")
    oof = pd.read_csv(work / "runs" / "resnet18_32" / f"fold{without[0]}" / "oof.csv")
    assert "rare" in oof.columns and len(oof) == (table.fold == without[0]).sum()


def no_room_after(limit_bytes):
    """preexec_fn: writes past `limit_bytes` in any one file fail as on a full disk (EFBIG)."""
    import resource
    import signal

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_earlier_files(work):
    """The disk fills after epoch 0 is saved: the save of epoch 1 ends the run with one line
    naming the checkpoint, and epoch 0's checkpoints, history and config still load."""
    import resource
    import subprocess
    import sys
    import time

    import pandas as pd

    from conftest import ROOT

    fold = work / "runs" / "full" / "fold0"
    cmd = [sys.executable, str(ROOT / "train.py"), "--work", str(work), "-m", "resnet18",
           "-t", "64", "-b", "4", "-e", "3", "-f", "0", "-g", "cpu", "--run", "full",
           "--no-progress", "--aug", "none"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=no_room_after(resource.RLIM_INFINITY))
    deadline = time.time() + 300
    while not (fold / "last.ckpt").is_file() and time.time() < deadline:
        time.sleep(0.02)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # now the disk is full
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"train: {fold}/") and ".ckpt: no room to write it" in line, line
    assert "untouched" in line and "another --work" in line
    assert torch.load(fold / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 0
    torch.load(fold / "best.ckpt", map_location="cpu", weights_only=True)
    assert list(pd.read_csv(fold / "history.csv").epoch)[:1] == [0]
    assert not list(fold.glob(".*ckpt*")) and not (fold / "result.json").exists()


def test_disk_full_while_writing_the_cache_is_one_line(e2e, tmp_path):
    """preprocess into a WORK whose disk has room for small files only: one line naming the
    cache, exit 2, no half-written file, and the earlier cache intact."""
    import subprocess
    import sys

    import numpy as np

    from conftest import ROOT

    work = tmp_path / "work"
    shutil.copytree(e2e["work"], work, ignore=shutil.ignore_patterns("runs"))
    before = (work / "train_wave.npy").read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "preprocess.py"), "--data", str(e2e["data"]),
                           "--work", str(work), "--n-folds", "2", "--force"], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=no_room_after(200_000))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"preprocess: {work / 'train_wave.npy'}: no room to write it"), line
    assert (work / "train_wave.npy").read_bytes() == before
    assert np.load(work / "train_wave.npy").shape[0] > 0 and len(cached(work)) > 0
    assert not [p for p in work.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- installs
def test_the_lock_pins_every_requirement_and_is_what_make_installed():
    """requirements.lock names an exact version for every package of requirements*.txt, and
    the environment `make` built (.venv) holds exactly those versions."""
    import re
    import sys
    from importlib.metadata import PackageNotFoundError, version

    from conftest import ROOT

    def norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"requirements.lock: {line!r} is not name==version"
            lock[norm(name)] = pinned
    for req in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / req).read_text().splitlines():
            name = norm(re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0])
            assert not name or name in lock, f"{req}: {name} has no pinned version in the lock"
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not the .venv that make builds from the lock")
    for name, pinned in lock.items():
        try:
            assert version(name) == pinned, f"{name} {version(name)} installed, lock {pinned}"
        except PackageNotFoundError:
            pytest.fail(f"{name} is in requirements.lock but not installed")
