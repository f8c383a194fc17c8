"""Word language model: stacked LSTM layers trained with truncated BPTT on a text corpus (PTB/WikiText layout).

In-process: ``python -m tasks.lm --mode dni --data-dir ../shared/data/kjv``.
Pipeline: ``launch/pipeline.py --task lm`` (each LSTM layer is a block; the
activation between stages is a layer's whole output sequence for the chunk).

``--mode dni`` gives every LSTM layer a synthetic gradient at each chunk
boundary (dni_async.recurrent); in the pipeline, stages also get the usual SG
of their output (``cdni``: conditioned on the next words, as class ids).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dni_async.config import TASK_DEFAULTS, PipelineConfig
from dni_async.data.text import SPLITS, TEXT_SUBSET_DIR, Corpus, batchify, split_file
from dni_async.metrics import dumps
from dni_async.recurrent import TruncatedLSTM, reset_states
from dni_async.task import Item, PipelineTask, Sum, add_sums, unpack

__all__ = ["resolve_corpus_dir", "lm_blocks", "stream_items", "lm_loss", "nll_sums", "perplexity",
           "pipeline_task", "train", "main"]

DEFAULTS = TASK_DEFAULTS["lm"]
SOURCE_TEXT_SUBSET = "kjv-subset"
DATA_HELP = ("folder with train.txt, valid.txt, test.txt, or one holding them in kjv/ "
             "(default: $DNI_ASYNC_DATA, the same rule; else the small KJV subset bundled in the package)")
log = logging.getLogger("tasks.lm")


def resolve_corpus_dir(data_dir: str | None) -> tuple[Path, str]:
    """The corpus folder and the data set's name.

    ``data_dir`` (else ``$DNI_ASYNC_DATA``) if it holds the three splits, else
    its ``kjv/`` subfolder; a folder named this way that has neither is an
    error. With no folder named: the small KJV subset bundled in the package
    (``kjv-subset``).

    Raises:
        FileNotFoundError: naming every folder tried.
    """
    root = data_dir or os.environ.get("DNI_ASYNC_DATA")
    if not root:
        return TEXT_SUBSET_DIR, SOURCE_TEXT_SUBSET
    tried = [Path(root).expanduser(), Path(root).expanduser() / "kjv"]
    for folder in tried:
        if all(split_file(folder, s) is not None for s in SPLITS):
            return folder, folder.name
    raise FileNotFoundError(f"no train.txt, valid.txt and test.txt in {' or '.join(map(str, tried))}")


def lm_blocks(vocab: int, hidden_size: int, num_layers: int, temporal_sg: bool, sg_lr: float,
              sg_scale: float = 1.0) -> list[nn.Module]:
    """``num_layers`` blocks: embedding + LSTM, LSTM ..., LSTM + decoder (one block when ``num_layers`` is 1)."""
    layers: list[nn.Module] = [TruncatedLSTM(hidden_size, hidden_size, temporal_sg=temporal_sg, sg_lr=sg_lr,
                                             sg_scale=sg_scale) for _ in range(num_layers)]
    layers[0] = nn.Sequential(nn.Embedding(vocab, hidden_size), layers[0])
    layers[-1] = nn.Sequential(layers[-1], nn.Linear(hidden_size, vocab))
    return layers


def stream_items(ids: torch.Tensor, batch_size: int, bptt: int, meta: dict[str, Any] | None = None) -> list[Item]:
    """A token stream as ``batch_size`` columns cut into chunks ``(inputs (B, bptt), next words (B, bptt), meta)``.

    The first chunk has ``reset``, the last ``last``; the tail shorter than ``bptt`` is dropped.
    """
    data = batchify(ids, batch_size)
    chunks = (len(data) - 1) // bptt
    if chunks < 1:
        raise ValueError(f"{ids.numel()} tokens give no chunk of {bptt} steps in {batch_size} columns")
    return [(data[k * bptt:(k + 1) * bptt].t().contiguous(), data[k * bptt + 1:(k + 1) * bptt + 1].t().contiguous(),
             {"reset": k == 0, "last": k == chunks - 1, **(meta or {})}) for k in range(chunks)]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy per word."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def nll_sums(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Sum]:
    """Summed negative log likelihood (nats) and word count."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return {"nll": nll.detach(), "words": float(targets.numel())}  # a tensor: read once per scored group


def perplexity(sums: dict[str, Sum]) -> dict[str, float]:
    """Perplexity and mean loss of summed :func:`nll_sums`."""
    loss = float(sums["nll"]) / max(1.0, float(sums["words"]))
    return {"perplexity": math.exp(min(loss, 50.0)), "loss": loss, "words": int(sums["words"])}


