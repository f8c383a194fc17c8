"""Each stage's training step timed alone, in one process: the ideal throughput of a pipeline of those stages."""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import PipelineConfig
from .lifecycle import validate
from .metrics import JsonLines
from .stage import StageWorker
from .task import PipelineTask, unpack
from .transport import Message
from .transport.memory import MemoryTransport

__all__ = ["stage_step_times"]

SG_ACTIONS = ("sg_predicted", "sg_update")
"""Trace events whose spans are the SG's work (see ``dni_async.trace``)."""


def _interleaved_medians(fns: list[Callable[[], None]], repeats: int, warmup: int) -> list[float]:
    """Median seconds of each function, timed round-robin so that a slow spell of the machine hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


class _Events:
    """An event sink that keeps the events in memory."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def write(self, obj: dict[str, Any]) -> None:
        self.events.append(obj)


def _sg_seconds(events: list[dict[str, Any]], steps: int) -> float:
    """Seconds per step of SG work: the spans of the SG's actions (each from the previous event to its own)."""
    total = sum(b["t"] - a["t"] for a, b in zip(events, events[1:]) if b["event"] in SG_ACTIONS)
    return total / max(1, steps)


def _answer_with(gradients: dict[torch.Size, torch.Tensor], source: int) -> Callable[[Message], Message | None]:
    """Answer each activation sent forward with a fixed gradient of its shape, as the next stage would."""
    def answer(msg: Message) -> Message | None:
        if msg.kind != "act":
            return None
        h = msg.tensors[0]
        grad = gradients.setdefault(h.shape, torch.randn(h.shape) / h.shape[0])
        return Message("grad", msg.step, source, [grad])

    return answer


def stage_step_times(task: PipelineTask, config: PipelineConfig, repeats: int = 20,
                     warmup: int = 5) -> list[dict[str, Any]]:
    """Median seconds of one training step of each stage alone, with ``config.threads_per_stage`` threads.

    A step is :meth:`StageWorker.train_step` itself, in ``config.mode``, with
    in-process channels whose next stage answers every activation at once
    with a gradient (none in ``local``): forward, backward and optimizer of
    the block, the loss on the last stage, and each method's own work (the SG's
    prediction and its update on one target; the weight stash; the local
    head). Transport and waiting are not in it, so ``batch / max(step_s)`` is
    the throughput a pipeline of these stages could reach at best. Runs on
    copies of the blocks, on the task's first batch; the stages take turns step
    by step, so that the machine's slow spells fall on every stage alike.

    Returns:
        Per stage: ``stage``, ``step_s`` (all of it), ``sg_s`` (the SG's part: its mean over the steps, from the
        trace; 0 without an SG).
    """
    torch.set_num_threads(config.threads_per_stage)
    stages, shapes = validate(task, config)
    config = dataclasses.replace(config, log_every=10**9, snapshot_every=0, eval_every=0, checkpoint_every=0,
                                 save_grads_step=None, slow_stage={}, fail_stage={}, resume=None)
    x, y, _ = unpack(next(iter(task.data()[0])))
    per_example = [tuple(s[1:]) for s in shapes]
    metrics = JsonLines(Path(os.devnull))
    gradients: dict[torch.Size, torch.Tensor] = {}
    fns: list[Callable[[], None]] = []
    sinks: list[_Events] = []
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        answers = not last and config.method.sends_gradients
        transport = MemoryTransport(i, len(stages), _answer_with(gradients, i + 1) if answers else None, record=False)
        sinks.append(_Events())
        worker = StageWorker(i, len(stages), copy.deepcopy(stage), transport, config, torch.device("cpu"), task,
                             per_example, metrics, sinks[-1])
        inp = x if i == 0 else torch.randn(x.shape[0], *shapes[i - 1][1:])
        fns.append(_stepper(worker, inp, y))
    medians = _interleaved_medians(fns, repeats, warmup)
    metrics.close()
    return [{"stage": i, "step_s": median, "sg_s": _sg_seconds(sink.events, repeats + warmup)}
            for i, (median, sink) in enumerate(zip(medians, sinks))]


def _stepper(worker: StageWorker, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One more training step of ``worker`` on the same batch (its events flushed to its sink)."""
    def step() -> None:
        worker.train_step(worker.stats.steps, x, y, {})
        worker.trace.flush()

    return step
