"""tune.py as a user runs it: refusals before anything is written; the default recipe kept
and never pruned; two workers sharing a SQLite study whose best.yaml retrains to the best trial;
a pruned trial never read as finished; signals, a study that only fails, a killed trial 0
queued again; two workers on a PostgreSQL cluster started for the test, one killed."""
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

import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from conftest import ROOT, hears_interrupts, prepared, refused, run_script

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


def trials_of(url: str, name: str) -> list:
    return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)


def sqlite(work, name: str) -> str:
    return f"sqlite:///{work / 'studies' / f'{name}.db'}"


def nothing_made(work, study: str) -> None:
    assert not (work / "studies" / f"{study}.db").exists()
    assert not list(work.glob(f"**/{study}-*")) and not list(work.glob("**/esc-*"))


@pytest.mark.parametrize("text, said", [
    ("lrr: {float: [0.001, 0.01]}", "lrr: unknown setting (did you mean lr?)"),
    ("nonsense_field: {float: [0, 1]}", "nonsense_field: unknown setting"),  # nothing close
    ("lr: {float: [0.01, 0.001]}", "lr: float: [0.01, 0.001]: expected [low, high], low < high"),
    ("lr: {float: [0, 0.01], log: true}", "lr: float: [0, 0.01]: expected [low, high], low < high, "
                                          "above 0 for log: true"),
    ("labels: {float: [0.5, 1.5]}", "labels: says where or how a trial runs"),
    ("optimizer: {choice: [adamw, sgd]}", "optimizer: 'sgd': not one of adamw, adam"),
    ("epochs: {float: [2, 4]}", "epochs: a int setting: search it with int: [low, high]"),
    ("gpus: {choice: ['0', '1']}", "gpus: says where or how a trial runs"),
    ("aug: {float: [0, 1]}", "aug: a str setting: search it with choice"),
    ("head: {choice: [sed]}", "head: 'sed': --head sed"),
    ("lr: [0.001, 0.01]", "lr: expected {float: [low, high]}"),
])
def test_a_space_is_refused_before_a_study_is_made(work, tmp_path, text, said):
    path = tmp_path / "space.yaml"
    path.write_text(text + "\n")
    err = refused("tune.py", "--work", work, "--study", "bad", "--space", path, *TINY)
    assert err.startswith(f"tune: --space {path}: {said}"), err
    assert ("did you mean" in err) == ("did you mean" in said)
    nothing_made(work, "bad")


@pytest.mark.parametrize("args, said", [
    (["--study", "../esc"], "--study '../esc': a plain name"),
    (["--study", "a/b"], "--study 'a/b': a plain name"),
    (["--study", ""], "--study '': a plain name"),
    (["--heartbeat", "0"], "--heartbeat 0: expected 1 or more"),
    (["--startup", "-1"], "--startup -1: expected 0 or more"),
    (["--trials", "0"], "--trials 0: expected 1 or more"),
    (["-m", "resnet81"], "-m resnet81: timm has no such model; did you mean resnet18"),
    (["-f", "9"], "-f 9: "),
    (["--storage", "notaurl"], "--storage notaurl: not a study store this can open"),
    (["--storage", "mysql://u:secret@127.0.0.1/x"], "--storage mysql://u:***@127.0.0.1/x: not"),
    (["--storage", "postgresql://u@127.0.0.1:1/x"], "--storage postgresql://u@127.0.0.1:1/x: not"),
    (["--resume"], "--space FILE.yaml makes (or joins) a study; --resume continues one"),
])
def test_bad_requests_are_one_line_and_write_nothing(work, space, args, said):
    base = ["--work", work, "--study", "ok", "--space", space, *TINY]
    err = refused("tune.py", *base, *args)
    assert said in err, err
    assert "secret" not in err
    nothing_made(work, "ok")
    assert not (work.parent / "esc-0").exists() and not (work / "studies" / "a").exists()


def test_a_damaged_study_file_and_a_missing_resume_are_one_line(work, space, tmp_path):
    studies = work / "studies"
    studies.mkdir(exist_ok=True)
    (studies / "text.db").write_text("not a database\n")
    err = refused("tune.py", "--work", work, "--study", "text", "--space", space, *TINY)
    assert "not a study store this can open" in err and "DatabaseError" in err
    err = refused("tune.py", "--work", work, "--study", "ghost", "--resume")
    assert "--resume: no study 'ghost'" in err and not (studies / "ghost.db").exists()
    gz = tmp_path / "space.yaml.gz"
    gz.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe\x00\x80" * 8)
    err = refused("tune.py", "--work", work, "--study", "gz", "--space", gz, *TINY)
    assert f"--space {gz}: not a readable YAML file" in err
    nothing_made(work, "gz")


