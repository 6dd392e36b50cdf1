"""Small helpers shared by the scripts: the bad-request error, atomic writes, logging, option
stripping, device choice, fold locks."""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


class UsageError(Exception):
    """A bad request that nothing can continue from: one line on stderr, exit code 2. The one
    exception type every script's `main` catches (the subclasses say what was wrong); anything
    else is a bug and keeps its traceback."""


class Stopped(Exception):
    """A run a signal ended (job.run_job says which and what --resume continues from), with
    the exit code a shell gives a process that signal ends: 143 (SIGTERM), 130 (SIGINT, ^C)."""

    def __init__(self, said: str, code: int):
        super().__init__(said)
        self.code = code


def run_cli(main, name: str, argv=None) -> int:
    """Run a script's `main(argv)` and map what ends it to one line and an exit code, the same
    for every script: a bad request (UsageError) 2, a loss that went NaN (FloatingPointError)
    1, SIGTERM 143 and ^C 130; anything else keeps its traceback (a bug)."""
    try:
        return main(argv) or 0
    except UsageError as e:
        said, code = str(e), 2
    except FloatingPointError as e:
        said, code = str(e), 1
    except Stopped as e:
        said, code = str(e), e.code
    except KeyboardInterrupt:
        said, code = "stopped by SIGINT (^C)", 130
    except SystemExit as e:
        if type(e).__name__ != "SIGTERMException":  # Lightning's, raised in its loops
            raise
        said, code = "stopped by SIGTERM", 143
    print(f"{name}: {said}", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------- I/O
class DiskFullError(UsageError):
    """A write found no room (full disk, quota, file-size limit). The file it was replacing
    is untouched (atomic_write); the user frees space or writes elsewhere."""


NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def no_room(e: OSError, path: str | Path) -> DiskFullError:
    """The one-line error for a write to `path` that found no room."""
    path = Path(path)
    return DiskFullError(f"{path}: no room to write it ({os.strerror(e.errno).lower()}); the "
                         f"{path.name} there before, if any, is untouched. Free space on that "
                         f"disk (or write to another --work) and run the same command again")


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) and move the file into place, so readers never see half a file;
    DiskFullError (the old file kept) when the disk has no room for the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in NO_ROOM:
            raise no_room(e, path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_csv(df: pd.DataFrame, path: str | Path) -> None:
    atomic_write(path, lambda tmp: df.to_csv(tmp, index=False))


def write_json(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def write_text(text: str, path: str | Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    logging.raiseExceptions = False  # a log line that cannot be written is no traceback


def read_table(path: str | Path) -> pd.DataFrame:
    """A WORK csv with empty strings kept as '' (not NaN)."""
    return pd.read_csv(path, keep_default_na=False,
                       dtype={"label": str, "file_name": str, "secondary": str})


def probs_frame(names, probs: np.ndarray, classes: list[str], key: str = "file_name",
                **extra) -> pd.DataFrame:
    """A table of `key`, the `extra` columns, then one probability column per class."""
    df = pd.DataFrame({key: list(names), **extra})
    return pd.concat([df, pd.DataFrame(probs, columns=classes)], axis=1)


def strip_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without the options `names` and their values."""
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok in names:
            skip = True
        elif not tok.startswith(tuple(f"{n}=" for n in names if n.startswith("--"))):
            out.append(tok)
    return out


# ----------------------------------------------------------------------------- devices
def parse_gpus(spec: str) -> list[int]:
    """'0,1' -> [0, 1]; '-1' or 'cpu' -> [-1]; 'cpu,cpu' -> two CPU workers."""
    try:
        return [-1 if g.strip() == "cpu" else int(g) for g in str(spec).split(",") if g.strip()]
    except ValueError:
        raise UsageError(f"-g {spec}: expected GPU indices (0 or 0,1), -1 or cpu") from None


def pick_device(spec: str, devices: int = 1) -> tuple[str, list[int] | int]:
    """-g as every script reads it: ('gpu', [ids]) or ('cpu', processes). No GPU at all -> the
    CPU with a warning; a GPU index that is not there -> UsageError listing those that are."""
    import torch

    gpus = parse_gpus(spec)
    n = torch.cuda.device_count()
    if not gpus or all(g < 0 for g in gpus):
        return "cpu", devices
    if n == 0:
        logging.getLogger(__name__).warning("no GPU is visible: running on the CPU (pass -g -1 "
                                            "to say so)")
        return "cpu", devices
    missing = [g for g in gpus if g >= n]
    if missing:
        have = ", ".join(f"{i} ({torch.cuda.get_device_name(i)})" for i in range(n))
        raise UsageError(f"GPU {missing} requested with -g {spec}, but the visible GPUs "
                         f"are: {have}. Use -g with one of those, or -g -1 for the CPU")
    if devices > 1:  # -g 3 --devices 2: GPUs 3 and 4; -g 0,2 --devices 2: those two
        if len(gpus) not in (1, devices):
            raise UsageError(f"-g {spec} names {len(gpus)} GPUs for --devices {devices}: give one "
                             f"(the first of {devices} in a row) or {devices}")
        ids = gpus if len(gpus) == devices else list(range(gpus[0], gpus[0] + devices))
        if max(ids) >= n:
            raise UsageError(f"--devices {devices} from GPU {gpus[0]} needs GPUs "
                             f"{', '.join(map(str, ids))}; {n} visible")
        return "gpu", ids
    return "gpu", gpus[:1]


def torch_device(spec: str):
    """The one torch.device of -g for a single process (inference, export, bench): the first
    GPU listed, or the CPU."""
    import torch

    kind, ids = pick_device(spec)
    return torch.device(f"cuda:{ids[0]}" if kind == "gpu" else "cpu")


# ----------------------------------------------------------------------------- processes
def launched_rank_zero() -> bool:
    """True unless this process is a DDP worker other than global rank 0, as the environment
    of Lightning's launchers and of multi-node runs (NODE_RANK) tells before any Trainer."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class FoldLock:
    """An exclusive lock on a fold folder, held while the process lives (the kernel drops it
    when the process ends, even by kill -9). A second process on the same fold is refused.
    `with FoldLock(folder):` releases it however the block ends."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self._fd = None

    def acquire(self) -> "FoldLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UsageError(f"{self.path.parent} is being trained by pid {holder}: wait for it "
                             f"to finish, or train under another --run name") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FoldLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def secondary_names(value) -> list[str]:
    """The labels in a secondary-labels cell: "['a', 'b']" (BirdCLEF), "a b" or "a,b"."""
    s = str(value).strip().strip("[]")
    return [n for n in (t.strip().strip("'\"") for t in re.split(r"[,\s]+", s)) if n]
