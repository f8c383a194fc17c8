"""Step hooks: what runs around a stage's training step (fault injection, gradient dumps, snapshots, checkpoints,
metrics), so that the loop itself only trains."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .divergence import check_finite
from .host_sync import host_sync
from .metrics import LineWriter, rss_mb

if TYPE_CHECKING:
    from .checkpoint import Checkpointer
    from .sources import GradientSource, StageIO

__all__ = ["StepHook", "Hooks", "Faults", "SaveGrads", "CheckpointEvery", "MetricsEvery"]


class StepHook:
    """A component the stage loop calls at fixed points of every training step; each method defaults to nothing."""

    def before_step(self, t: int) -> None:
        """Step ``t`` is about to start (its input has arrived)."""

    def before_update(self, step: int) -> None:
        """The block's gradients for ``step`` are computed and about to be applied."""

    def after_step(self, t: int) -> None:
        """Step ``t`` is over (``t + 1`` steps done)."""


class Hooks(StepHook):
    """The hooks of one stage, called in order."""

    def __init__(self, hooks: list[StepHook] | None = None) -> None:
        self.hooks = list(hooks or [])

    def add(self, hook: StepHook) -> None:
        self.hooks.append(hook)

    def before_step(self, t: int) -> None:
        for hook in self.hooks:
            hook.before_step(t)

    def before_update(self, step: int) -> None:
        for hook in self.hooks:
            hook.before_update(step)

    def after_step(self, t: int) -> None:
        for hook in self.hooks:
            hook.after_step(t)


class Faults(StepHook):
    """Testing hooks: sleep ``delay`` seconds every step (``--slow-stage``); raise at step ``fail_at``
    (``--fail-stage``)."""

    def __init__(self, delay: float = 0.0, fail_at: float | None = None) -> None:
        self.delay, self.fail_at = delay, fail_at

    def before_step(self, t: int) -> None:
        if self.delay:
            time.sleep(self.delay)
        if self.fail_at == t:
            raise RuntimeError(f"injected failure at step {t} (--fail-stage)")


class SaveGrads(StepHook):
    """Testing hook: save the block's parameter gradients of one step to ``path`` (``--save-grads-step``)."""

    def __init__(self, block: nn.Module, step: int, path: Path) -> None:
        self.block, self.step, self.path = block, step, path

    def before_update(self, step: int) -> None:
        if step != self.step:
            return
        with host_sync("saved gradients"):
            grads = {n: p.grad.detach().cpu().clone() for n, p in self.block.named_parameters()
                     if p.grad is not None}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(grads, self.path)


class CheckpointEvery(StepHook):
    """Write this stage's checkpoint file when the checkpointer's schedule says so, with nothing in flight.

    Args:
        checkpointer: this stage's :class:`~dni_async.checkpoint.Checkpointer`.
        source: the stage's gradient source (flushed first).
        state: the stage's checkpoint state, taken after the flush.
    """

    def __init__(self, checkpointer: Checkpointer, source: GradientSource, state: Callable[[], dict[str, Any]]) -> None:
        self.checkpointer, self.source, self.state = checkpointer, source, state

    def after_step(self, t: int) -> None:
        if self.checkpointer.due(t + 1):
            self.source.flush(t)
            with host_sync("checkpoint"):
                self.checkpointer.save(t + 1, self.state())


class MetricsEvery(StepHook):
    """Every ``--log-every`` steps: one metrics.jsonl line for this stage, and its buffered events written; then
    the divergence check (:func:`~dni_async.divergence.check_finite`: the line's figures and the block's weights).

    The line: ``stage``, ``step``, ``time``, ``samples_per_s`` (since the last line), ``queue_depth``,
    ``rss_mb``, the source's figures (``loss``; ``sg_loss``, ``sg_cosine``, ``stash``; ``in_flight``,
    ``stash_mb``; ``local_loss``) and, where gradients come back asynchronously, the largest ``staleness``.
    """

    def __init__(self, io: StageIO, source: GradientSource, metrics: LineWriter) -> None:
        self.io, self.source, self.metrics = io, source, metrics
        self._start = time.perf_counter()

    def after_step(self, t: int) -> None:
        config = self.io.config
        if (t + 1) % config.log_every:
            return
        with host_sync("metrics line"):
            self._write(t)

    def _write(self, t: int) -> None:
        """The metrics line of step ``t``, then the divergence check."""
        config = self.io.config
        now = time.perf_counter()
        line: dict[str, Any] = {
            "stage": self.io.stage, "step": t, "time": time.time(),
            "samples_per_s": round(config.log_every * config.batch_size / (now - self._start), 2),
            "queue_depth": {d: self.io.transport.queue_depth(d) for d in ("forward", "backward")},
            "rss_mb": round(rss_mb(), 1), **self.source.log_fields(),
        }
        if self.source.absorbs:
            line["staleness"] = max(self.io.staleness) if self.io.staleness else None
        self.metrics.write(line)
        self.io.staleness.clear()
        self._start = now
        self.io.trace.flush()
        check_finite(t, self.io.stage, line, self.io.block)
