import json
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from conftest import cached, run_script
from ensemble import ensemble
from runs import parse_folds
from checkpoints import CheckpointError
from ensemble import check_compatible, load_checkpoint, predict_waves
from transform import tta_views


def test_soft_and_hard_voting_on_hand_made_probs():
    # 3 members, 2 clips, 3 classes
    p = np.array([[[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]],
                  [[0.1, 0.5, 0.4], [0.1, 0.45, 0.45]],
                  [[0.2, 0.45, 0.35], [0.2, 0.3, 0.5]]])
    soft_pred, soft = ensemble(p, "soft")
    assert np.allclose(soft, p.mean(0)) and list(soft_pred) == [1, 2]
    hard_pred, votes = ensemble(p, "hard")
    # clip 0: votes 0, 1, 1 -> class 1. clip 1: member 1 is tied between classes 1 and 2 at .45
    # and argmax picks 1, so the votes are 0, 1, 2: a three-way tie that the mean probability
    # breaks (class 2 at .400 over class 1 at .367)
    assert list(votes[0]) == pytest.approx([1 / 3, 2 / 3, 0])
    assert list(votes[1]) == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert list(hard_pred) == [1, 2]
    # a three-way tie is broken by the mean probability
    tie = np.array([[[0.5, 0.3, 0.2]], [[0.1, 0.6, 0.3]], [[0.2, 0.3, 0.5]]])
    assert ensemble(tie, "hard")[0][0] == np.argmax(tie.mean(0)[0]) == 1
    # soft and hard can disagree: one confident member outweighs two lukewarm ones
    dis = np.array([[[0.98, 0.02]], [[0.45, 0.55]], [[0.45, 0.55]]])
    assert ensemble(dis, "soft")[0][0] == 0 and ensemble(dis, "hard")[0][0] == 1
    # weights count: the first member alone decides when it weighs more than the others
    assert ensemble(dis, "hard", [3, 1, 1])[0][0] == 0


def test_parse_folds_keeps_the_seed_meaning():
    assert parse_folds("5") == [0, 1, 2, 3, 4]
    assert parse_folds("1") == [0]
    assert parse_folds("0,2") == [0, 2] and parse_folds("3,") == [3]


def test_submission_has_every_sample_row_in_order(e2e):
    sub_sample = pd.read_csv(e2e["data"] / "submission.csv")
    sub = pd.read_csv(e2e["run"] / "submission.csv")
    classes = json.loads((e2e["work"] / "classes.json").read_text())
    assert list(sub.columns) == ["file_name", "label"]
    assert list(sub.file_name) == list(sub_sample.file_name)
    assert sub.label.isin(classes).all()
    probs = pd.read_csv(e2e["run"] / "test_probs.csv")
    assert list(probs.file_name) == list(sub.file_name)
    assert list(probs.columns[1:]) == classes
    assert (probs[classes].to_numpy().argmax(1) == sub.label.map(classes.index)).all()


def test_tta_views_differ_and_their_mean_is_used(e2e):
    model = load_checkpoint(e2e["run"] / "fold0" / "best.ckpt")
    waves = torch.from_numpy(cached(e2e["work"], "test", range(16)))
    per_view = model.net.predict_views(waves, tta_views(True))
    assert per_view.shape == (5, 16, len(model.classes))
    assert not torch.allclose(per_view[1], per_view[0])  # a shifted view changes the output
    assert not torch.allclose(per_view[2], per_view[0])
    probs, _ = predict_waves([e2e["run"] / "fold0" / "best.ckpt"], waves.numpy(), True,
                             torch.device("cpu"), 8)
    assert np.allclose(probs[0], per_view.mean(0).numpy(), atol=1e-5)
    plain, _ = predict_waves([e2e["run"] / "fold0" / "best.ckpt"], waves.numpy(), False,
                             torch.device("cpu"), 8)
    assert np.allclose(plain[0], per_view[0].numpy(), atol=1e-5)


def test_mismatched_checkpoints_are_refused(e2e, tmp_path):
    src = e2e["run"] / "fold0" / "best.ckpt"
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["config"]["seconds"] = 2.0
    torch.save(ckpt, tmp_path / "seconds.ckpt")
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["config"]["norm"] = "minmax"  # another front end: blends
    torch.save(ckpt, tmp_path / "norm.ckpt")
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["classes"] = list(reversed(ckpt["hyper_parameters"]["classes"]))
    torch.save(ckpt, tmp_path / "classes.ckpt")
    ref = load_checkpoint(src)
    check_compatible(ref, src, load_checkpoint(tmp_path / "norm.ckpt"), tmp_path / "norm.ckpt")
    for name, match in (("seconds.ckpt", "seconds 1.0 vs 2.0"), ("classes.ckpt", "class lists")):
        other = load_checkpoint(tmp_path / name)
        with pytest.raises(CheckpointError, match=match) as err:
            check_compatible(ref, src, other, tmp_path / name)
        assert str(src) in str(err.value) and name in str(err.value)


