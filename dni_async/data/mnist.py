"""Read the standard MNIST IDX files (``.gz`` or not) into tensors."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch

__all__ = ["MNIST_FILES", "load_mnist", "read_idx", "resolve_data_dir"]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes -> (torch dtype, big-endian struct width); MNIST uses only 0x08.
_IDX_TYPES = {0x08: (torch.uint8, 1)}
_MEAN, _STD = 0.1307, 0.3081  # the usual MNIST normalisation


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data folder: ``data_dir``, else ``$DNI_ASYNC_DATA``.

    Raises:
        FileNotFoundError: if neither is given.
    """
    chosen = data_dir if data_dir is not None else os.environ.get("DNI_ASYNC_DATA")
    if not chosen:
        raise FileNotFoundError("no data folder: pass --data-dir or set DNI_ASYNC_DATA")
    return Path(chosen).expanduser()


def _find(root: Path, stem: str) -> Path:
    tried = []
    for folder in (root, root / "mnist", root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            path = folder / name
            tried.append(str(path))
            if path.is_file():
                return path
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found; tried: {', '.join(tried)}")


def read_idx(path: Path) -> torch.Tensor:
    """Parse one IDX file into a tensor, checking its header against its size.

    Raises:
        ValueError: for a malformed or truncated file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(f"{path}: unsupported IDX element type 0x{type_code:02x}")
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype, width = _IDX_TYPES[type_code]
    count = 1
    for d in shape:
        count *= d
    body = data[4 + 4 * ndim:]
    if len(body) != count * width:
        raise ValueError(f"{path}: header declares shape {shape} ({count * width} bytes) "
                         f"but the file holds {len(body)} bytes")
    return torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)


def load_mnist(data_dir: str | os.PathLike[str] | None, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split.

    Args:
        data_dir: folder holding the four IDX files, plainly, in ``mnist/`` or
            in torchvision's ``MNIST/raw``; None reads ``$DNI_ASYNC_DATA``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).

    Returns:
        ``(images, labels)``: float32 (N, 1, 28, 28) normalised images and int64 (N,) labels.

    Raises:
        ValueError: for an unknown split or malformed files.
        FileNotFoundError: when the files are not there.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    root = resolve_data_dir(data_dir)
    image_stem, label_stem = MNIST_FILES[split]
    images = read_idx(_find(root, image_stem))
    labels = read_idx(_find(root, label_stem))
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                         "do not match")
    x = images.float().div_(255.0).sub_(_MEAN).div_(_STD).unsqueeze(1)
    return x, labels.long()
