"""The run folder: one run at a time (a lock), writable before any process starts, cleared only once the run
cannot be refused any more, no temporary files left behind."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

__all__ = ["LOCK_FILE", "clear_outputs", "lock_run_dir", "remove_own_tmp"]

LOCK_FILE = ".lock"
"""Held (``flock``) by the process that owns the run: the launcher, or rank 0 when torchrun starts the stages.
The kernel releases it when that process ends, however it ends."""
_held: list[int] = []  # the open lock files of this process: a lock lives as long as its descriptor


def lock_run_dir(run_dir: str | Path) -> None:
    """Check that ``run_dir`` can take this run's outputs and make it this process's until it exits.

    Raises:
        ValueError: the path is a file, the folder cannot be written (read-only, no permission), or another run
            holds it (naming that run's pid). Nothing in the folder is changed then.
    """
    folder = Path(run_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--run-dir {folder} is a file, not a folder")
    probe = folder / f".write-test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.touch()
        probe.unlink()
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ValueError(f"--run-dir {folder} cannot be written: {err.strerror or err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"--run-dir {folder} is in use by another run (pid {holder}): wait for it to end, or "
                         f"choose another --run-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held.append(fd)


def clear_outputs(run_dir: Path, resumed: bool) -> None:
    """Remove a previous run's outputs from ``run_dir`` (shared files are appended to); a resumed run appends to
    metrics.jsonl. Checkpoints are never removed here (``validate`` refuses a fresh run where they are)."""
    for name in ("summary.json",) if resumed else ("metrics.jsonl", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)
    for folder in ("events", "grads", "stages"):
        if (run_dir / folder).is_dir():
            shutil.rmtree(run_dir / folder)


def remove_own_tmp(run_dir: Path) -> None:
    """Remove the temporary files this process left in ``run_dir`` (a write cut short by its end: a signal, an
    abort); every atomic write names them ``.<name>.<pid>.tmp``."""
    for tmp in run_dir.glob(f"**/.*.{os.getpid()}.tmp"):
        tmp.unlink(missing_ok=True)
