"""Search a recipe with Optuna: every trial an ordinary run, one study shared by many workers.

    python tune.py --work work/hard --study s1 --space space.yaml --trials 40 \\
        -m resnet18 -t 64 -e 4 -b 64 -g cpu                   # one machine (SQLite)
    python tune.py ... --storage postgresql://USER:PASS@HOST/DB  # the same on every machine
    python tune.py --work work/hard --study s1 --resume --trials 60   # more trials, same settings
    python train.py --config work/hard/studies/s1/best.yaml -f all      # the winner, every fold

Any train.py flag is fixed for every trial; space.yaml names the settings searched (a `float`
or `int` range, `log: true` for a log scale, or a `choice` list; example: space.yaml).
Trial n trains WORK/runs/<study>-<n>/fold<k>/ as train.py would (report.py lists it); its
score is the fold's best validation accuracy (mAP for multilabel data), the one the run
monitors; several -f folds score their mean. A trial the pruner stops holds pruned.json and no
result.json: nothing reads it as finished. Trial 0 of a new study is the default recipe (each
searched setting at its train.py default, where the space holds it).

The study lives in WORK/studies/<study>.db (SQLite) or any --storage URL Optuna takes. A worker
joins a study of the same settings; --resume continues one with the settings it was made
with. Workers beat a heartbeat: a killed worker's trial is marked failed by the next worker
that looks, and the study goes on until --trials trials are finished (complete or pruned).
At the end WORK/studies/<study>/ holds best.yaml, trials.csv, history.png, importance.png,
slice.png and report.html.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from pathlib import Path

from arg import (FIELDS, PRESETS, RESUME_SAFE, WORK_FIXED, Config, make_parser, parse_config,
                 write_yaml)
from runs import Run, Work
from util import UsageError, setup_logging, write_csv, write_json

log = logging.getLogger(__name__)
# settings that say where and how a trial runs, not what it learns: never searched
NOT_SEARCHED = (*WORK_FIXED, "work", "run", "fold", "gpus", "devices", "strategy", "num_nodes",
                "workers", "resume", "logger", "limit_batches", "tta", "precision", "compile",
                "channels_last", "pseudo", "teacher", "pretrained", "seed")
KINDS = ("float", "int", "choice")


# ----------------------------------------------------------------------------- the space
@dataclasses.dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (log scale or not), or a list of values."""
    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def holds(self, value) -> bool:
        if self.kind == "choice":
            return value in self.choices
        return self.low <= value <= self.high

    def ends(self) -> list:
        """The values a check of the space tries: both ends of a range, every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]


def read_spec(path: str) -> dict:
    """A space file's {setting: spec} ({} without --space: --resume reads the study's)."""
    import yaml

    if not path:
        return {}
    if not Path(path).is_file():
        raise UsageError(f"--space {path}: no such file (see space.yaml in the repository)")
    try:
        spec = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--space {path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(spec, dict) or not spec:
        raise UsageError(f"--space {path}: expected 'setting: {{float: [low, high]}}' lines")
    return spec


def check_param(path: Path, name: str, spec, base: Config) -> Param:
    """One setting of a space file checked against Config: an unknown or unsearchable setting,
    a spec that is not one of float/int/choice, an empty range, a log range from 0 or below,
    or a value the setting's flag (or train.py's option checks) would refuse -> UsageError
    naming the file, the setting and what is wrong."""
    import difflib

    def bad(why: str):
        return UsageError(f"--space {path}: {name}: {why}")

    if name not in FIELDS:
        close = difflib.get_close_matches(str(name), list(FIELDS), n=1)
        raise bad("unknown setting" + (f" (did you mean {close[0]}?)" if close else
                                       " (python train.py --help lists them)"))
    if name in NOT_SEARCHED:
        raise bad("says where or how a trial runs, not what it learns: give it as a flag")
    if not isinstance(spec, dict) or len(set(spec) & set(KINDS)) != 1 or \
            set(spec) - {*KINDS, "log"}:
        raise bad("expected one of {float: [low, high]}, {int: [low, high]} (either with "
                  "log: true) or {choice: [a, b, ...]}")
    kind = next(k for k in KINDS if k in spec)
    default = FIELDS[name].default
    if isinstance(default, tuple):
        raise bad("a pair of values: not searchable")
    if kind == "choice":
        values = spec[kind]
        if not isinstance(values, list) or not values:
            raise bad("choice: expected a non-empty list")
        param = Param(name, kind, choices=tuple(values))
    else:
        pair = spec[kind]
        try:
            low, high = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise bad(f"{kind}: expected [low, high], got {pair!r}")
        if type(default) is int and kind == "float":
            raise bad("an int setting: search it with int: [low, high] or choice: [...]")
        if type(default) not in (int, float):
            raise bad(f"{'a yes/no' if type(default) is bool else 'a name'} setting: search "
                      f"it with choice: [...]")
        if kind == "int" and (low != int(low) or high != int(high)):
            raise bad(f"int: [{low:g}, {high:g}] are not whole numbers")
        if not low < high:
            raise bad(f"empty range [{low:g}, {high:g}]: low must be below high")
        if spec.get("log") and low <= 0:
            raise bad(f"log: true needs a range above 0, got [{low:g}, {high:g}]")
        param = Param(name, kind, low, high, bool(spec.get("log")))
    for value in param.ends():
        problem = value_problem(name, value, base)
        if problem:
            raise bad(f"{value!r}: {problem}")
    return param


def value_problem(name: str, value, base: Config) -> str:
    """Why train.py would refuse `name` = `value` on top of `base` ('' when it would not):
    the flag's own type and choices, then the option checks train.py makes."""
    from job import check_model, check_options

    meta, default = FIELDS[name].metadata, FIELDS[name].default
    if "choices" in meta and value not in meta["choices"]:
        return f"not one of {', '.join(meta['choices'])}"
    if isinstance(default, bool) and not isinstance(value, bool):
        return "expected true or false"
    if isinstance(default, (int, float)) and not isinstance(default, bool) and \
            (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"expected a number ({type(default).__name__})"
    if isinstance(default, str) and not isinstance(value, str):
        return "expected a name (a string)"
    try:
        cfg = dataclasses.replace(base, **{name: value})
        if name == "model":
            check_model(value)
        check_options(cfg)
    except UsageError as e:
        return str(e)
    return ""


# ----------------------------------------------------------------------------- one trial
def trial_config(given: dict, params: dict, study: str, number: int) -> Config:
    """The Config of trial `number`: the fixed settings (the study's recipe and this worker's
    own: where the data is, which device), then the trial's values, the --aug preset filling
    in the augmentation settings neither sets (as train.py does)."""
    values = {**given, **params}
    aug = values.pop("aug", "default")
    return Config.preset(aug, **values, run=f"{study}-{number}")


def objective(trial, given: dict, space: list[Param], folds: list[int], state: dict) -> float:
    """Train the trial's folds as train.py would; its score is their best validation scores'
    mean. The pruner watches the first fold epoch by epoch."""
    import optuna
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from fit import train_fold
    from job import work_settings
    from metrics import monitored

    params = {p.name: p.suggest(trial) for p in space}
    cfg = work_settings(trial_config(given, params, trial.study.study_name, trial.number),
                        set(given) | set(params))
    monitor = "val_" + monitored(cfg.multilabel)
    run = Run(cfg.work, cfg.run_name)
    trial.set_user_attr("run", str(run.dir))
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    scores = []
    for i, k in enumerate(folds):
        prune = [pruning_callback(trial, monitor)] if i == 0 and state["pruning"] else []
        with trial_log(run.fold(k) / "tune.log"):
            try:
                result = train_fold(cfg, k, progress=False, extra_callbacks=prune)
                scores.append(result[monitor])
                epochs = trial.user_attrs.get("epochs", 0) + result["epochs"]
                trial.set_user_attr("epochs", epochs)
            except optuna.TrialPruned as e:
                steps = next(t for t in trial.study.get_trials(deepcopy=False)
                             if t.number == trial.number).intermediate_values
                last = max(steps, default=-1)  # Lightning's epoch index, from 0
                trial.set_user_attr("epochs", trial.user_attrs.get("epochs", 0) + last + 1)
                write_json(dict(trial=trial.number, epochs=last + 1,
                                **{monitor: steps.get(last)}, why=str(e)),
                           run.fold(k) / "pruned.json")
                raise
            except SIGTERMException as e:  # the trial is failed, the worker stops
                state["stopped"] = e
                raise Stopped("stopped by SIGTERM") from e
    return float(sum(scores) / len(scores))


def pruning_callback(trial, monitor: str):
    """Optuna's Lightning pruning callback, except after the last epoch: a trial that has
    trained every epoch is complete (its score counts, its fold is finished), however the
    pruner ranks it."""
    from optuna_integration import PyTorchLightningPruningCallback

    class Pruning(PyTorchLightningPruningCallback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.current_epoch + 1 < trainer.max_epochs:
                return super().on_validation_end(trainer, pl_module)
            score = trainer.callback_metrics.get(self.monitor)
            if score is not None and not trainer.sanity_checking and trainer.is_global_zero:
                self._trial.report(score.item(), step=pl_module.current_epoch)

    return Pruning(trial, monitor)


class Stopped(Exception):
    """The worker was told to stop (SIGTERM) mid-trial: the trial is failed, the worker ends."""


class trial_log:
    """A trial's log lines and warnings (its own, Lightning's) go to the fold's tune.log, not
    the terminal: the worker's bar and one line per trial are there."""

    QUIET = ("", "lightning")  # the loggers with a handler on the terminal

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, mode="w")
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.levels = [(h, h.level) for name in self.QUIET
                       for h in logging.getLogger(name).handlers]
        for h, _ in self.levels:
            h.setLevel(logging.ERROR)
        logging.getLogger().addHandler(self.handler)  # Lightning's lines propagate to it
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").propagate = False
        logging.getLogger("py.warnings").addHandler(self.handler)

    def __exit__(self, *exc):
        for name in ("", "py.warnings"):
            logging.getLogger(name).removeHandler(self.handler)
        logging.captureWarnings(False)
        self.handler.close()
        for h, level in self.levels:
            h.setLevel(level)


# ----------------------------------------------------------------------------- the study
def storage_url(args, work: Work) -> str:
    if args.storage:
        return args.storage
    folder = work.dir / "studies"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / f'{args.study}.db').resolve()}"


