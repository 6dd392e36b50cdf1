"""The network apart from the run machinery: AudioNet, the flags the results rest on, the
import graph and the size of functions and classes."""
import ast
import re
import types

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from arg import Config
from conftest import ROOT, run_script

TINY_NET = dict(model="resnet18", size=32)
SCRIPTS = {p.stem for p in ROOT.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}


def imports_of(path) -> set[str]:
    """The project modules `path` imports, at the top or inside a function."""
    names = {p.stem for p in ROOT.glob("*.py")}
    got = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            got |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            got.add(node.module.split(".")[0])
    return got & names - {path.stem}


def test_no_script_imports_another_and_the_graph_has_no_cycles():
    graph = {p.stem: imports_of(p) for p in ROOT.glob("*.py")}
    assert {"train", "pretrain", "inference", "export", "report", "predict", "preprocess",
            "demo", "bench"} <= SCRIPTS
    crossing = sorted(f"{a} imports {b}" for a, deps in graph.items() if a in SCRIPTS
                      for b in deps if b in SCRIPTS)
    assert crossing == []
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [node]))
        if state.get(node) == "done":
            return
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        visit(node, [])


def test_tests_import_library_modules_only():
    """A test runs a script as a user does (a subprocess, or its main(argv) in this process),
    never imports its functions."""
    tests = sorted((ROOT / "tests").glob("*.py"))
    importing = sorted(f"{t.name} imports {m}" for t in tests
                       for m in imports_of(t) & SCRIPTS)
    assert importing == []


def test_each_decision_of_the_product_is_made_in_one_place():
    """The open class names, the window hop and the reject rule's comparison are each written
    in one module (and the graph's twin of the rule is held equal to it in test_openset)."""
    def modules_with(pattern: str) -> list[str]:
        return sorted(p.name for p in ROOT.glob("*.py") if re.search(pattern, p.read_text()))

    assert modules_with(r"[\"']_(unknown|silence)_[\"']") == ["predictor.py"]
    assert modules_with(r"(?m)^HOP = ") == ["audio.py"]
    assert modules_with(r"\bhop\w*: float = 0\.25|hop=0\.25|--hop\", \"0\.25") == []
    assert modules_with(r"def accepts\(") == ["predictor.py"]
    compare = modules_with(r">= *(self\.)?(threshold|rule\.threshold)\b")
    # the graph's twin of the rule (tested equal), and --pseudo's confidence (another decision)
    assert compare == ["dataset.py", "ensemble.py", "predictor.py"], compare


# ----------------------------------------------------------------------------- AudioNet
def test_audionet_forward_is_logits_and_embed_is_the_pooled_features():
    from model import AudioNet

    torch.manual_seed(0)
    net = AudioNet(Config(**TINY_NET), 5).eval()
    wave = torch.randn(3, 16000) * 0.1
    with torch.no_grad():
        logits, feats = net(wave), net.embed(wave)
        fc = net.backbone.get_classifier()
        assert logits.shape == (3, 5) and feats.shape == (3, net.num_features)
        assert torch.allclose(fc(feats), logits, atol=1e-5)  # the head of the pooled features
        encoder = AudioNet(Config(**TINY_NET), 0).eval()  # no head: pooled features out
        assert encoder(wave).shape == (3, encoder.num_features)
        assert torch.allclose(encoder(wave), encoder.embed(wave), atol=1e-6)


def test_sed_output_frames_is_the_loudest_frame_and_clip_the_attention_pool():
    """--sed-output frames: each class's loudest frame; clip: the attention-weighted mean of
    the frames, never above the loudest, and different from it."""
    from model import AudioNet

    cfg = Config(**{**TINY_NET, "size": 64}, head="sed", multilabel=True)
    torch.manual_seed(0)
    frames_net = AudioNet(cfg, 4).eval()
    clip_net = AudioNet(Config(**{**cfg.to_dict(), "sed_output": "clip"}), 4).eval()
    clip_net.load_state_dict(frames_net.state_dict())
    wave = torch.randn(2, 16000) * 0.1
    with torch.no_grad():
        img = frames_net.images(frames_net.waveform(wave))
        clip, frames = frames_net.logits_and_frames(img)
        assert frames.dim() == 3 and frames.shape[:2] == (2, 4) and frames.shape[2] > 1
        assert torch.equal(frames_net(wave), frames.amax(-1))
        assert torch.allclose(clip_net(wave), clip)
        assert (clip <= frames.amax(-1) + 1e-6).all() and not torch.allclose(clip, frames.amax(-1))


