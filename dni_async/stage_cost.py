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

from .allocator import set_malloc
from .config import PipelineConfig
from .lifecycle import validate
from .metrics import JsonLines
from .stage import StageWorker
from .task import PipelineTask, unpack
from .transport import Message
from .transport.memory import MemoryTransport

__all__ = ["Alone", "alone", "interleaved_medians", "stage_step_times"]

PARTS = {"forward": "forward_s", "act_sent": "forward_s", "sg_predicted": "sg_predict_s", "sg_update": "sg_update_s"}
"""Which part of a step each trace event's span is (see ``dni_async.trace``); the SG's work is ``sg_*``. Every
other span but the input's is ``backward_s``: the loss, the backward passes, optimizer steps, sending the input's
gradient. The span that ends at an ``input`` event is the time between two steps, where the other stages take
their turns: not counted."""


@dataclasses.dataclass
class Alone:
    """What timing the stages one at a time starts from (:func:`alone`)."""

    stages: list[torch.nn.Sequential]
    shapes: list[torch.Size]
    """Each stage's output shape."""
    batches: Any
    """The task's training items, after the first."""
    x: torch.Tensor
    y: torch.Tensor
    """The first batch."""

    def input_of(self, stage: int) -> torch.Tensor:
        """The first batch for stage 0; for a later stage, a random stand-in of its input's shape."""
        return self.x if stage == 0 else torch.randn(self.x.shape[0], *self.shapes[stage - 1][1:])


def alone(task: PipelineTask, config: PipelineConfig) -> Alone:
    """Set this process up as a stage process would be (threads, malloc) and build the stages and the first
    batch. No run folder: an earlier run's checkpoints are not a measurement's concern."""
    torch.set_num_threads(config.threads_per_stage)
    set_malloc(config.system_malloc)
    stages, shapes = validate(task, dataclasses.replace(config, run_dir=os.devnull, resume=None))
    batches = iter(task.data()[0])
    x, y, _ = unpack(next(batches))
    return Alone(stages, shapes, batches, x, y)


def interleaved_medians(fns: list[Callable[[], None]], repeats: int, warmup: int) -> list[float]:
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


def _span_sums(events: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of each part of :data:`PARTS` over the traced steps (each span from the previous event to its own)."""
    sums = dict.fromkeys(("forward_s", "backward_s", "sg_predict_s", "sg_update_s"), 0.0)
    for a, b in zip(events, events[1:]):
        if b["event"] != "input":
            sums[PARTS.get(b["event"], "backward_s")] += b["t"] - a["t"]
    return sums


def _breakdown(events: list[dict[str, Any]], steps: int, step_s: float) -> dict[str, float]:
    """``sg_s`` (seconds of SG work per step, its mean over ``steps``) and ``step_s`` split into the parts of
    :data:`PARTS` by each part's share of the traced steps."""
    sums = _span_sums(events)
    total = sum(sums.values())
    return {"sg_s": (sums["sg_predict_s"] + sums["sg_update_s"]) / max(1, steps),
            **{k: step_s * v / total if total > 0 else 0.0 for k, v in sums.items()}}


def _answer_with(gradients: dict[torch.Size, torch.Tensor], source: int, answers: bool,
                 sent: dict[str, int]) -> Callable[[Message], Message | None]:
    """Note the bytes of each message kind sent (``sent``); if ``answers``, answer each activation sent forward
    with a fixed gradient of its shape, as the next stage would."""
    def answer(msg: Message) -> Message | None:
        sent[msg.kind] = sum(t.nbytes for t in msg.tensors)
        if msg.kind != "act" or not answers:
            return None
        h = msg.tensors[0]
        grad = gradients.setdefault(h.shape, torch.randn(h.shape) / h.shape[0])
        return Message("grad", msg.step, source, [grad])

    return answer


def _optimizer_seconds(worker: StageWorker, repeats: int) -> float:
    """Median seconds of one step of the block's optimizer (on zero gradients: the same arithmetic)."""
    params = [p for p in worker.io.block.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = torch.zeros_like(p)
        worker.io.opt.step()

    return interleaved_medians([step], repeats, 1)[0]


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
        trace; 0 without an SG); ``step_s`` split by the trace into ``forward_s`` (up to the activation's send),
        ``sg_predict_s``, ``sg_update_s`` and ``backward_s`` (the rest); ``optimizer_s`` (one step of the block's
        optimizer, timed apart; also inside ``backward_s``); ``act_bytes`` and ``grad_bytes`` (the tensors of
        the activation message it sends forward and of the gradient it sends back; 0 where it sends none);
        ``input_s`` (stage 0: reading the next batch from the task's data, outside the step).
    """
    start = alone(task, config)
    stages, shapes = start.stages, start.shapes
    config = dataclasses.replace(config, log_every=10**9, snapshot_every=0, eval_every=0, checkpoint_every=0,
                                 save_grads_step=None, slow_stage={}, fail_stage={}, resume=None)

    def read() -> None:
        unpack(next(start.batches))

    input_s = interleaved_medians([read], repeats, 1)[0]
    per_example = [tuple(s[1:]) for s in shapes]
    metrics = JsonLines(Path(os.devnull))
    gradients: dict[torch.Size, torch.Tensor] = {}
    fns: list[Callable[[], None]] = []
    sinks: list[_Events] = []
    workers: list[StageWorker] = []
    sent: list[dict[str, int]] = []
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        sent.append({})
        answer = _answer_with(gradients, i + 1, not last and config.method.sends_gradients, sent[-1])
        transport = MemoryTransport(i, len(stages), answer, record=False)
        sinks.append(_Events())
        workers.append(StageWorker(i, len(stages), copy.deepcopy(stage), transport, config, torch.device("cpu"),
                                   task, per_example, metrics, sinks[-1]))
        fns.append(_stepper(workers[-1], start.input_of(i), start.y))
    medians = interleaved_medians(fns, repeats, warmup)
    metrics.close()
    return [{"stage": i, "step_s": median, **_breakdown(sink.events, repeats + warmup, median),
             "optimizer_s": _optimizer_seconds(worker, repeats),
             "act_bytes": out.get("act", 0), "grad_bytes": out.get("grad", 0), "input_s": input_s if i == 0 else 0.0}
            for i, (median, sink, worker, out) in enumerate(zip(medians, sinks, workers, sent))]


def _stepper(worker: StageWorker, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One more training step of ``worker`` on the same batch, traced from its input on as the loop does (its
    events flushed to its sink)."""
    def step() -> None:
        worker.trace("X", worker.stats.steps)
        worker.train_step(worker.stats.steps, x, y, {})
        worker.trace.flush()

    return step
