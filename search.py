"""The search space and the pruners of tune.py's studies, as a library (bench.py replays a
study's curves through the pruners with it): a space file's settings as Optuna distributions,
each value checked as train.py checks it; the default recipe's point in the space; and the
pruners, wrapped so that the default recipe and a trial's last epoch are never pruned and
--startup means what it says."""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from arg import FIELDS, PRESETS, SEARCHABLE, Config
from job import check_model, check_options
from util import UsageError


def read_space(path: str, base: Config) -> dict:
    """A space file's {setting: spec}, every setting checked (distribution) on top of `base`."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"--space {path}: not a readable YAML file ({type(e).__name__}); see "
                         f"space.yaml in the repository") from None
    if not isinstance(spec, dict) or not spec:
        raise UsageError(f"--space {path}: expected 'setting: {{float: [low, high]}}' lines")
    for name, s in spec.items():
        distribution(path, str(name), s, base)
    return spec


def distribution(where: str, name: str, spec, base: Config):
    """One setting's Optuna distribution, checked: a searchable Config setting, a spec of its
    kind, a range that is one, and both ends (every choice) of its flag's type and choices and
    passing train.py's option checks; UsageError naming the file and the setting otherwise."""
    def bad(why):
        return UsageError(f"--space {where}: {name}: {why}")

    if name not in SEARCHABLE:
        close = difflib.get_close_matches(name, SEARCHABLE, n=1)
        raise bad("says where or how a trial runs, not what it learns: give it as a flag"
                  if name in FIELDS else
                  "unknown setting" + (f" (did you mean {close[0]}?)" if close else ""))
    kinds = [k for k in ("float", "int", "choice") if isinstance(spec, dict) and k in spec]
    if len(kinds) != 1 or set(spec) - {kinds[0], "log"}:
        raise bad("expected {float: [low, high]}, {int: [low, high]} (log: true for a log "
                  "scale) or {choice: [a, b, ...]}")
    kind, default, values, logs = kinds[0], FIELDS[name].default, spec[kinds[0]], spec.get("log")
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise bad("choice: expected a non-empty list")
        dist = CategoricalDistribution(values)
    elif type(default) is not (int if kind == "int" else float):
        raise bad(f"a {type(default).__name__} setting: search it with "
                  + ("int: [low, high] or " if type(default) is int else "") + "choice: [...]")
    elif not (isinstance(values, list) and len(values) == 2 and all(
            type(v) in (int, float) for v in values) and values[0] < values[1]) or \
            (logs and values[0] <= 0):
        raise bad(f"{kind}: {values!r}: expected [low, high], low < high"
                  + (", above 0 for log: true" if logs else ""))
    else:
        dist = (IntDistribution if kind == "int" else FloatDistribution)(*values, log=bool(logs))
    for value in getattr(dist, "choices", None) or (dist.low, dist.high):
        if value not in FIELDS[name].metadata.get("choices", [value]):
            raise bad(f"{value!r}: not one of {', '.join(FIELDS[name].metadata['choices'])}")
        if type(value) is not type(default) and (type(default), type(value)) != (float, int):
            raise bad(f"{value!r}: expected {type(default).__name__}")
        try:
            if name == "model":
                check_model(value)
            check_options(dataclasses.replace(base, **{name: value}))
        except UsageError as e:
            raise bad(f"{value!r}: {e}") from None
    return dist


def baseline(space: dict) -> dict:
    """The default recipe's value of each searched setting, where the space holds it."""
    out = {n: PRESETS["default"].get(n, FIELDS[n].default) for n in space}
    return {n: v for n, v in out.items() for d in [space[n]]
            if (v in d.choices if hasattr(d, "choices") else d.low <= v <= d.high)}


class Spared(optuna.pruners.BasePruner):
    """`pruner`, but never the default recipe, nor a trial at its last epoch (it trained them
    all: it is complete), nor at an epoch fewer than `startup` other trials reached."""

    def __init__(self, pruner, startup: int):
        self.pruner, self.startup = pruner, startup

    def prune(self, study, trial) -> bool:
        step = trial.last_step
        if trial.user_attrs.get("baseline") or step is None or \
                step + 1 >= trial.user_attrs.get("epochs", step + 2):
            return False
        reached = sum(step in t.intermediate_values and t.number != trial.number
                      for t in study.get_trials(deepcopy=False))
        return reached >= self.startup and self.pruner.prune(study, trial)


PRUNERS = {"halving": lambda: optuna.pruners.SuccessiveHalvingPruner(reduction_factor=3),
           "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=1),
           "none": optuna.pruners.NopPruner}


def replay(trials: list, pruner: str, startup: int) -> dict:
    """A finished study's recorded learning curves (complete trials, every epoch) run again
    in trial order, one at a time, through `pruner` as tune.py builds it: the epochs that would
    have run, the trials it would prune, and whether the best trial would have finished."""
    study = optuna.create_study(direction="maximize", pruner=Spared(PRUNERS[pruner](), startup))
    epochs, pruned = 0, []
    for t in sorted(trials, key=lambda t: t.number):
        live = study.ask(t.distributions)
        for key in ("baseline", "epochs"):
            live.set_user_attr(key, t.user_attrs.get(key, key == "epochs" and len(
                t.intermediate_values)))
        for step in sorted(t.intermediate_values):
            epochs += 1
            live.report(t.intermediate_values[step], step)
            if live.should_prune():
                pruned.append(t.number)
                study.tell(live, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(live, t.value)
    best = max(trials, key=lambda t: t.value).number
    return dict(epochs=epochs, of=sum(len(t.intermediate_values) for t in trials),
                pruned=pruned, best_kept=best not in pruned)
