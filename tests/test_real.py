"""Real voices: Kokoro speakers and their cache, phrases from --words, the FSDD benchmark's
manifests through preprocess, the fold -1 (train only) rows, and the digit-accuracy score."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from conftest import ROOT, refused, run_script

FSDD = ROOT.parent / "shared" / "data" / "fsdd" / "recordings"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
needs_fsdd = pytest.mark.skipif(not FSDD.is_dir(), reason="../shared/data/fsdd is not here")


# ----------------------------------------------------------------------------- Kokoro
def test_a_kokoro_mix_is_a_new_speaker_between_its_parents():
    """Two voices mixed 50/50 say a word unlike either parent (their style vectors differ, and
    so does the sound), and nearer to each parent than the parents are to each other."""
    import librosa
    from voices import Kokoro, KokoroVoice

    k = Kokoro()
    a, b = KokoroVoice("am_adam"), KokoroVoice("bf_emma")
    mix = KokoroVoice("am_adam", "bf_emma", 0.5)
    assert not np.allclose(mix.style(k.styles), a.style(k.styles))
    assert not np.allclose(mix.style(k.styles), b.style(k.styles))

    def mfcc(v):
        y = k.say("seven", v)
        return librosa.feature.mfcc(y=y, sr=16000, n_mfcc=20).mean(1)

    fa, fb, fm = mfcc(a), mfcc(b), mfcc(mix)
    parents = np.linalg.norm(fa - fb)
    assert np.linalg.norm(fm - fa) > 0.05 * parents and np.linalg.norm(fm - fb) > 0.05 * parents
    assert np.linalg.norm(fm - fa) < parents and np.linalg.norm(fm - fb) < parents


def test_the_kokoro_cache_is_reused(tmp_path):
    from voices import KokoroVoice, cache_path, cached, synthesise

    jobs = [(KokoroVoice("af_heart", speed=1.1), w) for w in ("yes", "no")]
    assert synthesise(jobs, tmp_path, workers=1, progress=False) == 2
    stamps = [cache_path(tmp_path, *j).stat().st_mtime_ns for j in jobs]
    assert synthesise(jobs, tmp_path, workers=1, progress=False) == 0  # nothing said again
    assert [cache_path(tmp_path, *j).stat().st_mtime_ns for j in jobs] == stamps
    yes = cached(tmp_path, *jobs[0])
    assert yes.dtype == np.float32 and 0.2 * 16000 < len(yes) < 1.2 * 16000
    assert np.abs(yes).max() > 0.1  # a word, not silence


def test_a_killed_synthesis_resumes_without_a_half_written_clip(tmp_path):
    """SIGKILL while Kokoro is saying clips: every clip in the cache loads whole, and the next
    run says only the ones missing."""
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from voices import KokoroVoice, synthesise\n"
              "jobs = [(KokoroVoice('bm_lewis'), w) for w in %r]\n"
              "synthesise(jobs, %r, workers=1, progress=False)\n")
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    proc = subprocess.Popen([sys.executable, "-c", script % (str(ROOT), words, str(tmp_path))],
                            start_new_session=True)
    folder = tmp_path / "kokoro"

    def clips():  # a clip being written is a hidden temporary file (.NAME.npy.XXXX.npy)
        return [f for f in folder.glob("*.npy") if not f.name.startswith(".")]

    deadline = time.time() + 120
    while time.time() < deadline and len(clips()) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    made = clips()
    assert 2 <= len(made) < len(words)
    for f in made:
        assert len(np.load(f)) > 1000  # whole clips only
    from voices import KokoroVoice, synthesise

    jobs = [(KokoroVoice("bm_lewis"), w) for w in words]
    assert synthesise(jobs, tmp_path, workers=1, progress=False) == len(words) - len(made)
    assert len(clips()) == len(words) and all(len(np.load(f)) > 1000 for f in clips())


def test_kokoro_voices_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("UAC_TTS_HOME", str(tmp_path / "nothing"))
    proc = run_script("demo.py", "--out", tmp_path / "d", "--words", "yes", "--speakers", 2,
                      "--kokoro", 2, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "make kokoro" in proc.stderr and "kokoro-js@1.2.1" in proc.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- phrases
def test_phrases_are_said_whole_and_labelled_with_underscores(tmp_path):
    run_script("demo.py", "--out", tmp_path / "d", "--words", "alexa, smart  mirror ,stop",
               "--speakers", 3, "--kokoro", 1, "--clip-seconds", 1.5, "--cache",
               tmp_path / "cache", "--jobs", 1)
    train = tmp_path / "d" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["alexa", "smart_mirror", "stop"]
    clips = sorted((train / "smart_mirror").glob("*.wav"))
    assert len(clips) == 3  # two espeak-ng speakers and the Kokoro one (one espeak in test)
    for c in clips:
        y, sr = sf.read(c)
        assert sr == 16000 and len(y) <= 24000
    meta = pd.read_csv(tmp_path / "d" / "meta.csv")
    assert meta.voice.str.startswith("kokoro:").sum() == 3  # one speaker, three phrases
    assert set(pd.read_csv(tmp_path / "d" / "solution.csv").label) == {"alexa", "smart_mirror",
                                                                       "stop"}


@pytest.mark.parametrize("args,said", [
    (["--words", "yes,a/b"], "cannot name a class folder"),
    (["--words", "yes,_x"], "cannot name a class folder"),
    (["--words", "smart mirror,smart_mirror"], "given twice"),
    (["--words", " , "], "no words given"),
    (["--kokoro", "-1"], "--kokoro -1"),
    (["--clip-seconds", "0"], "--clip-seconds 0"),
    (["--accents", "en-us,xx"], "espeak-ng has no 'xx'"),
])
def test_demo_refuses_bad_words_and_counts(tmp_path, args, said):
    proc = run_script("demo.py", "--out", tmp_path / "d", *args, check=False)
    assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


# ----------------------------------------------------------------------------- manifests
def write_clip(path: Path, sr: int = 16000, seconds: float = 0.5, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, 0.1 * rng.standard_normal(int(sr * seconds)), sr, subtype="PCM_16")
    return str(path)


def test_rows_added_to_a_manifest_without_a_fold_are_drawn():
    """--silence's rows join a manifest's rows with no fold column of their own (NaN after the
    concat): they are drawn like a blank, never refused as fold 'nan'."""
    from layouts import folds_of

    given = pd.DataFrame(dict(path=[f"s{i % 4}_nohash_{i}.wav" for i in range(8)],
                              label=["yes", "no"] * 4, group=[f"g{i % 4}" for i in range(8)],
                              fold=["", "", "", "", "", "", "-1", ""]))
    added = pd.DataFrame(dict(path=[f"sil{i}.wav" for i in range(4)], label="_silence_",
                              group=[f"sil{i}" for i in range(4)]))
    fold = folds_of(pd.concat([given, added], ignore_index=True), 2, 0, "m.csv")
    assert fold[6] == -1 and set(np.delete(fold, 6)) == {0, 1}


def test_manifest_folds_given_drawn_and_train_only(tmp_path):
    """A fold column with numbers, blanks (drawn by StratifiedGroupKFold) and -1 (trained in
    every fold, never validated); a blank group is that row's own (its speaker), the others
    are kept."""
    from arg import Config
    from layouts import prepare
    from runs import Work

    rows = []
    for spk in range(6):
        for lab in ("yes", "no"):
            rows.append(dict(path=write_clip(tmp_path / f"{lab}/s{spk}_nohash_0.wav", seed=spk),
                             label=lab, group="" if spk == 0 else f"g{spk}", fold=""))
    rows += [dict(path=write_clip(tmp_path / f"ext/{lab}_{i}.wav", seed=10 + i), label=lab,
                  group="ext", fold=-1) for i, lab in enumerate(("yes", "no", "yes"))]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    work = tmp_path / "w"
    s = prepare(Config(manifest=str(tmp_path / "m.csv"), work=str(work), n_folds=3), workers=1)
    train = pd.read_csv(work / "train.csv", keep_default_na=False)
    ext = train.path.str.contains("/ext/")
    assert (train.fold[ext] == -1).all() and sorted(train.fold[~ext].unique()) == [0, 1, 2]
    assert Work(work).folds() == [0, 1, 2] and s["n_folds"] == 3
    assert set(train.group[~ext]) == {"s0", "g1", "g2", "g3", "g4", "g5"}  # s0 from its name
    assert (train[~ext].groupby("group").fold.nunique() == 1).all()

    from dataset import FoldData

    data = FoldData(Config(work=str(work), batch_size=4), 0)
    assert not data.val_table.path.str.contains("/ext/").any()
    assert set(train.row[ext]) <= set(np.asarray(data.train_ds.rows).tolist())


@pytest.mark.parametrize("fold,said", [("x", "fold 'x'"), ("-2", "fold '-2'"), ("1.5", "fold '1.5'")])
def test_manifest_refuses_a_fold_that_is_not_a_number(tmp_path, fold, said):
    rows = [dict(path=write_clip(tmp_path / f"c{i}.wav", seed=i), label="yes", fold=fold if i
                 else 0) for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    proc = run_script("preprocess.py", "--manifest", tmp_path / "m.csv", "--work", tmp_path / "w",
                      check=False)
    assert proc.returncode == 2 and said in proc.stderr and "row 2" in proc.stderr
    assert not (tmp_path / "w" / "prep.json").exists()


def test_manifest_of_train_only_rows_is_refused(tmp_path):
    rows = [dict(path=write_clip(tmp_path / f"c{i}.wav", seed=i), label="yes", fold=-1)
            for i in range(2)]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    proc = run_script("preprocess.py", "--manifest", tmp_path / "m.csv", "--work", tmp_path / "w",
                      check=False)
    assert proc.returncode == 2 and "no fold to validate" in proc.stderr


def test_manifest_noise_comes_from_beside_it_or_noise_never_from_data(tmp_path, demo_data):
    """A manifest run takes no background noise from --data's default folder: only from a
    _background_noise_/ beside the manifest, or --noise DIR; prep.json says which."""
    rows = [dict(path=write_clip(tmp_path / f"{lab}/s{i}_nohash_0.wav", seed=i), label=lab)
            for i in range(4) for lab in ("yes", "no")]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    base = ["--manifest", tmp_path / "m.csv", "--n-folds", 2, "--data", demo_data]
    run_script("preprocess.py", *base, "--work", tmp_path / "w1")
    prep = json.loads((tmp_path / "w1" / "prep.json").read_text())
    assert prep["noise_seconds"] == 0 and prep["noise"] == "" and prep["data"] == ""
    assert not (tmp_path / "w1" / "noise.npy").exists()
    write_clip(tmp_path / "_background_noise_" / "hum.wav", seconds=2.0)
    run_script("preprocess.py", *base, "--work", tmp_path / "w2")
    prep = json.loads((tmp_path / "w2" / "prep.json").read_text())
    assert prep["noise_seconds"] == 2.0 and prep["noise"].endswith("_background_noise_")
    run_script("preprocess.py", *base, "--work", tmp_path / "w3", "--noise",
               demo_data / "_background_noise_")
    prep = json.loads((tmp_path / "w3" / "prep.json").read_text())
    assert prep["noise"] == str(demo_data / "_background_noise_") and prep["noise_seconds"] > 2
    proc = run_script("preprocess.py", *base, "--work", tmp_path / "w4", "--noise",
                      tmp_path / "nowhere", check=False)
    assert proc.returncode == 2 and "--noise" in proc.stderr and "no such folder" in proc.stderr


# ----------------------------------------------------------------------------- the benchmark
@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """real.py's manifests over a tiny synthetic set (every digit word) and the real FSDD."""
    if not FSDD.is_dir():
        pytest.skip("../shared/data/fsdd is not here")
    import synth

    root = tmp_path_factory.mktemp("real")
    synth.make_dataset(root / "synth", speakers=6, seed=2, workers=2, progress=False,
                       words=DIGITS + ("yes",))
    run_script("real.py", "data", "--fsdd", FSDD, "--synth", root / "synth", "--out",
               root / "bench", "--real-speaker", "theo")
    return root