def test_focal_with_gamma_zero_is_bce_and_gamma_two_quiets_the_easy_terms():
    from model import multilabel_loss

    torch.manual_seed(0)
    logits, target = torch.randn(8, 5) * 3, (torch.rand(8, 5) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1).mean()
    assert torch.allclose(multilabel_loss(logits, target, focal=0.0), bce)
    easy = torch.full((1, 1), 6.0)  # p = 0.998 for a positive
    hard = torch.full((1, 1), -2.0)
    ones = torch.ones(1, 1)
    ratio_easy = multilabel_loss(easy, ones, focal=2) / multilabel_loss(easy, ones)
    ratio_hard = multilabel_loss(hard, ones, focal=2) / multilabel_loss(hard, ones)
    assert ratio_easy < 1e-4 < 0.7 < ratio_hard < 1  # (1 - p_t)^2


def fake_trainer(steps: int, epochs: int):
    return types.SimpleNamespace(estimated_stepping_batches=steps, max_epochs=epochs)


def test_layer_decay_gives_the_stem_a_smaller_lr_than_the_head():
    """timm's layer decay sets each group's lr_scale; the schedule here starts every group at
    lr x lr_scale (timm leaves that to its own schedulers: before, --layer-decay did nothing)."""
    from model import AudioNet, warmup_cosine

    net = AudioNet(Config(**TINY_NET), 3)
    opt = net.optimizer("adamw", 1e-3, 0.01, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    stem, head = net.backbone.conv1.weight, net.backbone.fc.weight
    assert lr_of[id(head)] == pytest.approx(1e-3)
    assert lr_of[id(stem)] < lr_of[id(net.backbone.layer4[0].conv1.weight)] < lr_of[id(head)]
    sched = warmup_cosine(opt, fake_trainer(100, 10), Config(warmup=1.0))["lr_scheduler"]
    for _ in range(10):  # the end of the warm-up: every group at its own peak
        opt.step()
        sched["scheduler"].step()
    peak = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert peak[id(stem)] / peak[id(head)] == pytest.approx(lr_of[id(stem)] / lr_of[id(head)])
    flat = net.optimizer("adamw", 1e-3, 0.01, layer_decay=0.0)
    assert {g["lr"] for g in flat.param_groups} == {1e-3}


def test_warmup_steps_are_the_trainer_s_own():
    """The schedule and the EMA start both count the warm-up in the optimizer steps of one
    process: W processes take 1/W of the steps, and the warm-up is as many epochs."""
    from model import warmup_steps

    cfg = Config(warmup=0.5)
    assert warmup_steps(fake_trainer(200, 10), cfg) == 10  # 20 steps an epoch
    assert warmup_steps(fake_trainer(100, 10), cfg) == 5  # the same data over 2 processes
    assert warmup_steps(fake_trainer(3, 3), Config(warmup=5)) == 2  # never the whole run


def test_compile_compiles_the_backbone_and_changes_nothing_it_computes():
    from model import AudioNet

    torch.manual_seed(0)
    plain = AudioNet(Config(**TINY_NET), 3).eval()
    compiled = AudioNet(Config(**TINY_NET, compile=True), 3).eval()
    compiled.load_state_dict(plain.state_dict())
    assert compiled.backbone._compiled_call_impl is not None
    assert plain.backbone._compiled_call_impl is None
    wave = torch.randn(2, 16000) * 0.1
    with torch.no_grad():
        assert torch.allclose(compiled(wave), plain(wave), atol=1e-4)


# ----------------------------------------------------------------------------- data flags
@pytest.fixture(scope="module")
def two_label_work(tmp_path_factory):
    """A multilabel WORK from a manifest: tones and noise bursts, some with the other kind as a
    secondary label; 2 folds."""
    from layouts import prepare

    root = tmp_path_factory.mktemp("two")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = ("tone", "noise")[i % 2]
        y = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) if label == "tone" else \
            rng.standard_normal(16000)
        sf.write(root / f"{i}.wav", (0.2 * y).astype(np.float32), 16000)
        rows.append(dict(path=f"{i}.wav", label=label, group=f"g{i % 6}",
                         secondary=("noise" if label == "tone" else "tone") if i % 3 == 0 else ""))
    pd.DataFrame(rows).to_csv(root / "m.csv", index=False)
    prepare(Config(manifest=str(root / "m.csv"), work=str(root / "work"), n_folds=2), workers=1)
    return root / "work"