def open_study(args, url: str, given: dict, space_file: dict):
    """The study `args.study` in `url`: made, joined when it was made with this recipe and
    space, or continued with its own (--resume). Returns (study, recipe, space spec)."""
    import optuna

    storage = optuna.storages.RDBStorage(url, heartbeat_interval=args.heartbeat,
                                         grace_period=2 * args.heartbeat + 5)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if args.resume:
        if args.study not in names:
            raise UsageError(f"--resume: no study {args.study!r} in {redact(url)} (it has: "
                             f"{', '.join(names) or 'none'})")
        study = optuna.load_study(study_name=args.study, storage=storage,
                                  sampler=sampler(), pruner=make_pruner(args))
        return study, study.user_attrs["given"], study.user_attrs["space"]
    study = optuna.create_study(study_name=args.study, storage=storage, direction="maximize",
                                sampler=sampler(), pruner=make_pruner(args),
                                load_if_exists=True)
    made = study.user_attrs.get("space")
    if made is None:
        study.set_user_attr("given", given)
        study.set_user_attr("space", space_file)
    elif (study.user_attrs["given"], made) != (given, space_file):
        old = {**study.user_attrs["given"], **{f"space {k}": v for k, v in made.items()}}
        new = {**given, **{f"space {k}": v for k, v in space_file.items()}}
        diff = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted({*old, *new})
                         if old.get(k) != new.get(k))
        raise UsageError(f"study {args.study!r} in {redact(url)} was made with other settings "
                         f"({diff}): --resume continues it with its own, or pick another --study")
    return study, given, space_file


