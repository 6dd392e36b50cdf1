"""Odd but real inputs on the paths for windows, label shares, weights, pretraining runs and
BirdCLEF files: each ends in one line naming the problem, or works, and nothing is written
before a refusal."""
import contextlib
import io
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from arg import Config
from conftest import TINY, refusal, refused

WINDOW_SAYS = "expected seconds, at least 0.01 (one STFT frame)"


# ----------------------------------------------------------------------------- windows
def test_window_row_ids_are_unique_and_exact_for_any_hop():
    from audio import seconds_label
    from cache import Clips, windows

    clips = Clips.from_arrays([np.ones(16000 * 12, np.int16), np.ones(16000 * 12 + 7, np.int16)])
    got = windows(clips, 5 * 16000, 8000, 16000)  # 5-s windows every 0.5 s
    ids = [f"{r}_{e}" for r, e in zip(got.row, got.end)]
    assert len(ids) == len(set(ids))  # before: 5.5, 6.0 and 6.5 were all "_6"
    assert got.end.tolist()[:4] == ["5", "5.5", "6", "6.5"]
    assert got.end.tolist()[-1] == "12.0004375"  # the last window ends at the recording's end
    whole = windows(clips, 5 * 16000, 5 * 16000, 16000)  # whole seconds: BirdCLEF's row ids
    assert whole.end.tolist()[:2] == ["5", "10"]
    assert seconds_label(480007, 16000) != seconds_label(480006, 16000)


@pytest.mark.parametrize("flags,said", [(["--hop", "0.00001"], "--hop 1e-05"),
                                        (["--window", "-5"], "--window -5"),
                                        (["--hop", "nan"], "--hop nan")])
def test_windows_and_hops_that_cannot_be_are_refused_by_inference_and_predict(
        e2e, tmp_path, flags, said):
    out = tmp_path / "out"
    assert refused("inference.py", "--work", e2e["work"], "-m", "resnet18", "-t", "32", "-f",
                   "1", "-g", "cpu", "--out", out, *flags) == f"inference: {said}: {WINDOW_SAYS}"
    assert not out.exists()
    assert refused("predict.py", tmp_path / "none.onnx", tmp_path, *flags) == \
        f"predict: {said}: {WINDOW_SAYS}"


# ----------------------------------------------------------------------------- label shares
def test_a_label_share_outside_0_1_is_refused(e2e):
    assert refused("train.py", "--work", e2e["work"], *TINY, "-f", "0", "-g", "cpu", "--run",
                   "share", "--labels", "1.5") == \
        "train: --labels 1.5: a share of the training rows in (0, 1]"
    assert not (e2e["work"] / "runs" / "share").exists()


def test_a_share_keeps_a_class_with_one_row_and_says_so(caplog):
    from dataset import labelled_share

    train = pd.DataFrame({"row": range(21), "y": [0] * 10 + [1] * 10 + [2]})
    with caplog.at_level(logging.WARNING):
        kept = labelled_share(train, 0.5, seed=0)
    assert set(kept.y) == {0, 1, 2} and len(kept) == 10
    assert "every class keeps at least one row" in caplog.text
    kept = labelled_share(train[train.y < 2], 0.5, seed=0)  # stratified as before
    assert kept.y.value_counts().to_dict() == {0: 5, 1: 5}


# ----------------------------------------------------------------------------- weights
@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    import timm

    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0, in_chans=1).state_dict(), path)
    return path


def test_weights_of_another_model_are_refused_with_the_counts(e2e, resnet_weights):
    """A resnet18 state dict into mobilenetv3: the BatchNorm step counters match by name but
    carry no weights; before, 'loaded' counted one and training went on."""
    weights = sum(not k.endswith("num_batches_tracked") for k in torch.load(resnet_weights))
    err = refused("train.py", "--work", e2e["work"], "-m", "mobilenetv3_small_050", "-t", "32",
                  "-f", "0", "-g", "cpu", "--run", "wrong", "--pretrained", resnet_weights)
    assert err.startswith(f"train: --pretrained {resnet_weights}: none of its "
                                        f"{weights} weight tensors fits the ")
    assert "backbone" in err and "pass weights of the -m model" in err
    assert not (e2e["work"] / "runs" / "wrong").exists()


