import json
import re

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import synth
from arg import Config
from conftest import cached, prepared, run_script
from cache import Clips
from layouts import speaker_of
from layouts import prepare


@pytest.fixture(scope="module")
def work(demo_data, tmp_path_factory):
    return prepared(demo_data, tmp_path_factory, folds=5)


def test_classes_sorted_and_complete(work):
    classes = json.loads((work / "classes.json").read_text())
    assert classes == sorted(synth.WORDS)


def test_folds_stratified_and_speaker_disjoint(work):
    train = pd.read_csv(work / "train.csv")
    assert sorted(train.fold.unique()) == [0, 1, 2, 3, 4]
    assert (train.groupby("group").fold.nunique() == 1).all()  # no speaker in two folds
    per_fold = train.groupby(["fold", "label"]).size().unstack(fill_value=0)
    # 7 speakers each saying every word once: every class is spread the same way
    assert (per_fold.std(axis=1) == 0).all()
    assert (train.group == train.path.map(speaker_of)).all()


def test_cached_rows_equal_librosa_load(work):
    train = pd.read_csv(work / "train.csv")
    clips = Clips.of(work, "train")
    assert clips.wave.dtype == np.int16 and len(clips) == len(train)
    for i in [0, 17, len(train) - 1]:
        y, _ = librosa.load(train.path[i], sr=16000)
        assert len(clips.clip(i)) == len(y)  # whole, neither padded nor cut
        assert np.abs(clips.clip(i) / 32768.0 - y).max() <= 1 / 32768 + 1e-7


def test_test_order_is_submission_order(work, demo_data):
    sub = pd.read_csv(demo_data / "submission.csv")
    test = pd.read_csv(work / "test.csv")
    assert list(test.file_name) == list(sub.file_name)
    assert len(Clips.of(work, "test")) == len(sub)
    assert (work / "noise.npy").is_file()


def test_rerun_reuses_work(demo_data, work, caplog):
    caplog.set_level("INFO")
    stamp = (work / "train_wave.npy").stat().st_mtime_ns
    summary = prepare(Config(data=str(demo_data), work=str(work), n_folds=5))
    assert summary["reused"] and (work / "train_wave.npy").stat().st_mtime_ns == stamp
    assert "reusing" in caplog.text


def _write_bad_inputs(root):
    """A contest layout with every awkward case: returns expected reasons by file name."""
    rng = np.random.default_rng(0)
    tone = lambda sr, sec: (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(sr * sec)) / sr)).astype(np.float32)
    for label in ("yes", "no"):
        d = root / "train" / label
        d.mkdir(parents=True)
        for spk in range(3):
            sf.write(d / f"s{spk}_nohash_0.wav", tone(16000, 1.0) * (spk + 1) / 4, 16000)
    d = root / "train" / "yes"
    sf.write(d / "stereo_nohash_0.wav", np.stack([tone(16000, 1), -tone(16000, 1)], 1), 16000)
    sf.write(d / "u8_nohash_0.wav", tone(16000, 1), 16000, subtype="PCM_U8")
    sf.write(d / "float_nohash_0.wav", tone(16000, 1), 16000, subtype="FLOAT")
    sf.write(d / "cd_nohash_0.wav", tone(44100, 1), 44100)
    sf.write(d / "long_nohash_0.wav", tone(16000, 2.5), 16000)
    sf.write(d / "short_nohash_0.wav", tone(16000, 0.2), 16000)
    sf.write(d / "silent_nohash_0.wav", np.zeros(16000, np.float32), 16000)
    sf.write(d / "lossless_nohash_0.flac", tone(22050, 1), 22050)
    (d / "empty_nohash_0.wav").write_bytes(b"")
    good = (d / "s0_nohash_0.wav").read_bytes()
    (d / "truncated_nohash_0.wav").write_bytes(good[:30])
    (d / "text_nohash_0.wav").write_text("this is not audio\n" * 20)
    (root / "test").mkdir()
    sf.write(root / "test" / "a.wav", tone(16000, 1), 16000)
    (root / "test" / "broken.wav").write_bytes(b"RIFF1234WAVEjunk")
    sf.write(root / "test" / "c.wav", rng.standard_normal(8000).astype(np.float32) * 0.1, 8000)
    pd.DataFrame({"file_name": ["c.wav", "broken.wav", "a.wav", "gone.wav"], "label": ""}).to_csv(
        root / "submission.csv", index=False)