def sampler():
    """TPE; with several workers each running trial counts as a poor result for the others'
    next suggestion (constant liar), so two workers do not try the same corner at once."""
    import optuna

    return optuna.samplers.TPESampler(constant_liar=True)


def redact(url: str) -> str:
    """A storage URL without its password."""
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def make_pruner(args):
    import optuna

    if args.pruner == "median":  # prune below the median of earlier trials at the same epoch
        return optuna.pruners.MedianPruner(n_startup_trials=args.startup, n_warmup_steps=1)
    if args.pruner == "halving":  # successive halving: the best third goes on (epochs 2, 4, 10)
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3,
                                                      bootstrap_count=args.startup)
    return optuna.pruners.NopPruner()


def baseline(space: list[Param]) -> dict:
    """The default recipe's value of each searched setting the space holds."""
    out = {}
    for p in space:
        value = PRESETS["default"].get(p.name, FIELDS[p.name].default)
        if p.holds(value):
            out[p.name] = value
    return out


def counts(study) -> dict:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return {s: sum(t.state == s for t in trials) for s in TrialState}


def work_loop(study, given: dict, space: list[Param], folds: list[int], args) -> int:
    """Trials until the study holds --trials finished ones (or --timeout): one at a time,
    each in Optuna's optimize (its heartbeat, stale trials failed first); the bar counts the
    study's finished trials, from every worker."""
    import optuna
    from optuna.trial import TrialState
    from tqdm import tqdm

    state = dict(pruning=args.pruner != "none", stopped=None)
    t0 = time.time()
    bar = tqdm(total=args.trials, desc=f"study {args.study}", unit="trial")

    def finished(c):
        return c[TrialState.COMPLETE] + c[TrialState.PRUNED]

    def show(study_, trial):
        c = counts(study_)
        bar.n = min(args.trials, finished(c))
        best = best_trial(study_)
        if best is not None:
            bar.set_postfix_str(f"best {best.value:.4f} (trial {best.number})")
        took = (trial.datetime_complete - trial.datetime_start).total_seconds() / 60 \
            if trial.datetime_complete else float("nan")
        outcome = {TrialState.COMPLETE: f"{trial.value:.4f}",
                   TrialState.PRUNED: f"pruned after {len(trial.intermediate_values)} epoch(s)",
                   TrialState.FAIL: "failed"}.get(trial.state, trial.state.name)
        bar.write(f"trial {trial.number}: {outcome} in {took:.1f} min ({said(trial.params)})")
        bar.refresh()

    while True:
        optuna.storages.fail_stale_trials(study)
        c = counts(study)
        bar.n = min(args.trials, finished(c))
        bar.refresh()
        if finished(c) >= args.trials or (args.timeout and time.time() - t0 > args.timeout):
            break
        if finished(c) + c[TrialState.RUNNING] >= args.trials:  # others hold the rest: wait
            time.sleep(min(args.heartbeat, 5))
            continue
        study.optimize(lambda t: objective(t, given, space, folds, state), n_trials=1,
                       catch=(FloatingPointError, Stopped), callbacks=[show])
        if state["stopped"] is not None:
            bar.close()
            return 143
    bar.close()
    return 0