def test_weights_that_fit_a_few_layers_say_so(resnet_weights, tmp_path, caplog):
    from model import create_backbone

    full = torch.load(resnet_weights)
    torch.save({k: v for k, v in full.items() if k.startswith("conv1")}, tmp_path / "few.pth")
    wanted = sum(not k.endswith("num_batches_tracked") for k in full)  # the head is not in it
    with caplog.at_level(logging.WARNING):
        create_backbone(Config(model="resnet18"), 3, str(tmp_path / "few.pth"))
    assert f"only 1 of the backbone's {wanted} weight tensors loaded" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_a_damaged_checkpoint_is_one_line_on_every_path(e2e, tmp_path, damage):
    work = tmp_path / "work"
    shutil.copytree(e2e["work"], work)
    fold = work / "runs" / "resnet18_32" / "fold0"
    for name in ("best.ckpt", "last.ckpt"):
        data = (fold / name).read_bytes()
        (fold / name).write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                                   "text": b"not a checkpoint\n"}[damage])
    before = {p.name: p.stat().st_mtime_ns for p in fold.iterdir()}
    err = refused("train.py", "--config", fold / "config.yaml", "--work", work, "-f", "0", "-g",
                  "cpu", "--resume", "--no-progress")
    assert err.startswith(f"train: --resume {fold / 'last.ckpt'}: not a complete "
                          f"torch file (truncated, empty or another format")
    assert err.endswith("delete it to train the fold from the start, or train under another "
                        "--run")
    assert {p.name: p.stat().st_mtime_ns for p in fold.iterdir()} == before
    assert "best.ckpt: not a complete torch file" in refused(
        "inference.py", "--work", work, "-m", "resnet18", "-t", "32", "-f", "1", "-g", "cpu")
    assert refused("train.py", "--work", work, *TINY, "-f", "0", "-g", "cpu", "--run", "tuned",
                   "--pretrained", fold / "best.ckpt").startswith("train: --pretrained ")
    assert "not a complete torch file" in refused(
        "train.py", "--work", work, *TINY, "-f", "0", "-g", "cpu", "--run", "student",
        "--teacher", "resnet18_32")


