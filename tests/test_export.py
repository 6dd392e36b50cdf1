"""ONNX export of a fold ensemble, the torch-free predictor, windows over long recordings."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from conftest import ROOT, TINY, cached, hears_interrupts, refusal, run_script

BLOCKED = ("torch", "torchvision", "torchaudio", "lightning", "pytorch_lightning", "timm",
           "librosa", "sklearn", "scipy", "pandas", "matplotlib")


@pytest.fixture(scope="module")
def exported(e2e, tmp_path_factory):
    """The end-to-end run (2 folds) exported with and without TTA, the TTA one as a bundle."""
    out = tmp_path_factory.mktemp("export")
    run_script("export.py", "--work", e2e["work"], "--run", "resnet18_32", "-f", 2,
               "--out", out / "plain.onnx")
    run_script("export.py", "--work", e2e["work"], "--run", "resnet18_32", "-f", 2, "-a", "y",
               "--out", out / "tta.onnx", "--bundle", out / "bundle")
    return out


@pytest.mark.parametrize("tta", [False, True])
def test_onnx_matches_the_pytorch_ensemble(e2e, exported, tta):
    import onnxruntime as ort

    from ensemble import ensemble
    from ensemble import predict_waves

    waves = cached(e2e["work"], "test")
    paths = [e2e["run"] / f"fold{k}" / "best.ckpt" for k in (0, 1)]
    probs, classes = predict_waves(paths, waves, tta, torch.device("cpu"), 64)
    want = ensemble(probs, "soft")[1]
    session = ort.InferenceSession(str(exported / ("tta.onnx" if tta else "plain.onnx")))
    got = session.run(None, {"wave": (waves / 32768.0).astype(np.float32)})[0]
    assert got.shape == want.shape == (30, len(classes))
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == classes
    assert (meta["sample_rate"], meta["clip_samples"], meta["tta"]) == ("16000", "16000", str(tta))
    one = session.run(None, {"wave": (waves[:1] / 32768.0).astype(np.float32)})[0]  # any batch
    assert np.allclose(one, got[:1], atol=1e-5)


def torch_free_env(tmp_path):
    """An environment whose Python cannot import torch, Lightning, timm, librosa, pandas..."""
    block = tmp_path / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        f"    names = {set(BLOCKED)!r}\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in self.names:\n"
        "            raise ImportError(f'{name} is blocked here')\n"
        "sys.meta_path.insert(0, Block())\n")
    return dict(os.environ, PYTHONPATH=str(block))


def test_the_bundle_predicts_without_torch(e2e, exported, tmp_path):
    env = torch_free_env(tmp_path)
    for name in ("torch", "timm", "lightning"):  # prove the blocker works
        probe = subprocess.run([sys.executable, "-c", f"import {name}"], env=env,
                               capture_output=True, text=True)
        assert probe.returncode != 0 and "blocked here" in probe.stderr
    bundle = exported / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "audio.py", "predict.py",
                                                        "predictor.py",
                                                        "requirements.txt", "tta.onnx"]
    assert (bundle / "requirements.txt").read_text().split()[0].startswith("numpy")
    files = sorted((e2e["data"] / "test").glob("*.wav"))[:6]
    (tmp_path / "bad.wav").write_text("not audio")
    sf.write(tmp_path / "empty.wav", np.zeros(0), 16000)
    proc = subprocess.run([sys.executable, str(bundle / "predict.py"), str(bundle / "tta.onnx"),
                           *map(str, files), str(tmp_path / "bad.wav"), str(tmp_path / "empty.wav"),
                           "--csv", str(tmp_path / "out.csv")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr  # two files skipped
    assert "bad.wav: skipped - not audio (" in proc.stderr
    assert "empty.wav: skipped - empty (0 samples)" in proc.stderr
    got = pd.read_csv(tmp_path / "out.csv")
    want = pd.read_csv(e2e["run"] / "test_probs.csv").set_index("file_name")
    assert [p.split("/")[-1] for p in got.path] == [f.name for f in files]
    # the same labels as inference.py -f 2 -a y gave for those clips
    assert list(got.label1) == list(want.loc[[f.name for f in files]].idxmax(axis=1))


@pytest.fixture(scope="module")
def three_words(tmp_path_factory):
    """A 3-word model trained on clean demo speech, exported (fold 0)."""
    import synth

    root = tmp_path_factory.mktemp("words")
    clean = dataclasses.replace(synth.PRESETS["demo"], p_noise=0.0, p_short=0.0)
    synth.make_dataset(root / "data", speakers=200, seed=3, preset=clean,
                      words=("marvin", "up", "six"), workers=2, progress=False)
    run_script("preprocess.py", "--data", root / "data", "--work", root / "work", "--n-folds", 2)
    run_script("train.py", "--work", root / "work", "-m", "resnet18", "-t", 32, "-e", 8,
               "-b", 32, "-l1", 0.003, "-f", 0, "-g", "cpu", "--aug", "none", "--no-progress")
    run_script("export.py", "--work", root / "work", "--run", "resnet18_32", "-f", 1,
               "--out", root / "words.onnx")
    return root


def three_word_recording(seconds: float = 5.5):
    """(5.5 s of float32 16 kHz audio holding marvin, up and six, [(word, centre second)], sr)."""
    import synth

    espeak, rng, sr = synth.Espeak(), np.random.default_rng(0), 16000
    rec = np.zeros(int(seconds * sr), np.float32)
    truth = []
    for word, centre in (("marvin", 1.0), ("up", 2.5), ("six", 4.0)):
        y = 0.3 * synth.espeak_at_sr(espeak, word, "en-us+m3", rng, pitch=50, prange=50, rate=170)
        start = int(centre * sr - len(y) / 2)
        rec[start:start + len(y)] += y
        truth.append((word, centre))
    return rec, truth, sr


def heard_in(stdout: str, name: str) -> list[tuple[str, float]]:
    """predict.py's detection lines for recording `name`: [(word, second)]."""
    found = [re.fullmatch(rf".*{re.escape(name)}: (\S+) at ([\d.]+) s \([\d.]+\)", line)
             for line in stdout.splitlines()]
    return [(m[1], float(m[2])) for m in found if m]