def test_secondary_weight_is_the_target_of_a_secondary_label(two_label_work):
    import job
    import fit

    cfg = job.work_settings(Config(**TINY_NET, work=str(two_label_work), secondary_weight=0.25,
                                   gpus="cpu", run="sw"))
    assert cfg.multilabel  # from prep.json: the data has secondary labels
    fold = fit.plan_fold(cfg, 0)
    got = fold.data.train_ds.targets
    assert got.shape[1] == 2 and set(np.unique(got)) == {0.0, 0.25, 1.0}
    assert (got.max(1) == 1).all() and ((got == 0.25).sum(1) <= 1).all()


def test_unlabelled_folders_join_pretraining_as_crops(two_label_work, tmp_path):
    from byol import unlabelled_data
    from util import UsageError

    cfg = Config(**TINY_NET, work=str(two_label_work), ssl_data="train")
    base = len(unlabelled_data(cfg))
    (tmp_path / "more").mkdir()
    sf.write(tmp_path / "more" / "long.wav", np.zeros(int(3.5 * 16000), np.float32) + 0.1, 16000)
    (tmp_path / "more" / "bad.wav").write_text("not audio")
    more = unlabelled_data(Config(**{**cfg.to_dict(), "unlabelled": (str(tmp_path / "more"),)}))
    assert len(more) == base + 3  # one clip-length crop per whole second of the recording
    wave, _, _ = more[[len(more) - 1]]
    assert wave.shape == (1, 16000) and ((wave - 3277).abs() <= 1).all()  # PCM_16 of 0.1
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a folder with audio files"):
        unlabelled_data(Config(**{**cfg.to_dict(), "unlabelled": (str(tmp_path / "empty"),)}))


def test_flags_mean_one_thing_in_every_script():
    """Each long flag has one meaning: preprocess's fold count is --n-folds, inference's fold
    list is --folds; the STFT hop is --hop-length (samples), the window step --hop (seconds)."""
    from arg import make_parser

    def flags(parser):
        return {s for a in parser._actions for s in a.option_strings}

    pre = flags(make_parser("preprocess", "preprocess"))  # as preprocess.py builds it
    train = flags(make_parser("train", "train"))  # as train.py builds it
    infer = set(run_script("inference.py", "--help").stdout.replace(",", " ").split())
    assert "--n-folds" in pre and "--folds" not in pre and "--folds" not in train
    assert "--folds" in infer and "--hop-length" in train and "--hop" not in train
    assert "--hop" in infer
    old = Config.from_dict({"folds": 3, "hop": 128, "not_a_field": 1})  # older saved configs
    assert (old.n_folds, old.hop_length) == (3, 128)


def test_the_number_of_tta_views_has_one_definition():
    """-a y averages N_VIEWS distinct views of a batch (the identity first), and no module
    writes a view count of its own ("5 views", "x5 views", "1 + 4 * ...")."""
    import torch

    from transform import N_VIEWS, TTA_VIEWS, tta_views

    assert N_VIEWS == len(TTA_VIEWS) == len(tta_views(True)) and len(tta_views(False)) == 1
    x = torch.randn(3, 16000)
    seen = [view(x.clone()) for view in tta_views(True).values()]
    assert torch.equal(seen[0], x)  # the clip itself
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])
    count = re.compile(r"\b[2-9]\s*(?:test-time\s+)?views\b|\bx\s*[2-9]\s+views|\b1 \+ 4\b")
    hard = [f"{p.name}: {m.group(0)}" for p in ROOT.glob("*.py")
            for m in count.finditer(p.read_text())]
    assert hard == []