def pipeline_task(config: PipelineConfig) -> PipelineTask:
    """``lm`` for the multi-process runtime; the corpus is read on every stage (for its vocabulary size)."""
    folder, dataset = resolve_corpus_dir(config.data_dir)
    corpus = Corpus(folder, max_size=config.vocab_size)
    torch.manual_seed(config.seed)
    bptt = config.bptt
    assert bptt is not None, "PipelineConfig resolves --bptt for lm"
    vocab = len(corpus.vocab)
    blocks = lm_blocks(vocab, config.hidden_size, config.num_layers, config.method.temporal_sg, config.sg_lr,
                       config.sg_scale)

    def train_items(items: list[Item], steps: int) -> Iterator[Item]:
        for t in range(steps):
            yield items[t % len(items)]

    def data() -> tuple[Iterator[Item], int, Any, str]:
        if dataset == SOURCE_TEXT_SUBSET:
            log.warning("using the text subset bundled in the package (%s, %d training words): no --data-dir "
                        "and no $DNI_ASYNC_DATA", dataset, corpus.train.numel())
        items = stream_items(corpus.train, config.batch_size, bptt)
        evals = {s: stream_items(corpus.splits[s], config.batch_size, bptt, {"split": s}) for s in ("valid", "test")}
        steps = config.steps if config.steps is not None else max(1, int((config.epochs or 1.0) * len(items)))
        return (train_items(items, steps), steps,
                lambda final: evals["valid"] + evals["test"] if final else evals["valid"], dataset)

    def check_data() -> None:
        need = config.batch_size * (bptt + 1)
        for split, ids in corpus.splits.items():
            if ids.numel() < need:
                raise ValueError(f"--batch-size {config.batch_size} with --bptt {bptt} needs {need:,} tokens per "
                                 f"split; the {split} split of {dataset} has {ids.numel():,}")

    return PipelineTask(name="lm", blocks=blocks, loss_fn=lm_loss, input_shape=(bptt,), input_dtype=torch.long,
                        num_classes=vocab, classification=False, context_fn=lambda targets: targets,
                        metric_fn=nll_sums, summarize=perplexity, data=data, check_data=check_data)


@torch.no_grad()
def evaluate(model: nn.Module, items: list[Item]) -> dict[str, float]:
    """Perplexity of ``model`` over ``items`` (eval mode, state carried through the stream)."""
    model.eval()
    sums: dict[str, Sum] = {"nll": 0.0, "words": 0.0}
    for x, y, meta in map(unpack, items):
        if meta.get("reset"):
            reset_states(model, training=False)
        add_sums(sums, nll_sums(model(x), y))
    model.train()
    return perplexity(sums)


def train(data_dir: str | None, mode: str = "dni", epochs: float = 1.0, batch_size: int = DEFAULTS["batch_size"],
          bptt: int = DEFAULTS["bptt"], hidden_size: int = DEFAULTS["hidden_size"], num_layers: int = 2,
          vocab_size: int = 10000, lr: float = DEFAULTS["lr"], sg_lr: float = DEFAULTS["sg_lr"], seed: int = 0,
          steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train in one process; return validation and test perplexity."""
    if mode not in ("backprop", "dni"):
        raise ValueError(f"in-process lm runs backprop or dni, got {mode!r}")
    folder, dataset = resolve_corpus_dir(data_dir)
    if dataset == SOURCE_TEXT_SUBSET:
        log.warning("using the text subset bundled in the package: no --data-dir and no $DNI_ASYNC_DATA")
    corpus = Corpus(folder, max_size=vocab_size)
    torch.manual_seed(seed)
    model = nn.Sequential(*lm_blocks(len(corpus.vocab), hidden_size, num_layers, mode == "dni", sg_lr))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    items = stream_items(corpus.train, batch_size, bptt)
    total = steps if steps is not None else max(1, int(epochs * len(items)))
    bar = tqdm(total=total, disable=not progress, desc=f"lm {mode}", unit="chunk")
    start = time.perf_counter()
    for t in range(total):
        x, y, meta = unpack(items[t % len(items)])
        if meta["reset"]:
            reset_states(model)
        loss = lm_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    wall = time.perf_counter() - start
    return {"valid": evaluate(model, stream_items(corpus.valid, batch_size, bptt)),
            "test": evaluate(model, stream_items(corpus.test, batch_size, bptt)),
            "steps": total, "vocab": len(corpus.vocab), "dataset": dataset, "wall_s": round(wall, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train one mode and print validation and test perplexity as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("backprop", "dni"), default="dni", help="training method (default: dni)")
    parser.add_argument("--data-dir", default=None, help=DATA_HELP)
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training text (default: 1)")
    parser.add_argument("--steps", type=int, default=None, help="training chunks (default: --epochs worth)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="text columns per batch (default: %(default)s)")
    parser.add_argument("--bptt", type=int, default=DEFAULTS["bptt"], help="truncation length (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=DEFAULTS["hidden_size"],
                        help="embedding and LSTM width (default: %(default)s)")
    parser.add_argument("--num-layers", type=int, default=2, help="stacked LSTM layers (default: 2)")
    parser.add_argument("--vocab-size", type=int, default=10000, help="largest vocabulary (default: 10000)")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--sg-lr", type=float, default=DEFAULTS["sg_lr"],
                        help="Adam learning rate of the SGs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "bptt", "hidden_size", "num_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    try:
        result = train(args.data_dir, args.mode, args.epochs, args.batch_size, args.bptt, args.hidden_size,
                       args.num_layers, args.vocab_size, args.lr, args.sg_lr, args.seed, args.steps)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(dumps({"mode": args.mode, "seed": args.seed, "bptt": args.bptt, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