@pytest.mark.parametrize("damage", ["missing", "cut short", "longer"])
def test_a_damaged_cache_is_one_line_naming_the_file_and_the_rebuild(e2e, tmp_path, damage):
    """train.py, pretrain.py and inference.py check WORK's cache before they start."""
    work = tmp_path / "work"
    shutil.copytree(e2e["work"], work, ignore=shutil.ignore_patterns("runs"))
    shutil.copytree(e2e["work"] / "runs" / "resnet18_32" / "fold0",
                    work / "runs" / "resnet18_32" / "fold0")
    fix = f"rebuild the cache: python preprocess.py --data {e2e['data']} --work {work} --force"
    for split, steps in (("train", [("train", ["train.py", *TINY, "-f", 0, "-g", "cpu"]),
                                    ("pretrain", ["pretrain.py", "-e", 1, "-g", "cpu"])]),
                         ("test", [("inference", ["inference.py", "-m", "resnet18", "-t", 32,
                                                  "-f", 1, "-g", "cpu"])])):
        wave = work / f"{split}_wave.npy"
        keep = wave.read_bytes()
        if damage == "missing":
            wave.unlink()
        else:
            wave.write_bytes(keep[:len(keep) // 2] if damage == "cut short" else keep + keep[-64:])
        for name, (script, *args) in steps:
            said = refusal(script, "--work", work, *args)
            assert said.startswith(f"{name}: {wave}") and said.endswith(fix), said
            assert ("is missing" if damage == "missing" else "bytes where its header promises") \
                in said
        wave.write_bytes(keep)
    assert not (work / "pretrain").exists()


# ----------------------------------------------------------------------------- BirdCLEF files
@pytest.fixture(scope="module")
def ghost_work(tmp_path_factory):
    """A BirdCLEF layout whose sample submission names a class no recording has (ghostbird)
    and lacks one that has recordings (crow), with its columns in its own order."""
    from layouts import prepare

    root = tmp_path_factory.mktemp("ghost")
    data = root / "data"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        label = ("wren", "crow", "owl")[i % 3]
        (data / "train_audio" / label).mkdir(parents=True, exist_ok=True)
        sf.write(data / "train_audio" / label / f"{i}.ogg",
                 (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32), 16000)
        rows.append(dict(primary_label=label, secondary_labels="[]", filename=f"{label}/{i}.ogg",
                         author=f"a{i % 4}"))
    rows.append(dict(primary_label="owl", secondary_labels="[]", filename="owl/gone.ogg",
                     author="a0"))  # a row whose file is missing
    pd.DataFrame(rows).to_csv(data / "train_metadata.csv", index=False)
    (data / "test_soundscapes").mkdir()
    sf.write(data / "test_soundscapes" / "s1.ogg", np.zeros(16000 * 10, np.float32), 16000)
    pd.DataFrame({"row_id": [f"s1_{e}" for e in (5, 10)], "wren": 0.0, "ghostbird": 0.0,
                  "owl": 0.0}).to_csv(data / "sample_submission.csv", index=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        prepare(Config(data=str(data), work=str(root / "work"), n_folds=2, seconds=5), workers=1)
    return root / "work", err.getvalue()


def test_sample_classes_without_recordings_and_labels_outside_the_sample_are_named(ghost_work):
    work, err = ghost_work
    assert ("preprocess: 1 class(es) of sample_submission.csv have no training recording "
            "(trained as negatives only): ghostbird") in err.splitlines()
    assert ("preprocess: 1 training label(s) are not columns of sample_submission.csv (left out "
            "of the submission): crow") in err.splitlines()
    rejected = pd.read_csv(work / "rejected.csv")
    assert rejected.reason.tolist() == ["file not found"]
    assert "1 of 14 files rejected (1 file not found)" in err  # before: "(1 not)"


def test_a_class_without_recordings_has_no_positives_and_the_sample_keeps_its_columns(
        ghost_work, tmp_path):
    from dataset import targets
    from submission import write_windows
    from runs import Work
    from util import read_table

    work, _ = ghost_work
    classes = Work(work).classes()
    assert classes == ["crow", "ghostbird", "owl", "wren"]
    y = targets(read_table(Work(work).train_csv), classes, True)
    assert y[:, classes.index("ghostbird")].max() == 0 and (y.max(0)[[0, 2, 3]] == 1).all()
    wins = pd.DataFrame({"row": [0, 0], "start": [0, 80000], "end": ["5", "10"]})
    score = np.random.default_rng(0).random((2, 4))
    sample = Path_of(work) / "sample_submission.csv"
    write_windows(work, tmp_path, wins, score, classes, "", "test", sample)
    sub = pd.read_csv(tmp_path / "submission.csv")
    assert list(sub.columns) == ["row_id", "wren", "ghostbird", "owl"]  # the sample's order
    assert sub.wren.tolist() == pytest.approx(score[:, 3].tolist())
    assert list(pd.read_csv(tmp_path / "test_probs.csv").columns) == ["row_id", *classes]


def Path_of(work):
    from pathlib import Path

    return Path(json.loads((work / "prep.json").read_text())["data"])


# ----------------------------------------------------------------------------- bench
def test_bench_reads_clips_as_training_does(ghost_work):
    """2-s recordings in a WORK of 5-s clips: padded to 5 s; 1-s WORK of longer clips: cropped."""
    from cache import training_clips

    work, _ = ghost_work
    waves, said = training_clips(work, 4)
    assert waves.shape == (4, 80000) and not waves[:, 32000:].any() and waves[:, :32000].any()
    assert said.startswith("80000 samples (5 s at 16000 Hz")
