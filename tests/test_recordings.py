"""Recordings of any length, several labels per clip, windowed test rows (the BirdCLEF shape)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from conftest import TINY, cached, run_script
from cache import Clips, Rows, windows
from dataset import WaveDataset, targets, weighted_sampler


def test_cache_returns_each_clip_exactly(tmp_path):
    """Clips of 0.3 to 7 s go in whole (no padding, no cut) and come back sample for sample."""
    from arg import Config
    from layouts import prepare

    rng = np.random.default_rng(0)
    lengths = [4800, 16000, 112000, 7000, 33333, 16001]
    rows = []
    for i, n in enumerate(lengths):
        (tmp_path / "a").mkdir(exist_ok=True)
        y = (rng.integers(-20000, 20000, n) / 32768).astype(np.float32)
        sf.write(tmp_path / "a" / f"{i}.wav", y, 16000, subtype="PCM_16")
        rows.append(dict(path=f"a/{i}.wav", label="xy"[i % 2], group=f"g{i}",
                         secondary="y" if i == 2 else ""))
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    s = prepare(Config(manifest=str(tmp_path / "m.csv"), work=str(tmp_path / "w"), n_folds=2),
                workers=1)
    assert s["multilabel"]  # a secondary label makes the data multilabel
    clips = Clips.of(tmp_path / "w", "train")
    assert list(clips.lengths) == lengths
    for i in range(len(lengths)):
        want, _ = sf.read(tmp_path / "a" / f"{i}.wav", dtype="int16")
        assert np.array_equal(clips.clip(i), want)
    got = clips.read([2, 0], 16000, [1000, 0])  # from an offset, and padded past the end
    assert np.array_equal(got[0], clips.clip(2)[1000:17000])
    assert np.array_equal(got[1, :4800], clips.clip(0)) and not got[1, 4800:].any()
    train = pd.read_csv(tmp_path / "w" / "train.csv", keep_default_na=False)
    assert train.secondary.tolist() == ["", "", "y", "", "", ""]


def test_random_crops_stay_inside_and_differ_across_epochs():
    ramp = np.arange(20000, dtype=np.int16)  # every value says where it came from
    clips = Clips.from_arrays([ramp, ramp[:500]])
    ds = WaveDataset(clips, [0, 1], [0, 1], 1000, "random")
    torch.manual_seed(0)
    starts = []
    for _ in range(20):
        wave = ds.__getitems__([0, 1])[0].numpy()
        start = int(wave[0, 0])
        assert np.array_equal(wave[0], ramp[start:start + 1000])  # one contiguous piece
        assert 0 <= start <= 19000
        assert np.array_equal(wave[1, :500], ramp[:500]) and not wave[1, 500:].any()
        starts.append(start)
    assert len(set(starts)) > 15
    fixed = WaveDataset(clips, [0], [0], 1000, "start")
    assert np.array_equal(fixed.__getitems__([0])[0][0].numpy(), ramp[:1000])


def test_multi_hot_targets():
    table = pd.DataFrame({"y": [0, 2, 1], "secondary": ["c b", "", "b a"]})
    got = targets(table, ["a", "b", "c"], True, 0.5)
    assert got.tolist() == [[1, 0.5, 0.5], [0, 0, 1], [0.5, 1, 0]]
    assert targets(table, ["a", "b", "c"], False).tolist() == [0, 2, 1]


def test_windows_cover_every_clip_in_order():
    clips = Clips.from_arrays([np.ones(60 * 100, np.int16), np.ones(130, np.int16),
                               np.ones(0, np.int16)])
    w = windows(clips, 200, 200, 100)  # 2-s windows at 100 Hz
    assert w.row.tolist() == [0] * 30 + [1, 2]
    assert w.end.tolist()[:30] == [str(s) for s in range(2, 61, 2)]  # whole seconds: "2"
    assert w.start.tolist()[:3] == [0, 200, 400] and w.start.tolist()[30:] == [0, 0]
    read = Rows(clips, w.row, 150, w.start, 200)[0:31]  # windows fitted to the clip length
    assert read.shape == (31, 150) and read[30, :130].all() and not read[30, 130:].any()


def test_padded_cmap_equals_sklearn():
    from sklearn.metrics import average_precision_score

    from metrics import padded_cmap

    rng = np.random.default_rng(3)
    truth = (rng.random((40, 6)) < 0.2).astype(int)
    truth[:, 5] = 0  # a class with no positive: padding is what makes it count
    probs = rng.random((40, 6))
    pad_t = np.concatenate([truth, np.ones((5, 6), int)])
    pad_p = np.concatenate([probs, np.ones((5, 6))])
    want = average_precision_score(pad_t, pad_p, average="macro")
    assert abs(padded_cmap(truth, probs) - want) < 1e-6


def test_balanced_sampler_evens_out_classes():
    y = np.array([0] * 900 + [1] * 100)
    drawn = y[list(weighted_sampler(y, ["a", "b"], 1.0, 0.0, 0))]
    assert 0.4 < (drawn == 1).mean() < 0.6  # 10 % of the rows, half of the draws
    half = y[list(weighted_sampler(y, ["a", "b"], 0.5, 0.0, 0))]
    assert 0.2 < (half == 1).mean() < 0.35  # sqrt: 1 / (1 + 3)
    assert weighted_sampler(y, ["a", "b"], 0.0, 0.0, 0) is None  # nothing asked: no sampler


def test_unknown_share_sets_the_share_of_the_draws():
    """--unknown-share 0.2: the _unknown_ and _silence_ rows together a fifth of the draws,
    however few they are; with --balance, the words evened out among themselves too."""
    from util import UsageError

    classes = ["_silence_", "_unknown_", "no", "yes"]
    y = np.array([0] * 10 + [1] * 30 + [2] * 600 + [3] * 360)
    drawn = y[list(weighted_sampler(y, classes, 0.0, 0.2, 0))]
    assert 0.17 < (drawn <= 1).mean() < 0.23
    assert 0.55 < (drawn[drawn > 1] == 2).mean() < 0.65  # the words as they come
    both = y[list(weighted_sampler(y, classes, 1.0, 0.2, 0))]
    assert 0.17 < (both <= 1).mean() < 0.23 and 0.45 < (both[both > 1] == 2).mean() < 0.55
    with pytest.raises(UsageError, match="need both words and _unknown_"):
        weighted_sampler(np.array([2, 3, 3]), classes, 0.0, 0.2, 0)


def test_soundscape_end_to_end(tmp_path):
    """demo soundscapes -> preprocess (BirdCLEF layout) -> multilabel training with the SED
    head -> one row per 2-s window of every test soundscape, scored with padded cmAP."""
    import soundscapes

    data, work = tmp_path / "data", tmp_path / "work"
    soundscapes.make_soundscapes(data, seed=1, workers=2, progress=False, recorders=10,
                          per_recorder=2, test_recorders=2, soundscapes=2)
    run_script("preprocess.py", "--data", data, "--work", work, "--n-folds", 2, "--seconds", 2,
               "--max-seconds", 20)
    prep = json.loads((work / "prep.json").read_text())
    assert prep["multilabel"] and prep["rows"] == "window" and prep["layout"] == "birdclef"
    assert Clips.of(work, "train").lengths.max() <= 20 * 16000
    proc = run_script("train.py", "--work", work, *TINY, "-f", 0, "-g", "cpu", "--run", "ss",
                      "--head", "sed", "--no-progress", "-e", 2)
    fold = work / "runs" / "ss" / "fold0"
    result = json.loads((fold / "result.json").read_text())
    hist = pd.read_csv(fold / "history.csv")  # best.ckpt, history and the summary: one score
    assert result["val_map"] == pytest.approx(hist.val_map.max()) and "val_acc" not in result
    assert "best val_map" in proc.stderr
    oof = pd.read_csv(fold / "oof.csv", keep_default_na=False)
    assert "secondary" in oof and oof.filter(items=soundscapes.SOUNDSCAPE_WORDS).max().max() < 1
    proc = run_script("inference.py", "--work", work, "--run", "ss", "-f", 1, "-g", -1,
                      "--solution", data / "solution.csv")
    sub = pd.read_csv(work / "runs" / "ss" / "submission.csv")
    sol = pd.read_csv(data / "solution.csv")
    assert sub.row_id.tolist() == sol.row_id.tolist()  # every window of every file, in order
    sample = pd.read_csv(data / "sample_submission.csv", nrows=0)
    assert len(sub) == 2 * 30 and list(sub.columns) == list(sample.columns)  # the sample's order
    assert sorted(sub.columns[1:]) == json.loads((work / "classes.json").read_text())
    score = json.loads((work / "runs" / "ss" / "test_score.json").read_text())
    assert 0 < score["cmap_pad5"] <= 1 and "padded cmAP" in proc.stderr
    # the exported SED ensemble says what inference.py said, window for window
    from predictor import Predictor

    run_script("export.py", "--work", work, "--run", "ss", "-f", 1, "--out", tmp_path / "ss.onnx")
    first = sorted((data / "test_soundscapes").iterdir())[0]
    got = Predictor(tmp_path / "ss.onnx").windows(first, 2.0, 2.0, silence_db=1000)
    assert len(got) == 30 and got[-1][1] == 60.0
    run_script("inference.py", "--work", work, "--run", "ss", "-f", 1, "-g", -1,
                       "--out", tmp_path / "plain")
    want = pd.read_csv(tmp_path / "plain" / "submission.csv").set_index("row_id")
    run_script("inference.py", "--work", work, "--run", "ss", "-f", 1, "-g", -1, "--hop", 0.5,
               "--out", tmp_path / "hop")  # overlapping windows: ids with the decimals they need
    hop = pd.read_csv(tmp_path / "hop" / "submission.csv", dtype={"row_id": str})
    assert hop.row_id.is_unique and f"{first.stem}_2.5" in set(hop.row_id)
    for start, end, label, prob in got:
        row = want.loc[f"{first.stem}_{int(end)}"]
        assert label == row.idxmax() and abs(prob - row.max()) < 1e-4


def test_fixed_length_clips_train_as_before(e2e, tmp_path):
    """The flat cache of 1-s clips and the [N, L] cache of earlier WORKs give the same batches,
    so the same seed trains the same weights."""
    new, old = tmp_path / "new", tmp_path / "old"
    for work in (new, old):
        shutil.copytree(e2e["work"], work, ignore=shutil.ignore_patterns("runs"))
    for split in ("train", "test"):
        np.save(old / f"{split}_wave.npy", cached(new, split))
        (old / f"{split}_offsets.npy").unlink()
    assert np.load(old / "train_wave.npy").ndim == 2
    weights = []
    for work in (new, old):
        run_script("train.py", "--work", work, *TINY, "-f", 0, "-g", "cpu", "--run", "same",
                   "--limit-batches", 3, "--no-progress")
        ckpt = torch.load(work / "runs" / "same" / "fold0" / "best.ckpt", weights_only=True)
        weights.append(ckpt["state_dict"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("flags,said", [(["--head", "sed"], "--head sed is a multilabel head"),
                                        (["--ema", "0.99", "--swa", "0.5"], "pick one")])
def test_options_that_do_not_fit_are_refused(e2e, flags, said):
    proc = run_script("train.py", "--work", e2e["work"], *TINY, "-f", 0, "-g", "cpu",
                      "--run", "refused", *flags, check=False)
    assert proc.returncode == 2 and said in proc.stderr.strip().splitlines()[-1]
    assert not (e2e["work"] / "runs" / "refused").exists()
