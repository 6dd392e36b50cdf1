"""Faults where nothing failed loudly: stale run results, the speech embedding at another rate,
the audit's spectrogram, the git record of a copied project, a best score of 0, the logged lr
under layer decay, GPUs of --devices, a binary --config. Each test failed before its fix."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from arg import Config
from conftest import ROOT, TINY, hears_interrupts, prepared, run_script


@pytest.fixture(scope="module")
def work(demo_data, tmp_path_factory):
    return prepared(demo_data, tmp_path_factory, folds=2)


def test_a_fresh_run_removes_the_results_of_the_earlier_one(work):
    """Retraining a fold under an existing --run removes the run's test score, submission,
    test probabilities, CV and report made from the earlier folds: the leaderboard never pairs
    the old test accuracy with the new CV, and --pseudo never reads old probabilities."""
    run = work / "runs" / "again"
    run.mkdir(parents=True)
    stale = ["test_score.json", "test_probs.csv", "submission.csv", "cv.json", "report.html",
             "report.txt", "confusion.png", "blend.json", "again.onnx"]
    for name in stale:
        (run / name).write_text("{}")
    (run / "test_score.json").write_text(json.dumps({"accuracy": 0.99}))
    keep = run / "notes.txt"
    keep.write_text("mine")
    run_script("train.py", "--work", work, *TINY, "-f", "0", "-g", "cpu", "--run", "again",
               "--no-progress")
    assert not [n for n in stale if (run / n).exists()]  # fold 1 untrained: no new CV either
    assert keep.read_text() == "mine"
    board = run_script("report.py", "--work", work).stdout
    assert "0.99" not in board


def test_the_speech_embedding_refuses_another_rate(demo_data, tmp_path):
    w = tmp_path / "w8k"
    run_script("preprocess.py", "--data", demo_data, "--work", w, "--sr", 8000, "--n-folds", 2)
    proc = run_script("train.py", "--work", w, "-m", "speech_embedding", "-e", 1, "-f", 0,
                      "-g", "cpu", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "hears 16000 Hz audio" in proc.stderr and "WORK is at 8000 Hz" in proc.stderr
    assert not (w / "runs").exists()


def test_the_audit_draws_what_the_network_hears(work):
    """The run report's worst-clip images come from the run's own front end: 32 bands for
    the speech embedding (before: a 224-band log-mel it never saw), -t bands for a CNN."""
    from cache import Clips
    from model import AudioNet
    from results import seen_images

    waves = Clips.of(work, "train").read(np.arange(3), 16000)
    cfg = Config(model="speech_embedding")
    imgs = seen_images(cfg, waves)
    net = AudioNet(cfg, 3).eval()
    with torch.no_grad():
        heard = net.images(net.waveform(torch.from_numpy(waves)))[:, 0]
    assert imgs.shape[1] == 32 and torch.allclose(imgs, heard)
    assert seen_images(Config(model="resnet18", size=64), waves).shape[1:] == (64, 64)


def test_a_copy_inside_another_repository_records_no_commit(tmp_path):
    """versions.json names the project's own commit only where git tracks the project's
    files: a copy inside another repository is 'not a git checkout'."""
    outer = tmp_path / "outer"
    (outer / "uac").mkdir(parents=True)
    for f in ROOT.glob("*.py"):
        shutil.copy2(f, outer / "uac" / f.name)

    def git(*args):
        subprocess.run(["git", "-C", str(outer), *args], check=True, capture_output=True)

    git("init", "-q")
    (outer / "other.txt").write_text("x")
    git("add", "other.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "outer")
    said = subprocess.run([sys.executable, "-c", "import job, json; print(json.dumps("
                           "job.versions()))"], cwd=outer / "uac", capture_output=True, text=True)
    got = json.loads(said.stdout)
    assert got["commit"] == "not a git checkout" and got["uncommitted_changes"] is None
    assert json.loads(subprocess.run(
        [sys.executable, "-c", "import job, json; print(json.dumps(job.versions()))"], cwd=ROOT,
        capture_output=True, text=True).stdout)["commit"] != "not a git checkout"


def test_a_best_score_of_zero_is_zero_not_nan(monkeypatch, tmp_path):
    import fit
    import results

    callback = types.SimpleNamespace(best_model_score=torch.tensor(0.0), monitor="val_acc")
    trainer = types.SimpleNamespace(checkpoint_callback=callback, current_epoch=0,
                                    world_size=1, callbacks=[], is_global_zero=True)
    fold = types.SimpleNamespace(k=0, cfg=Config(tta="n", work=str(tmp_path)), dir=tmp_path,
                                 accelerator="cpu", teacher="", pseudo_clips=0,
                                 data=types.SimpleNamespace(table=pd.DataFrame({"fold": [0, 1]}),
                                                            classes=["a"]),
                                 run=types.SimpleNamespace(dir=tmp_path / "run"))
    monkeypatch.setattr(results, "cv_summary", lambda *a, **k: None)
    result = fit.finish_fold(fold, trainer, 0.0)
    assert result["val_acc"] == 0.0
    assert json.loads((tmp_path / "result.json").read_text())["val_acc"] == 0.0


def test_history_logs_the_schedule_s_lr_under_layer_decay(tmp_path):
    """With --layer-decay the first parameter group is the stem's, at a fraction of the lr:
    history.csv logs the schedule's (the largest group's) lr."""
    from callback import History

    groups = [{"lr": 1e-3 * 0.5 ** 4}, {"lr": 1e-3 * 0.5}, {"lr": 1e-3}]
    trainer = types.SimpleNamespace(is_global_zero=True, callback_metrics={}, current_epoch=0,
                                    optimizers=[types.SimpleNamespace(param_groups=groups)])
    History(tmp_path).on_train_epoch_end(trainer, None)
    assert pd.read_csv(tmp_path / "history.csv").lr.tolist() == [1e-3]


def test_devices_count_from_the_gpu_given(monkeypatch):
    from util import UsageError, pick_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"FakeGPU{i}")
    assert pick_device("3", 2) == ("gpu", [3, 4])  # before: GPUs 0 and 1
    assert pick_device("0,5", 2) == ("gpu", [0, 5])
    with pytest.raises(UsageError, match="names 3 GPUs for --devices 2"):
        pick_device("0,1,2", 2)
    with pytest.raises(UsageError, match="needs GPUs 7, 8; 8 visible"):
        pick_device("7", 2)


def test_a_config_that_is_not_text_is_one_line(tmp_path):
    (tmp_path / "x.gz").write_bytes(b"\x1f\x8b\x08\x00\xff\xfe\x00\x80" * 8)
    proc = run_script("train.py", "--config", tmp_path / "x.gz", check=False)
    assert proc.returncode == 2 and "not a text file" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("sig,code,said", [("SIGINT", 130, "SIGINT (^C)"),
                                           ("SIGTERM", 143, "SIGTERM")])
def test_a_signal_ends_training_with_the_shell_s_code_and_one_line(work, sig, code, said):
    """^C in train.py ended in exit 1 and silence (Lightning turns it into sys.exit(1));
    now it is 130 and one line, as SIGTERM is 143; last.ckpt stays for --resume."""
    import signal
    import time

    fold = work / "runs" / f"sig{code}" / "fold0"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--work", str(work), *TINY,
                             "-e", "50", "-f", "0", "-g", "cpu", "--run", f"sig{code}",
                             "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=hears_interrupts)
    deadline = time.time() + 300
    while not (fold / "last.ckpt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err[-2000:]
    assert f"train: fold 0 stopped by {said}; its last.ckpt is where --resume continues" in err
    assert "Traceback" not in err and (fold / "last.ckpt").is_file()
    assert not (fold / "result.json").exists()


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_all_folds_stops_every_fold_process_first(work, sig, code):
    """SIGTERM or ^C to `train.py -f all` goes on to its fold processes and waits for them:
    each leaves its last.ckpt and no result.json, and none outlives the parent (they trained
    on to their last epoch, orphaned, before)."""
    import signal
    import time

    run = work / "runs" / f"all{code}"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--work", str(work), *TINY,
                             "-e", "50", "-f", "all", "-g", "cpu,cpu", "--run", f"all{code}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, preexec_fn=hears_interrupts)
    deadline = time.time() + 300
    while not all((run / f"fold{k}" / "last.ckpt").is_file() for k in (0, 1)) and \
            time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(getattr(signal, sig))
    err = proc.communicate(timeout=180)[1]
    assert proc.returncode == code, err[-2000:]
    assert f"train: stopped by {sig}: fold(s) 0, 1 stopped, each with its last.ckpt" in err
    for k in (0, 1):
        fold = run / f"fold{k}"
        assert (fold / "last.ckpt").is_file() and not (fold / "result.json").exists()
        assert f"stopped by {sig if sig == 'SIGTERM' else 'SIGINT (^C)'}" in \
            (fold / "train.log").read_text()
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline")
                if f"all{code}".encode() in read_or_nothing(p)]  # none outlives the parent


def read_or_nothing(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended meanwhile
        return b""
