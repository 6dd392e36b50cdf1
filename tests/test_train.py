import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import job
from arg import Config
from conftest import ROOT, TINY, prepared, refused, run_script


@pytest.fixture(scope="module")
def work(demo_data, tmp_path_factory):
    return prepared(demo_data, tmp_path_factory, folds=2)


FOLD_FILES = ("best.ckpt", "last.ckpt", "history.csv", "curve.png", "oof.csv", "oof_tta.csv",
              "config.yaml", "versions.json", "command.txt", "train.log", "result.json")


@pytest.mark.parametrize("k", [0, 1])
def test_every_fold_writes_its_records(e2e, k):
    fold = e2e["run"] / f"fold{k}"
    assert [n for n in FOLD_FILES if not (fold / n).is_file()] == []
    hist = pd.read_csv(fold / "history.csv")
    assert list(hist.epoch) == [0] and hist.train_loss.gt(0).all()
    assert hist.val_acc.between(0, 1).all() and (hist.seconds > 0).all()
    import lightning
    import timm

    made = json.loads((fold / "versions.json").read_text())  # the code and packages it ran with
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    assert made["commit"] == (head.stdout.strip() if head.returncode == 0 else
                              "not a git checkout")
    assert (made["torch"], made["lightning"], made["timm"]) == (
        torch.__version__, lightning.__version__, timm.__version__)


@pytest.mark.parametrize("k", [0, 1])
def test_oof_holds_the_fold_once_with_the_best_epochs_probabilities(e2e, k):
    fold, work = e2e["run"] / f"fold{k}", e2e["work"]
    classes = json.loads((work / "classes.json").read_text())
    table = pd.read_csv(work / "train.csv")
    oof = pd.read_csv(fold / "oof.csv")
    assert sorted(oof.row) == sorted(table[table.fold == k].row) and (oof.fold == k).all()
    assert list(oof.columns[-len(classes):]) == classes
    assert ((oof[classes].sum(axis=1) - 1).abs() < 1e-4).all()
    acc = (oof[classes].to_numpy().argmax(1) == oof.label.map(classes.index)).mean()
    assert acc == pytest.approx(pd.read_csv(fold / "history.csv").val_acc.max(), abs=1e-6)