@needs_fsdd
def test_benchmark_manifests_hold_fsdd_as_the_test_set(benchmark):
    bench = benchmark / "bench"
    synth = pd.read_csv(bench / "synth.csv", keep_default_na=False)
    test = synth[synth.split == "test"]
    assert len(test) == 3000 and set(test.label) == set(DIGITS)
    assert (synth[synth.split == "train"].path.str.contains("/synth/train/")).all()
    sol = pd.read_csv(bench / "synth_solution.csv")
    assert sorted(sol.speaker.unique()) == ["george", "jackson", "lucas", "nicolas", "theo",
                                            "yweweler"]
    few = pd.read_csv(bench / "few.csv", keep_default_na=False)
    heard = few.path.str.contains("_theo_")
    assert heard.sum() == 3000 // 6 and (few.split[heard] == "train").all()
    assert (few.fold[heard].astype(int) == -1).all()
    assert len(pd.read_csv(bench / "few_solution.csv").query("speaker == 'theo'")) == 0
    real_ = pd.read_csv(bench / "real.csv")
    assert real_.groupby("group").fold.nunique().eq(1).all() and real_.fold.nunique() == 6
    # open set: five digits learnt, every other word and digit _unknown_, in training and test
    known = {"zero", "one", "two", "three", "four"}
    opened = pd.read_csv(bench / "openset.csv", keep_default_na=False)
    assert set(opened.label) == known | {"_unknown_"}
    was = synth.set_index("path").label
    assert (opened.label == opened.path.map(was).where(opened.path.map(was).isin(known),
                                                       "_unknown_")).all()
    sol = pd.read_csv(bench / "openset_solution.csv")
    assert (sol.label == "_unknown_").sum() == 1500 and set(sol.label) == set(opened.label)
    real_open = pd.read_csv(bench / "openset_real.csv")
    assert (real_open.fold == real_.fold).all() and (real_open.label == "_unknown_").sum() == 1500
    # the long recording of other speech: the other five digits' clips one after another, as
    # its table says, and nothing between them
    other = pd.read_csv(bench / "openset_other.csv")
    assert len(other) == 1500 and not other.label.isin(known).any()
    assert other.file_name.nunique() == 1500 and other.speaker.nunique() == 6
    y, sr = sf.read(bench / "openset_other.wav")
    assert sr == 8000
    gaps = other.start.to_numpy()[1:] - other.end.to_numpy()[:-1]
    assert gaps.min() >= 0.2 - 1e-3 and gaps.max() <= 0.8 and len(y) / sr > other.end.max()
    for r in other.sample(3, random_state=0).itertuples():
        clip, _ = sf.read(FSDD / r.file_name)
        at = int(round(r.start * sr))
        assert np.abs(y[at:at + len(clip)] - clip).max() < 1e-3  # the clip itself, at its start
        assert not y[int(round(r.end * sr)) + 1:int(round(r.end * sr)) + int(0.2 * sr) - 1].any()


