"""Text corpora (vocabulary, splits, batches) and the copy / repeat-copy generator."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from dni_async.data.copy import copy_batch
from dni_async.data.text import EOS, UNK, Corpus, Vocabulary, batchify


def write_corpus(folder: Path, train: str, valid: str = "a b\n", test: str = "b zz\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (folder / f"{name}.txt").write_text(text)
    return folder


def test_vocabulary_order_and_limits() -> None:
    counts = Counter({"the": 5, "a": 3, "b": 3, "rare": 1})
    vocab = Vocabulary(counts)
    assert vocab.itos[:2] == [UNK, EOS] and vocab.itos[2:] == ["the", "a", "b", "rare"]
    assert vocab.encode(["the", "nope"]) == [2, 0]
    assert len(Vocabulary(counts, min_count=2)) == 5
    assert Vocabulary(counts, max_size=4).itos == [UNK, EOS, "the", "a"]
    with pytest.raises(ValueError, match="min_count"):
        Vocabulary(counts, min_count=0)


def test_corpus_splits_eos_and_unknown_words(tmp_path: Path) -> None:
    corpus = Corpus(write_corpus(tmp_path, "a b a\n\nb c\n"))
    assert corpus.vocab.decode(corpus.train.tolist()) == ["a", "b", "a", EOS, "b", "c", EOS]
    assert corpus.vocab.decode(corpus.test.tolist()) == ["b", UNK, EOS], "words unseen in train are <unk>"
    assert corpus.valid.dtype == torch.long


def test_corpus_errors(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("x\n")
    with pytest.raises(FileNotFoundError, match="valid.txt, test.txt"):
        Corpus(tmp_path)
    with pytest.raises(ValueError, match="no words"):
        Corpus(write_corpus(tmp_path / "empty", "\n \n"))


def test_batchify_columns_are_contiguous() -> None:
    ids = torch.arange(10)
    batches = batchify(ids, 3)
    assert batches.shape == (3, 3)
    assert batches[:, 0].tolist() == [0, 1, 2] and batches[:, 2].tolist() == [6, 7, 8]
    with pytest.raises(ValueError, match="fewer than one"):
        batchify(torch.arange(2), 3)


def test_real_kjv_corpus(full_kjv: Path) -> None:
    corpus = Corpus(full_kjv)
    assert len(corpus.vocab) > 20000
    assert corpus.train.numel() == 647820 + 24881  # words + one <eos> per verse
    assert 0 < (corpus.valid == 0).float().mean() < 0.05  # some, not many, <unk> in valid


@pytest.mark.parametrize("repeats", [1, 3])
def test_copy_batch_layout(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    b = copy_batch(4, length=5, bits=6, repeats=repeats, generator=gen)
    total = 5 + 1 + 5 * repeats + 1
    assert b.inputs.shape == (total, 4, 8) and b.targets.shape == (total, 4, 7) and b.mask.shape == (total, 4)
    data = b.inputs[:5, :, :6]
    for r in range(repeats):
        torch.testing.assert_close(b.targets[6 + 5 * r:11 + 5 * r, :, :6], data)
    assert b.inputs[5, :, 6].eq(1).all() and b.inputs[5, :, 7].eq(repeats / 10).all()
    assert b.targets[-1, :, 6].eq(1).all() and b.mask[:6].eq(0).all() and b.mask[6:].eq(1).all()
    assert b.inputs[6:].eq(0).all(), "nothing to copy from after the delimiter"
    again = copy_batch(4, length=5, bits=6, repeats=repeats, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.inputs, b.inputs)


def test_copy_batch_errors() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        copy_batch(2, 3, repeats=11)
    with pytest.raises(ValueError, match=">= 1"):
        copy_batch(2, 0)
