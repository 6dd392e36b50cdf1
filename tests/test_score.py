"""The score tools: hard benchmark, EMA, pseudo-labels, distillation, fitted blends, leaderboard."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, cached, run_script


@pytest.fixture(scope="module")
def work(e2e, tmp_path_factory):
    """A copy of the end-to-end WORK (its 2-fold run included) that these tests may add to."""
    work = tmp_path_factory.mktemp("score") / "work"
    shutil.copytree(e2e["work"], work)
    return work


def train(work, *args, check=True):
    return run_script("train.py", "--work", work, *TINY, "-g", "cpu", "--no-progress",
                      "--limit-batches", 3, *args, check=check)


def test_hard_preset_degrades_and_holds_voices_out(tmp_path):
    import synth

    counts = synth.make_dataset(tmp_path / "hard", preset="hard", speakers=10, words=("yes", "no"),
                               workers=2, progress=False)
    assert counts == {"train": 16, "test": 4, "speakers": 10}
    meta = pd.read_csv(tmp_path / "hard" / "meta.csv")
    voices = json.loads((tmp_path / "hard" / "voices.json").read_text())
    assert len(voices["test_only"]) >= 20 and not set(voices["test_only"]) & set(voices["train"])
    train = meta[meta.path.str.startswith("train/")]
    assert train.voice.str.split("+").str[1].isin(voices["train"]).all()
    noisy = meta[meta.noise.notna()]
    assert noisy.snr.between(0, 30).all() and len(noisy) >= 0.6 * len(meta)
    assert (meta.seconds < 1).any() and (meta.rt60 > 0).any() and (meta.lowpass > 0).any()
    assert sorted(p.name for p in (tmp_path / "hard" / "_background_noise_").iterdir()) == \
        sorted(f"{k}_noise.wav" for k in synth.PRESETS["hard"].noises)


def test_ema_weights_are_validated_and_saved_in_best(work):
    from ensemble import predict_waves

    train(work, "-f", "0", "--run", "ema", "--ema", "0.9", "-e", "1", "-b", 8, "--limit-batches", 6)
    fold = work / "runs" / "ema" / "fold0"
    best = torch.load(fold / "best.ckpt", map_location="cpu", weights_only=False)
    last = torch.load(fold / "last.ckpt", map_location="cpu", weights_only=False)
    averaged, raw = last["state_dict"], last["current_model_state"]
    assert last["averaging_state"]["n_averaged"] == 3  # steps 3, 4, 5: after the warmup
    key = "net.backbone.conv1.weight"
    assert not torch.equal(averaged[key], raw[key])  # EMA weights differ from the raw ones
    assert all(torch.equal(best["state_dict"][k], averaged[k]) for k in averaged)
    # validation (oof.csv) saw the averaged weights: best.ckpt predicts the same probabilities
    oof = pd.read_csv(fold / "oof.csv", keep_default_na=False)
    classes = json.loads((work / "classes.json").read_text())
    waves = cached(work, "train", oof.row)
    probs = predict_waves([fold / "best.ckpt"], waves, False, torch.device("cpu"), 64)[0][0]
    assert np.abs(probs - oof[classes].to_numpy()).max() < 1e-5
    result = json.loads((fold / "result.json").read_text())
    assert result["ema"] == 0.9 and result["ema_start_step"] == 3  # warm-up: half of 6 steps


def test_pseudo_labels_train_but_never_validate(work):
    from arg import Config
    from dataset import FoldData, pseudo_labels
    from runs import Work

    classes = Work(work).classes()
    probs = work / "runs" / "resnet18_32" / "test_probs.csv"
    chosen = pseudo_labels(work, probs, 0.0, classes)
    test = pd.read_csv(work / "test.csv")
    assert len(chosen) == len(test) and chosen.y.between(0, len(classes) - 1).all()
    top = pd.read_csv(probs)[classes].to_numpy().max(1)
    strict = pseudo_labels(work, probs, float(np.median(top)), classes)
    assert 0 < len(strict) < len(test) and (strict.p >= np.median(top)).all()
    data = FoldData(Config(work=str(work), batch_size=32), 0, pseudo=chosen)
    _, _, rows = data.train_ds.__getitems__(list(range(len(data.train_ds))))
    assert (rows < 0).sum() == len(test)  # every pseudo row is in training...
    assert set(-1 - rows[rows < 0].numpy()) == set(test.row)
    val_rows = data.val_ds.__getitems__(list(range(len(data.val_ds))))[2]
    assert (val_rows >= 0).all() and set(val_rows.numpy()) == set(data.val_table.row)  # ...never val
    train(work, "-f", "0", "--run", "pseudo", "--pseudo", "resnet18_32", "--pseudo-threshold", 0)
    fold = work / "runs" / "pseudo" / "fold0"
    assert json.loads((fold / "result.json").read_text())["pseudo_clips"] == len(test)
    oof = pd.read_csv(fold / "oof.csv")
    assert sorted(oof.row) == sorted(data.val_table.row)


def test_student_fold_k_reads_teacher_fold_k_only(work):
    teach = work / "runs" / "teach"
    shutil.copytree(work / "runs" / "resnet18_32" / "fold0", teach / "fold0")  # no fold 1
    train(work, "-f", "0", "--run", "student", "--teacher", "teach", "--kd-weight", 0.7)
    result = json.loads((work / "runs" / "student" / "fold0" / "result.json").read_text())
    assert result["teacher"].endswith("teach/fold0/best.ckpt")
    proc = train(work, "-f", "1", "--run", "student", "--teacher", "teach", check=False)
    assert proc.returncode == 2 and "teach/fold1/best.ckpt is missing" in proc.stderr
    assert "python train.py" in proc.stderr and "Traceback" not in proc.stderr
    assert not (work / "runs" / "student" / "fold1").exists()  # nothing written


def test_distillation_loss():
    from model import classification_loss

    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    ce = classification_loss(logits, y)
    own = (logits / 2.0).softmax(-1)  # a teacher that agrees with the student at T=2
    assert classification_loss(logits, y, teacher=own, kd_weight=0.0) == pytest.approx(float(ce))
    assert classification_loss(logits, y, teacher=own, kd_weight=1.0) == pytest.approx(0, abs=1e-6)
    other = torch.randn(16, 5).softmax(-1)
    assert classification_loss(logits, y, teacher=other, kd_weight=1.0) > 0


def test_fitted_weights_beat_equal_weights_and_temperature_calibrates():
    from ensemble import fit_blend
    from metrics import log_loss

    rng = np.random.default_rng(0)
    n, c = 600, 6
    y = rng.integers(0, c, n)
    good = rng.dirichlet(np.ones(c) * 0.3, n)
    hit = np.where(rng.random(n) < 0.75, y, rng.integers(0, c, n))
    good[np.arange(n), hit] += 2.0  # an informative run, right 3 times in 4 ...
    good /= good.sum(1, keepdims=True)
    noise = rng.dirichlet(np.ones(c), n)  # ... and one that knows nothing
    fit = fit_blend(np.stack([good, noise]), y)
    assert fit["weights"][0] > 0.8 and sum(fit["weights"]) == pytest.approx(1)
    assert fit["oof_log_loss"]["fitted"] < fit["oof_log_loss"]["equal"] - 0.05
    # an overconfident run: sharpened probabilities; the temperature softens them back
    sharp = good ** 4 / (good ** 4).sum(1, keepdims=True)
    fit = fit_blend(sharp[None], y)
    assert fit["temperature"] > 1.5
    assert fit["oof_log_loss"]["calibrated"] < fit["oof_log_loss"]["fitted"]
    assert fit["oof_ece"]["after"] < fit["oof_ece"]["before"]
    assert log_loss(good, y) < log_loss(noise, y)


def test_blend_cli_fits_weights_and_refuses_unlike_oof(work):
    runs = work / "runs"
    shutil.copytree(runs / "resnet18_32", runs / "copy", ignore=shutil.ignore_patterns("last.ckpt"))
    proc = run_script("inference.py", "--work", work, "--runs", "resnet18_32", "copy", "-f", 2,
                      "--fit-weights", "-g", -1)
    blend = json.loads((runs / "blend_resnet18_32+copy" / "blend.json").read_text())
    assert len(blend["weights"]) == 2 and sum(blend["weights"]) == pytest.approx(1)
    assert blend["temperature"] > 0 and "ece" in proc.stderr.lower()
    probs = pd.read_csv(runs / "blend_resnet18_32+copy" / "test_probs.csv")
    assert np.allclose(probs.iloc[:, 1:].sum(axis=1), 1, atol=1e-4)
    (runs / "copy" / "fold1" / "oof.csv").unlink()
    proc = run_script("inference.py", "--work", work, "--runs", "resnet18_32", "copy", "-f", 2,
                      "--fit-weights", "--out", work / "never", check=False)
    assert proc.returncode == 2 and "run copy: fold(s) 1 have no oof.csv; train them" in proc.stderr
    assert "python train.py" in proc.stderr and not (work / "never").exists()


def test_pseudo_naming_a_run_without_test_probs_is_refused(work):
    proc = train(work, "-f", "0", "--run", "p2", "--pseudo", "nothing", check=False)
    assert proc.returncode == 2 and "runs/nothing/test_probs.csv not found" in proc.stderr
    assert "python inference.py" in proc.stderr and not (work / "runs" / "p2").exists()


def test_leaderboard_lists_every_run_best_cv_first(work):
    proc = run_script("report.py", "--work", work)
    board = pd.read_csv(work / "runs" / "leaderboard.csv", keep_default_na=False)
    assert {"resnet18_32", "ema", "pseudo", "student"} <= set(board.run)
    assert list(board.columns[:12]) == ["run", "model", "size", "aug", "epochs", "ema",
                                        "pseudo", "teacher", "init", "labels", "recipe",
                                        "folds_done"]
    assert set(board.recipe) == {""} and set(board.cv_map) == {""}  # single-label runs
    cv = pd.to_numeric(board.cv, errors="coerce").dropna()
    assert list(cv) == sorted(cv, reverse=True)
    row = board.set_index("run").loc["resnet18_32"]
    score = json.loads((work / "runs" / "resnet18_32" / "test_score.json").read_text())
    assert row.folds_done == "2/2" and "TTA" in row.test_with
    assert float(row.test_acc) == pytest.approx(score["accuracy"])  # the run's own test score
    assert board.set_index("run").loc["ema"].ema == 0.9
    assert board.set_index("run").loc["student"].teacher == "teach"
    assert set(board.init) == {"scratch"} and set(board.labels.astype(float)) == {1.0}
    assert "resnet18_32" in proc.stdout


def test_initialised_from_names_what_a_run_started_from():
    from leaderboard import initialised_from

    assert initialised_from("") == "scratch" and initialised_from("timm") == "timm"
    assert initialised_from("w/pretrain/byol/encoder.pth") == "pretrain:byol"
    assert initialised_from("w/runs/hard_cpu/fold0/best.ckpt") == "run:hard_cpu"
    assert initialised_from("/x/resnet18.a1_in1k.safetensors") == "resnet18.a1_in1k.safetensors"
