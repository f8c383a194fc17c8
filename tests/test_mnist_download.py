"""MNIST lookup order, the verified download (local HTTP server and file:// only) and the bundled subset."""

from __future__ import annotations

import configparser
import gzip
import hashlib
import http.server
import logging
import signal
import struct
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

from dni_async.data import download, load_mnist, load_mnist_with_source, mnist_cache_dir
from dni_async.data.download import MnistDownloadError, download_files
from dni_async.data.make_subset import SUBSET_MAX_BYTES, _head, main, make_subset
from dni_async.data.mnist import MNIST_FILES, SUBSET_DIR

ROOT = Path(__file__).resolve().parents[1]
NAMES = [stem + ".gz" for split in ("train", "test") for stem in MNIST_FILES[split]]
SIZES = {"train": 5, "test": 4}
NET_TIMEOUT = 5.0  # urlopen's per-operation timeout in these tests
HARD_TIMEOUT = 20.0  # SIGALRM kills a network test that hangs anyway


def idx_gz(array: torch.Tensor) -> bytes:
    header = b"\0\0\x08" + bytes([array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    return gzip.compress(header + bytes(array.flatten().tolist()), mtime=0)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real cache, no data folder, no default mirrors: nothing here may reach the internet."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DNI_ASYNC_DATA", raising=False)
    monkeypatch.setenv("DNI_ASYNC_MNIST_MIRRORS", "")


@pytest.fixture
def files(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Small fake MNIST ``.gz`` files, with their checksums put in place of the real ones."""
    blobs = {}
    for split, n in SIZES.items():
        images, labels = MNIST_FILES[split]
        blobs[images + ".gz"] = idx_gz(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8))
        blobs[labels + ".gz"] = idx_gz(torch.arange(n, dtype=torch.uint8))
    monkeypatch.setattr(download, "MNIST_SHA256", {k: hashlib.sha256(v).hexdigest() for k, v in blobs.items()})
    return blobs


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "xdg" / "dni_async" / "mnist"


@pytest.fixture
def hard_timeout() -> Iterator[None]:
    """Fail a test that runs past ``HARD_TIMEOUT`` seconds (pytest-timeout is not a dependency)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"network test ran past its {HARD_TIMEOUT} s hard timeout")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, HARD_TIMEOUT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Server:
    """A local HTTP server: ``routes`` maps a path to bytes (200) or to ``"truncate"``; the rest are 404."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes | str] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                server.requests.append(self.path)
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if body == "truncate":  # promise 1000 bytes, send 10, hang up
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"0123456789")
                    return
                assert isinstance(body, bytes)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, prefix: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{prefix}/"

    def serve(self, prefix: str, blobs: dict[str, bytes]) -> str:
        self.routes.update({f"/{prefix}/{name}": blob for name, blob in blobs.items()})
        return self.url(prefix)


@pytest.fixture
def server(hard_timeout: None) -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(5)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cache_dir_follows_xdg_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert mnist_cache_dir() == tmp_path / "xdg" / "dni_async" / "mnist"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert mnist_cache_dir() == tmp_path / "home" / ".cache" / "dni_async" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert mnist_cache_dir() == tmp_path / "home" / ".cache" / "dni_async" / "mnist"


def test_download_from_local_server_lands_in_cache(server: Server, files: dict[str, bytes], cache: Path) -> None:
    url = server.serve("mnist", files)
    x, y, source = load_mnist_with_source(None, "train", mirrors=[url], timeout=NET_TIMEOUT)
    assert source == "mnist" and x.shape == (5, 1, 28, 28) and y.tolist() == [0, 1, 2, 3, 4]
    assert leftovers(cache) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]  # no temp files
    assert (cache / "train-images-idx3-ubyte.gz").read_bytes() == files["train-images-idx3-ubyte.gz"]
    asked = len(server.requests)
    assert load_mnist_with_source(None, "train", mirrors=[url]).source == "mnist"
    assert len(server.requests) == asked  # the second call reads the cache
    assert load_mnist(None, "train")[0].shape == (5, 1, 28, 28)  # the strict form reads the cache too


def test_checksum_failure_names_mirrors_and_keeps_nothing(server: Server, files: dict[str, bytes],
                                                          cache: Path) -> None:
    wrong = {name: blob + b"x" for name, blob in files.items()}
    urls = [server.serve("a", wrong), server.serve("b", wrong)]
    with pytest.raises(FileNotFoundError, match="SHA-256 mismatch") as info:
        load_mnist_with_source(None, "test", fallback=False, mirrors=urls, timeout=NET_TIMEOUT)
    assert urls[0] + "t10k-images-idx3-ubyte.gz" in str(info.value) and urls[1] in str(info.value)
    assert leftovers(cache) == []
    with pytest.raises(MnistDownloadError, match="mismatch"):
        download_files(["t10k-labels-idx1-ubyte.gz"], cache, urls, NET_TIMEOUT)
    assert leftovers(cache) == []


def test_truncated_response_leaves_no_file(server: Server, files: dict[str, bytes], cache: Path) -> None:
    server.routes["/cut/t10k-labels-idx1-ubyte.gz"] = "truncate"
    with pytest.raises(MnistDownloadError, match="cut/t10k-labels"):
        download_files(["t10k-labels-idx1-ubyte.gz"], cache, [server.url("cut")], NET_TIMEOUT)
    assert leftovers(cache) == []


def test_mirror_fallback_404_then_good(server: Server, files: dict[str, bytes],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    good = server.serve("good", files)
    monkeypatch.setenv("DNI_ASYNC_MNIST_MIRRORS", f" {server.url('empty')} ,{good}")
    x, y, source = load_mnist_with_source(None, "test", timeout=NET_TIMEOUT)
    assert source == "mnist" and x.shape == (4, 1, 28, 28)
    assert server.requests == ["/empty/t10k-images-idx3-ubyte.gz", "/good/t10k-images-idx3-ubyte.gz",
                               "/empty/t10k-labels-idx1-ubyte.gz", "/good/t10k-labels-idx1-ubyte.gz"]


def test_unreachable_mirror_is_skipped_for_later_files(server: Server, files: dict[str, bytes],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    dead = "http://127.0.0.1:1/mnist/"  # connection refused
    fetched: list[str] = []
    real_fetch = download._fetch

    def counting_fetch(url: str, *args: object) -> None:
        fetched.append(url)
        real_fetch(url, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(download, "_fetch", counting_fetch)
    data = load_mnist_with_source(None, "test", mirrors=[dead, server.serve("ok", files)], timeout=NET_TIMEOUT)
    assert data.source == "mnist"
    assert [u for u in fetched if u.startswith(dead)] == [dead + "t10k-images-idx3-ubyte.gz"]


def test_file_mirror(tmp_path: Path, files: dict[str, bytes], cache: Path, hard_timeout: None) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, blob in files.items():
        (mirror / name).write_bytes(blob)
    data = load_mnist_with_source(None, "test", mirrors=[mirror.as_uri()])
    assert data.source == "mnist" and data.labels.tolist() == [0, 1, 2, 3]
    assert leftovers(cache) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(MnistDownloadError, match="empty"):
        download_files(["train-images-idx3-ubyte.gz"], cache, [(tmp_path / "empty").as_uri()])


def test_subset_fallback_when_nothing_else(caplog: pytest.LogCaptureFixture, cache: Path) -> None:
    caplog.set_level(logging.INFO, logger="dni_async.data.mnist")
    train = load_mnist_with_source(None, "train")  # $DNI_ASYNC_MNIST_MIRRORS="": no download
    test = load_mnist_with_source(None, "test")
    assert train.source == test.source == "mnist-subset"
    assert train.images.shape == (6000, 1, 28, 28) and train.labels.shape == (6000,)
    assert test.images.shape == (1000, 1, 28, 28) and test.labels.shape == (1000,)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "the fallback is news, not a warning"
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("using the bundled MNIST subset")]
    assert len(notes) == 2 and str(cache) in notes[0] and "no mirrors" in notes[0]


def test_subset_fallback_after_failed_download(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dni_async.data.mnist")
    url = server.url("nothing")
    x, y, source = load_mnist_with_source(None, "test", mirrors=[url], timeout=NET_TIMEOUT)
    assert source == "mnist-subset" and x.shape == (1000, 1, 28, 28)
    assert url + "t10k-images-idx3-ubyte.gz (HTTP 404" in caplog.text


def test_strict_modes_fail_loudly(tmp_path: Path, server: Server, files: dict[str, bytes],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    url = server.serve("mnist", files)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="named folder.*empty"):  # a wrong --data-dir
        load_mnist_with_source(empty, "test", mirrors=[url])
    with pytest.raises(FileNotFoundError, match="--data-dir.*download \\(off\\).*subset \\(off\\)"):
        load_mnist_with_source(None, "test", download=False, fallback=False, mirrors=[url])
    monkeypatch.setenv("DNI_ASYNC_DATA", str(empty))  # a wrong $DNI_ASYNC_DATA is strict as well
    with pytest.raises(FileNotFoundError, match="empty"):
        load_mnist_with_source(None, "test", mirrors=[url])
    assert server.requests == []  # none of these went to the network
    assert load_mnist_with_source(empty, "test", fallback=True).source == "mnist-subset"  # asked for it
    assert load_mnist_with_source(empty, "test", download=True, mirrors=[url]).source == "mnist"
    assert load_mnist(empty, "test", download=True)[0].shape == (4, 1, 28, 28)  # now from the cache


def test_malformed_cached_file_is_an_error_not_a_fallback(cache: Path) -> None:
    cache.mkdir(parents=True)
    (cache / "t10k-images-idx3-ubyte.gz").write_bytes(idx_gz(torch.zeros(3, 28, 28, dtype=torch.uint8)))
    (cache / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="t10k-labels"):
        load_mnist_with_source(None, "test")


def test_bundled_subset_is_shipped_and_small() -> None:
    names = sorted(p.name for p in SUBSET_DIR.glob("*.gz"))
    assert names == sorted(NAMES)
    total = sum(p.stat().st_size for p in SUBSET_DIR.iterdir())
    assert total < SUBSET_MAX_BYTES == 2 * 1024 * 1024, total
    sums = dict(line.split()[::-1] for line in (SUBSET_DIR / "SHA256SUMS").read_text().splitlines())
    assert {n: hashlib.sha256((SUBSET_DIR / n).read_bytes()).hexdigest() for n in names} == sums
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    patterns = [p.strip() for p in config["options.package_data"]["dni_async.data"].split(",")]
    shipped = {p.name for pattern in patterns for p in SUBSET_DIR.parent.glob(pattern)}
    text = {f"{split}.txt.gz" for split in ("train", "valid", "test")}  # the bundled text subset
    assert shipped == set(names) | {"SHA256SUMS", "README.md"} | text


def test_subset_is_the_head_of_real_mnist(full_mnist: Path) -> None:
    for split, n in (("train", 6000), ("test", 1000)):
        for stem in MNIST_FILES[split]:
            full = next(full_mnist.glob(stem + "*"))
            assert _head(full, n) == gzip.decompress((SUBSET_DIR / (stem + ".gz")).read_bytes()), stem


def test_make_subset(tmp_path: Path, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch,
                     capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src" / "MNIST" / "raw"
    src.mkdir(parents=True)
    for name, blob in files.items():
        (src / name).write_bytes(blob)
    main([str(tmp_path / "src"), str(tmp_path / "out"), "--train", "3", "--test", "2"])
    assert "total" in capsys.readouterr().out
    x, y = load_mnist(tmp_path / "out", "train")
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [0, 1, 2]
    assert load_mnist(tmp_path / "out", "test")[1].tolist() == [0, 1]
    with pytest.raises(ValueError, match="fewer than the 9"):
        make_subset(tmp_path / "src", tmp_path / "out2", n_train=9)
    monkeypatch.setattr("dni_async.data.make_subset.SUBSET_MAX_BYTES", 10)
    with pytest.raises(ValueError, match="over the 10 allowed"):
        make_subset(tmp_path / "src", tmp_path / "out3", 3, 2)
    with pytest.raises(FileNotFoundError, match="MNIST train"):
        make_subset(tmp_path / "nowhere", tmp_path / "out4")