@needs_fsdd
@pytest.mark.parametrize("known, said", [("zero,ten", "ten"), (",".join(DIGITS), "all ten")])
def test_real_refuses_known_words_that_are_not_some_digits(benchmark, tmp_path, known, said):
    line = refused("real.py", "data", "--fsdd", FSDD, "--synth", benchmark / "synth", "--out",
                   tmp_path, "--known", known)
    assert said in line and not list(tmp_path.iterdir())


@needs_fsdd
def test_fsdd_8khz_clips_go_through_preprocess_at_16khz(benchmark, tmp_path):
    """The 8 kHz recordings are decoded once at 16 kHz (soxr, as every clip), and scored by
    the speaker column of the solution."""
    from audio import read_audio
    from cache import Clips

    work = tmp_path / "w"
    run_script("preprocess.py", "--manifest", benchmark / "bench" / "synth.csv", "--work", work)
    test = pd.read_csv(work / "test.csv")
    assert (test.orig_sr == 8000).all() and len(test) == 3000
    clips = Clips.of(work, "test")
    for i in (0, 1234, 2999):
        y8, sr = sf.read(test.path[i])
        assert sr == 8000 and len(clips.clip(i)) == 2 * len(y8)
        want = np.round(read_audio(test.path[i], 16000) * 32768).clip(-32768, 32767)
        assert np.array_equal(clips.clip(i), want.astype(np.int16))
    prep = json.loads((work / "prep.json").read_text())
    assert prep["noise"].endswith("_background_noise_") and prep["noise_seconds"] > 0


