"""Self-supervised pretraining, transfer of weights between runs, label shares, the shift preset."""

import re

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import yaml

from arg import Config
from conftest import TINY, refused, run_script


def backbone_state(model) -> dict:
    head = {f"{model.net.backbone.default_cfg['classifier']}.{p}" for p in ("weight", "bias")}
    return {k: v for k, v in model.net.backbone_state().items() if k not in head}


@pytest.fixture(scope="module")
def two_kinds(tmp_path_factory):
    """A WORK of two clearly different kinds of clip, tones and noise bursts, 2 folds."""
    from layouts import prepare

    root = tmp_path_factory.mktemp("kinds")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    for n in range(48):
        speaker = f"s{n % 12}"
        on = slice(int(rng.integers(0, 6000)), None)
        tone = np.zeros(16000)
        tone[on] = np.sin(2 * np.pi * rng.uniform(300, 3000) * t[on])
        noise = np.zeros(16000)
        noise[on] = rng.standard_normal(16000)[on] * 0.3
        for kind, y in (("tone", tone), ("noise", noise)):
            (root / "data" / "train" / kind).mkdir(parents=True, exist_ok=True)
            sf.write(root / "data" / "train" / kind / f"{speaker}_nohash_{n}.wav",
                     (y * rng.uniform(0.1, 0.5)).astype(np.float32), 16000)
    (root / "data" / "test").mkdir()
    prepare(Config(data=str(root / "data"), work=str(root / "work"), n_folds=2), workers=1)
    return root / "work"


def test_pretraining_writes_an_encoder_and_a_probe_that_separates_two_kinds(two_kinds):
    proc = run_script("pretrain.py", "--work", two_kinds, "-m", "resnet18", "-t", 32, "-e", 3,
                      "-b", 16, "-g", "cpu", "--run", "byol", "--probe-every", 2, "--no-progress")
    out = two_kinds / "pretrain" / "byol"
    for name in ("encoder.pth", "config.yaml", "history.csv", "curve.png", "last.ckpt"):
        assert (out / name).is_file(), name
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.epoch) == [0, 1, 2] and np.isfinite(hist.train_loss).all()
    assert np.isnan(hist.probe_acc[0]) and hist.probe_acc[1:].notna().all()  # every 2nd, last
    assert hist.probe_acc.iloc[-1] > 0.85  # chance is 0.5: the probe reads the embeddings right
    assert "fine-tune with: python train.py" in proc.stderr


def test_an_encoder_loads_into_train_with_every_backbone_tensor_equal(two_kinds):
    from model import AudioClassifier

    encoder = torch.load(two_kinds / "pretrain" / "byol" / "encoder.pth", weights_only=True)
    cfg = Config(model="resnet18", size=32, pretrained=str(two_kinds / "pretrain" / "byol" /
                                                            "encoder.pth"))
    model = AudioClassifier(cfg.to_dict(), ["a", "b", "c"])
    mine = backbone_state(model)
    assert set(mine) == set(encoder)
    assert all(torch.equal(mine[k], encoder[k]) for k in encoder)
    scratch = backbone_state(AudioClassifier(Config(model="resnet18", size=32).to_dict(),
                                            ["a", "b"]))
    assert not torch.equal(scratch["conv1.weight"], encoder["conv1.weight"])


def test_a_checkpoint_with_other_classes_transfers_its_backbone(e2e, two_kinds):
    """best.ckpt of the 30-class run into a 2-class run: backbone equal, head new."""
    from ensemble import load_checkpoint
    from model import AudioClassifier

    src = e2e["run"] / "fold0" / "best.ckpt"
    teacher = backbone_state(load_checkpoint(src))
    proc = run_script("train.py", "--work", two_kinds, *TINY, "-f", 0, "-g", "cpu", "--run",
                      "moved", "--pretrained", src, "--limit-batches", 1, "--no-progress")
    said = re.search(r"(\d+) of (\d+) backbone weight tensors loaded, 2 skipped \(head or not "
                     r"in resnet18\), 0 of another shape", proc.stderr)
    assert said and said.group(1) == said.group(2)  # every weight of the backbone, no counters
    cfg = dict(Config(model="resnet18", size=32, pretrained=str(src)).to_dict())
    model = AudioClassifier(cfg, ["noise", "tone"])
    assert model.net.head_parameters()[0].shape == (2, 512)
    mine = backbone_state(model)
    assert all(torch.equal(mine[k], teacher[k]) for k in teacher)


