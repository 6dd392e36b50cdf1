"""report.html in a real browser, config files, loggers, live progress, and the module layout."""
import ast
import inspect
import os
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_script

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def browser():
    """Headless Debian chromium through selenium; skipped where it is not installed, unless
    UAC_REQUIRE_BROWSER=1 (CI sets it) makes that a failure."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        selenium = None
    else:
        selenium = webdriver
    if not (CHROMIUM and DRIVER and selenium):
        if os.environ.get("UAC_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium, chromedriver or selenium is missing (.ci/run installs them)")
        pytest.skip("no chromium/chromedriver/selenium here")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1280,2000",
                 "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=Service(DRIVER))


def test_report_html_renders_in_a_browser(e2e):
    page = e2e["run"] / "report.html"
    assert page.stat().st_size < 5e6
    driver = browser()
    try:
        driver.get(page.as_uri())
        assert driver.title == "resnet18_32: run report"
        js = driver.execute_script
        js("return Promise.all(Array.from(document.images).map(i => i.decode()))")
        images = js("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) >= 2 + 30 and all(ok and w > 0 for ok, w in images)  # plots + audit
        headers = js("return Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        for part in ("Cross-validation per fold", "Learning curves", "Per class",
                     "Confusion matrix", "Most confused pairs", "Error audit", "Speakers"):
            assert any(h.startswith(part) for h in headers), part
        assert js("return document.querySelectorAll('table').length") >= 6
        audio = js("return Array.from(document.querySelectorAll('audio')).map(a => "
                   "[a.src.slice(0, 16), a.canPlayType('audio/flac')])")
        assert len(audio) == 40 and all(  # the 40 OOF clips with the highest loss
            s == "data:audio/flac;" and can for s, can in audio)
        js("document.querySelectorAll('audio').forEach(a => a.load())")
        states = js("""return new Promise(done => setTimeout(() => done(Array.from(
            document.querySelectorAll('audio')).map(a => [a.readyState, a.duration])), 1500))""")
        assert all(r >= 1 and 0.9 < d < 1.1 for r, d in states)  # 1 s clips, decodable
        if os.environ.get("UAC_SCREENSHOT"):
            driver.set_window_size(1280, 2400)
            driver.save_screenshot(os.environ["UAC_SCREENSHOT"])
    finally:
        driver.quit()


def test_config_yaml_remakes_the_same_config(e2e, tmp_path):
    import yaml

    from arg import Config, make_parser, parse_config

    saved = e2e["run"] / "fold0" / "config.yaml"
    cfg, _ = parse_config(make_parser("x", "train", config_file=True), ["--config", str(saved)])
    assert cfg == Config.from_dict(yaml.safe_load(saved.read_text()))
    import torch

    from arg import LEARNT, fields_with

    ckpt = torch.load(e2e["run"] / "fold0" / "best.ckpt", map_location="cpu", weights_only=False)
    held = ckpt["hyper_parameters"]["config"]  # the recipe and the clips, not the placement
    assert set(held) == set(fields_with(*LEARNT)) and "gpus" not in held and "work" not in held
    assert cfg.part(*LEARNT) == Config.from_dict(held).part(*LEARNT)
    text = saved.read_text()  # config.yaml: both, in labelled parts
    assert text.index("# recipe:") < text.index("# work:") < text.index("# place:")
    assert (e2e["run"] / "fold0" / "command.txt").read_text().split() == [
        "python", "train.py", "--config", str(saved), "-f", "0"]
    # a run made from that file, under another name, has the same Config but its name
    work = tmp_path / "work"
    shutil.copytree(e2e["work"], work, ignore=shutil.ignore_patterns("runs"))
    run_script("train.py", "--config", saved, "--work", work, "--run", "again", "-g", "cpu",
               "--no-progress", "--limit-batches", 2)
    again, _ = parse_config(make_parser("x", "train", config_file=True),
                            ["--config", str(work / "runs" / "again" / "fold0" / "config.yaml")])
    mine = dict(cfg.to_dict(), work=str(work), run="again", gpus="cpu", limit_batches=2)
    assert again == Config.from_dict(mine)


@pytest.mark.parametrize("kind,made", [("csv", "csv_logs/version_0/metrics.csv"),
                                       ("tensorboard", "tensorboard/version_0/events.out.tfevents"),
                                       ("mlflow", "mlruns")])
def test_each_logger_builds_and_writes(kind, made, tmp_path):
    from arg import Config
    from job import build_logger

    cfg = Config(logger=kind, work=str(tmp_path), run="r")
    logger = build_logger(cfg, tmp_path / "fold0", "fold0")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"val_acc": 0.5}, step=0)
    logger.finalize("success")
    root = tmp_path if kind == "mlflow" else tmp_path / "fold0"
    files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    assert any(f.startswith(made) for f in files), files
    if kind == "mlflow":  # a local file store: the metric is a file under WORK/mlruns
        assert any(f.endswith("metrics/val_acc") for f in files)


def test_a_logger_without_its_package_says_how_to_install_it(monkeypatch, tmp_path):
    import importlib.util

    from arg import Config
    from job import build_logger
    from util import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UsageError, match="--logger wandb needs the wandb package: pip install wandb"):
        build_logger(Config(logger="wandb", work=str(tmp_path)), tmp_path, "fold0")


def test_all_folds_show_live_epochs_and_accuracy(e2e):
    err = e2e["steps"]["train"].stderr
    assert "fold 0: epoch 1/1 val" in err and "fold 1: epoch" in err
    assert "2/2 epochs" in err


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_layout_a_newcomer_can_read():
    import subprocess
    import sys

    assert "inference" not in imports(ROOT / "train.py")
    assert "train" not in imports(ROOT / "inference.py")  # no import circle
    import results

    # the run folder layout and a fold's state live in runs.py; results.py holds what a
    # person reads, and no script reaches into it for fold state
    for script in ("train.py", "inference.py", "export.py", "report.py"):
        assert "runs" in imports(ROOT / script), script
    defined = {n for n, o in vars(results).items() if getattr(o, "__module__", "") == "results"}
    assert not defined & {"fold_done", "train_command", "read_config", "fold_dirs"}
    assert {"write_html", "cv_summary"} <= defined
    import leaderboard  # the leaderboard of runs: its own module, beside a run's report

    assert "leaderboard" in vars(leaderboard) and "runs" in imports(ROOT / "leaderboard.py")
    assert "inference" not in imports(ROOT / "export.py")
    import callback
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.io import CheckpointIO

    mine = [obj for _, obj in inspect.getmembers(callback)
            if getattr(obj, "__module__", "") == "callback"]
    assert mine and all(inspect.isclass(o) and issubclass(o, (Callback, CheckpointIO)) for o in mine)
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('uac', "
            f"{str(ROOT / '__init__.py')!r}); m = importlib.util.module_from_spec(s); "
            "s.loader.exec_module(m); print(m.__version__, m.__doc__.count(chr(10)), "
            "sum(m.split('.')[0] in ('torch', 'numpy', 'pandas', 'lightning', 'timm') "
            "for m in sys.modules))")
    version, lines, loaded = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                            text=True, check=True).stdout.split()
    assert version.count(".") == 2 and lines == "0"  # a version and a one-line docstring
    assert imports(ROOT / "__init__.py") == set()  # nothing runs at import
    assert loaded == "0"  # importing the package loads none of the libraries