def test_the_default_recipe_is_kept_and_a_pruned_trial_never_finished(work, space):
    """With the default pruner (median, --startup 4) and 3 epochs, trial 0 is the default
    recipe and runs to its end (before, the pruner stopped it after an epoch). Then two
    perfect trials added to the study make the next sampled trial prune at epoch 2 (median:
    never at epoch 1, its warm-up, nor at the last): it holds
    pruned.json, no result.json, and nothing reads it as finished."""
    from leaderboard import leaderboard
    from runs import Run, fold_done
    from util import UsageError

    tiny3 = [*TINY[:4], "-e", "3", *TINY[6:]]
    out = run_script("tune.py", "--work", work, "--study", "keep", "--space", space,
                     "--trials", 1, *tiny3).stdout
    assert "study keep: 1 complete, 0 pruned, 0 failed" in out
    url = sqlite(work, "keep")
    (t0,) = trials_of(url, "keep")
    assert t0.params == {"lr": 1e-3, "p_mixup": 0.0} and t0.user_attrs["baseline"]
    assert len(t0.intermediate_values) == 3 and t0.user_attrs["epochs"] == 3
    refused_resume = refused("tune.py", "--work", work, "--study", "keep", "--resume",
                             "--trials", 2, "-e", 5)
    assert "was made with other settings (epochs 3 -> 5)" in refused_resume
    study = optuna.load_study(study_name="keep", storage=url)
    for _ in range(2):  # perfect scores at every epoch: the median of the others is 1.0
        study.add_trial(optuna.trial.create_trial(
            params=t0.params, distributions=t0.distributions, value=1.0,
            intermediate_values={0: 1.0, 1: 1.0, 2: 1.0}, user_attrs={"epochs": 3}))
    run_script("tune.py", "--work", work, "--study", "keep", "--resume", "--trials", 4,
               "--pruner", "median", "--startup", 0)
    pruned = [t for t in trials_of(url, "keep") if t.state == TrialState.PRUNED]
    assert [t.number for t in pruned] == [3] and not pruned[0].user_attrs["baseline"]
    fold = Run(work, "keep-3").fold(0)
    record = json.loads((fold / "pruned.json").read_text())
    assert record["trial"] == 3 and record["epochs"] == 2 and 0 <= record["val_acc"] < 1
    assert not (fold / "result.json").exists() and not fold_done(fold)
    with pytest.raises(UsageError, match="unfinished"):
        Run(work, "keep-3").checkpoints([0])
    assert leaderboard(work).set_index("run").loc["keep-3"].folds_done == "0/2 (pruned)"


