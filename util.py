"""Small helpers shared by the scripts: atomic writes, logging, option stripping, fold locks."""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd


class UsageError(Exception):
    """A bad request that nothing can continue from: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------- I/O
def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) and move the file into place, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
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


# ----------------------------------------------------------------------------- processes
def launched_rank_zero() -> bool:
    """True unless this process is a DDP worker other than global rank 0, as the environment
    of Lightning's launchers and of multi-node runs (NODE_RANK) tells before any Trainer."""
    return all(int(os.environ.get(k, "0") or 0) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


class FoldLock:
    """An exclusive lock on a fold folder, held while the process lives (the kernel drops it
    when the process ends, even by kill -9). A second process on the same fold is refused."""

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