def best_trial(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return max(done, key=lambda t: t.value) if done else None


def said(params: dict) -> str:
    """A trial's values in one line: 'lr 0.002769, p_mixup 0'."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in params.items())


# ----------------------------------------------------------------------------- the summary
def summarise(study, given: dict, out: Path) -> Path | None:
    """best.yaml (train.py --config reads it), trials.csv, the plots and report.html."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in study.get_trials(deepcopy=False):
        took = (t.datetime_complete - t.datetime_start).total_seconds() / 60 \
            if t.datetime_complete and t.datetime_start else float("nan")
        rows.append(dict(trial=t.number, state=t.state.name.lower(), value=t.value,
                         epochs=t.user_attrs.get("epochs", 0), minutes=round(took, 2),
                         **t.params, worker=t.user_attrs.get("worker", ""),
                         run=t.user_attrs.get("run", "")))
    table = pd.DataFrame(rows)
    write_csv(table, out / "trials.csv")
    best = best_trial(study)
    if best is None:
        return None
    from job import work_settings

    cfg = work_settings(trial_config(given, best.params, study.study_name, best.number))
    write_yaml(dataclasses.replace(cfg, run=f"{study.study_name}-best"), out / "best.yaml",
               roles=("recipe", "place"), only=("run",))  # the recipe; no worker's placement
    images = plot_study(study, out)
    write_report(study, table, best, images, out)
    return out / "best.yaml"


def plot_study(study, out: Path) -> list[Path]:
    """history.png, importance.png (two complete trials and more) and slice.png: Optuna's
    matplotlib plots, one file each."""
    import warnings

    import optuna.visualization.matplotlib as vis

    from results import save_figure

    made = []
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its notes on categorical axes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental plots, matplotlib's layout notes
        for name, plot in (("history", vis.plot_optimization_history),
                           ("importance", vis.plot_param_importances),
                           ("slice", vis.plot_slice)):
            try:
                ax = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                log.info("%s plot skipped: %s", name, e)
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(max(6.0, fig.get_size_inches()[0]), 4.0)
            fig.tight_layout()
            save_figure(fig, out / f"{name}.png")
            made.append(out / f"{name}.png")
    return made


def write_report(study, table, best, images: list[Path], out: Path) -> None:
    """report.html: the best trial, the plots and the table of trials, in one file."""
    from results import _data_uri
    from util import write_text

    imgs = "".join(f'<h2>{p.stem}</h2><img src="{_data_uri(p.read_bytes(), "image/png")}">'
                   for p in images)
    params = said(best.params)
    html = (f"<!doctype html><meta charset='utf-8'><title>study {study.study_name}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style>"
            f"<h1>study {study.study_name}</h1><p>best: trial {best.number}, score "
            f"{best.value:.4f} ({params}); retrain it on every fold with <code>python train.py "
            f"--config {out / 'best.yaml'} -f all</code></p>{imgs}<h2>trials</h2>"
            + table.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep=""))
    write_text(html, out / "report.html")


