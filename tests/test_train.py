import json
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from arg import Config
from conftest import ROOT, TINY, prepared, run_script


@pytest.fixture(scope="module")
def work(demo_data, tmp_path_factory):
    return prepared(demo_data, tmp_path_factory, folds=2)


def test_all_folds_write_records(e2e):
    run, work = e2e["run"], e2e["work"]
    classes = json.loads((work / "classes.json").read_text())
    table = pd.read_csv(work / "train.csv")
    for k in (0, 1):
        fold = run / f"fold{k}"
        for name in ("best.ckpt", "last.ckpt", "history.csv", "curve.png", "oof.csv",
                     "oof_tta.csv", "config.yaml", "command.txt", "train.log", "result.json"):
            assert (fold / name).is_file(), fold / name
        hist = pd.read_csv(fold / "history.csv")
        assert list(hist.epoch) == [0] and hist.train_loss.gt(0).all()
        assert hist.val_acc.between(0, 1).all() and (hist.seconds > 0).all()
        oof = pd.read_csv(fold / "oof.csv")
        val = table[table.fold == k]
        assert sorted(oof.row) == sorted(val.row) and (oof.fold == k).all()
        assert list(oof.columns[-len(classes):]) == classes
        assert ((oof[classes].sum(axis=1) - 1).abs() < 1e-4).all()
        # the OOF is the best epoch's: its accuracy is best.ckpt's score
        acc = (oof[classes].to_numpy().argmax(1) == oof.label.map(classes.index)).mean()
        assert acc == pytest.approx(hist.val_acc.max(), abs=1e-6)
        ckpt = torch.load(fold / "best.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["hyper_parameters"]["classes"] == classes
        assert ckpt["hyper_parameters"]["config"]["model"] == "resnet18"
        assert "optimizer_states" not in ckpt or not ckpt["optimizer_states"]
        last = torch.load(fold / "last.ckpt", map_location="cpu", weights_only=False)
        assert last["optimizer_states"] and last["epoch"] == 0 and last["global_step"] > 0
    cv = json.loads((run / "cv.json").read_text())
    assert set(cv["plain"]["folds"]) == {"0", "1"} and 0 <= cv["accuracy"] <= 1
    assert cv["plain"]["clips"] == len(table)
    out = e2e["steps"]["train"].stdout
    assert "best_val_acc" in out and "CV accuracy" in out  # the summary table


def test_resume_after_kill_matches_uninterrupted_count(work):
    """Kill the process once epoch 0 is saved, resume, and end where an uninterrupted run ends."""
    epochs, batch = 3, 4  # small batches at t=128: an epoch lasts seconds, time to kill it
    cmd = [sys.executable, str(ROOT / "train.py"), "--work", str(work), "-m", "resnet18",
           "-t", "128", "-b", str(batch), "-e", str(epochs), "-f", "0", "-g", "-1", "--no-progress",
           "--aug", "none"]
    last = work / "runs" / "resnet18_128" / "fold0" / "last.ckpt"
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
    subprocess.run(cmd + ["--resume"], cwd=ROOT, check=True, capture_output=True)
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
    import train

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"FakeGPU{i}")
    with pytest.raises(train.UsageError, match=r"visible GPUs are: 0 \(FakeGPU0\), 1 \(FakeGPU1\)"):
        train.pick_device(Config(gpus="3"))
    assert train.pick_device(Config(gpus="1")) == ("gpu", [1])
    assert train.pick_device(Config(gpus="0,1", devices=2)) == ("gpu", [0, 1])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert train.pick_device(Config(gpus="0")) == ("cpu", 1)


def test_config_flags_round_trip():
    from arg import config_from_args, make_parser

    args = make_parser("x").parse_args(["-e", "3", "-b", "8", "-t", "64", "-m", "resnet18",
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
