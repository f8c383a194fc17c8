"""Cut the bundled data subsets from the full files: MNIST (the first N train and M test images) and the text
corpus (the first lines of each split)."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import struct
from pathlib import Path
from typing import Sequence

from .mnist import MNIST_FILES, SUBSET_DIR, _find_split, _parse_idx, _read_bytes
from .text import SPLITS, TEXT_SUBSET_DIR, split_file

__all__ = ["SUBSET_MAX_BYTES", "SUBSET_TEST", "SUBSET_TRAIN", "TEXT_SUBSET_LINES", "main", "make_subset",
           "make_text_subset"]

SUBSET_TRAIN, SUBSET_TEST = 6000, 1000
#: The most the subset's files may take together (the package must stay small).
SUBSET_MAX_BYTES = 2 * 1024 * 1024
#: Lines of train, valid and test kept in the bundled text subset.
TEXT_SUBSET_LINES = {"train": 4000, "valid": 500, "test": 500}


def _head(path: Path, n: int) -> bytes:
    """The IDX file at ``path``, validated, cut to its first ``n`` records (header rewritten)."""
    data = _read_bytes(path)
    shape, _, body = _parse_idx(data, path)
    if shape[0] < n:
        raise ValueError(f"{path}: holds {shape[0]} records, fewer than the {n} asked for")
    record = len(body) // shape[0] if shape[0] else 0
    return data[:4] + struct.pack(f">{len(shape)}I", n, *shape[1:]) + body[:n * record]


def make_subset(src: str | os.PathLike[str], dst: str | os.PathLike[str] = SUBSET_DIR, n_train: int = SUBSET_TRAIN,
                n_test: int = SUBSET_TEST) -> dict[str, int]:
    """Write the first ``n_train`` / ``n_test`` images and labels of MNIST as IDX ``.gz`` files.

    The output is deterministic (gzip level 9, no time stamp or file name in the header), so rerunning it
    on the published files reproduces the bundled subset. A ``SHA256SUMS`` of the written files goes beside
    them.

    Args:
        src: folder with the full MNIST files (as ``load_mnist`` finds them: plainly, ``mnist/``, ``MNIST/raw``).
        dst: output folder (created); default the package's ``mnist_subset/``.
        n_train: training images to keep (the first ones, in file order).
        n_test: test images to keep.

    Returns:
        File name -> size in bytes of each ``.gz`` written.

    Raises:
        FileNotFoundError: when ``src`` lacks a file.
        ValueError: for a malformed source file, too few records, or a subset over ``SUBSET_MAX_BYTES``.
    """
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    sums = []
    for split, n in (("train", n_train), ("test", n_test)):
        tried: list[str] = []
        files = _find_split(Path(src), split, tried)
        if files is None:
            raise FileNotFoundError(f"MNIST {split} files not found; tried: {', '.join(tried)}")
        for stem, path in zip(MNIST_FILES[split], files):
            blob = gzip.compress(_head(path, n), compresslevel=9, mtime=0)
            name = stem + ".gz"
            (out / name).write_bytes(blob)
            sizes[name] = len(blob)
            sums.append(f"{hashlib.sha256(blob).hexdigest()}  {name}\n")
    (out / "SHA256SUMS").write_text("".join(sums))
    total = sum(sizes.values())
    if total > SUBSET_MAX_BYTES:
        raise ValueError(f"the subset takes {total} bytes, over the {SUBSET_MAX_BYTES} allowed; keep fewer images")
    return sizes


def make_text_subset(src: str | os.PathLike[str], dst: str | os.PathLike[str] = TEXT_SUBSET_DIR,
                     lines: dict[str, int] | None = None) -> dict[str, int]:
    """Write the first lines of each split of the corpus folder ``src`` as deterministic ``<split>.txt.gz``.

    Returns:
        File name -> size in bytes.

    Raises:
        FileNotFoundError: when ``src`` lacks a split.
        ValueError: when a split has fewer lines than asked for.
    """
    out = Path(dst)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split in SPLITS:
        path = split_file(Path(src), split)
        if path is None:
            raise FileNotFoundError(f"{src} has no {split}.txt")
        n = (lines or TEXT_SUBSET_LINES)[split]
        kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:n]
        if len(kept) < n:
            raise ValueError(f"{path} has {len(kept)} lines, fewer than the {n} asked for")
        blob = gzip.compress("".join(kept).encode("utf-8"), compresslevel=9, mtime=0)
        (out / f"{split}.txt.gz").write_bytes(blob)
        sizes[f"{split}.txt.gz"] = len(blob)
    return sizes


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dni_async.data.make_subset SRC [DST] [--train N] [--test M]``."""
    parser = argparse.ArgumentParser(prog="python -m dni_async.data.make_subset", description=__doc__)
    parser.add_argument("src", help="folder with the full MNIST IDX files")
    parser.add_argument("dst", nargs="?", default=str(SUBSET_DIR), help="output folder (default: %(default)s)")
    parser.add_argument("--train", type=int, default=SUBSET_TRAIN, help="training images (default: %(default)s)")
    parser.add_argument("--test", type=int, default=SUBSET_TEST, help="test images (default: %(default)s)")
    parser.add_argument("--text", action="store_true",
                        help=f"SRC is a text corpus folder: write its first lines {TEXT_SUBSET_LINES} "
                             f"(default DST: {TEXT_SUBSET_DIR})")
    args = parser.parse_args(argv)
    if args.text:
        dst = TEXT_SUBSET_DIR if args.dst == str(SUBSET_DIR) else args.dst
        sizes = make_text_subset(args.src, dst)
    else:
        sizes = make_subset(args.src, args.dst, args.train, args.test)
    for name, size in sizes.items():
        print(f"{size:>9}  {name}")
    print(f"{sum(sizes.values()):>9}  total (limit {SUBSET_MAX_BYTES})")


if __name__ == "__main__":
    main()
