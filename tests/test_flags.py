"""A long option means one thing in every script, and no script takes an abbreviation of one."""
from __future__ import annotations

import functools
import re
from collections import defaultdict

import pytest

from conftest import ROOT, run_script

SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
# options whose one meaning is "this script's own ...": where it writes (--out, --embed), that it
# may replace what is there (--force), that it continues its own unfinished work (--resume),
# and the seed of its own randomness (--seed)
OWN = {"--out", "--embed", "--force", "--resume", "--seed"}


@functools.lru_cache(maxsize=None)
def options(script: str) -> dict[str, str]:
    """{long option: its help without the default} from `script --help`."""
    text = run_script(f"{script}.py", "--help").stdout
    found, current = {}, []
    for line in text.splitlines():
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(.*))?$", line)
        if m:
            current = re.findall(r"--[\w-]+", m.group(1))
            for name in current:
                found[name] = m.group(2) or ""
        elif current and line.startswith(" " * 10):
            for name in current:
                found[name] += " " + line.strip()
        else:
            current = []
    return {k: re.sub(r"\s*\(default:.*$", "", v).strip() for k, v in found.items()}


def test_every_long_option_means_one_thing_in_every_script():
    by_option = defaultdict(dict)
    for script in SCRIPTS:
        for name, said in options(script).items():
            by_option[name][script] = said
    assert {"train", "inference", "predict", "demo", "real"} <= set(SCRIPTS)
    assert {"train", "inference"} <= set(by_option["--work"])  # the parse found the options
    differ = {name: said for name, said in by_option.items()
              if name not in OWN and len(set(said.values())) > 1}
    assert not differ, differ


@pytest.mark.parametrize("script,args,abbreviated", [
    ("train.py", ["--hop", "256"], "--hop"),             # would have been --hop-length
    ("inference.py", ["--fold", "0"], "--fold"),         # would have been --folds
    ("predict.py", ["m.onnx", "x.wav", "--win", "1"], "--win"),
    ("demo.py", ["--kok", "2"], "--kok"),
])
def test_an_abbreviated_option_is_refused(script, args, abbreviated):
    proc = run_script(script, *args, check=False)
    assert proc.returncode == 2 and "unrecognized arguments" in proc.stderr
    assert abbreviated in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("script", ["inference.py", "export.py"])
@pytest.mark.parametrize("folds", ["0", "1,1"])
def test_a_fold_count_that_names_no_fold_is_one_line(tmp_path, script, folds):
    proc = run_script(script, "--work", tmp_path, "--run", "r", "-f", folds, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"-f {folds}: expected a fold count of at least 1" in proc.stderr


JOB_OF = {"preprocess": "preprocess", "train": "train", "tune": "train", "pretrain": "pretrain",
          "inference": "inference", "export": "export", "report": "report", "bench": "bench"}


def config_options(job: str) -> dict[str, str]:
    """{long flag: Config field} of the fields whose role says `job` uses them."""
    from arg import FIELDS

    out = {}
    for name, f in FIELDS.items():
        if job in f.metadata["jobs"]:
            for flag in f.metadata["flags"] or (f"--{name.replace('_', '-')}",):
                if flag.startswith("--"):
                    out[flag] = name
    return out


@pytest.mark.parametrize("script", sorted(JOB_OF))
def test_a_script_offers_the_config_fields_its_job_uses_and_no_others(script):
    """From the roles alone: every Config flag a script's --help offers is a field its job
    uses, and every field its job uses is offered (tune.py: train's; its --resume is the
    study's own)."""
    from arg import FIELDS

    every = {flag: name for job in JOB_OF.values() for flag, name in config_options(job).items()}
    offered = {flag for flag in options(script) if flag in every}
    want = set(config_options(JOB_OF[script]))
    assert offered == want, (sorted(offered - want), sorted(want - offered))
    roles = {FIELDS[every[f]].metadata["role"] for f in offered}
    if script in ("inference", "export", "report", "bench"):
        assert "work" not in roles and "pretrain" not in roles


def test_the_roles_say_what_each_job_leaves_out():
    """A few facts the roles must keep: preprocess takes no training setting, pretrain
    no setting BYOL never applies, train no setting WORK fixes."""
    pre, ssl, train = (set(config_options(j).values()) for j in ("preprocess", "pretrain", "train"))
    assert {"sr", "seconds", "n_folds", "manifest", "noise"} <= pre
    assert not {"crop", "labels", "epochs", "model"} & pre
    assert not {"p_mixup", "mixup", "p_codec", "smoothing", "ohem", "ema", "head"} & ssl
    assert {"ssl_tau", "p_pitch", "lr"} <= ssl
    assert not {"sr", "seconds", "n_folds", "manifest", "data", "ssl_tau"} & train
