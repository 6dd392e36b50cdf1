"""Distributed training on the CPU, no half-built state trusted, and one-line bad requests."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, TINY, cached, refused, run_script


@pytest.fixture(scope="module")
def work(e2e, tmp_path_factory):
    work = tmp_path_factory.mktemp("robust") / "work"
    shutil.copytree(e2e["work"], work, ignore=shutil.ignore_patterns("runs"))
    return work


def fold_files(fold):
    return sorted(p.name for p in fold.iterdir() if p.name not in ("train.log", ".lock"))


def assert_oof_matches_best(work, fold_dir, k):
    """oof.csv holds every validation row once, and best.ckpt predicts it to 1e-5."""
    from ensemble import predict_waves

    classes = json.loads((work / "classes.json").read_text())
    table = pd.read_csv(work / "train.csv")
    oof = pd.read_csv(fold_dir / "oof.csv", keep_default_na=False)
    assert sorted(oof.row) == sorted(table[table.fold == k].row)  # each val row exactly once
    waves = cached(work, "train", oof.row)
    probs = predict_waves([fold_dir / "best.ckpt"], waves, False, torch.device("cpu"), 64)[0][0]
    assert np.abs(probs - oof[classes].to_numpy()).max() < 1e-5


def test_cpu_ddp_two_processes_writes_what_one_process_writes(work, e2e):
    """Two CPU processes (with EMA) write the records one process writes; the monitored score
    counts every validation row once (DistributedSampler pads with repeats), and EMA starts
    at the warm-up's end in the optimizer steps each process takes."""
    run_script("train.py", "--work", work, *TINY, "-f", "0", "-g", "cpu", "--devices", 2,
               "--run", "ddp", "--no-progress", "-a", "y", "-b", 8, "-e", 2, "--ema", 0.9,
               process=True)  # DDP starts its second rank from the process's command line
    fold = work / "runs" / "ddp" / "fold0"
    single = e2e["run"] / "fold0"
    assert fold_files(fold) == fold_files(single)
    result = json.loads((fold / "result.json").read_text())
    assert result["processes"] == 2
    assert_oof_matches_best(work, fold, 0)
    hist = pd.read_csv(fold / "history.csv")
    assert list(hist.epoch) == [0, 1] and hist.val_acc.between(0, 1).all()
    classes = json.loads((work / "classes.json").read_text())
    oof = pd.read_csv(fold / "oof.csv", keep_default_na=False)
    oof_acc = (oof[classes].to_numpy().argmax(1) == oof.label.map(classes.index)).mean()
    assert result["val_acc"] == pytest.approx(hist.val_acc.max()) == pytest.approx(oof_acc)
    n = int((pd.read_csv(work / "train.csv").fold != 0).sum())
    steps = -(-n // 2) // 8  # each process: half the rows (padded), whole batches of 8
    assert result["ema_start_step"] == max(1, round(0.5 * steps))  # --warmup 0.5 epochs
    assert result["ema_start_step"] < int(0.5 * (n // 8))  # not counted over all the rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_one_fold(work):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "train.py"), "--work", str(work), *map(str, TINY),
           "-f", "1", "-g", "cpu", "--num-nodes", "2", "--devices", "1", "--strategy", "ddp",
           "--run", "nodes", "--no-progress"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, NODE_RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    fold = work / "runs" / "nodes" / "fold1"
    assert json.loads((fold / "result.json").read_text())["processes"] == 2
    assert_oof_matches_best(work, fold, 1)


def test_killed_preprocess_is_rebuilt_not_reused(demo_data, tmp_path):
    work = tmp_path / "w"
    run_script("preprocess.py", "--data", demo_data, "--work", work, "--n-folds", 2)
    cmd = [sys.executable, str(ROOT / "preprocess.py"), "--data", str(demo_data), "--work",
           str(work), "--n-folds", "2", "--force", "--jobs", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while (work / "prep.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (work / "prep.json").exists()
    # a plain run now rebuilds instead of reusing the half-built cache
    proc = run_script("preprocess.py", "--data", demo_data, "--work", work, "--n-folds", 2)
    assert "reusing" not in proc.stderr + proc.stdout and (work / "prep.json").is_file()
    table = pd.read_csv(work / "train.csv")
    assert len(cached(work)) == len(table)
    # and train.py refuses a WORK whose build never finished
    (work / "prep.json").unlink()
    proc = run_script("train.py", "--work", work, *TINY, "-f", "0", "-g", "cpu", check=False)
    assert proc.returncode == 2 and "build was interrupted" in proc.stderr
    assert "python preprocess.py" in proc.stderr


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_resume_with_other_settings_is_refused_and_the_fold_untouched(e2e, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(e2e["work"], work)
    fold = work / "runs" / "resnet18_32" / "fold0"
    before = snapshot(fold)
    proc = run_script("train.py", "--work", work, "-m", "resnet18", "-t", 64, "-e", 3, "-b", 32,
                      "-f", 0, "-g", "cpu", "--run", "resnet18_32", "--resume", "--workers", 0,
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "size 32 -> 64" in proc.stderr and "epochs 1 -> 3" in proc.stderr
    assert "workers" in proc.stderr  # it says what may change
    assert snapshot(fold) == before


def test_second_process_on_a_locked_fold_is_refused(work):
    cmd = [sys.executable, str(ROOT / "train.py"), "--work", str(work), "-m", "resnet18",
           "-t", "128", "-b", "4", "-e", "3", "-f", "0", "-g", "cpu", "--run", "locked",
           "--no-progress", "--aug", "none"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = work / "runs" / "locked" / "fold0" / ".lock"
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        assert lock.read_text() == str(first.pid)
        second = run_script("train.py", *cmd[2:], check=False)  # refused: needs no process
        assert first.poll() is None, "the first run ended before the second could try"
        assert second.returncode == 2
        assert f"being trained by pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()


BAD_TRAIN = {  # argv after the base flags -> what the one line says
    "unknown model": (["-m", "resnet19", "-f", "0"], "did you mean resnet18"),
    "fold not in WORK": (["-f", "7"], "fold 7 is not in"),
    "fold not a number": (["-f", "x"], "expected a fold number"),
}


@pytest.mark.parametrize("case", BAD_TRAIN)
def test_bad_train_request_exits_2_with_one_line(work, case):
    argv, said = BAD_TRAIN[case]
    assert said in refused("train.py", "--work", work, *TINY, "-g", "cpu", "--no-progress", *argv)
    assert not (work / "runs" / "resnet18_32").exists()  # nothing written


def test_pretrained_file_that_is_no_weights_exits_2(work, tmp_path):
    junk = tmp_path / "weights.pth"
    junk.write_text("not a checkpoint")
    err = refused("train.py", "--work", work, *TINY, "-g", "cpu", "-f", 0, "--pretrained", junk)
    assert "--pretrained" in err and "weights.pth" in err
    assert not (work / "runs" / "resnet18_32").exists()


def test_missing_work_exits_2_in_train_and_inference(tmp_path):
    missing = tmp_path / "nowhere"
    assert "does not exist" in refused("train.py", "--work", missing, "-f", 0)
    assert "python preprocess.py" in refused("inference.py", "--work", missing)


@pytest.mark.parametrize("argv,said", [(["--norm", "bogus"], "invalid choice: 'bogus'"),
                                       (["--config", "x.yaml"], "x.yaml: no such file")])
def test_bad_flag_values_exit_2_with_one_line_and_help(argv, said):
    err = refused("train.py", *argv)
    assert said in err and "--help" in err


def test_unknown_model_as_a_user_types_it(work):
    proc = run_script("train.py", "--work", work, "-m", "res2next5O", "-f", 0, "-g", "cpu",
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("train: -m res2next5O: timm has no")
