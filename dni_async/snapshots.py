"""Copies of a stage's weights taken while it trains, evaluated afterwards: accuracy against wall-clock time."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .hooks import StepHook

__all__ = ["Snapshots", "accuracy_curve"]


class Snapshots(StepHook):
    """Every ``every`` steps, a copy of ``module``'s state (parameters and buffers) and the time it was taken.

    Evaluating the copies once training is over gives the accuracy the run had
    at each of those moments without evaluation taking time from training: the
    same fixed schedule for every mode, and throughput measured in the same run.

    Args:
        module: the stage's block.
        every: steps between snapshots (0: none).
    """

    def __init__(self, module: nn.Module, every: int) -> None:
        self.module, self.every = module, every
        self.taken: dict[int, tuple[float, dict[str, torch.Tensor]]] = {}
        self._live: dict[str, torch.Tensor] | None = None
        self._loaded: int | None = None

    def maybe_take(self, step: int) -> None:
        """Take a snapshot if ``step`` (steps done) is on the schedule."""
        if self.every and step % self.every == 0:
            state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self.taken[step] = (time.time(), state)

    def after_step(self, t: int) -> None:
        self.maybe_take(t + 1)

    def steps(self) -> list[int]:
        """The steps snapshots were taken at, in order."""
        return sorted(self.taken)

    def times(self) -> dict[str, float]:
        """``{step: time.time() when taken}`` (string keys: the form it travels in as JSON)."""
        return {str(step): when for step, (when, _) in sorted(self.taken.items())}

    def select(self, step: int | None) -> None:
        """Load the weights of snapshot ``step`` into the module; None puts the live weights back.

        Raises:
            KeyError: for a step no snapshot was taken at.
        """
        if step == self._loaded:
            return
        if step is not None and step not in self.taken:
            raise KeyError(f"no snapshot was taken at step {step} (taken: {self.steps()})")
        if self._loaded is None:
            self._live = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        assert self._live is not None
        self.module.load_state_dict(self._live if step is None else self.taken[step][1])
        self._loaded = step
        if step is None:
            self._live = None


def accuracy_curve(reports: list[dict[str, Any]], start_time: float) -> list[dict[str, Any]]:
    """One point per snapshot step: ``step``, ``ready_s`` and the last stage's eval figures of that snapshot.

    ``ready_s`` is when the model of that step existed: the time the slowest
    stage took its snapshot, in seconds since training started (stage 0's
    clock; the stages share one host's clock or synchronised ones).

    Args:
        reports: each stage's report, in stage order, with ``snapshot_times``; the last one with ``curve_evals``.
        start_time: ``time.time()`` at which training started.
    """
    points = []
    for step, summary in sorted(reports[-1]["curve_evals"].items(), key=lambda kv: int(kv[0])):
        ready = max(report["snapshot_times"][str(step)] for report in reports)
        points.append({"step": int(step), "ready_s": round(ready - start_time, 3),
                       **{k: v for k, v in summary.items() if k != "snapshot"}})
    return points
