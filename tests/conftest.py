"""Shared fixtures: a fixed seed for every test and the real data folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files: ``$DNI_ASYNC_DATA`` or ``../shared/data/mnist`` beside the checkout."""
    candidates = [Path(p) for p in (os.environ.get("DNI_ASYNC_DATA"),) if p]
    candidates.append(ROOT.parent / "shared" / "data" / "mnist")
    for path in candidates:
        if (path / "train-images-idx3-ubyte.gz").is_file() or (path / "train-images-idx3-ubyte").is_file():
            return path
    pytest.fail(f"MNIST files not found in {[str(c) for c in candidates]}; set DNI_ASYNC_DATA")


def torchrun(nproc: int, args: list[str], timeout: float = 120, env: dict[str, str] | None = None,
             script: Path = ROOT / "launch" / "pipeline.py") -> subprocess.CompletedProcess[str]:
    """Run ``script`` (default launch/pipeline.py) under torchrun with a hard timeout; the whole process group
    dies on expiry."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s\nstderr:\n{err[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstderr:\n{result.stderr[-6000:]}"