def test_windows_find_three_words_in_order_at_their_times(three_words, tmp_path):
    rec, truth, sr = three_word_recording()
    sf.write(tmp_path / "rec.wav", rec, sr)
    sf.write(tmp_path / "short.wav", rec[:sr // 2], sr)
    hop = 0.25
    proc = subprocess.run([sys.executable, str(ROOT / "predict.py"),
                           str(three_words / "words.onnx"), str(tmp_path / "rec.wav"),
                           str(tmp_path / "short.wav"), "--window", "1", "--hop", str(hop),
                           "--csv", str(tmp_path / "rows.csv"), "--patience", "2",
                           "--refractory", "0.5"],
                          env=torch_free_env(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "short.wav: 0.50 s, shorter than one 1 s window: one padded window" in proc.stderr
    rows = pd.read_csv(tmp_path / "rows.csv", keep_default_na=False)
    rec_rows = rows[rows.path.str.endswith("rec.wav")]
    assert list(rec_rows.start) == [i * hop for i in range(len(rec_rows))]
    # the detections (the rule over time: two windows in a row, 0.5 s apart, for words 1.5 s
    # apart): each word once, in order, printed when the second window that hears it ends
    heard = heard_in(proc.stdout, "rec.wav")
    assert [w for w, _ in heard] == [w for w, _ in truth]
    for (_, t), (_, centre) in zip(heard, truth):
        assert centre - 0.5 <= t <= centre + 1 + hop  # said once its windows have heard it
    assert proc.stdout.strip().splitlines()[-1].startswith("predict: 3 detections in")


def start_stream(three_words, tmp_path, *flags, stdout=subprocess.PIPE):
    """predict.py MODEL - (torch-free), reading standard input."""
    return subprocess.Popen([sys.executable, str(ROOT / "predict.py"),
                             str(three_words / "words.onnx"), "-", *map(str, flags)],
                            stdin=subprocess.PIPE, stdout=stdout, stderr=subprocess.PIPE,
                            env=torch_free_env(tmp_path), preexec_fn=hears_interrupts)


def pcm(y: np.ndarray) -> bytes:
    return (np.clip(y, -1, 1) * 32767).astype("<i2").tobytes()


def test_predict_hears_a_stream_as_it_arrives(three_words, tmp_path):
    """`... | predict.py MODEL -`: raw PCM written at real-time pace; each word is printed
    while the stream still runs, within about a window of its end, and once."""
    import threading
    import time

    rec, truth, sr = three_word_recording(9.5)  # 4 s of quiet after the last word
    proc = start_stream(three_words, tmp_path, "--patience", 2, "--refractory", 0.5)
    lines, began = [], time.monotonic()
    reader = threading.Thread(target=lambda: lines.extend(
        (time.monotonic() - began, line) for line in proc.stdout))
    reader.start()
    step = sr // 10
    for i in range(0, len(rec), step):  # 0.1 s at a time, as a sound card gives it
        proc.stdin.write(pcm(rec[i:i + step]))
        proc.stdin.flush()
        time.sleep(max(0.0, began + (i + step) / sr - time.monotonic()))
    written = time.monotonic() - began
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    reader.join()
    out = "".join(line.decode() for _, line in lines)
    heard = heard_in(out, "-")
    assert [w for w, _ in heard] == [w for w, _ in truth]
    first = next(at for at, line in lines if b"marvin" in line)
    assert first < written - 3  # printed as it happened, not when the stream ended
    assert f"predict: 3 detections in {9.5 / 60:.1f} min" in out


def test_a_stream_ends_with_one_line_on_a_signal_a_closed_pipe_or_bad_audio(three_words,
                                                                           tmp_path):
    import io
    import signal
    import time

    rec, _, sr = three_word_recording()
    wav = io.BytesIO()
    sf.write(wav, rec, sr, format="WAV", subtype="PCM_16")  # a WAV stream is read too
    for sig, code, said in ((signal.SIGINT, 130, "predict: stopped (^C)"),
                            (signal.SIGTERM, 143, "predict: stopped (SIGTERM)")):
        proc = start_stream(three_words, tmp_path)
        proc.stdin.write(wav.getvalue()[:44 + 2 * sr])
        proc.stdin.flush()
        time.sleep(3)
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1].decode()
        assert proc.returncode == code and err.strip() == said, (proc.returncode, err)
    # the reader of its output goes away: one line, no traceback
    proc = start_stream(three_words, tmp_path)
    proc.stdout.close()
    _, err = proc.communicate(wav.getvalue(), timeout=60)
    assert proc.returncode == 141 and err.decode().strip() == \
        "predict: the output was closed; stopped", err
    # what is not 16-bit PCM is refused in one line
    proc = start_stream(three_words, tmp_path)
    fmt = b"fmt \x10\x00\x00\x00\x03\x00\x01\x00\x80\x3e\x00\x00\x00\xfa\x00\x00\x04\x00\x20\x00"
    _, err = proc.communicate(b"RIFF\x24\x00\x00\x00WAVE" + fmt + b"data\x00\x00\x00\x00",
                              timeout=60)  # 32-bit float
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "format 3, 32 bits" in lines[0], err


@pytest.mark.parametrize("flags, said", [
    (["--min-prob", 2], "--min-prob 2.0: expected a probability in [0, 1]"),
    (["--min-prob", -1], "--min-prob -1.0: expected a probability in [0, 1]"),
    (["--min-prob", "nan"], "--min-prob nan: expected a probability in [0, 1]"),
    (["--smooth", 0], "--smooth 0: expected a number of windows, 1 or more"),
    (["--patience", 0], "--patience 0: expected a number of windows, 1 or more"),
    (["--refractory", -1], "--refractory -1.0: expected seconds, 0 or more"),
    (["--refractory", "nan"], "--refractory nan: expected seconds, 0 or more"),
])
def test_predict_refuses_rules_out_of_range(three_words, flags, said):
    got = refusal("predict.py", three_words / "words.onnx", "-", *flags)
    assert got == f"predict: {said}"


def test_the_bundle_s_embedding_equals_torch_s_and_holds_the_words(e2e, exported, tmp_path):
    """The exported graph's second output is fold 0's pooled vector (1e-4 of torch's);
    predict.py --embed writes it, torch-free; and on the generated speech two clips of one
    word are closer (cosine) than clips of two words, on average."""
    import onnxruntime as ort

    from ensemble import embed_waves

    waves = cached(e2e["work"], "train")
    labels = pd.read_csv(e2e["work"] / "train.csv").label.to_numpy()
    want = embed_waves(e2e["run"] / "fold0" / "best.ckpt", waves, torch.device("cpu"), 64)
    session = ort.InferenceSession(str(exported / "tta.onnx"))
    got = session.run(["embedding"], {"wave": (waves / 32768.0).astype(np.float32)})[0]
    assert got.shape == want.shape == (len(waves), 512)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    unit = got / np.linalg.norm(got, axis=1, keepdims=True)
    cos = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    assert cos[same & off].mean() > cos[~same].mean()
    files = sorted((e2e["data"] / "train").glob("*/*.wav"))[:4]
    bundle = exported / "bundle"
    proc = subprocess.run([sys.executable, str(bundle / "predict.py"), str(bundle / "tta.onnx"),
                           *map(str, files), "--embed", str(tmp_path / "vec.npy")],
                          cwd=tmp_path, env=torch_free_env(tmp_path), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    vec = np.load(tmp_path / "vec.npy")
    assert vec.shape == (4, 512)
    assert pd.read_csv(tmp_path / "vec.csv").path.tolist() == list(map(str, files))
    y = sf.read(files[0], dtype="float32")[0][:16000]
    first = session.run(["embedding"], {"wave": np.pad(y, (0, 16000 - len(y)))[None]})[0]
    assert np.abs(vec[0] - first[0]).max() <= 1e-4 * max(1.0, np.abs(first).max())


def test_inference_writes_the_test_clips_embeddings(e2e, tmp_path):
    from ensemble import embed_waves

    run_script("inference.py", "--work", e2e["work"], "-m", "resnet18", "-t", 32, "-f", 1,
               "--embed", "--out", tmp_path)
    vectors = np.load(tmp_path / "embeddings.npy")
    names = pd.read_csv(tmp_path / "embeddings.csv")
    test = pd.read_csv(e2e["work"] / "test.csv", keep_default_na=False)
    assert names.file_name.tolist() == test.file_name.tolist() and vectors.shape == (len(test), 512)
    want = embed_waves(e2e["run"] / "fold0" / "best.ckpt", cached(e2e["work"], "test"),
                       torch.device("cpu"), 64)
    assert np.abs(vectors - want).max() < 1e-4


@pytest.fixture(scope="module")
def two_runs(e2e, tmp_path_factory):
    """A second run on the end-to-end WORK (another seed), blended with the first by
    inference.py with --weights and with --fit-weights."""
    work = e2e["work"]
    run_script("train.py", "--work", work, *TINY, "-f", "all", "-g", "cpu,cpu", "--seed", 7,
               "--run", "second")
    out = tmp_path_factory.mktemp("blends")
    run_script("inference.py", "--work", work, "--runs", "resnet18_32", "second", "-f", 2,
               "--weights", 1, 3, "--out", out / "weighted")
    run_script("inference.py", "--work", work, "--runs", "resnet18_32", "second", "-f", 2,
               "--fit-weights")
    return out


def graph_probs(path, waves) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path))
    return session.run(["probs"], {"wave": (waves / 32768.0).astype(np.float32)})[0]


def test_the_graph_applies_the_blend_inference_used(e2e, two_runs, tmp_path):
    """--weights and --blend (blend.json's fitted weights and temperature) put into the graph
    what inference.py computed: the same test probabilities, not the equal-weight mean."""
    work, waves = e2e["work"], cached(e2e["work"], "test")
    runs = ["--work", work, "--runs", "resnet18_32", "second", "-f", 2]
    weighted = pd.read_csv(two_runs / "weighted" / "test_probs.csv").set_index("file_name")
    run_script("export.py", *runs, "--weights", 1, 3, "--out", tmp_path / "w.onnx")
    got = graph_probs(tmp_path / "w.onnx", waves)
    assert np.abs(got - weighted.to_numpy()).max() <= 1e-4
    from ensemble import predict_waves

    members = [work / "runs" / r / f"fold{k}" / "best.ckpt" for r in ("resnet18_32", "second")
               for k in (0, 1)]
    equal = predict_waves(members, waves, False, torch.device("cpu"), 64)[0].mean(0)
    assert np.abs(equal - weighted.to_numpy()).max() > 1e-3  # the weights are in the graph
    blend_dir = work / "runs" / "blend_resnet18_32+second"
    blend = json.loads((blend_dir / "blend.json").read_text())
    assert abs(blend["temperature"] - 1) > 0.01
    run_script("export.py", *runs, "--blend", "--out", tmp_path / "b.onnx")
    fitted = pd.read_csv(blend_dir / "test_probs.csv").set_index("file_name").to_numpy()
    assert np.abs(graph_probs(tmp_path / "b.onnx", waves) - fitted).max() <= 1e-4


@pytest.mark.parametrize("args,said", [
    (["-f", 1, "--blend"], "was fitted for runs ['resnet18_32', 'second'], folds [0, 1]"),
    (["-f", 2, "--blend", "--weights", 1, 1], "--blend takes the fitted weights"),
    (["-f", 2, "--weights", 1], "1 --weights for 2 runs"),
    (["-f", 2, "--weights", 0, 0], "not all 0"),
])
def test_export_refuses_a_blend_it_cannot_put_in_the_graph(e2e, two_runs, tmp_path, args, said):
    proc = run_script("export.py", "--work", e2e["work"], "--runs", "resnet18_32", "second",
                      *args, "--out", tmp_path / "x.onnx", check=False)
    assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_predict_fetches_only_what_was_asked(exported, e2e):
    """Labels do not pay for the embedding pass (the graph's second output), nor the reverse."""
    from predictor import Predictor

    pred = Predictor(exported / "plain.onnx")
    asked = []
    run = pred.session.run
    pred.session.run = lambda names, feeds: asked.append(names) or run(names, feeds)
    waves = (cached(e2e["work"], "test")[:3] / 32768.0).astype(np.float32)
    assert pred.probs(waves).shape[0] == 3 and asked == [["probs"]]
    assert pred.embed(waves).shape[0] == 3 and asked[-1] == ["embedding"]


def test_predict_refuses_what_is_not_an_exported_model(e2e, exported, tmp_path):
    import onnx

    clip = sorted((e2e["data"] / "test").glob("*.wav"))[0]
    ckpt = run_script("predict.py", e2e["run"] / "fold0" / "best.ckpt", clip, check=False)
    assert ckpt.returncode == 2 and "not an ONNX model" in ckpt.stderr
    assert "export.py" in ckpt.stderr and "Traceback" not in ckpt.stderr
    old = onnx.load(str(exported / "plain.onnx"))
    del old.graph.output[1]  # as exported before the embedding output
    onnx.save(old, str(tmp_path / "old.onnx"))
    proc = run_script("predict.py", tmp_path / "old.onnx", clip, "--embed", tmp_path / "v.npy",
                      check=False)
    assert proc.returncode == 2 and "no 'embedding' output" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "v.npy").exists()
    assert run_script("predict.py", tmp_path / "old.onnx", clip).returncode == 0  # labels work
    nodir = run_script("predict.py", exported / "plain.onnx", clip, "--embed",
                       tmp_path / "nodir" / "v.npy", check=False)
    assert nodir.returncode == 2 and "no folder" in nodir.stderr and "Traceback" not in nodir.stderr
    said = run_script("predict.py", exported / "plain.onnx", clip, "--embed", tmp_path / "vec")
    assert (tmp_path / "vec.npy").is_file() and f"-> {tmp_path / 'vec.npy'} " in said.stdout
    assert (tmp_path / "vec.csv").is_file()


FSDD = ROOT.parent / "shared" / "data" / "fsdd" / "recordings"


@pytest.mark.skipif(not FSDD.is_dir(), reason="../shared/data/fsdd is not here")
def test_predict_hears_an_8khz_recording_at_the_model_s_16khz(exported, tmp_path):
    """An FSDD clip (8 kHz) is resampled as preprocess.py resamples: the same probabilities as
    the same clip written at 16 kHz by the project's own reader."""
    from audio import read_audio
    from predictor import Predictor

    src = FSDD / "7_jackson_0.wav"
    assert sf.info(src).samplerate == 8000
    sf.write(tmp_path / "at16k.wav", read_audio(src, 16000), 16000, subtype="FLOAT")
    pred = Predictor(exported / "plain.onnx")
    (_, a), (_, b) = pred.predict_files([src, tmp_path / "at16k.wav"], top_k=3)
    assert [lab for lab, _ in a] == [lab for lab, _ in b]
    assert np.allclose([p for _, p in a], [p for _, p in b], atol=1e-6)


def test_predict_into_a_closed_pipe_ends_quietly(e2e, exported):
    """`predict.py MODEL folder/ | head -1`: the first line, and no BrokenPipeError traceback."""
    cmd = f"{sys.executable} {ROOT / 'predict.py'} {exported / 'plain.onnx'} " \
          f"{e2e['data'] / 'test'} | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
    assert proc.stdout.count("\n") == 1 and ".wav: " in proc.stdout
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
