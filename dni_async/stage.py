"""The per-process stage loop: the same for every method; a method is the stage's gradient source."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .checkpoint import Checkpointer
from .config import PipelineConfig
from .evaluation import StageEval
from .hooks import CheckpointEvery, Faults, Hooks, MetricsEvery, SaveGrads
from .host_sync import host_sync
from .lifecycle import check_resume_step
from .metrics import LineWriter, StageStats
from .recurrent import carried_states, load_carried_states, reset_states
from .snapshots import Snapshots
from .sources import StageIO, build_source
from .task import EvalData, Item, PipelineTask, unpack
from .trace import EventSink, Trace
from .transport import Message, Transport

__all__ = ["StageWorker"]

log = logging.getLogger("dni_async")

POLL_S = 0.002
"""While a stage waits for its next input with gradients still owed to it, it takes them every POLL_S seconds."""

# [Note: the stage loop]
#
# Stage i at step t, whatever the method (DESIGN.md; the source's part is
# [Note: gradient sources] in sources/base.py):
#
#     x_t <- data (i = 0) or act(t) from i-1     hooks.before_step(t)
#     source.before_forward(t)                   h_t <- source.forward(t, x_t)
#     send act(t, h_t, y) to i+1                 (not on the last stage)
#     source.update(t, ...); source.absorb(t)    hooks.after_step(t)
#
# Shutdown: stage 0 sends `stop` after its last step; each stage passes it on;
# the last stage answers with `stop` backward, and each stage passes that back
# once it has taken every gradient queued before it (channels keep order), so
# no gradient is lost. `eval` batches travel forward like activations, in order.
# An item's meta (PipelineTask) travels with its act/eval message: `reset`
# restarts recurrent state on every stage, `last` closes a scored group.
#
# Hazard: sends may be zero-copy, so a tensor handed to `send` is never written
# again: h_t.detach() shares storage with h_t, which nothing modifies in place.


class StageWorker:
    """One stage: its block, its gradient source (by ``config.method``), its hooks, and the loop.

    Args:
        stage: this stage's index.
        num_stages: number of stages.
        block: the stage's module, already on ``device``.
        transport: connected channels to the neighbours.
        config: the run's config.
        device: where the block lives.
        task: the task (loss, cDNI context, metrics; ``task.latest`` receives the relayed figures).
        shapes: every stage's output shape, per example (the SG's and the local head's shapes).
        metrics: where the stage's metrics lines go (metrics.jsonl; with ``--tensorboard``, TensorBoard too).
        events: this stage's event log.
        checkpoints: writes this stage's checkpoint files (``--checkpoint-every``); None: none.
        keep_trace: keep every action in ``trace.actions`` (tests).
    """

    def __init__(self, stage: int, num_stages: int, block: nn.Module, transport: Transport, config: PipelineConfig,
                 device: torch.device, task: PipelineTask, shapes: list[tuple[int, ...]], metrics: LineWriter,
                 events: EventSink | None, checkpoints: Checkpointer | None = None, keep_trace: bool = False) -> None:
        self.config = config
        self.trace = Trace(stage, events, keep=keep_trace)
        self.hooks = Hooks([Faults(config.slow_stage.get(stage, 0.0), config.fail_stage.get(stage))])
        self.io = StageIO(stage, num_stages, block, transport, config, device, task, self.trace, self.hooks)
        self.snapshots = Snapshots(block, config.snapshot_every)
        self.eval = StageEval(self.io, self.snapshots, metrics, before=lambda t: self.source.flush(t))
        self.source = build_source(self.io, shapes, self.eval.score)
        if self.source.absorbs:
            self.io.while_sending_forward = lambda: self.source.absorb(self.io.stats.steps)
        if config.save_grads_step is not None:
            self.hooks.add(SaveGrads(block, config.save_grads_step,
                                     Path(config.run_dir) / "grads" / f"stage-{stage}.pt"))
        self.hooks.add(self.snapshots)
        if checkpoints is not None:
            self.hooks.add(CheckpointEvery(checkpoints, self.source, self.checkpoint_state))
        self.hooks.add(MetricsEvery(self.io, self.source, metrics))
        self.start_step = 0          # > 0 when resumed from a checkpoint
        self._skip_items = 0         # training items stage 0 skips when resumed
        self._last_act = -1          # step of the last activation received
        self.summary_fields: dict[str, Any] = {}  # the source's figures for summary.json, at the end

    @property
    def stats(self) -> StageStats:
        return self.io.stats

    # ------------------------------------------------------------ entry points

    def run_first(self, batches: Iterator[Item], steps: int, eval_data: EvalData,
                  on_step: Callable[[int, dict[str, Any]], None] | None = None) -> None:
        """Stage 0: read the data, train ``steps`` steps (or until ``--time-budget``), evaluate, stop."""
        deadline = time.perf_counter() + self.config.time_budget if self.config.time_budget else None
        check_resume_step(self.start_step, steps)
        for _ in range(self._skip_items):  # the data position: the same items the uninterrupted run would read
            next(batches)
        for t in range(self.start_step, steps):
            if deadline is not None and time.perf_counter() >= deadline:
                log.info("time budget of %.1f s spent after %d steps", self.config.time_budget, t)
                break
            if self.config.eval_every and t and t % self.config.eval_every == 0:
                self.eval.send(eval_data, final=False)
            x, y, meta = unpack(next(batches))
            self.trace("X", t)
            self.train_step(t, x, y, meta)
            if on_step is not None:
                on_step(t, self.io.latest)
        self.eval.send(eval_data, final=True)
        for step in self.snapshots.steps():  # after training, so evaluating them costs it nothing
            self.eval.send(eval_data, final=False, extra={"snapshot": step})
        self._finish()

    def run_next(self) -> None:
        """Stages 1..S-1: follow the forward queue until ``stop``."""
        while True:
            msg = self._next_input()
            if msg.kind == "act" and msg.step <= self._last_act:
                self.io.reject(msg, f"activations must come in step order (last was step {self._last_act})")
            elif msg.kind == "act":
                self._last_act = msg.step
                self.trace("X", msg.step)
                x, y = msg.tensors
                self.train_step(msg.step, x, y, msg.meta)
            elif msg.kind == "eval":
                self.eval.step(msg)
            elif msg.kind == "stop":
                break
            else:
                raise RuntimeError(f"unexpected {msg.kind!r} message from stage {msg.src}")
        self._finish()

    # --------------------------------------------------------------- the loop

    def train_step(self, t: int, x: torch.Tensor, y: torch.Tensor, meta: dict[str, Any]) -> None:
        """One training step (see [Note: the stage loop])."""
        io, source = self.io, self.source
        self.hooks.before_step(t)
        start, blocked = time.perf_counter(), io.blocked_s
        x, y = io.to_device(x), io.to_device(y)
        if io.needs_input_grad:
            x.requires_grad_(True)
        source.before_forward(t)
        io.block.train()
        if meta.get("reset"):
            reset_states(io.block, training=True)
        h = source.forward(t, x)
        self.trace("F", t)
        if not io.last:
            io.send_forward(Message("act", t, io.stage, [h.detach(), y], meta))
        source.update(t, x, h, y, meta)
        source.absorb(t)
        io.stats.busy_s += time.perf_counter() - start - (io.blocked_s - blocked)  # time blocked on peers is idle
        io.stats.steps += 1
        io.stats.step_times.append(time.perf_counter())
        self.hooks.after_step(t)

    def _next_input(self) -> Message:
        """The next forward message; meanwhile, gradients still owed to this stage are taken as they come."""
        while True:
            owed = self.source.absorbs and self.source.pending()
            msg = self.io.transport.recv("forward", timeout=POLL_S if owed else None)
            if msg is not None:
                return msg
            self.source.absorb(self.io.stats.steps)

    def _finish(self) -> None:
        """Pass `stop` on and take the gradients still in flight (see [Note: the stage loop])."""
        io = self.io
        if not io.last:
            io.send_forward(Message("stop", io.stats.steps, io.stage))
            while True:
                msg = io.next_backward(wait=True)
                assert msg is not None
                if msg.kind == "stop":
                    break
                if io.check_gradient(msg, io.stats.steps):
                    self.source.on_gradient(msg, io.stats.steps)
        if not io.first:
            io.send(io.stage - 1, Message("stop", io.stats.steps, io.stage))
        self.snapshots.select(None)
        with host_sync("summary"):
            self.source.log_fields()  # the last losses into the stats
            self.summary_fields = self.source.summary_fields()
        self.trace.flush()

    # ----------------------------------------------------------- checkpoints

    def checkpoint_state(self) -> dict[str, Any]:
        """What resuming this stage needs (between steps, nothing in flight): block, optimizer, gradient source,
        RNG states, the data position, what recurrent layers carry, the metric sums of the open groups."""
        io = self.io
        return {
            "block": io.block.state_dict(), "opt": io.opt.state_dict(), "source": self.source.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state(io.device) if io.device.type == "cuda" else None},
            "data_position": io.stats.steps,
            "data": io.task.data_state() if io.first and io.task.data_state is not None else None,
            "recurrent": carried_states(io.block),
            "sums": {group: {k: float(v) for k, v in sums.items()} for group, sums in self.eval.sums.items()},
            "latest": {k: v for k, v in io.latest.items() if isinstance(v, (bool, int, float, str))},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`checkpoint_state` (loaded with ``weights_only=True``) taken after its ``step``.

        The learning rates are this run's (``--lr``, ``--sg-lr``), not the checkpoint's.
        """
        io = self.io
        io.block.load_state_dict(state["block"])
        io.opt.load_state_dict(state["opt"])
        for group in io.opt.param_groups:
            group["lr"] = self.config.lr
        self.source.load_state_dict(state["source"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and io.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], io.device)
        io.latest.update(state["latest"])
        load_carried_states(io.block, state["recurrent"])
        self.eval.sums = {group: dict(sums) for group, sums in state["sums"].items()}
        self._skip_items = int(state["data_position"])
        if state["data"] is not None and io.task.resume_data is not None:
            io.task.resume_data(state["data"])
            self._skip_items = 0
        self.start_step = io.stats.steps = int(state["step"])
        self._last_act = self.start_step - 1