def test_digit_accuracy_is_the_most_probable_of_the_solution_labels(tmp_path):
    """Where the true labels are fewer than the classes, accuracy_within takes the most
    probable of them: a clip whose top class is a distractor can still be right."""
    from submission import score_test

    classes = ["bed", "one", "two", "yes"]
    score = np.array([[0.1, 0.6, 0.3, 0.0],    # one: right either way
                      [0.5, 0.2, 0.3, 0.0],    # two: top-1 bed (wrong), within -> two (right)
                      [0.0, 0.1, 0.2, 0.7],    # one: top-1 yes, within -> two (wrong)
                      [0.0, 0.45, 0.55, 0.0]])  # one: wrong either way
    pd.DataFrame({"file_name": list("abcd"), "label": ["one", "two", "one", "one"],
                  "speaker": ["x", "x", "y", "y"]}).to_csv(tmp_path / "s.csv", index=False)
    test = pd.DataFrame({"file_name": list("abcd"), "label": ""})
    got = score_test(test, score, classes, str(tmp_path / "s.csv"), tmp_path, "1 fold")
    assert got["accuracy"] == 0.25 and got["accuracy_within"] == 0.5
    assert got["within"] == ["one", "two"]
    assert got["by_within"] == {"speaker": {"x": 1.0, "y": 0.0}}
    assert got["by"] == {"speaker": {"x": 0.5, "y": 0.0}}
    saved = json.loads((tmp_path / "test_score.json").read_text())
    assert saved["accuracy_within"] == 0.5


