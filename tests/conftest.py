"""Shared fixtures: a fixed seed for every test and the real data folder."""

from __future__ import annotations

import os
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
