"""A long option means one thing in every script, and no script takes an abbreviation of one."""
from __future__ import annotations

import re
from collections import defaultdict

import pytest

from conftest import ROOT, run_script

SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
# options whose one meaning is "this script's own ...": where it writes (--out, --embed), that it
# may replace what is there (--force), that it continues its own unfinished work (--resume),
# and the seed of its own randomness (--seed)
OWN = {"--out", "--embed", "--force", "--resume", "--seed"}


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
@pytest.mark.parametrize("folds", ["0", "-2", "1,1", ","])
def test_a_fold_count_that_names_no_fold_is_one_line(tmp_path, script, folds):
    proc = run_script(script, "--work", tmp_path, "--run", "r", "-f", folds, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"-f {folds}: expected a fold count of at least 1" in proc.stderr
