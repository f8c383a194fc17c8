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


SUBSET = ROOT / "dni_async" / "data" / "mnist_subset"
"""The MNIST subset bundled in the package (6,000 train / 1,000 test images of the real files)."""


def _real_mnist() -> Path | None:
    """``$DNI_ASYNC_DATA`` or ``../shared/data/mnist`` beside the checkout, if it holds the MNIST files."""
    candidates = [Path(p) for p in (os.environ.get("DNI_ASYNC_DATA"),) if p]
    candidates.append(ROOT.parent / "shared" / "data" / "mnist")
    for path in candidates:
        if (path / "train-images-idx3-ubyte.gz").is_file() or (path / "train-images-idx3-ubyte").is_file():
            return path
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST files (``$DNI_ASYNC_DATA``, ``../shared/data/mnist``), else the bundled subset: the tests run
    in any clone, without network."""
    return _real_mnist() or SUBSET


@pytest.fixture(scope="session")
def mnist_test_size(mnist_dir: Path) -> int:
    """Test images in ``mnist_dir``."""
    return 1000 if mnist_dir == SUBSET else 10000


@pytest.fixture
def full_mnist(mnist_dir: Path) -> Path:
    """The full MNIST, for the few tests whose claim needs it (skipped, with the reason, on the subset alone)."""
    if mnist_dir == SUBSET:
        pytest.skip("needs the full MNIST: set DNI_ASYNC_DATA (only the bundled subset is here)")
    return mnist_dir


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
