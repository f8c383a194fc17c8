"""Load MNIST from a folder, the user cache, a verified download or, failing all, the bundled subset."""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from .download import DEFAULT_TIMEOUT, MnistDownloadError, download_files, mnist_cache_dir

__all__ = ["DATA_ENV", "MNIST_FILES", "SOURCE_MNIST", "SOURCE_SUBSET", "SUBSET_DIR", "MnistData", "load_mnist",
           "load_mnist_with_source", "local_split_size", "read_idx", "resolve_data_dir"]

log = logging.getLogger(__name__)

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: Environment variable naming the data folder when no ``data_dir`` is passed.
DATA_ENV = "DNI_ASYNC_DATA"
#: ``MnistData.source`` values: the full data set, or the subset shipped in the package.
SOURCE_MNIST, SOURCE_SUBSET = "mnist", "mnist-subset"
#: The bundled subset (first 6,000 train and 1,000 test images); ``python -m dni_async.data.make_subset``.
SUBSET_DIR = Path(__file__).resolve().with_name("mnist_subset")
# IDX type codes -> (torch dtype, big-endian struct width); MNIST uses only 0x08.
_IDX_TYPES = {0x08: (torch.uint8, 1)}
_MEAN, _STD = 0.1307, 0.3081  # the usual MNIST normalisation


class MnistData(NamedTuple):
    """One MNIST split and where it came from: unpack as ``x, y, source = ...``."""

    images: torch.Tensor
    """float32 (N, 1, 28, 28), normalised with the usual MNIST mean and std."""
    labels: torch.Tensor
    """int64 (N,)."""
    source: str
    """``"mnist"`` (the full files) or ``"mnist-subset"`` (the bundled subset): record it with the results."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data folder: ``data_dir``, else ``$DNI_ASYNC_DATA``.

    Raises:
        FileNotFoundError: if neither is given.
    """
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not chosen:
        raise FileNotFoundError("no data folder: pass --data-dir or set DNI_ASYNC_DATA")
    return Path(chosen).expanduser()


def check_mnist_dir(data_dir: str | os.PathLike[str] | None) -> None:
    """Check, without reading them, that a named folder (``data_dir``, else ``$DNI_ASYNC_DATA``) holds readable
    train and test files; with no folder named there is nothing to check (the loader searches on).

    Raises:
        FileNotFoundError: for a folder that is not there, not readable, or without the files.
    """
    named = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    if named is None:
        return
    folder = Path(named).expanduser()
    what = f"--data-dir {folder}" if data_dir is not None else f"${DATA_ENV}={folder}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{what}: no such folder")
    for split in MNIST_FILES:
        tried: list[str] = []
        files = _find_split(folder, split, tried)
        if files is None:
            raise FileNotFoundError(f"{what}: no MNIST {split} files; tried {'; '.join(tried)}")
        unreadable = [str(f) for f in files if not os.access(f, os.R_OK)]
        if unreadable:
            raise FileNotFoundError(f"{what}: cannot read {', '.join(unreadable)}")


def local_split_size(data_dir: str | os.PathLike[str] | None, split: str) -> int | None:
    """How many images :func:`load_mnist_with_source` would load for ``split`` from the files here (in ``data_dir``,
    else ``$DNI_ASYNC_DATA``, else the user cache), read from the IDX header alone; None when they are not
    there (a named folder without them is :func:`check_mnist_dir`'s error; otherwise the loader would download
    them or fall back to the subset, which is not known before it does)."""
    named = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    for folder in [Path(named).expanduser()] if named is not None else [mnist_cache_dir()]:
        files = _find_split(folder, split, [])
        if files is not None:
            opener = gzip.open if files[0].suffix == ".gz" else open
            with opener(files[0], "rb") as f:
                header = f.read(8)
            return int(struct.unpack(">I", header[4:8])[0]) if len(header) == 8 else None
    return None