# ----------------------------------------------------------------------------- main
def parse(argv):
    p = make_parser(__doc__.split("\n")[0], "train", config_file=True, skip=("resume",))
    g = p.add_argument_group("study")
    g.add_argument("--study", required=True, help="study name: trials run as WORK/runs/STUDY-N")
    g.add_argument("--space", default="", help="YAML file of the searched settings (space.yaml)")
    g.add_argument("--trials", type=int, default=20, help="finished trials the study ends "
                   "with, from every worker together (default: 20)")
    g.add_argument("--timeout", type=float, default=0, help="this worker starts no trial after "
                   "this many seconds (0: no limit)")
    g.add_argument("--storage", default="", help="an Optuna storage URL shared by the workers "
                   "(postgresql://USER:PASS@HOST/DB); default WORK/studies/STUDY.db (SQLite)")
    g.add_argument("--resume", action="store_true", help="continue the study with the settings "
                   "it was made with")
    g.add_argument("--pruner", default="halving", choices=("halving", "median", "none"),
                   help="stop hopeless trials early: halving (successive halving: the best "
                        "third of the trials at epochs 2, 4, 10 go on), median (below the "
                        "median of earlier trials at the same epoch) or none (default: "
                        "halving, measured in docs/RESULTS.md)")
    g.add_argument("--startup", type=int, default=4, help="trials that run to the end before "
                   "the pruner prunes (default: 4)")
    g.add_argument("--heartbeat", type=int, default=30, help="seconds between a worker's "
                   "heartbeats; a trial silent for twice as long (+5 s) is failed (default: 30)")
    cfg, args = parse_config(p, argv)
    if args.trials < 1:
        p.error(f"--trials {args.trials}: expected 1 or more")
    if not args.resume and not args.space:
        p.error("--space FILE.yaml is needed to make a study (--resume reads it from the study)")
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse(sys.argv[1:] if argv is None else argv)
    setup_logging()
    import warnings

    import optuna
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar and a line per trial say it
    warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats, the plots

    from job import work_settings

    work = Work(cfg.work)
    given = {k: (list(v) if isinstance(v, tuple) else v)
             for k, v in dataclasses.asdict(cfg).items() if k in args.given and k != "run"}
    recipe = {k: v for k, v in given.items() if k not in RESUME_SAFE}  # what the study is
    local = {k: v for k, v in given.items() if k in RESUME_SAFE}  # this worker's own
    try:
        def checked(recipe_, spec_, where):  # every check before the study is touched
            base = work_settings(trial_config({**recipe_, **local}, {}, args.study, 0),
                                 {*recipe_, *local})
            return base, [check_param(where, n, s, base) for n, s in spec_.items()]

        spec = read_spec(args.space)
        if not args.resume:  # a study joined or made has this recipe and space
            base, space = checked(recipe, spec, Path(args.space))
        url = storage_url(args, work)
        study, recipe, spec = open_study(args, url, recipe, spec)
        given = {**recipe, **local}
        if args.resume:  # the study's own recipe and space
            base, space = checked(recipe, spec, Path(f"study {args.study}"))
        folds = work.folds() if base.fold == "all" else \
            [int(f) for f in str(base.fold).split(",")]
        if not study.trials and baseline(space):
            study.enqueue_trial(baseline(space), skip_if_exists=True)
        log.info("study %s in %s: %d trials on fold(s) %s, %s pruning; trials in %s",
                 args.study, redact(url), args.trials, ",".join(map(str, folds)), args.pruner,
                 Run(cfg.work, f"{args.study}-N").dir)
        code = work_loop(study, given, space, folds, args)
    except UsageError as e:
        print(f"tune: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tune: study {args.study} stopped by SIGINT; its running trial is failed, "
              f"--resume continues the study", file=sys.stderr)
        return 130
    made = summarise(study, given, work.study(args.study))
    c = counts(study)
    print(f"study {args.study}: {c[TrialState.COMPLETE]} complete, {c[TrialState.PRUNED]} "
          f"pruned, {c[TrialState.FAIL]} failed -> {work.study(args.study)}")
    if made:
        best = best_trial(study)
        print(f"best: trial {best.number} {best.value:.4f} "
              f"({said(best.params)})")
        print(f"every fold: python train.py --config {made} -f all")
    if code == 143:
        print("tune: stopped by SIGTERM; its trial is failed, --resume continues the study",
              file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