@pytest.mark.parametrize("args,said", [
    (["data", "--fsdd", "nowhere", "--synth", "x", "--out", "y"], "--fsdd nowhere: no such folder"),
    (["table", "--work", "nowhere", "--runs", "r"], "nowhere/classes.json not found"),
    (["table", "--work", "prepared", "--runs", "r"], "run r: no finished fold"),
])
def test_real_refuses_missing_folders(tmp_path, args, said):
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "classes.json").write_text('["one", "two"]')
    args = [str(tmp_path / a) if a == "prepared" else a for a in args]
    proc = run_script("real.py", *args, check=False)
    assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr


@needs_fsdd
def test_real_refuses_a_synthetic_set_without_every_digit(tmp_path):
    write_clip(tmp_path / "s" / "train" / "one" / "a_nohash_0.wav")
    proc = run_script("real.py", "data", "--fsdd", FSDD, "--synth", tmp_path / "s", "--out",
                      tmp_path / "o", check=False)
    assert proc.returncode == 2 and "no clips of eight, five" in proc.stderr
    proc = run_script("real.py", "data", "--fsdd", FSDD, "--synth", tmp_path / "s", "--out",
                      tmp_path / "o", "--real-speaker", "nobody", check=False)
    assert proc.returncode == 2 and "not an FSDD speaker" in proc.stderr


# ----------------------------------------------------------------------------- codecs
@pytest.mark.parametrize("name", ["gsm", "ulaw", "alaw", "ima_adpcm", "ms_adpcm", "mp3",
                                  "vorbis", "opus"])