def test_bad_inputs_listed_and_converted(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    _write_bad_inputs(data)
    proc = run_script("preprocess.py", "--data", data, "--work", work, "--n-folds", 2)
    assert "5 of " in proc.stderr and "rejected.csv" in proc.stderr  # one summary line
    rejected = pd.read_csv(work / "rejected.csv")
    names = {p.split("/")[-1]: r for p, r in zip(rejected.path, rejected.reason)}
    assert set(names) == {"empty_nohash_0.wav", "truncated_nohash_0.wav", "text_nohash_0.wav",
                          "broken.wav", "gone.wav"}
    assert names["empty_nohash_0.wav"].startswith(("empty", "not audio ("))
    assert names["gone.wav"] == "file not found" and names["text_nohash_0.wav"].startswith(
        "not audio (")
    kinds = pd.Series([r.split(" (")[0] for r in rejected.reason]).value_counts()
    said = ", ".join(f"{n} {k}" for k, n in kinds.items())
    assert re.search(rf"5 of \d+ files rejected \({re.escape(said)}\)", proc.stderr)  # in words
    train = pd.read_csv(work / "train.csv")
    waves = cached(work)
    by_name = {p.split("/")[-1]: i for i, p in enumerate(train.path)}
    for name in ("stereo", "u8", "float", "cd", "long", "short", "silent", "lossless"):
        assert any(k.startswith(name + "_") for k in by_name), name
    row = lambda n: waves[by_name[n]]
    assert np.abs(row("stereo_nohash_0.wav")).max() == 0  # +x and -x average to silence
    assert train.set_index(train.path.str.split("/").str[-1]).loc["stereo_nohash_0.wav", "orig_channels"] == 2
    assert np.abs(row("short_nohash_0.wav")[3200:]).max() == 0  # zero-padded after 0.2 s
    assert np.abs(row("short_nohash_0.wav")[:3200]).max() > 8000
    assert np.abs(row("cd_nohash_0.wav")).max() > 8000  # resampled, not rejected
    assert (np.abs(row("u8_nohash_0.wav").astype(int) - row("float_nohash_0.wav")) < 300).all()
    test = pd.read_csv(work / "test.csv", keep_default_na=False)
    assert list(test.file_name) == ["c.wav", "broken.wav", "a.wav", "gone.wav"]
    assert list(test.status == "ok") == [True, False, True, False]
    assert Clips.of(work, "test").lengths[1] == 0  # unreadable: no samples, read as silence
    assert np.abs(cached(work, "test", [1])).max() == 0
    assert test.orig_sr[0] == 8000


def test_missing_train_folder_exits_2(tmp_path):
    (tmp_path / "data").mkdir()
    proc = run_script("preprocess.py", "--data", tmp_path / "data", "--work", tmp_path / "w",
                      check=False)
    assert proc.returncode == 2
    assert "no labelled clips found" in proc.stderr and "train/<label>" in proc.stderr
    proc = run_script("preprocess.py", "--data", tmp_path / "nope", "--work", tmp_path / "w",
                      check=False)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_speech_commands_layout(tmp_path):
    root = tmp_path / "sc"
    tone = (0.2 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    listed = []
    for label in ("go", "stop"):
        (root / label).mkdir(parents=True)
        for spk in ("aa", "bb", "cc", "dd"):
            sf.write(root / label / f"{spk}_nohash_0.wav", tone, 16000)
        listed.append(f"{label}/dd_nohash_0.wav")
    (root / "_background_noise_").mkdir()
    sf.write(root / "_background_noise_" / "white.wav", np.zeros(32000, np.float32) + 0.01, 16000)
    (root / "testing_list.txt").write_text("\n".join(listed) + "\n")
    (root / "validation_list.txt").write_text("go/cc_nohash_0.wav\n")
    s = prepare(Config(data=str(root), work=str(tmp_path / "w"), n_folds=3), workers=1)
    assert s["layout"] == "speech_commands" and s["train"] == 6 and s["test"] == 2
    test = pd.read_csv(tmp_path / "w" / "test.csv")
    assert list(test.label) == ["go", "stop"] and list(test.file_name) == listed
    assert np.load(tmp_path / "w" / "noise.npy").shape == (32000,)
    train = pd.read_csv(tmp_path / "w" / "train.csv")
    assert not train.path.str.contains("dd_nohash").any()


def test_manifest_layout_keeps_its_folds(tmp_path):
    (tmp_path / "clips").mkdir()
    rows = []
    for i in range(8):
        sf.write(tmp_path / "clips" / f"{i}.wav", np.full(800, 0.1 * (i + 1), np.float32), 8000)
        rows.append(dict(path=f"clips/{i}.wav", label="ab"[i % 2], fold=i % 4,
                         split="test" if i == 7 else "train"))
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    s = prepare(Config(manifest=str(tmp_path / "m.csv"), work=str(tmp_path / "w"), n_folds=4,
                       seconds=0.5), workers=1)
    assert s["layout"] == "manifest" and s["train"] == 7 and s["test"] == 1
    train = pd.read_csv(tmp_path / "w" / "train.csv")
    assert list(train.fold) == [i % 4 for i in range(7)]
    assert list(Clips.of(tmp_path / "w", "train").lengths) == [1600] * 7  # whole, at 16 kHz


def test_predictor_reads_a_file_as_training_did(tmp_path):
    """audio.read_audio (the torch-free predictor's reader, and preprocess's) equals
    librosa.load for a 44.1 kHz stereo file: mono by the channel mean, soxr's HQ resampler."""
    from audio import read_audio

    rng = np.random.default_rng(0)
    t = np.arange(44100) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.1 * rng.standard_normal(44100)], 1)
    sf.write(tmp_path / "x.wav", stereo, 44100, subtype="FLOAT")
    info = {}
    ours = read_audio(tmp_path / "x.wav", 16000, info)
    ref, _ = librosa.load(tmp_path / "x.wav", sr=16000)
    assert ours.shape == ref.shape == (16000,) and np.abs(ours - ref).max() < 1e-6
    assert info == dict(orig_sr=44100, orig_channels=2, orig_seconds=1.0)


def test_csv_and_json_files_are_written_aside_and_renamed(demo_data, tmp_path, monkeypatch):
    """The CSV and JSON files of WORK go through util.atomic_write (written aside, renamed)."""
    import util

    written = []
    real = util.atomic_write
    monkeypatch.setattr(util, "atomic_write", lambda path, fn: (written.append(path.name),
                                                                real(path, fn)))
    prepare(Config(data=str(demo_data), work=str(tmp_path / "w"), n_folds=2), workers=1)
    assert {"train.csv", "test.csv", "rejected.csv", "classes.json", "prep.json"} <= set(written)
