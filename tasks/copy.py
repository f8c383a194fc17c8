"""Copy and repeat-copy (the DNI paper's RNN tasks): an LSTM trained with truncated BPTT and a curriculum.

In-process: ``python -m tasks.copy --task copy --mode dni --bptt 3 --steps 20000``.
Pipeline: ``launch/pipeline.py --task copy|repeat-copy`` (every LSTM layer is a block).

``--mode dni`` gives every LSTM layer a synthetic gradient at each truncation
boundary (dni_async.recurrent); in the pipeline, stages also get the usual SG
of their output. The curriculum follows the paper: start with sequences of
length 1 and add one whenever the mean training error of the last
``WINDOW`` batches at the current length is below ``THRESHOLD`` bits per
sequence. "Longest solved" is the last length that passed.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dni_async.config import TASK_DEFAULTS, PipelineConfig
from dni_async.data.copy import copy_batch
from dni_async.metrics import dumps
from dni_async.recurrent import TruncatedLSTM, reset_states, sg_fit
from dni_async.task import Item, PipelineTask, Sum, add_sums, unpack

__all__ = ["THRESHOLD", "WINDOW", "Curriculum", "copy_model_blocks", "sequence_items", "copy_loss", "bit_errors",
           "bits_summary", "pipeline_task", "train", "main"]

log = logging.getLogger("tasks.copy")
THRESHOLD = 0.15
"""Bits-per-sequence error below which a length counts as solved (the paper's curriculum criterion)."""
WINDOW = 10
"""Training batches averaged for the criterion."""
BITS = 8
TASKS = ("copy", "repeat-copy")
DEFAULTS = TASK_DEFAULTS["copy"]


@dataclass
class Curriculum:
    """Sequence length schedule: one longer after ``window`` batches averaging below ``threshold`` bits."""

    threshold: float = THRESHOLD
    window: int = WINDOW
    length: int = 1
    longest_solved: int = 0
    errors: list[float] = field(default_factory=list)

    def record(self, length: int, error: float) -> None:
        """Add one batch's bits-per-sequence error measured at ``length`` (stale lengths are ignored)."""
        if length != self.length:
            return
        self.errors = [*self.errors[-(self.window - 1):], error]
        if len(self.errors) == self.window and sum(self.errors) / self.window < self.threshold:
            self.longest_solved = length
            self.length += 1
            self.errors = []

    @property
    def error(self) -> float | None:
        """Mean error of the batches recorded so far at the current length (None before the first)."""
        return sum(self.errors) / len(self.errors) if self.errors else None


def copy_model_blocks(hidden_size: int, num_layers: int, temporal_sg: bool, sg_lr: float,
                      sg_scale: float = 1.0) -> list[nn.Module]:
    """``num_layers`` truncated LSTM layers (one block each); the last block ends in the output layer."""
    blocks: list[nn.Module] = []
    width = BITS + 2
    for _ in range(num_layers):
        blocks.append(TruncatedLSTM(width, hidden_size, temporal_sg=temporal_sg, sg_lr=sg_lr, sg_scale=sg_scale))
        width = hidden_size
    blocks[-1] = nn.Sequential(blocks[-1], nn.Linear(hidden_size, BITS + 1))
    return blocks


def sequence_items(batch_size: int, length: int, repeats: int, max_repeats: int, bptt: int,
                   generator: torch.Generator, extra: dict[str, Any] | None = None) -> list[Item]:
    """One batch of sequences cut into ``bptt``-step chunks, batch-first.

    Each chunk is ``(inputs (B, bptt, bits+2), labels (B, bptt, bits+2), meta)``;
    ``labels`` is the targets with the score mask as last channel. The first
    chunk has ``reset``, the last ``last``. The tail is padded (mask 0).
    """
    seq = copy_batch(batch_size, length, BITS, repeats, max_repeats, generator)
    labels = torch.cat([seq.targets, seq.mask.unsqueeze(-1)], dim=-1)
    x, y = seq.inputs.transpose(0, 1), labels.transpose(0, 1)
    pad = -x.shape[1] % bptt
    x, y = F.pad(x, (0, 0, 0, pad)), F.pad(y, (0, 0, 0, pad))
    chunks = x.shape[1] // bptt
    return [(x[:, k * bptt:(k + 1) * bptt].contiguous(), y[:, k * bptt:(k + 1) * bptt].contiguous(),
             {"reset": k == 0, "last": k == chunks - 1, "length": length, **(extra or {})})
            for k in range(chunks)]


def copy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bernoulli log loss of the scored outputs, summed over time and bits, averaged over the batch."""
    targets, mask = labels[..., :-1], labels[..., -1]
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
    return (loss * mask).sum() / logits.shape[0]


def bit_errors(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Sum]:
    """Wrong output bits (scored positions) and sequences (each has exactly one scored end marker)."""
    targets, mask = labels[..., :-1], labels[..., -1]
    wrong = ((logits > 0).float() != targets).float().sum(-1) * mask
    ends = (targets[..., -1] * mask).sum()
    return {"bit_errors": wrong.sum(), "sequences": ends}  # tensors: read once per scored group


def bits_summary(sums: dict[str, Sum]) -> dict[str, float]:
    """Bits-per-sequence error of summed :func:`bit_errors`."""
    errors, sequences = float(sums["bit_errors"]), float(sums["sequences"])
    return {"bits_error": errors / max(1.0, sequences), "sequences": int(sequences)}


def _draw_repeats(task: str, max_repeats: int, generator: torch.Generator) -> int:
    return 1 if task == "copy" else int(torch.randint(1, max_repeats + 1, (1,), generator=generator))


def pipeline_task(config: PipelineConfig) -> PipelineTask:
    """``copy`` / ``repeat-copy`` for the multi-process runtime; the curriculum runs on stage 0.

    Stage 0 reads the training error the last stage relays back
    (``train_bits_error`` at ``train_length``) to move the curriculum on.
    """
    torch.manual_seed(config.seed)
    bptt = config.bptt
    assert bptt is not None, "PipelineConfig resolves --bptt for copy"
    blocks = copy_model_blocks(config.hidden_size, config.num_layers, config.method.temporal_sg, config.sg_lr,
                               config.sg_scale)
    curriculum = Curriculum()
    latest: dict[str, Any] = {}  # PipelineTask.latest: what the last stage relays back
    # Where the next training item comes from (checkpoints): chunk `chunk` of sequence `sequence`, drawn from
    # the generator state `generator` with the curriculum as it was then and `seen` the last recorded sequence.
    position: dict[str, Any] = {}

    def train_items(steps: int) -> Iterator[Item]:
        gen = torch.Generator().manual_seed(config.seed)
        seen, first, skip = None, 0, 0
        resumed = bool(position)  # PipelineTask.resume_data was called: continue where `position` says
        if resumed:
            gen.set_state(position["generator"])
            seen, first, skip = position["seen"], position["sequence"], position["chunk"]
            vars(curriculum).update(position["curriculum"])
        for sequence in range(first, steps):  # more than enough: each batch has >= 1 chunk
            # (a resumed first sequence was drawn after its curriculum step, which is in the saved curriculum)
            if not (resumed and sequence == first) and latest.get("train_sequence") != seen \
                    and "train_length" in latest:
                seen = latest["train_sequence"]
                curriculum.record(int(latest["train_length"]), float(latest["train_bits_error"]))
            drawn_from = gen.get_state()
            state = {"curriculum": dict(vars(curriculum)), "seen": seen}
            repeats = _draw_repeats(config.task, config.max_repeats, gen)
            items = sequence_items(config.batch_size, curriculum.length, repeats, config.max_repeats, bptt, gen,
                                   {"sequence": sequence})
            for k in range(skip, len(items)):
                position.update(state, generator=drawn_from, sequence=sequence, chunk=k + 1)
                yield items[k]
            skip = 0

    def eval_items(final: bool) -> list[Item]:
        gen = torch.Generator().manual_seed(config.seed + 1)
        items: list[Item] = []
        for _ in range(4):
            repeats = _draw_repeats(config.task, config.max_repeats, gen)
            items += sequence_items(config.batch_size, curriculum.length, repeats, config.max_repeats, bptt, gen,
                                    {"last": False})  # one scored group: the stage loop marks its end
        return items

    def data() -> tuple[Iterator[Item], int, Any, str]:
        steps = config.steps if config.steps is not None else 10_000
        return train_items(steps), steps, eval_items, f"{config.task} (generated, seed {config.seed})"

    return PipelineTask(name=config.task, blocks=blocks, loss_fn=copy_loss, input_shape=(bptt, BITS + 2),
                        num_classes=BITS + 2, classification=False, context_fn=lambda labels: labels,
                        metric_fn=bit_errors,
                        summarize=bits_summary, train_metrics=True, latest=latest, data=data,
                        data_state=lambda: {**position, "curriculum": dict(position["curriculum"])},
                        resume_data=lambda state: position.update(state),
                        result=lambda: {"longest_solved": curriculum.longest_solved, "bptt": bptt,
                                        "threshold": THRESHOLD, "curriculum_length": curriculum.length,
                                        "error_at_length": curriculum.error})


def train(task: str = "copy", mode: str = "dni", steps: int = 20_000, bptt: int = DEFAULTS["bptt"],
          batch_size: int = DEFAULTS["batch_size"], hidden_size: int = DEFAULTS["hidden_size"], num_layers: int = 1,
          lr: float = DEFAULTS["lr"], sg_lr: float = DEFAULTS["sg_lr"], max_repeats: int = 3,
          seed: int = 0, progress: bool = True, sg_scale: float = DEFAULTS["sg_scale"]) -> dict[str, Any]:
    """Train in one process for ``steps`` truncated chunks with the curriculum; return what it reached.

    Args:
        task: ``copy`` or ``repeat-copy``.
        mode: ``backprop`` (truncated BPTT) or ``dni`` (plus a synthetic gradient at each truncation boundary).
        bptt: truncation length, time steps.
        max_repeats: repeat-copy draws each batch's repeat count from 1..max_repeats.
        sg_scale: factor on the injected synthetic gradient (see ``TruncatedLSTM``).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if mode not in ("backprop", "dni"):
        raise ValueError(f"in-process {task} runs backprop or dni, got {mode!r}")
    torch.manual_seed(seed)
    model = nn.Sequential(*copy_model_blocks(hidden_size, num_layers, mode == "dni", sg_lr, sg_scale))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curriculum = Curriculum()
    bar = tqdm(total=steps, disable=not progress, desc=f"{task} {mode} T={bptt}", unit="chunk")
    start = time.perf_counter()
    done = sequences = 0
    measuring = False
    while done < steps:
        if done >= steps * 0.9 and not measuring:  # the SG's fit is reported over the last 10% of the run
            sg_fit(model)
            measuring = True
        repeats = _draw_repeats(task, max_repeats, gen)
        sums: dict[str, Sum] = {}
        for x, y, meta in map(unpack, sequence_items(batch_size, curriculum.length, repeats, max_repeats, bptt,
                                                     gen)):
            if meta["reset"]:
                reset_states(model)
            logits = model(x)
            loss = copy_loss(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            add_sums(sums, bit_errors(logits.detach(), y))
            done += 1
            bar.update(1)
        sequences += 1
        curriculum.record(meta["length"], bits_summary(sums)["bits_error"])
        bar.set_postfix(length=curriculum.length, solved=curriculum.longest_solved, refresh=False)
    bar.close()
    return {"longest_solved": curriculum.longest_solved, "curriculum_length": curriculum.length,
            "error_at_length": curriculum.error, "sequences": sequences, "chunks": done,
            "sg_fit_last_10pct": sg_fit(model), "wall_s": round(time.perf_counter() - start, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train one mode and print what the curriculum reached as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="copy", help="copy or repeat-copy (default: copy)")
    parser.add_argument("--mode", choices=("backprop", "dni"), default="dni", help="training method (default: dni)")
    parser.add_argument("--steps", type=int, default=20_000, help="truncated chunks to train (default: 20000)")
    parser.add_argument("--bptt", type=int, default=DEFAULTS["bptt"],
                        help="truncation length, time steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                        help="sequences per batch (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=DEFAULTS["hidden_size"],
                        help="LSTM width (default: %(default)s)")
    parser.add_argument("--num-layers", type=int, default=1, help="stacked LSTM layers (default: 1)")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--sg-lr", type=float, default=DEFAULTS["sg_lr"],
                        help="Adam learning rate of the SGs (default: %(default)s)")
    parser.add_argument("--sg-scale", type=float, default=DEFAULTS["sg_scale"],
                        help="factor on the injected synthetic gradient (default: %(default)s)")
    parser.add_argument("--max-repeats", type=int, default=3, help="repeat-copy: largest repeat count (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    for name in ("steps", "bptt", "batch_size", "hidden_size", "num_layers", "max_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    result = train(args.task, args.mode, args.steps, args.bptt, args.batch_size, args.hidden_size, args.num_layers,
                   args.lr, args.sg_lr, args.max_repeats, args.seed, sg_scale=args.sg_scale)
    print(dumps({"task": args.task, "mode": args.mode, "bptt": args.bptt, "seed": args.seed,
                      "sg_scale": args.sg_scale, "threshold": THRESHOLD, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
