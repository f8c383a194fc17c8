"""Fetch the MNIST ``.gz`` files from public mirrors into a cache folder, each verified by SHA-256."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import urlsplit

__all__ = ["DEFAULT_MIRRORS", "DEFAULT_TIMEOUT", "MIRRORS_ENV", "MNIST_SHA256", "MnistDownloadError",
           "download_files", "mnist_cache_dir", "resolve_mirrors"]

#: SHA-256 of the published MNIST ``.gz`` files (the same as ``/work/shared/data/mnist/SHA256SUMS``).
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}
#: Base URLs tried in turn (the ones torchvision uses).
DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
#: Environment variable with comma-separated base URLs that replace ``DEFAULT_MIRRORS`` (empty: no download).
MIRRORS_ENV = "DNI_ASYNC_MNIST_MIRRORS"
#: Seconds ``urlopen`` waits on each socket operation (connect, each read).
DEFAULT_TIMEOUT = 30.0
_CHUNK = 1 << 20
_MAX_BYTES = 64 << 20  # the largest file is 9.9 MB; stop a runaway response long before the disk fills


class MnistDownloadError(OSError):
    """No mirror gave a verified copy of a file; the message names every URL tried and why it failed."""


class _BadContent(Exception):
    """The response arrived but is not the expected file (checksum mismatch, too large)."""


def mnist_cache_dir() -> Path:
    """The user cache folder for MNIST: ``$XDG_CACHE_HOME/dni_async/mnist``, else ``~/.cache/dni_async/mnist``.

    A relative ``$XDG_CACHE_HOME`` is ignored, as the XDG spec asks.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "dni_async" / "mnist"


def resolve_mirrors(mirrors: Sequence[str] | None = None) -> list[str]:
    """The base URLs to try, in order.

    Args:
        mirrors: base URLs (``https://``, ``http://`` or ``file://``); None reads ``$DNI_ASYNC_MNIST_MIRRORS``
            (comma-separated) and, when that is unset, uses ``DEFAULT_MIRRORS``.

    Returns:
        The non-blank URLs, stripped; an empty list means "do not download".
    """
    if mirrors is None:
        env = os.environ.get(MIRRORS_ENV)
        mirrors = DEFAULT_MIRRORS if env is None else env.split(",")
    return [m.strip() for m in mirrors if m.strip()]


def _fetch(url: str, target: Path, expected: str, timeout: float) -> None:
    """Stream ``url`` into a temp file beside ``target``, check its SHA-256, then rename it into place."""
    request = urllib.request.Request(url, headers={"User-Agent": "dni_async"})
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > _MAX_BYTES:
                    raise _BadContent(f"response larger than {_MAX_BYTES} bytes")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise _BadContent(f"SHA-256 mismatch ({size} bytes, sha256 {digest.hexdigest()}, expected {expected})")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def download_files(names: Iterable[str], dest: str | os.PathLike[str], mirrors: Sequence[str] | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> list[Path]:
    """Download MNIST ``.gz`` files into ``dest``, trying each mirror in turn.

    Each file goes to a temp file in ``dest``, is checked against ``MNIST_SHA256`` and only then renamed to
    its name, so ``dest`` never holds a partial or unverified file under a real name. Files already in
    ``dest`` are kept as they are. A mirror that cannot be reached (DNS, refused, timeout) is skipped for
    the remaining files of this call; one that answers 404 or wrong bytes is still asked for the others.

    Args:
        names: file names, e.g. ``"t10k-images-idx3-ubyte.gz"``; each needs an entry in ``MNIST_SHA256``.
        dest: folder to write into (created if missing).
        mirrors: base URLs; None: see ``resolve_mirrors``.
        timeout: seconds for each socket operation.

    Returns:
        The paths of the files, in the order of ``names``.

    Raises:
        MnistDownloadError: when there are no mirrors, ``dest`` cannot be created, or no mirror gave a
            verified copy of some file; the message names each URL tried and the reason it failed.
        ValueError: for a name with no known checksum.
    """
    bases = resolve_mirrors(mirrors)
    if not bases:
        raise MnistDownloadError(f"no mirrors to download from (${MIRRORS_ENV} is set but empty)")
    folder = Path(dest)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MnistDownloadError(f"cannot create the cache folder {folder}: {err}") from err
    unreachable: dict[str, str] = {}
    paths = []
    for name in names:
        expected = MNIST_SHA256.get(name)
        if expected is None:
            raise ValueError(f"no known SHA-256 for {name!r}; known: {sorted(MNIST_SHA256)}")
        target = folder / name
        paths.append(target)
        if target.is_file():
            continue
        failures = []
        for base in bases:
            url = base.rstrip("/") + "/" + name
            if base in unreachable:
                failures.append(f"{url} (skipped: {unreachable[base]})")
                continue
            try:
                _fetch(url, target, expected, timeout)
                break
            except urllib.error.HTTPError as err:
                failures.append(f"{url} (HTTP {err.code} {err.reason})")
            except _BadContent as err:
                failures.append(f"{url} ({err})")
            except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
                reason = str(getattr(err, "reason", None) or err) or type(err).__name__
                failures.append(f"{url} ({reason})")
                if urlsplit(url).scheme in ("http", "https"):
                    unreachable[base] = reason
        else:
            raise MnistDownloadError(f"could not download {name}; tried: {'; '.join(failures)}")
    return paths