def _find_split(root: Path, split: str, tried: list[str]) -> tuple[Path, Path] | None:
    """The split's image and label files under ``root`` (plainly, ``mnist/`` or ``MNIST/raw``), or None."""
    found = []
    for stem in MNIST_FILES[split]:
        for folder in (root, root / "mnist", root / "MNIST" / "raw"):
            hit = next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)
            if hit is not None:
                found.append(hit)
                break
        else:
            tried.append(f"{root}/{{,mnist/,MNIST/raw/}}{stem}[.gz]")
            return None
    return found[0], found[1]


def _read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when its name ends in ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip file ({err})") from err


def _parse_idx(data: bytes, path: Path) -> tuple[tuple[int, ...], torch.dtype, bytes]:
    """Check an IDX blob's header against its size; returns ``(shape, dtype, body)``."""
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
    return shape, dtype, body


def read_idx(path: Path) -> torch.Tensor:
    """Parse one IDX file (``.gz`` or not) into a tensor, checking its header against its size.

    Raises:
        ValueError: for a malformed, truncated or corrupt file.
    """
    shape, dtype, body = _parse_idx(_read_bytes(path), path)
    if not body:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(body), dtype=dtype).reshape(shape)


def _read_split(files: tuple[Path, Path], split: str, source: str) -> MnistData:
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split} ({files[0].parent}): images {tuple(images.shape)} and labels "
                         f"{tuple(labels.shape)} do not match")
    log.info("MNIST %s: %d images from %s (%s)", split, images.shape[0], files[0].parent, source)
    x = images.float().div_(255.0).sub_(_MEAN).div_(_STD).unsqueeze(1)
    return MnistData(x, labels.long(), source)