def test_weights_that_fit_nothing_are_refused_with_one_line(two_kinds, tmp_path):
    torch.save({"encoder.layer.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    err = refused("train.py", "--work", two_kinds, *TINY, "-f", "0", "-g", "cpu", "--run",
                  "nothing", "--pretrained", tmp_path / "other.pth")
    assert "other.pth" in err and "none of its 1 weight tensors fits" in err
    assert not (two_kinds / "runs" / "nothing").exists()


def test_label_share_is_stratified_and_seeded(e2e):
    from dataset import labelled_share
    from util import read_table

    train = read_table(e2e["work"] / "train.csv")
    a, b = labelled_share(train, 0.3, 1), labelled_share(train, 0.3, 1)
    assert list(a.row) == list(b.row)  # the same seed keeps the same rows
    assert list(labelled_share(train, 0.3, 2).row) != list(a.row)
    assert len(a) == round(0.3 * len(train))
    per_class = a.label.value_counts()
    assert set(per_class.index) == set(train.label) and per_class.max() - per_class.min() <= 1


def test_shift_preset_keeps_test_voices_and_channels_out_of_training(tmp_path):
    import synth

    synth.make_dataset(tmp_path / "s", preset="shift", speakers=12, words=("yes", "no"),
                      workers=2, progress=False)
    meta = pd.read_csv(tmp_path / "s" / "meta.csv", keep_default_na=False)
    sol = pd.read_csv(tmp_path / "s" / "solution.csv")
    assert set(sol.domain) == {"in", "shift"} and (sol.domain == "in").sum() == (
        sol.domain == "shift").sum()
    meta["file_name"] = meta.path.str.split("/").str[-1]
    shifted = meta[meta.file_name.isin(sol.file_name[sol.domain == "shift"])]
    train = meta[meta.path.str.startswith("train")]
    accent = lambda v: v.split("+")[0]  # noqa: E731
    assert not set(shifted.voice.map(accent)) & set(train.voice.map(accent))
    assert not set(shifted.voice.str.split("+").str[1]) & set(train.voice.str.split("+").str[1])
    assert ((shifted.pitch < 30) | (shifted.pitch >= 70)).all()
    assert train.pitch.between(30, 69).all() and (train.channel == "").all()
    assert (shifted.channel != "").any()


def test_freeze_epochs_train_the_head_alone(two_kinds):
    """--freeze-epochs 1: after one epoch the backbone's weights are the encoder's, the head's
    are not its initial ones."""
    enc_path = two_kinds / "pretrain" / "byol" / "encoder.pth"
    encoder = torch.load(enc_path, weights_only=True)
    run_script("train.py", "--work", two_kinds, *TINY, "-f", 0, "-g", "cpu", "--run", "frozen",
               "--pretrained", enc_path, "--freeze-epochs", 1, "--limit-batches", 2,
               "--no-progress")
    state = torch.load(two_kinds / "runs" / "frozen" / "fold0" / "last.ckpt",
                       weights_only=False)["state_dict"]
    convs = [k for k in encoder if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert convs and all(torch.equal(state[f"net.backbone.{k}"], encoder[k]) for k in convs)
    import lightning as L

    from model import AudioClassifier

    L.seed_everything(Config().seed, verbose=False)  # as train.py does before building it
    start = AudioClassifier(Config(model="resnet18", size=32, pretrained=str(enc_path)).to_dict(),
                            ["noise", "tone"])
    assert not torch.equal(state["net.backbone.fc.weight"], start.net.head_parameters()[0])


def test_a_fresh_pretraining_under_an_existing_name_refuses_and_leaves_it(two_kinds):
    """Before, the new config.yaml landed beside the old run's encoder and checkpoint."""
    out = two_kinds / "pretrain" / "byol"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    base = ["--work", two_kinds, "-m", "resnet18", "-t", "32", "-b", "16", "-g", "cpu",
            "--run", "byol", "--no-progress", "--probe-every", "2"]
    err = refused("pretrain.py", *base, "-e", "1")
    assert err == (f"pretrain: {out} already holds a pretraining run (encoder.pth, last.ckpt): "
                   f"add --resume to continue it, pass another --run, or --force to replace it")
    err = refused("pretrain.py", *base, "-e", "1", "--resume")  # other settings than the run's
    assert err.startswith(f"pretrain: --resume: {out} was trained with other settings (epochs "
                          f"3 -> 1)")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_force_replaces_a_pretraining_run_whole(two_kinds):
    base = ["--work", two_kinds, "-m", "resnet18", "-t", 32, "-g", "cpu", "--run", "again",
            "--limit-batches", 1, "--no-progress"]
    run_script("pretrain.py", *base, "-e", 2, "-b", 16)
    run_script("pretrain.py", *base, "-e", 1, "-b", 8, "--force")
    out = two_kinds / "pretrain" / "again"
    hist = pd.read_csv(out / "history.csv")
    assert list(hist.epoch) == [0]  # nothing of the replaced run's two epochs
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["epochs"], saved["batch_size"]) == (1, 8)
    state = torch.load(out / "last.ckpt", weights_only=False)
    assert state["epoch"] == 0 and state["hyper_parameters"]["config"]["batch_size"] == 8


def test_sigterm_stops_pretraining_with_a_non_zero_code(two_kinds):
    """Lightning turns SIGTERM into a SystemExit without a code (exit 0) unless it is caught."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    out = two_kinds / "pretrain" / "halt"
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--work", str(two_kinds), "-m", "resnet18",
           "-t", "64", "-b", "4", "-e", "20", "-g", "cpu", "--run", "halt", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not (out / "last.ckpt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err[-2000:]
    assert "pretrain: run halt stopped by SIGTERM; its last.ckpt is where --resume continues" in err
    assert not (out / "encoder.pth").exists()