def test_a_codec_round_trip_keeps_the_length_and_changes_the_sound(name):
    from audio import codec

    t = np.arange(16000) / 16000
    y = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    z = codec(y, 16000, name)
    assert z.shape == y.shape and z.dtype == np.float32 and np.isfinite(z).all()
    assert 0 < np.abs(z - y).mean()  # lossy
    spec_y, spec_z = (np.abs(np.fft.rfft(v)) for v in (y, z))
    assert spec_z[440] > 0.5 * spec_y[440]  # the speech band survives
    if name in ("gsm", "ulaw", "alaw"):  # 8 kHz lines: nothing above 4 kHz comes back
        assert spec_z[6000] < 0.01 * spec_y[6000]


def test_the_loader_sends_chosen_clips_through_codecs(tmp_path):
    from cache import Clips
    from dataset import WaveDataset
    from cache import save_offsets, write_clips

    rng = np.random.default_rng(0)
    clips_in = [(0.2 * rng.standard_normal(16000) * 32767).astype(np.int16) for _ in range(16)]
    from runs import Work

    offsets = write_clips(Work(tmp_path).wave("train"), [clips_in])
    save_offsets(tmp_path, "train", offsets)
    clips = Clips.of(tmp_path, "train")
    plain = WaveDataset(clips, length=16000).__getitems__(list(range(16)))[0]
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    every = WaveDataset(clips, length=16000, codecs=("gsm", "mp3"), p_codec=1.0)
    coded = every.__getitems__(list(range(16)))[0]
    assert coded.shape == plain.shape and (coded != plain).any(1).all()
    none = WaveDataset(clips, length=16000, codecs=("gsm",), p_codec=0.0)
    assert torch.equal(none.__getitems__(list(range(16)))[0], plain)
    proc = run_script("train.py", "--codecs", "gsm", "amr", check=False)
    assert proc.returncode == 2 and "invalid choice: 'amr'" in proc.stderr


def test_the_table_reads_digits_speakers_and_the_cv(e2e, tmp_path):
    """real.py table: digit accuracy and each speaker from test_score.json, the worst, the
    CV (or the folds' validation), epochs, folds; a run without a test set shows each group's
    out-of-fold accuracy instead."""
    import shutil

    work = tmp_path / "w"
    shutil.copytree(e2e["work"], work)
    run = work / "runs" / "resnet18_32"
    (run / "test_score.json").write_text(json.dumps(dict(
        accuracy=0.5, accuracy_within=0.75, by_within=dict(speaker=dict(george=0.9, theo=0.6)))))
    out = run_script("real.py", "table", "--work", work, "--runs", "resnet18_32").stdout
    row = out.strip().splitlines()[-1].split(" | ")
    cv = json.loads((run / "cv.json").read_text())["accuracy"]
    assert row[1:5] == ["0.7500", "0.5000", "0.6000", "geo 0.90 the 0.60"]
    assert row[5:8] == [f"{cv:.4f}", "1", "2"]
    (run / "test_score.json").unlink()
    row = run_script("real.py", "table", "--work", work, "--runs", "resnet18_32").stdout
    groups = pd.read_csv(work / "train.csv").group.nunique()
    assert len(row.strip().splitlines()[-1].split(" | ")[4].split()) == 2 * groups


# ----------------------------------------------------------------------------- the real stream
@pytest.fixture(scope="module")
def stream_sources(tmp_path_factory):
    """FSDD-named clips of four speakers and four asterisk-like prompts with transcripts: two
    say a digit or number word and must be left out."""
    import gzip

    root = tmp_path_factory.mktemp("streams")
    fsdd = root / "fsdd"
    fsdd.mkdir()
    for d in range(10):
        for s, speaker in enumerate(("ann", "bob", "cy", "dee")):
            for i in range(2):
                write_clip(fsdd / f"{d}_{speaker}_{i}.wav", 8000, 0.3, seed=100 * d + 10 * s + i)
    prompts = root / "prompts"
    (prompts / "digits").mkdir(parents=True)
    said = {"hello": "Hello there.", "press-one": "Press one for sales.", "digits/5": "five",
            "goodbye": "Goodbye, thanks for calling."}
    for i, name in enumerate(said):
        write_clip(prompts / f"{name}.wav", 8000, 1.0, seed=900 + i)
    with gzip.open(root / "core-sounds-en.txt.gz", "wt") as f:
        f.write("; prompts\n" + "".join(f"{k}: {v}\n" for k, v in said.items()))
    return dict(root=root, fsdd=fsdd, prompts=prompts, transcripts=root / "core-sounds-en.txt.gz")