def load_mnist_with_source(data_dir: str | os.PathLike[str] | None = None, split: str = "train", *,
                           download: bool | None = None, fallback: bool | None = None,
                           cache_dir: str | os.PathLike[str] | None = None, mirrors: Sequence[str] | None = None,
                           timeout: float = DEFAULT_TIMEOUT) -> MnistData:
    """Load an MNIST split and say which data set it is.

    The files are looked for, in order, in:

    1. ``data_dir``, plainly, in ``mnist/`` or in torchvision's ``MNIST/raw`` (``.gz`` or not);
    2. ``$DNI_ASYNC_DATA``, the same way;
    3. the user cache, ``$XDG_CACHE_HOME/dni_async/mnist`` or ``~/.cache/dni_async/mnist`` (or ``cache_dir``);
    4. if ``download``: the mirrors (``mirrors``, else ``$DNI_ASYNC_MNIST_MIRRORS``, else the public ones),
       saved into the cache, each ``.gz`` file checked against its known SHA-256 before it is kept;
    5. if ``fallback``: the subset bundled in the package (6,000 train / 1,000 test images), with a WARNING
       logged that starts "using the bundled MNIST subset" and names what was tried.

    A *named* folder (``data_dir``, or ``$DNI_ASYNC_DATA`` when ``data_dir`` is None) is authoritative: when
    it lacks the files and neither ``download`` nor ``fallback`` is on, that is an error, not a silent
    fallback. ``download`` and ``fallback`` default to None, "auto": on when no folder is named, off when
    one is. So a command line with no ``--data-dir`` and no ``$DNI_ASYNC_DATA`` goes cache -> download ->
    subset, while a wrong ``--data-dir`` fails loudly. Pass True to search on past a named folder, False
    to turn a step off (``download=False, fallback=False`` never touches the network or the subset).

    Args:
        data_dir: folder holding the four IDX files; None: ``$DNI_ASYNC_DATA``, then the cache.
        split: ``"train"`` (60,000 images; 6,000 in the subset) or ``"test"`` (10,000; 1,000 in the subset).
        download: allow the download into the cache (None: auto, see above).
        fallback: allow the bundled subset (None: auto, see above).
        cache_dir: the cache folder; None: ``dni_async.data.download.mnist_cache_dir()``.
        mirrors: base URLs to download from; None: ``$DNI_ASYNC_MNIST_MIRRORS`` (comma-separated; empty:
            no download), else the public mirrors.
        timeout: seconds ``urlopen`` waits on each socket operation.

    Returns:
        ``MnistData(images, labels, source)``: float32 (N, 1, 28, 28) normalised images, int64 (N,) labels,
        and ``"mnist"`` or ``"mnist-subset"``.

    Raises:
        ValueError: for an unknown split, or a file that exists but is malformed (no fallback then).
        FileNotFoundError: when no allowed step gave the files; the message names every place and URL tried.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {sorted(MNIST_FILES)}, got {split!r}")
    env_dir = os.environ.get(DATA_ENV) or None
    named = data_dir is not None or env_dir is not None
    download = not named if download is None else download
    fallback = not named if fallback is None else fallback
    search_on = download or fallback
    cache = Path(cache_dir).expanduser() if cache_dir is not None else mnist_cache_dir()

    folders = []
    if data_dir is not None:
        folders.append(Path(data_dir).expanduser())
    if env_dir is not None and (data_dir is None or search_on):
        folders.append(Path(env_dir).expanduser())
    if not named or search_on:
        folders.append(cache)
    tried: list[str] = []
    for folder in folders:
        files = _find_split(folder, split, tried)
        if files is not None:
            return _read_split(files, split, SOURCE_MNIST)
    if named and not search_on:
        raise FileNotFoundError(f"MNIST {split} files not found in the named folder (check --data-dir / "
                                f"${DATA_ENV}; download and bundled subset are off for a named folder unless "
                                f"asked for); tried: {', '.join(tried)}")

    if download:
        names = [stem + ".gz" for stem in MNIST_FILES[split]]
        try:
            paths = download_files(names, cache, mirrors, timeout)
        except MnistDownloadError as err:
            tried.append(f"download into {cache}: {err}")
        else:
            return _read_split((paths[0], paths[1]), split, SOURCE_MNIST)
    else:
        tried.append("download (off)")

    if fallback:
        files = _find_split(SUBSET_DIR, split, tried)
        if files is not None:
            log.info("using the bundled MNIST subset for %s (dataset %r), not the full MNIST: tried %s",
                     split, SOURCE_SUBSET, "; ".join(tried))
            return _read_split(files, split, SOURCE_SUBSET)
    else:
        tried.append("bundled subset (off)")
    hint = "" if named else "; pass --data-dir or set DNI_ASYNC_DATA"
    raise FileNotFoundError(f"MNIST {split} files not found{hint}; tried: {'; '.join(tried)}")


def load_mnist(data_dir: str | os.PathLike[str] | None = None, split: str = "train", *, download: bool = False,
               fallback: bool = False, cache_dir: str | os.PathLike[str] | None = None,
               mirrors: Sequence[str] | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an MNIST split as ``(images, labels)``, strictly by default.

    The same search as ``load_mnist_with_source`` but with ``download`` and ``fallback`` off unless asked
    for, so existing callers keep their behaviour: ``data_dir``, else ``$DNI_ASYNC_DATA``, else the user
    cache, else ``FileNotFoundError``. Use ``load_mnist_with_source`` to get the automatic download and
    subset fallback and to learn which data set was loaded.

    Args:
        data_dir: folder holding the four IDX files, plainly, in ``mnist/`` or in torchvision's
            ``MNIST/raw``; None reads ``$DNI_ASYNC_DATA``, then the cache.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        download: allow the verified download into the cache.
        fallback: allow the bundled subset (check ``load_mnist_with_source(...).source`` to know).
        cache_dir: the cache folder; None: the user cache.
        mirrors: base URLs to download from; None: ``$DNI_ASYNC_MNIST_MIRRORS``, else the public mirrors.
        timeout: seconds ``urlopen`` waits on each socket operation.

    Returns:
        ``(images, labels)``: float32 (N, 1, 28, 28) normalised images and int64 (N,) labels.

    Raises:
        ValueError: for an unknown split or malformed files.
        FileNotFoundError: when the files are not there.
    """
    data = load_mnist_with_source(data_dir, split, download=download, fallback=fallback, cache_dir=cache_dir,
                                  mirrors=mirrors, timeout=timeout)
    return data.images, data.labels