def test_missing_and_unfinished_checkpoints_named_with_train_command(e2e, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(e2e["work"], work, ignore=shutil.ignore_patterns("last.ckpt"))
    run = work / "runs" / "resnet18_32"
    (run / "fold1" / "best.ckpt").unlink()
    (run / "fold0" / "result.json").unlink()  # as if fold 0 had been killed mid-training
    before = (run / "submission.csv").stat().st_mtime_ns
    proc = run_script("inference.py", "--work", work, "-m", "resnet18", "-t", 32, "-f", 2,
                      check=False)
    assert proc.returncode == 2
    assert "2 of 2 fold checkpoints are missing or unfinished" in proc.stderr
    assert "fold0/best.ckpt: unfinished" in proc.stderr and "fold1/best.ckpt: missing" in proc.stderr
    assert "python train.py" in proc.stderr and "-f 1" in proc.stderr and "--resume" in proc.stderr
    assert (run / "submission.csv").stat().st_mtime_ns == before  # nothing written
    proc = run_script("inference.py", "--work", work, "-m", "resnet18", "-t", 32, "-f", 4,
                      check=False)
    assert proc.returncode == 2 and "has folds 0, 1" in proc.stderr


def test_predict_wav_and_flac_of_another_rate(e2e, tmp_path):
    src = sorted((e2e["data"] / "test").glob("*.wav"))[0]
    y, sr = sf.read(src)
    shutil.copy(src, tmp_path / "a.wav")
    import librosa

    sf.write(tmp_path / "b.flac", librosa.resample(y, orig_sr=sr, target_sr=44100), 44100)
    (tmp_path / "c.wav").write_text("not audio")
    proc = run_script("inference.py", "--work", e2e["work"], "-m", "resnet18", "-t", 32, "-f", 2,
                      "-a", "y", "--predict", tmp_path / "a.wav", tmp_path / "b.flac",
                      tmp_path / "c.wav", check=False)
    assert proc.returncode == 1  # one file could not be read
    assert "c.wav: skipped" in proc.stderr
    lines = {l.split(":")[0].split("/")[-1]: l for l in proc.stdout.splitlines() if ": " in l}
    assert set(lines) == {"a.wav", "b.flac"}
    for line in lines.values():
        parts = line.split(": ", 1)[1].split()
        assert len(parts) == 6 and all(0 <= float(p) <= 1 for p in parts[1::2])
    # the same clip at another rate gets the same top label
    assert lines["a.wav"].split()[1] == lines["b.flac"].split()[1]


def test_unreadable_test_row_still_gets_a_label(e2e, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(e2e["work"], work, ignore=shutil.ignore_patterns("last.ckpt"))
    test = pd.read_csv(work / "test.csv", keep_default_na=False)
    test.loc[3, "status"] = "not readable audio (Format not recognised)"
    test.to_csv(work / "test.csv", index=False)
    proc = run_script("inference.py", "--work", work, "-m", "resnet18", "-t", 32, "-f", 2)
    assert "1 test files could not be read" in proc.stderr and test.file_name[3] in proc.stderr
    sub = pd.read_csv(work / "runs" / "resnet18_32" / "submission.csv", keep_default_na=False)
    assert list(sub.file_name) == list(test.file_name) and (sub.label != "").all()


def test_test_score_per_domain_of_the_solution(tmp_path):
    """A solution column besides the label (the shift preset's `domain`) is scored per value."""
    from submission import score_test

    sol = pd.DataFrame({"file_name": ["a", "b", "c", "d"], "label": ["yes", "no", "yes", "no"],
                        "domain": ["in", "in", "shift", "shift"]})
    sol.to_csv(tmp_path / "solution.csv", index=False)
    test = pd.DataFrame({"file_name": ["d", "c", "b", "a"], "label": ""})
    probs = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # no, no, no, yes
    score = score_test(test, probs, ["no", "yes"], str(tmp_path / "solution.csv"), tmp_path,
                       "1 fold")
    assert score["accuracy"] == 0.75 and score["by"] == {"domain": {"in": 1.0, "shift": 0.5}}
    assert json.loads((tmp_path / "test_score.json").read_text())["by"]["domain"]["shift"] == 0.5
