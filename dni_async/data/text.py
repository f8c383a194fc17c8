"""Word-level text corpora in the Penn Treebank / WikiText layout: a folder with train/valid/test .txt files."""

from __future__ import annotations

import gzip
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

__all__ = ["UNK", "EOS", "SPLITS", "TEXT_SUBSET_DIR", "Vocabulary", "Corpus", "batchify", "split_file"]

UNK, EOS = "<unk>", "<eos>"
SPLITS = ("train", "valid", "test")
TEXT_SUBSET_DIR = Path(__file__).resolve().parent / "kjv_subset"
"""A small real corpus shipped in the package (the first verses of each split of the KJV folder, gzipped)."""


class Vocabulary:
    """Word <-> id, with ``<unk>`` (id 0) and ``<eos>`` (id 1) first.

    Args:
        counts: word frequencies (of the training split).
        min_count: words seen fewer times map to ``<unk>``.
        max_size: keep at most this many words (specials included), most frequent first.
    """

    def __init__(self, counts: Counter[str], min_count: int = 1, max_size: int | None = None) -> None:
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < 3:
            raise ValueError(f"max_size must leave room for <unk>, <eos> and a word, got {max_size}")
        words = sorted((w for w, n in counts.items() if n >= min_count and w not in (UNK, EOS)),
                       key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[:max_size - 2]
        self.itos = [UNK, EOS, *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: Iterable[str]) -> list[int]:
        """Ids of ``words``; unknown words are ``<unk>``."""
        unk = self.stoi[UNK]
        return [self.stoi.get(w, unk) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[i] for i in ids]


def split_file(folder: Path, split: str) -> Path | None:
    """``folder/<split>.txt``, else ``folder/<split>.txt.gz``, else None."""
    for name in (f"{split}.txt", f"{split}.txt.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _lines(path: Path) -> list[list[str]]:
    """Whitespace-split words of each non-empty line, with ``<eos>`` at its end."""
    with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
        return [line.split() + [EOS] for line in f if line.strip()]


class Corpus:
    """The three splits of a folder as flat id tensors; the vocabulary comes from ``train`` alone.

    Words are split on whitespace (PTB and WikiText come tokenised this way);
    each line ends with ``<eos>``; words outside the vocabulary become ``<unk>``.

    Args:
        folder: holds ``train.txt``, ``valid.txt`` and ``test.txt`` (each may be gzipped: ``train.txt.gz``).
        min_count: see :class:`Vocabulary`.
        max_size: see :class:`Vocabulary`.

    Raises:
        FileNotFoundError: naming the folder and the missing files.
        ValueError: when the training split has no words.
    """

    def __init__(self, folder: str | os.PathLike[str], min_count: int = 1, max_size: int | None = None) -> None:
        root = Path(folder).expanduser()
        files = {s: split_file(root, s) for s in SPLITS}
        missing = [f"{s}.txt" for s, f in files.items() if f is None]
        if missing:
            raise FileNotFoundError(f"text corpus folder {root} lacks {', '.join(missing)} "
                                    "(expected train.txt, valid.txt, test.txt)")
        lines = {s: _lines(f) for s, f in files.items() if f is not None}
        counts = Counter(w for line in lines["train"] for w in line)
        if not counts:
            raise ValueError(f"{root / 'train.txt'} holds no words")
        self.vocab = Vocabulary(counts, min_count, max_size)
        self.splits = {s: torch.tensor(self.vocab.encode(w for line in lines[s] for w in line), dtype=torch.long)
                       for s in SPLITS}

    @property
    def train(self) -> torch.Tensor:
        return self.splits["train"]

    @property
    def valid(self) -> torch.Tensor:
        return self.splits["valid"]

    @property
    def test(self) -> torch.Tensor:
        return self.splits["test"]


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a flat id stream into ``batch_size`` contiguous columns: shape (steps, batch); the tail is dropped."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = ids.numel() // batch_size
    if steps == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one per column of a batch of {batch_size}")
    return ids[:steps * batch_size].view(batch_size, steps).t().contiguous()