def test_the_real_stream_holds_each_keyword_where_its_table_says(stream_sources, tmp_path):
    from audio import read_audio

    s = stream_sources
    proc = run_script("stream.py", "data", "--fsdd", s["fsdd"], "--asterisk", s["prompts"],
                      "--transcripts", s["transcripts"], "--fit-speakers", "ann,bob",
                      "--out", tmp_path)
    assert "(2 prompts kept)" in proc.stdout  # "press one" and "five" said a number
    truth = pd.read_csv(tmp_path / "stream_test.csv")
    assert len(truth) == 5 * 2 * 2 and set(truth.word) == set(DIGITS[:5])
    assert set(truth.speaker) == {"cy", "dee"}  # the fit speakers' digits are not tested
    y, sr = sf.read(tmp_path / "stream_test.wav", dtype="float32")
    assert sr == 8000 and truth.start.is_monotonic_increasing
    for row in truth.itertuples():
        clip = read_audio(s["fsdd"] / row.file_name, 8000)
        at = round(row.start * sr)
        assert np.abs(y[at:at + len(clip)] - clip).max() < 1e-3  # no noise asked: the clip
        assert row.end == pytest.approx(row.start + len(clip) / sr)
    fit = sf.info(tmp_path / "stream_fit.wav").duration
    assert 0.3 * 5 * 2 * 2 + 1.0 * 1 < fit < 0.3 * 20 + 1.0 + 0.8 * 21  # others + a prompt
    # the held-out keywords the rule's windows are chosen on: the fit speakers' only
    held = pd.read_csv(tmp_path / "stream_fit_keys.csv")
    assert len(held) == 5 * 2 * 2 and set(held.word) == set(DIGITS[:5])
    assert set(held.speaker) == {"ann", "bob"} and not set(held.file_name) & set(truth.file_name)
    y, sr = sf.read(tmp_path / "stream_fit_keys.wav", dtype="float32")
    for row in held.itertuples():
        clip = read_audio(s["fsdd"] / row.file_name, 8000)
        at = round(row.start * sr)
        assert np.abs(y[at:at + len(clip)] - clip).max() < 1e-3
    assert "20 keywords of the fit speakers (stream_fit_keys.csv)" in proc.stdout


@pytest.mark.parametrize("args,said", [
    (["--asterisk", "nowhere"], "--asterisk nowhere: no such folder: apt-get install"),
    (["--transcripts", "nowhere.gz"], "--transcripts nowhere.gz: no such file: apt-get install"),
    (["--fit-speakers", "ann,zed"], "--fit-speakers ann,zed: some FSDD speakers, not all"),
    (["--fit-speakers", "ann,bob,cy,dee"], "--fit-speakers ann,bob,cy,dee: some FSDD speakers"),
    (["--known", "zero,ten"], "--known zero,ten: some of the ten digit words"),
    (["--snr", "nan"], "--snr nan: expected dB"),
])
def test_stream_refuses_what_it_cannot_build_from(stream_sources, tmp_path, args, said):
    from conftest import refusal

    s = stream_sources
    flags = {"--fsdd": s["fsdd"], "--asterisk": s["prompts"], "--transcripts": s["transcripts"],
             "--fit-speakers": "ann,bob", **dict(zip(args[::2], args[1::2]))}
    got = refusal("stream.py", "data", *[x for kv in flags.items() for x in kv],
                  "--out", tmp_path / "out")
    assert got.startswith(f"stream: {said}"), got
    assert not (tmp_path / "out").exists()