def test_best_is_weights_and_labels_last_is_everything_resume_needs(e2e):
    fold = e2e["run"] / "fold0"
    classes = json.loads((e2e["work"] / "classes.json").read_text())
    ckpt = torch.load(fold / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["classes"] == classes
    assert ckpt["hyper_parameters"]["config"]["model"] == "resnet18"
    assert "optimizer_states" not in ckpt or not ckpt["optimizer_states"]
    last = torch.load(fold / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["optimizer_states"] and last["epoch"] == 0 and last["global_step"] > 0


def test_cv_covers_every_training_clip_and_is_printed(e2e):
    cv = json.loads((e2e["run"] / "cv.json").read_text())
    assert set(cv["plain"]["folds"]) == {"0", "1"} and 0 <= cv["accuracy"] <= 1
    assert cv["plain"]["clips"] == len(pd.read_csv(e2e["work"] / "train.csv"))
    out = e2e["steps"]["train"].stdout
    assert "best_val_acc" in out and "CV accuracy" in out  # the summary table


def test_resume_after_kill_matches_uninterrupted_count(work):
    """Kill the process once epoch 0 is saved, resume, and end where an uninterrupted run ends."""
    epochs, batch = 3, 4  # small batches: an epoch lasts seconds, time to kill it
    cmd = [sys.executable, str(ROOT / "train.py"), "--work", str(work), "-m", "resnet18",
           "-t", "64", "-b", str(batch), "-e", str(epochs), "-f", "0", "-g", "-1", "--no-progress",
           "--aug", "none"]
    last = work / "runs" / "resnet18_64" / "fold0" / "last.ckpt"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    steps_per_epoch = len(pd.read_csv(work / "train.csv").query("fold != 0")) // batch
    done = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert steps_per_epoch <= done < epochs * steps_per_epoch
    run_script("train.py", *cmd[2:], "--resume")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    hist = pd.read_csv(last.parent / "history.csv")
    assert list(hist.epoch) == list(range(epochs))
    assert ckpt["epoch"] == epochs - 1 and ckpt["global_step"] == epochs * steps_per_epoch
    assert not list(last.parent.glob(".*.ckpt"))  # no half-written checkpoint left


def test_nan_loss_stops_with_clear_message(work):
    proc = run_script("train.py", "--work", work, *TINY, "-f", "1", "-g", "-1", "--no-progress",
                      "--run", "nan", "-l1", "1e30", "-e", "3", check=False)
    assert proc.returncode == 1
    assert "loss is nan" in proc.stderr.lower() or "loss is inf" in proc.stderr.lower()
    assert "lower -l1" in proc.stderr


def test_missing_gpu_lists_the_visible_ones(monkeypatch):
    from util import UsageError, pick_device, torch_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"FakeGPU{i}")
    with pytest.raises(UsageError, match=r"visible GPUs are: 0 \(FakeGPU0\), 1 \(FakeGPU1\)"):
        pick_device("3")
    assert pick_device("1") == ("gpu", [1])
    assert pick_device("0,1", 2) == ("gpu", [0, 1])
    assert torch_device("1,0") == torch.device("cuda:1")  # one process: the first listed
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert pick_device("0") == ("cpu", 1) and torch_device("cpu") == torch.device("cpu")


def test_g_means_the_same_in_every_script():
    """-g is one Config field: train, inference and bench offer it alike; report and export
    run on the CPU and offer none; bench's old --device is gone."""
    from arg import make_parser

    for name in ("train", "inference", "bench", "pretrain"):
        parser = make_parser("x", name)
        assert parser.parse_args(["-g", "cpu"]).gpus == "cpu"
        assert parser.parse_args(["--gpus", "0,1"]).gpus == "0,1"
    for script in ("report.py", "export.py"):
        assert "unrecognized arguments: -g" in refused(script, "-g", "0")
    assert "unrecognized arguments: --device" in refused("bench.py", "--device", "cuda")


def test_config_flags_round_trip():
    from arg import config_from_args, make_parser

    args = make_parser("x", "train").parse_args(["-e", "3", "-b", "8", "-t", "64", "-m", "resnet18",
                                        "-l1", "0.01", "-l2", "0.0001", "-d", "0", "-s", "0.1",
                                        "-o", "0.7", "-f", "all", "-g", "0,1", "-p", "bf16",
                                        "-a", "y", "--aug", "seed", "--channels-last", "no"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.batch_size, cfg.size, cfg.model, cfg.lr, cfg.min_lr) == \
        (3, 8, 64, "resnet18", 0.01, 0.0001)
    assert (cfg.smoothing, cfg.ohem, cfg.fold, cfg.gpus, cfg.precision, cfg.tta) == \
        (0.1, 0.7, "all", "0,1", "bf16", "y")
    assert cfg.channels_last is False and cfg.run_name == "resnet18_64"
    assert cfg.p_bg == cfg.p_spec == cfg.p_mixup == 0 and cfg.p_noise > 0  # the seed's three
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_same_seed_same_weights(work):
    """Two runs with the same --seed end with identical weights (augmentation included)."""
    states = []
    for run in ("det_a", "det_b"):
        run_script("train.py", "--work", work, *TINY, "-f", "0", "-g", "-1", "--no-progress",
                   "--run", run, "--limit-batches", 3, "--p-bg", 1, "--p-spec", 1)
        states.append(torch.load(work / "runs" / run / "fold0" / "last.ckpt", map_location="cpu",
                                 weights_only=False)["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    run_script("train.py", "--work", work, *TINY, "-f", "0", "-g", "-1", "--no-progress",
               "--run", "det_c", "--limit-batches", 3, "--seed", 1)
    other = torch.load(work / "runs" / "det_c" / "fold0" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    assert not all(torch.equal(states[0][k], other[k]) for k in other)


def test_sample_rate_and_clip_length_come_from_work(e2e, tmp_path):
    """train.py offers no --sr/--seconds/--data/--n-folds: WORK's prep.json fixed them. A config
    file that says otherwise is refused with one line; else they are taken from prep.json."""
    import shutil

    from arg import make_parser, write_yaml

    work = tmp_path / "work"
    shutil.copytree(e2e["work"], work, ignore=shutil.ignore_patterns("runs"))
    offered = {s for a in make_parser("x", "train")._actions for s in a.option_strings}
    assert not {"--seconds", "--sr", "--data", "--manifest", "--n-folds"} & offered
    assert "unrecognized arguments: --sr" in refused("train.py", "--work", work, "--sr", "2")
    prep = json.loads((work / "prep.json").read_text())
    assert job.work_settings(Config(work=str(work), seconds=2.0, n_folds=9)).seconds == 1.0
    prep.update(seconds=0.5, sr=8000)
    (work / "prep.json").write_text(json.dumps(prep))
    got = job.work_settings(Config(work=str(work)))
    assert (got.sr, got.seconds, got.clip_samples, got.n_folds) == (8000, 0.5, 4000,
                                                                     prep["n_folds"])
    write_yaml(Config(work=str(work), seconds=2.0), tmp_path / "two.yaml")
    err = refused("train.py", "--config", tmp_path / "two.yaml", "-f", "0")
    assert "seconds 2.0 here, 0.5 there" in err and "prep.json" in err
    assert not (work / "runs").exists()


def test_a_bug_keeps_its_traceback(capsys):
    """run_cli, every script's main, turns a bad request (UsageError) into one line and 2, a
    loss gone NaN into 1, a signal into 143 / 130; anything else is a bug: its traceback."""
    from util import Stopped, UsageError, run_cli

    def raising(e):
        def main(argv):
            raise e
        return main

    with pytest.raises(ValueError, match="a bug"):
        run_cli(raising(ValueError("a bug")), "train")
    for e, code in ((UsageError("-f x: bad"), 2), (FloatingPointError("loss is nan"), 1),
                    (Stopped("fold 0 stopped by SIGTERM", 143), 143), (KeyboardInterrupt(), 130)):
        assert run_cli(raising(e), "train") == code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("train: ")


def test_bad_request_errors_are_one_type():
    from checkpoints import CheckpointError, PretrainedError
    from layouts import DataLayoutError
    from util import UsageError

    assert all(issubclass(e, UsageError) for e in (CheckpointError, PretrainedError,
                                                   DataLayoutError))


def test_fold_lock_is_released_when_training_fails(work):
    """The fold lock is released however train_fold ends: here by a non-finite loss."""
    import fit
    from arg import make_parser, parse_config
    from util import FoldLock, UsageError

    cfg, _ = parse_config(make_parser("x", "train"), ["--work", str(work), *TINY, "-g", "cpu",
                                             "--run", "boom", "-l1", "1e30", "-e", "2"])
    cfg = job.work_settings(cfg)
    fold_dir = work / "runs" / "boom" / "fold0"
    with pytest.raises(FloatingPointError):
        fit.train_fold(cfg, 0, progress=False)
    with FoldLock(fold_dir):  # free again
        with pytest.raises(UsageError, match="being trained by pid"):
            FoldLock(fold_dir).acquire()
