"""Search a recipe with Optuna: every trial an ordinary run, one study shared by many workers.

    python tune.py --work work/hard --study s1 --space space.yaml --trials 40 \\
        -m resnet18 -t 64 -e 4 -b 64 -g cpu                   # one machine (SQLite)
    python tune.py ... --storage postgresql://USER:PASS@HOST/DB  # the same on every machine
    python tune.py --work work/hard --study s1 --resume --trials 60   # more trials, same recipe
    python train.py --work work/hard --config work/hard/studies/s1/best.yaml -f all  # the winner

Optuna's shape: `objective(trial)` suggests the space's values and trains the trial's folds
with fit.train_fold (train.py's own) and Optuna's Lightning pruning callback; `study.optimize`
runs it; the space and the pruners are search.py's. Any train.py flag is fixed for every
trial; space.yaml names the settings searched (`{float: [low, high]}`, `{int: ...}`, `log:
true`, `{choice: [...]}`): a YAML file runs no code, the study keeps it for every worker, and
each value passes train.py's checks before a study is made. Trial n is the run WORK/runs/<study>-<n>/ (a pruned fold holds pruned.json, no
result.json). The default recipe is queued while no trial holds it and is never pruned.
WORK/studies/<study>/ gets best.yaml, trials.csv and Optuna's history/importance/slice plots.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
import warnings
from pathlib import Path

import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState

from arg import FIELDS, Config, make_parser, parse_config, write_yaml
from job import check_model, work_settings
from metrics import monitored
from runs import PRUNED, Run, Work
from search import PRUNERS, Spared, baseline, distribution, read_space
from util import Stopped, UsageError, run_cli, setup_logging, write_csv, write_json

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# ----------------------------------------------------------------------------- a trial
def objective(trial, fixed: dict, space: dict, folds: list[int]) -> float:
    """Train the trial's folds as train.py would: their best validation scores' mean. The
    pruner watches the first fold."""
    from optuna_integration import PyTorchLightningPruningCallback  # Lightning, a trial's own

    from fit import train_fold

    params = {n: trial.suggest_categorical(n, d.choices) if hasattr(d, "choices") else
              (trial.suggest_int if isinstance(d, IntDistribution) else trial.suggest_float)(
                  n, d.low, d.high, log=d.log) for n, d in space.items()}
    cfg = trial_config(fixed, params, f"{trial.study.study_name}-{trial.number}")
    for key, value in (("worker", f"{socket.gethostname()}:{os.getpid()}"), ("epochs", cfg.epochs),
                       ("baseline", bool(baseline(space)) and all(
                           params[k] == v for k, v in baseline(space).items()))):
        trial.set_user_attr(key, value)  # what Spared and trials.csv read
    monitor, scores = "val_" + monitored(cfg.multilabel), []
    for i, k in enumerate(folds):
        # the first fold reports every epoch (--pruner none too: its curves are what bench.py
        # --replay-study runs through the other pruners)
        prune = [PyTorchLightningPruningCallback(trial, monitor)] if i == 0 else []
        try:
            scores.append(train_fold(cfg, k, False, prune)[monitor])
        except optuna.TrialPruned:
            seen = next(t for t in trial.study.get_trials(deepcopy=False)
                        if t.number == trial.number).intermediate_values
            trial.set_user_attr("epochs", max(seen) + 1)
            write_json(dict(trial=trial.number, epochs=max(seen) + 1, **{monitor: seen[max(seen)]}),
                       Run(cfg.work, cfg.run).fold(k) / PRUNED)
            raise
    return sum(scores) / len(scores)


def trial_config(fixed: dict, params: dict, run: str) -> Config:
    values = {**fixed, **params, "run": run}
    return work_settings(Config.preset(values.pop("aug", "default"), **values), set(values))


# ----------------------------------------------------------------------------- the study
def open_study(args, work: Work):
    """The study in --storage (default WORK/studies/STUDY.db), made unless --resume, which
    refuses a study that is not there before anything is written; a URL or file that is not
    a study store is one line."""
    url = args.storage or f"sqlite:///{(work.dir / 'studies' / f'{args.study}.db').resolve()}"
    said = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
    if not args.storage and args.resume and not Path(url[10:]).is_file():
        raise UsageError(f"--resume: no study {args.study!r} ({url[10:]} does not exist)")
    if not args.storage:
        Path(url[10:]).parent.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=args.heartbeat,
                                             grace_period=2 * args.heartbeat + 5)
        there = args.study in [s.study_name for s in optuna.get_all_study_summaries(storage)]
    except Exception as e:  # sqlalchemy's ArgumentError, DatabaseError...; a missing driver
        raise UsageError(f"--storage {said}: not a study store this can open ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:90]})") from None
    if args.resume and not there:
        raise UsageError(f"--resume: no study {args.study!r} in {said}")
    return optuna.create_study(study_name=args.study, storage=storage, direction="maximize",
                               sampler=optuna.samplers.TPESampler(constant_liar=True),
                               pruner=Spared(PRUNERS[args.pruner](), args.startup),
                               load_if_exists=True), said


def settle(study, fixed: dict, spec: dict | None, said: str) -> tuple[dict, dict]:
    """The study's recipe (the fixed flags) and space: recorded by the worker that makes it; a
    joining worker brings the same; --resume (spec None) takes the study's own, which its
    flags may not change."""
    made = study.user_attrs.get("fixed"), study.user_attrs.get("space")
    if made[1] is None:
        study.set_user_attr("fixed", fixed)
        study.set_user_attr("space", spec)
        return fixed, spec
    new = {**(made[0] if spec is None else {}), **fixed}, made[1] if spec is None else spec
    old, now = ({**f, **{f"space {k}": v for k, v in s.items()}} for f, s in (made, new))
    diff = [f"{k} {old.get(k)!r} -> {now.get(k)!r}" for k in sorted({*old, *now})
            if old.get(k) != now.get(k)]
    if diff:
        raise UsageError(f"study {study.study_name!r} in {said} was made with other settings "
                         f"({', '.join(diff)}): --resume continues it with its own (give none of "
                         f"them), or pick another --study")
    return made


def run_study(study, fixed: dict, space: dict, folds: list[int], args) -> None:
    """study.optimize until --trials trials are finished by every worker together. While the
    rest are others' running trials this worker waits: a dead worker's trial fails by its
    heartbeat (fail_stale_trials) and this worker takes its place. A study whose trials all
    fail stops after three."""
    def count(*states):
        return len(study.get_trials(deepcopy=False, states=states))

    def each(study_, trial):
        print(f"trial {trial.number}: " + (f"{trial.value:.4f}" if trial.value is not None else
              trial.state.name.lower()) + f" {trial.params}", flush=True)
        if count(*FINISHED, TrialState.RUNNING) >= args.trials:
            study_.stop()
        if not count(*FINISHED) and count(TrialState.FAIL) >= 3:
            raise FloatingPointError(f"study {args.study}: {count(TrialState.FAIL)} trials "
                                     f"failed and none finished: see their fold's records")
    t0, default = time.time(), baseline(space)
    while count(*FINISHED) < args.trials and not (args.timeout and time.time() - t0 > args.timeout):
        optuna.storages.fail_stale_trials(study)
        held = [t.system_attrs.get("fixed_params", t.params) for t in study.get_trials(
            deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))]
        if default and default not in [{k: p.get(k) for k in default} for p in held]:
            study.enqueue_trial(default)  # the default recipe, until a trial holds it
        if count(*FINISHED, TrialState.RUNNING) >= args.trials:
            time.sleep(min(args.heartbeat, 5))
            continue
        study.optimize(lambda t: objective(t, fixed, space, folds),
                       callbacks=[each], catch=(FloatingPointError,), gc_after_trial=True)


def summarise(study, given: dict, out: Path) -> None:
    """trials.csv (study.trials_dataframe), best.yaml (the best trial's recipe and run name)
    and Optuna's matplotlib plots."""
    import optuna.visualization.matplotlib as plots

    from results import save_figure

    table = study.trials_dataframe(("number", "state", "value", "duration", "params",
                                    "user_attrs"))
    write_csv(table.rename(columns=lambda c: re.sub("^(params|user_attrs)_", "", c)).rename(
        columns={"number": "trial"}).assign(state=lambda t: t.state.str.lower()),
        out / "trials.csv")
    if not any(t.state == TrialState.COMPLETE for t in study.trials):
        return
    cfg = trial_config(given, study.best_params, f"{study.study_name}-best")
    write_yaml(cfg, out / "best.yaml", roles=("recipe", "place"), only=("run",))
    for name in ("optimization_history", "param_importances", "slice"):
        try:
            ax = getattr(plots, f"plot_{name}")(study)
        except (ValueError, RuntimeError, ZeroDivisionError):  # too few trials for it
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(max(6.0, fig.get_size_inches()[0]), 4.0)
        save_figure(fig, out / f"{name.split('_')[-1]}.png")


# ----------------------------------------------------------------------------- main
def steps(argv) -> int:
    p = make_parser(__doc__.split("\n")[0], "train", config_file=True, skip=("resume",))
    g = p.add_argument_group("study")
    g.add_argument("--study", required=True, help="study name: trials run as WORK/runs/STUDY-N")
    g.add_argument("--space", default="", help="YAML file of the searched settings (space.yaml)")
    g.add_argument("--trials", type=int, default=20, help="finished trials the study ends with, "
                   "by every worker together (default: 20)")
    g.add_argument("--timeout", type=float, default=0, help="this worker starts no trial after "
                   "this many seconds (0: no limit)")
    g.add_argument("--storage", default="", help="an Optuna storage URL the workers share "
                   "(postgresql://USER:PASS@HOST/DB); default WORK/studies/STUDY.db")
    g.add_argument("--resume", action="store_true", help="continue the study with its own "
                   "recipe and space")
    g.add_argument("--pruner", default="median", choices=tuple(PRUNERS), help="stop hopeless "
                   "trials early (default: median, docs/RESULTS.md)")
    g.add_argument("--startup", type=int, default=4, help="no trial is pruned at an epoch fewer "
                   "than this many other trials reached (default: 4)")
    g.add_argument("--heartbeat", type=int, default=30, help="seconds between heartbeats; a "
                   "trial silent for twice as long (+5 s) is failed (default: 30)")
    cfg, args = parse_config(p, argv)
    for flag, value, least in (("--trials", args.trials, 1), ("--startup", args.startup, 0),
                               ("--heartbeat", args.heartbeat, 1)):
        if value < least:
            p.error(f"{flag} {value}: expected {least} or more")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", args.study) or ".." in args.study:
        p.error(f"--study {args.study!r}: a plain name (letters, digits, _ . -)")
    if args.resume == bool(args.space):
        p.error("--space FILE.yaml makes (or joins) a study; --resume continues one with the "
                "space it was made with: give one of them")
    setup_logging()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a line per trial says it
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    work, given = Work(cfg.work), {k: v for k, v in cfg.to_dict().items() if k in args.given}
    fixed = {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()
             if FIELDS[k].metadata["role"] == "recipe"}  # what the study is
    here = {k: v for k, v in given.items() if k not in fixed and k != "run"}  # this worker's
    if args.resume:  # the study's own recipe and space, read before any check
        study, said = open_study(args, work)
        fixed, spec = settle(study, fixed, None, said)
    base = trial_config({**fixed, **here}, {}, f"{args.study}-0")  # train.py's checks, first
    check_model(base.model)
    folds = work.folds() if base.fold == "all" else [int(f) for f in base.fold.split(",")]
    if not set(folds) <= set(work.folds()):
        raise UsageError(f"-f {base.fold}: {work.train_csv} has folds {work.folds()}")
    if not args.resume:
        spec = read_space(args.space, base)
        study, said = open_study(args, work)
        fixed, spec = settle(study, fixed, spec, said)
    space = {n: distribution(f"study {args.study}", n, s, base) for n, s in spec.items()}
    log.info("study %s in %s: %d trials on fold(s) %s, %s pruning; trials in %s", args.study,
             said, args.trials, folds, args.pruner, Run(cfg.work, f"{args.study}-N").dir)
    try:
        run_study(study, {**fixed, **here}, space, folds, args)
    except Stopped as e:  # Optuna failed the running trial
        raise Stopped(f"study {args.study}: {e}; the trial is failed, --resume continues the "
                      f"study", e.code) from None
    finally:
        states = [t.state for t in study.trials]
        print(f"study {args.study}: {states.count(TrialState.COMPLETE)} complete, "
              f"{states.count(TrialState.PRUNED)} pruned, {states.count(TrialState.FAIL)} failed "
              f"-> {work.study(args.study)}")
        summarise(study, {**fixed, **here}, work.study(args.study))
    if TrialState.COMPLETE in states:
        print(f"best: trial {study.best_trial.number} {study.best_value:.4f} {study.best_params}"
              f"; every fold: python train.py --work {cfg.work} --config "
              f"{work.study(args.study) / 'best.yaml'} -f all")
    return 0


def main(argv=None) -> int:
    return run_cli(steps, "tune", argv)


if __name__ == "__main__":
    raise SystemExit(main())
