"""tune.py: the space file checked against Config; two workers sharing a SQLite study whose
best.yaml retrains to the best trial's score; a pruned trial never read as finished; two
workers on a PostgreSQL cluster started for the test, one of them killed mid-trial."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, prepared, run_script

TINY = ["-m", "resnet18", "-t", "32", "-e", "1", "-b", "32", "-g", "cpu"]
SPACE = "lr: {float: [3.0e-4, 3.0e-3], log: true}\np_mixup: {choice: [0.0, 0.5]}\n"


@pytest.fixture(scope="module")
def work(demo_data, tmp_path_factory) -> Path:
    return prepared(demo_data, tmp_path_factory, 2)


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "space.yaml"
    path.write_text(SPACE)
    return path


def study_trials(url: str, name: str) -> list:
    import optuna

    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


@pytest.mark.parametrize("text, said", [
    ("lrr: {float: [0.001, 0.01]}", "lrr: unknown setting (did you mean lr?)"),
    ("lr: {float: [0.01, 0.001]}", "lr: empty range [0.01, 0.001]: low must be below high"),
    ("lr: {float: [0, 0.01], log: true}", "lr: log: true needs a range above 0"),
    ("labels: {float: [0.5, 1.5]}", "labels: 1.5: --labels 1.5: a share of the training rows"),
    ("head: {choice: [pool, sed]}", "head: 'sed': --head sed is a multilabel head"),
    ("optimizer: {choice: [adamw, sgd]}", "optimizer: 'sgd': not one of adamw, adam"),
    ("epochs: {float: [2, 4]}", "epochs: an int setting: search it with int: [low, high]"),
    ("gpus: {choice: ['0', '1']}", "gpus: says where or how a trial runs"),
    ("aug: {float: [0, 1]}", "aug: a name setting: search it with choice"),
    ("lr: [0.001, 0.01]", "lr: expected one of {float: [low, high]}"),
])
def test_space_refused(work, tmp_path, capsys, text, said):
    import tune

    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    assert tune.main(["--work", str(work), "--study", "bad", "--space", str(path), *TINY]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"tune: --space {path}: {said}"), line
    assert not (work / "runs" / "bad-0").exists()  # nothing trained
    assert not (work / "studies" / "bad.db").exists()  # no study made


def test_space_refused_as_a_user_sees_it(work, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lrr: {float: [0.001, 0.01]}\n")
    proc = run_script("tune.py", "--work", work, "--study", "bad", "--space", path, *TINY,
                      check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"tune: --space {path}: lrr: unknown setting (did you mean lr?)"


def test_two_workers_share_a_study_whose_best_yaml_retrains(work, space):
    """Two workers on one SQLite study of 4 tiny trials: each trial run once, by one of them,
    as an ordinary run; best.yaml holds the best trial's settings and retrains to its OOF."""
    (work / "studies").mkdir(exist_ok=True)
    a = start_worker(work, space, "s4", "--trials", 4, "--heartbeat", 2)
    time.sleep(3)
    b = start_worker(work, space, "s4", "--trials", 4, "--heartbeat", 2)
    outs = [p.communicate(timeout=600)[0] for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    got = check_shared(work, f"sqlite:///{work / 'studies' / 's4.db'}", "s4", 4, [a, b])
    assert len(got) == 4  # none failed, none run beyond the 4
    trials = pd.read_csv(work / "studies" / "s4" / "trials.csv")
    assert list(trials.trial) == [0, 1, 2, 3] and (trials.state == "complete").all()
    assert trials.lr[0] == 1e-3 and trials.p_mixup[0] == 0.0  # trial 0: the default recipe
    for row in trials.itertuples():  # every trial an ordinary finished run with its score
        result = json.loads((work / "runs" / f"s4-{row.trial}" / "fold0" / "result.json")
                            .read_text())
        assert result["val_acc"] == pytest.approx(row.value)
    import yaml

    best = yaml.safe_load((work / "studies" / "s4" / "best.yaml").read_text())
    top = trials[trials.value == trials.value.max()]
    chosen = top[(top.lr == best["lr"]) & (top.p_mixup == best["p_mixup"])].trial
    assert len(chosen) == 1, (best, trials)
    assert best["run"] == "s4-best" and best["epochs"] == 1 and best["model"] == "resnet18"
    assert any(f"best: trial {chosen.iloc[0]} " in out for out in outs)
    for name in ("history.png", "slice.png", "report.html"):
        assert (work / "studies" / "s4" / name).stat().st_size > 1000
    run_script("train.py", "--work", work, "--config", work / "studies" / "s4" / "best.yaml",
               "-f", 0, "--no-progress")
    again = json.loads((work / "runs" / "s4-best" / "fold0" / "result.json").read_text())
    assert again["val_acc"] == pytest.approx(top.value.max(), abs=1e-9)
    oof = "fold0/oof.csv"
    pd.testing.assert_frame_equal(pd.read_csv(work / "runs" / "s4-best" / oof),
                                  pd.read_csv(work / "runs" / f"s4-{chosen.iloc[0]}" / oof))
    # --resume reads the recipe and the space from the study: 4 trials are done, none runs
    again = run_script("tune.py", "--work", work, "--study", "s4", "--resume", "--trials", 4)
    assert "study s4: 4 complete, 0 pruned, 0 failed" in again.stdout
    assert not (work / "runs" / "s4-4").exists()
    # the same study name with another recipe is refused, naming the difference
    other = run_script("tune.py", "--work", work, "--study", "s4", "--space", space,
                       "--trials", 4, *TINY[:4], "-e", "2", *TINY[6:], check=False)
    assert other.returncode == 2 and "epochs 1 -> 2" in other.stderr, other.stderr


def test_pruned_trial_is_never_finished(work):
    import optuna

    import tune
    from results import leaderboard
    from runs import Run, fold_done
    from util import UsageError

    study = optuna.create_study(study_name="p", direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # prunes all
    given = dict(work=str(work), model="resnet18", size=32, epochs=3, batch_size=32, gpus="cpu")
    space = [tune.Param("lr", "float", 1e-3, 2e-3)]
    with pytest.raises(optuna.TrialPruned):
        tune.objective(study.ask(), given, space, [0], dict(pruning=True, stopped=None))
    fold = Run(work, "p-0").fold(0)
    pruned = json.loads((fold / "pruned.json").read_text())
    assert pruned["trial"] == 0 and pruned["epochs"] == 1 and 0 <= pruned["val_acc"] <= 1
    assert not (fold / "result.json").exists() and not fold_done(fold)
    with pytest.raises(UsageError, match="unfinished"):
        Run(work, "p-0").checkpoints([0])
    row = leaderboard(work).set_index("run").loc["p-0"]
    assert row.folds_done == "0/2 (pruned)" and row.cv != row.cv  # no CV from a pruned fold
    # after the last epoch nothing is pruned: the trial trained every epoch, it is complete
    last = study.ask()
    score = tune.objective(last, {**given, "epochs": 1}, space, [0],
                           dict(pruning=True, stopped=None))
    fold = Run(work, "p-1").fold(0)
    assert fold_done(fold) and not (fold / "pruned.json").exists()
    assert score == json.loads((fold / "result.json").read_text())["val_acc"]


def start_worker(work, space, study, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "tune.py"), "--work", str(work),
                             "--study", study, "--space", str(space), "--pruner", "none",
                             *map(str, extra), *TINY], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def check_shared(work, url: str, study: str, trials: int, workers: list) -> list:
    """The study holds `trials` complete trials, numbered once each, each an ordinary
    finished run, and every worker in `workers` ran at least one."""
    from optuna.trial import TrialState

    got = study_trials(url, study)
    done = [t for t in got if t.state == TrialState.COMPLETE]
    assert len(done) == trials, [(t.number, t.state) for t in got]
    assert len({t.number for t in got}) == len(got)  # no trial number run twice
    for t in done:
        assert (work / "runs" / f"{study}-{t.number}" / "fold0" / "result.json").is_file()
    ran = {t.user_attrs["worker"].split(":")[-1] for t in done}
    assert {str(p.pid) for p in workers} <= ran, ran
    return got


# ----------------------------------------------------------------------------- PostgreSQL
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster on localhost for the test (as Debian's `postgres` user when run as
    root: the server refuses root), stopped after; skipped where no server is installed,
    failed instead where UAC_REQUIRE_POSTGRES is set (CI)."""
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or \
        [Path(p) for p in [shutil.which("initdb")] if p]
    if not initdb:
        why = "no PostgreSQL server here (Debian: apt-get install postgresql)"
        if os.environ.get("UAC_REQUIRE_POSTGRES"):
            pytest.fail(why + ", and UAC_REQUIRE_POSTGRES is set")
        pytest.skip(why)
    bin_dir = initdb[-1].parent
    root = Path(tempfile.mkdtemp(prefix="uac-pg-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(tool, *args):
        subprocess.run([*as_user, str(bin_dir / tool), *map(str, args)], check=True,
                       capture_output=True, text=True, timeout=120)

    pg("initdb", "-D", root / "data", "-A", "trust", "-U", "postgres")
    pg("pg_ctl", "-D", root / "data", "-l", root / "server.log", "-w", "-o",
       f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "uac")
        yield f"postgresql://postgres@127.0.0.1:{port}/uac"
    finally:
        pg("pg_ctl", "-D", root / "data", "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_postgresql_workers_survive_a_killed_one(work, space, postgres):
    """Two workers on one PostgreSQL study; one is killed (SIGKILL) mid-trial: its trial is
    marked failed by the other, which finishes the study's trials alone."""
    from optuna.trial import TrialState

    a = start_worker(work, space, "pg", "--trials", 3, "--heartbeat", 2, "--storage", postgres)
    time.sleep(3)
    b = start_worker(work, space, "pg", "--trials", 3, "--heartbeat", 2, "--storage", postgres)
    t0 = time.time()
    while time.time() - t0 < 300:  # until a trial of a's is under way, then kill it
        assert a.poll() is None, a.communicate()[0]
        try:
            mine = [t for t in study_trials(postgres, "pg")
                    if t.user_attrs.get("worker", "").endswith(f":{a.pid}")]
        except Exception:  # the study is not made yet
            mine = []
        if any(t.state == TrialState.RUNNING for t in mine):
            break
        time.sleep(0.5)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=60)
    out = b.communicate(timeout=600)[0]
    assert b.returncode == 0, out
    got = study_trials(postgres, "pg")
    failed = [t for t in got if t.state == TrialState.FAIL]
    assert [t.user_attrs["worker"].endswith(f":{a.pid}") for t in failed] == [True], \
        [(t.number, t.state, t.user_attrs) for t in got]
    assert not (work / "runs" / f"pg-{failed[0].number}" / "fold0" / "result.json").exists()
    done = [t for t in got if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and len({t.number for t in got}) == len(got)
    assert any(t.user_attrs["worker"].endswith(f":{b.pid}") for t in done)
