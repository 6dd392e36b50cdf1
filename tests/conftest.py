"""Shared fixtures: one tiny generated dataset, its WORK folder, and one tiny trained run
made by the real scripts (the end-to-end test checks it; other tests reuse its checkpoints)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PYTHONWARNINGS", "ignore")
# on pytest-xdist's workers, each worker's torch (and the scripts it starts) takes its share of
# the cores: two workers of two threads each on two cores ran test_pretrain + test_trust in
# 302 s and 271 s, of one thread each in 228 s and 204 s
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

TINY = ["-m", "resnet18", "-t", "32", "-e", "1", "-b", "32"]


def hears_interrupts() -> None:
    """Popen's preexec_fn for a script a test sends ^C: a shell that started the tests in the
    background left SIGINT ignored, and a Python started so keeps ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(script: str, *args: str, check: bool = True, timeout: int = 600,
               process: bool = False):
    """Run one of the repo's scripts as a user would: its `main(argv)` in this process (as
    `python SCRIPT ARGS` runs it, stdout, stderr and the log captured; a script's
    exception is its traceback and exit code 1), or with `process` in a new interpreter,
    where the process itself is what a test is about. Returns a CompletedProcess."""
    if process:
        proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    else:
        proc = in_process(script, [str(a) for a in args])
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def in_process(script: str, argv: list[str]) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGV` without a new interpreter: the script's main(argv) run by runpy in
    ROOT, what it prints and logs captured (a log handler of its own on the root logger, at
    INFO as setup_logging sets it), the logging, signal and thread state put back after."""
    import contextlib
    import gc
    import io
    import logging
    import runpy
    import traceback

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, cwd = root.level, os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch_threads()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = runpy.run_path(str(ROOT / script))["main"](argv)
            except SystemExit as e:  # argparse's refusals and --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:  # a bug: its traceback, as the interpreter prints it
                traceback.print_exc()
                code = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        os.chdir(cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
        torch_threads(threads)
        gc.collect()
    return subprocess.CompletedProcess([script, *argv], code or 0, out.getvalue(),
                                       err.getvalue())


def torch_threads(n: int | None = None) -> int | None:
    """torch's thread count (set to `n` when given), None where torch is not imported yet."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def refused(script: str, *args) -> str:
    """A script run as a user runs it, expecting a refusal: exit code 2 and one line on stderr,
    no traceback; returns that line. In this process (refusal): the refusal needs no process
    of its own, and a new interpreter would spend seconds importing torch and Lightning."""
    return refusal(script, *args)


def refusal(script: str, *args) -> str:
    """A script's `main(argv)` run in this process (in_process: the file as a user runs it),
    expecting a refusal: exit code 2 and one line on stderr, no traceback; returns that line.
    For refusals that need no process of their own: no new interpreter, no imports paid
    again."""
    proc = in_process(script, [str(a) for a in args])
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, \
        (proc.returncode, proc.stderr[-3000:])
    return lines[0]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    import synth

    out = tmp_path_factory.mktemp("data") / "demo"
    synth.make_dataset(out, speakers=8, seed=1, workers=2, progress=False)
    return out


def prepared(data: Path, tmp_path_factory, folds: int) -> Path:
    """A WORK folder made from `data` by preprocess.prepare with `folds` folds."""
    from arg import Config
    from layouts import prepare

    work = tmp_path_factory.mktemp(f"work{folds}")
    prepare(Config(data=str(data), work=str(work), n_folds=folds), workers=2)
    return work


@pytest.fixture(scope="session")
def e2e(tmp_path_factory, demo_data) -> dict:
    """demo data -> preprocess.py (2 folds) -> train.py -f all -> inference.py -f 2 -a y."""
    work = tmp_path_factory.mktemp("work")
    steps = {
        "preprocess": run_script("preprocess.py", "--data", demo_data, "--work", work,
                                 "--n-folds", 2),
        "train": run_script("train.py", "--work", work, *TINY, "-f", "all", "-g", "cpu,cpu",
                            "-a", "y"),
        "inference": run_script("inference.py", "--work", work, "-m", "resnet18", "-t", 32,
                                "-f", 2, "-a", "y", "--solution", demo_data / "solution.csv"),
    }
    return dict(work=work, data=demo_data, run=work / "runs" / "resnet18_32", steps=steps)


def cached(work, split: str = "train", rows=None, length: int = 16000) -> np.ndarray:
    """[N, length] int16 of WORK's clip cache (every clip, or `rows`), from each clip's start."""
    from cache import Clips

    clips = Clips.of(work, split)
    return clips.read(np.arange(len(clips)) if rows is None else np.asarray(rows), length)