def start_worker(work, space, study, *extra, pruner="none"):
    return subprocess.Popen([sys.executable, str(ROOT / "tune.py"), "--work", str(work),
                             "--study", study, "--space", str(space), "--pruner", pruner,
                             *TINY, *map(str, extra)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=hears_interrupts)


def check_shared(work, url: str, study: str, trials: int, workers: list) -> list:
    """The study holds `trials` complete trials, numbered once each, each an ordinary
    finished run, and every worker in `workers` ran at least one."""
    got = trials_of(url, study)
    done = [t for t in got if t.state == TrialState.COMPLETE]
    assert len(done) == trials, [(t.number, t.state) for t in got]
    assert len({t.number for t in got}) == len(got)  # no trial number run twice
    for t in done:
        assert (work / "runs" / f"{study}-{t.number}" / "fold0" / "result.json").is_file()
    ran = {t.user_attrs["worker"].split(":")[-1] for t in done}
    assert {str(p.pid) for p in workers} <= ran, ran
    return got


def test_two_workers_share_a_study_whose_best_yaml_retrains(work, space):
    """Two workers on one SQLite study of 4 tiny trials: each trial run once, by one of them,
    as an ordinary run; trials.csv is Optuna's table; best.yaml holds the best trial's recipe
    (no worker's -g) and retrains to its OOF."""
    import yaml

    a = start_worker(work, space, "s4", "--trials", 4, "--heartbeat", 2)
    time.sleep(3)
    b = start_worker(work, space, "s4", "--trials", 4, "--heartbeat", 2)
    outs = [p.communicate(timeout=600)[0] for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, outs
    assert len(check_shared(work, sqlite(work, "s4"), "s4", 4, [a, b])) == 4
    trials = pd.read_csv(work / "studies" / "s4" / "trials.csv")
    assert list(trials.trial) == [0, 1, 2, 3] and (trials.state == "complete").all()
    curves = [t.intermediate_values for t in trials_of(sqlite(work, "s4"), "s4")]
    assert [len(c) for c in curves] == [1] * 4  # --pruner none records them for a replay
    replayed = run_script("bench.py", "--work", work, "--sections", "pruners",
                          "--replay-study", "s4", "--replay-startup", 0).stdout
    assert "none     (--startup 0): 4 of 4 epochs, 0 of 4 trials pruned" in replayed
    assert trials.lr[0] == 1e-3 and trials.p_mixup[0] == 0.0 and trials.baseline[0]
    for row in trials.itertuples():  # every trial an ordinary finished run with its score
        result = json.loads((work / "runs" / f"s4-{row.trial}" / "fold0" / "result.json")
                            .read_text())
        assert result["val_acc"] == pytest.approx(row.value)
    best = yaml.safe_load((work / "studies" / "s4" / "best.yaml").read_text())
    top = trials[trials.value == trials.value.max()]
    chosen = top[(top.lr == best["lr"]) & (top.p_mixup == best["p_mixup"])].trial
    assert len(chosen) == 1, (best, trials)
    assert best["run"] == "s4-best" and best["epochs"] == 1 and "gpus" not in best
    assert any(f"best: trial {chosen.iloc[0]} " in out for out in outs)
    for name in ("history.png", "slice.png"):
        assert (work / "studies" / "s4" / name).stat().st_size > 1000
    run_script("train.py", "--work", work, "--config", work / "studies" / "s4" / "best.yaml",
               "-f", 0, "-g", "cpu", "--no-progress")
    again = json.loads((work / "runs" / "s4-best" / "fold0" / "result.json").read_text())
    assert again["val_acc"] == pytest.approx(top.value.max(), abs=1e-9)
    oof = "fold0/oof.csv"
    pd.testing.assert_frame_equal(pd.read_csv(work / "runs" / "s4-best" / oof),
                                  pd.read_csv(work / "runs" / f"s4-{chosen.iloc[0]}" / oof))
    again = run_script("tune.py", "--work", work, "--study", "s4", "--resume", "--trials", 4)
    assert "study s4: 4 complete, 0 pruned, 0 failed" in again.stdout
    assert not (work / "runs" / "s4-4").exists()
    other = refused("tune.py", "--work", work, "--study", "s4", "--space", space, "--trials", 4,
                    *TINY[:4], "-e", "2", *TINY[6:])
    assert "epochs 1 -> 2" in other


def wait_for(pred, proc, seconds: float = 300):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None and time.time() - t0 < seconds, proc.communicate()[0]
        time.sleep(0.2)


@pytest.mark.parametrize("sig, code, name", [("SIGTERM", 143, "SIGTERM"),
                                             ("SIGINT", 130, "SIGINT (^C)")])
def test_a_signal_fails_the_running_trial_at_once(work, space, sig, code, name):
    study = f"sig{code}"
    proc = start_worker(work, space, study, "--trials", 2, *TINY[:4], "-e", 50, *TINY[6:])
    wait_for(lambda: (work / "runs" / f"{study}-0" / "fold0" / "last.ckpt").is_file(), proc)
    proc.send_signal(getattr(signal, sig))
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == code and "Traceback" not in out, out
    assert f"tune: study {study}: fold 0 stopped by {name}" in out
    assert [t.state for t in trials_of(sqlite(work, study), study)] == [TrialState.FAIL]


def test_a_study_whose_trials_all_fail_stops(work, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {float: [1.0e+7, 1.0e+8]}\n")  # every trial's loss is NaN at once
    proc = run_script("tune.py", "--work", work, "--study", "nan", "--space", path,
                      "--trials", 10, *TINY, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "tune: study nan: 3 trials failed and none finished" in proc.stderr
    assert [t.state for t in trials_of(sqlite(work, "nan"), "nan")] == [TrialState.FAIL] * 3


def test_a_killed_default_trial_is_queued_again(work, space):
    """SIGKILL during trial 0 (the default recipe): --resume waits out its heartbeat, marks it
    failed and runs the default recipe again."""
    proc = start_worker(work, space, "k0", "--trials", 2, "--heartbeat", 1, *TINY[:4], "-e",
                        4, *TINY[6:])  # killed in its second epoch; run again, 4 in all
    url = sqlite(work, "k0")
    wait_for(lambda: (work / "runs" / "k0-0" / "fold0" / "last.ckpt").is_file(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    out = run_script("tune.py", "--work", work, "--study", "k0", "--resume", "--trials", 1,
                     "--heartbeat", 1, timeout=900).stdout
    got = trials_of(url, "k0")
    assert [t.state for t in got] == [TrialState.FAIL, TrialState.COMPLETE], out
    assert got[1].params == got[0].params == {"lr": 1e-3, "p_mixup": 0.0}
    assert got[1].user_attrs["baseline"]


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
    a = start_worker(work, space, "pg", "--trials", 3, "--heartbeat", 2, "--storage", postgres)
    time.sleep(3)
    b = start_worker(work, space, "pg", "--trials", 3, "--heartbeat", 2, "--storage", postgres)

    def a_running():
        try:
            return any(t.state == TrialState.RUNNING and
                       t.user_attrs.get("worker", "").endswith(f":{a.pid}")
                       for t in trials_of(postgres, "pg"))
        except Exception:  # the study is not made yet
            return False
    wait_for(a_running, a)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=60)
    out = b.communicate(timeout=600)[0]
    assert b.returncode == 0, out
    got = trials_of(postgres, "pg")
    failed = [t for t in got if t.state == TrialState.FAIL]
    assert [t.user_attrs["worker"].endswith(f":{a.pid}") for t in failed] == [True], \
        [(t.number, t.state, t.user_attrs) for t in got]
    assert not (work / "runs" / f"pg-{failed[0].number}" / "fold0" / "result.json").exists()
    done = [t for t in got if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and len({t.number for t in got}) == len(got)
    assert any(t.user_attrs["worker"].endswith(f":{b.pid}") for t in done)


def recorded(number: int, curve: list[float], baseline: bool = False):
    """A complete trial of a --pruner none study: its validation accuracy at every epoch."""
    return optuna.trial.FrozenTrial(
        number=number, state=TrialState.COMPLETE, value=curve[-1], datetime_start=None,
        datetime_complete=None, params={"lr": 1e-3},
        distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
        user_attrs={"baseline": baseline, "epochs": len(curve)}, system_attrs={},
        intermediate_values=dict(enumerate(curve)), trial_id=number)


def test_a_replay_prunes_the_hopeless_spares_the_default_and_keeps_the_best():
    """Recorded curves through each pruner as tune.py builds it: none runs every epoch; median
    and halving stop the trials far under the others after the startup trials, never the
    default (trial 0, the worst here), never at the last epoch, and keep the best."""
    from search import replay

    good = [[0.3, 0.5, 0.6, 0.65], [0.32, 0.52, 0.62, 0.66], [0.33, 0.53, 0.63, 0.67],
            [0.34, 0.54, 0.64, 0.68], [0.35, 0.55, 0.7, 0.8]]  # each better than the last
    trials = [recorded(0, [0.05, 0.06, 0.07, 0.08], baseline=True)]
    trials += [recorded(i + 1, c) for i, c in enumerate(good)]
    trials += [recorded(6, [0.02, 0.03, 0.04, 0.05]), recorded(7, [0.01, 0.02, 0.03, 0.04])]
    none = replay(trials, "none", 4)
    assert none == dict(epochs=32, of=32, pruned=[], best_kept=True)
    for pruner in ("median", "halving"):
        got = replay(trials, pruner, 4)
        assert got["pruned"] == [6, 7] and got["best_kept"], (pruner, got)
        assert got["epochs"] < 32
    late = replay(trials, "median", 7)  # only trial 7 has 7 others before it
    assert late["pruned"] == [7]


def test_bench_refuses_a_replay_without_a_study(work, tmp_path):
    assert "which study?" in refused("bench.py", "--work", work, "--sections", "pruners")
    assert "no study" in refused("bench.py", "--work", work, "--sections", "pruners",
                                 "--replay-study", "nosuch")
    (work / "studies").mkdir(exist_ok=True)  # a complete trial with no curve and no run
    study = optuna.create_study(study_name="nocurve", storage=sqlite(work, "nocurve"))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    assert "trial 0 has no learning curve" in refused(
        "bench.py", "--work", work, "--sections", "pruners", "--replay-study", "nocurve")
