"""Shared fixtures: a fixed seed for every test and the real data folder (helpers for processes: helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import ROOT, SUBSET

from dni_async.data.text import TEXT_SUBSET_DIR


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


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


@pytest.fixture(scope="session")
def full_kjv() -> Path:
    """The whole KJV corpus folder (``$DNI_ASYNC_DATA/kjv`` or ``../shared/data/kjv``); skipped, with the reason,
    where only the bundled subset (``dni_async.data.text.TEXT_SUBSET_DIR``) is here."""
    candidates = [Path(p) / "kjv" for p in (os.environ.get("DNI_ASYNC_DATA"),) if p]
    candidates.append(ROOT.parent / "shared" / "data" / "kjv")
    for path in candidates:
        if (path / "train.txt").is_file():
            return path
    pytest.skip(f"needs the whole KJV corpus: set DNI_ASYNC_DATA (only the bundled subset {TEXT_SUBSET_DIR} is here)")
