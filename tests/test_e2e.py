"""The real scripts, as subprocesses, on a tiny generated dataset (see conftest.e2e)."""
import json

import pandas as pd


def test_pipeline_writes_every_output(e2e):
    work, run, data = e2e["work"], e2e["run"], e2e["data"]
    for name in ("classes.json", "train.csv", "train_wave.npy", "test.csv", "test_wave.npy",
                 "noise.npy", "rejected.csv", "prep.json"):
        assert (work / name).is_file(), name
    for name in ("submission.csv", "test_probs.csv", "test_score.json", "cv.json", "report.txt",
                 "confusion.png"):
        assert (run / name).stat().st_size > 0, name
    sample = pd.read_csv(data / "submission.csv")
    sub = pd.read_csv(run / "submission.csv")
    assert len(sub) == len(sample) == 30 and list(sub.file_name) == list(sample.file_name)
    truth = pd.read_csv(data / "solution.csv").set_index("file_name").label
    score = json.loads((run / "test_score.json").read_text())
    assert score["accuracy"] == (sub.label.to_numpy() == sub.file_name.map(truth).to_numpy()).mean()
    cv = json.loads((run / "cv.json").read_text())
    assert set(cv) >= {"plain", "tta", "accuracy"}
    assert "accuracy" in (run / "report.txt").read_text()
    assert (run / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "test accuracy" in e2e["steps"]["inference"].stderr


def test_demo_is_deterministic(tmp_path):
    import synth
    import numpy as np
    import soundfile as sf

    a = synth.make_dataset(tmp_path / "a", speakers=3, seed=5, workers=1, progress=False)
    synth.make_dataset(tmp_path / "b", speakers=3, seed=5, workers=1, progress=False)
    assert a == {"train": 60, "test": 30, "speakers": 3}
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.wav"))
    fb = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.wav"))
    assert fa == fb
    assert all(np.array_equal(sf.read(tmp_path / "a" / f)[0], sf.read(tmp_path / "b" / f)[0])
               for f in fa[:20])
    test_speakers = {p.stem.split("_nohash_")[0] for p in (tmp_path / "a" / "train").rglob("*.wav")}
    assert len(test_speakers) == 2  # 3 speakers: 2 train, 1 test
    lengths = [sf.info(tmp_path / "a" / f).frames for f in fa if f.parts[0] in ("train", "test")]
    assert len(lengths) == 90
    assert max(lengths) == 16000 and all(8000 <= n <= 16000 for n in lengths)
