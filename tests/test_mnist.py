"""MNIST: the IDX reader on good and malformed files, and one epoch of DNI on the real data."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch

from dni_async.data import load_mnist
from dni_async.data.mnist import read_idx
from tasks.mnist import train


@pytest.fixture(autouse=True)
def _no_user_cache_or_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every test off the real user cache and the internet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("DNI_ASYNC_MNIST_MIRRORS", "")


def write_idx(path: Path, array: torch.Tensor, declared: tuple[int, ...] | None = None,
              magic: bytes = b"\0\0\x08") -> None:
    shape = declared or tuple(array.shape)
    data = magic + bytes([len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + array.numpy().tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def fake_mnist(root: Path, n: int = 5, gz: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, m in (("train", n), ("t10k", n - 1)):
        write_idx(root / f"{split}-images-idx3-ubyte{ext}", torch.randint(0, 256, (m, 28, 28), dtype=torch.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte{ext}", torch.arange(m, dtype=torch.uint8) % 10)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_plain_and_torchvision_layouts(tmp_path: Path, gz: bool) -> None:
    fake_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    x, y = load_mnist(tmp_path, "train")
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32
    assert y.tolist() == [0, 1, 2, 3, 4]
    assert load_mnist(tmp_path, "test")[0].shape == (4, 1, 28, 28)


def test_env_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mnist(tmp_path)
    monkeypatch.setenv("DNI_ASYNC_DATA", str(tmp_path))
    assert load_mnist(None, "test")[1].shape == (4,)


def test_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    write_idx(bad, torch.zeros(3, 2, dtype=torch.uint8), magic=b"\x12\x34\x08")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    write_idx(bad, torch.zeros(3, 2, dtype=torch.uint8), declared=(4, 2))
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(bad)
    bad.write_bytes(gzip.compress(b"\0\0\x08\x03\0\0"))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(bad)
    write_idx(bad, torch.zeros(3, dtype=torch.uint8), magic=b"\0\0\x0d")
    with pytest.raises(ValueError, match="0x0d"):
        read_idx(bad)


def test_missing_files_name_what_was_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        load_mnist(tmp_path, "train")
    monkeypatch.delenv("DNI_ASYNC_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_mnist(None, "train")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, "valid")


def test_real_files(mnist_dir: Path, mnist_test_size: int) -> None:
    x, y = load_mnist(mnist_dir, "test")
    assert x.shape == (mnist_test_size, 1, 28, 28) and y.shape == (mnist_test_size,)
    assert sorted(y.unique().tolist()) == list(range(10))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # normalised


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_one_epoch_of_dni_reaches_90_percent(full_mnist: Path, mode: str) -> None:
    """3 hidden layers of 256 with BatchNorm, every hidden unit update-unlocked, 1 epoch."""
    result = train(mode, str(full_mnist), epochs=1, progress=False)
    assert result["accuracy"] >= 0.90, result


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x03abc")[:-6])  # truncated stream
    with pytest.raises(ValueError, match="t10k-images.*corrupt gzip"):
        read_idx(bad)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="corrupt gzip"):
        read_idx(bad)
