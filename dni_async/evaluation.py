"""A stage's share of evaluation: eval batches travel forward through the stages and the last stage scores them."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from .host_sync import host_sync
from .metrics import LineWriter
from .recurrent import reset_states
from .snapshots import Snapshots
from .sources import StageIO
from .task import EvalData, Sum, unpack
from .transport import Message

__all__ = ["StageEval"]


class StageEval:
    """Forward eval batches (eval mode, live weights or a snapshot's), score them on the last stage.

    Scores accumulate per group (``eval``, and ``train`` for tasks with
    ``train_metrics``) until an item marked ``last``; the group's summary is
    then relayed back to stage 0 (``task.latest``) and, for an eval pass,
    written to metrics.jsonl.

    Args:
        io: the stage's shared parts.
        snapshots: the stage's weight snapshots (an eval item's ``snapshot`` meta selects one).
        metrics: where the stage's metrics lines go (metrics.jsonl, and TensorBoard with ``--tensorboard``).
        before: called before each eval batch (a delayed source applies what is in flight first).
    """

    def __init__(self, io: StageIO, snapshots: Snapshots, metrics: LineWriter, before: Callable[[int], None]) -> None:
        self.io, self.snapshots, self.metrics, self.before = io, snapshots, metrics, before
        self.sums: dict[str, dict[str, Sum]] = {"eval": {}, "train": {}}
        self.final_eval: dict[str, Any] | None = None
        self.evals: dict[str, dict[str, Any]] = {}          # latest eval summary of each split
        self.curve_evals: dict[int, dict[str, Any]] = {}    # last stage: eval summary of each snapshot step

    def send(self, eval_data: EvalData, final: bool, extra: dict[str, Any] | None = None) -> None:
        """Stage 0: one pass over the eval items (the last one marked ``last``)."""
        items = eval_data(final) if callable(eval_data) else eval_data
        for k, item in enumerate(items):
            x, y, meta = unpack(item)
            meta.update(extra or {})
            if k == len(items) - 1:
                meta["last"] = True
            self.step(Message("eval", k, self.io.stage, [x, y], meta))

    def step(self, msg: Message) -> None:
        """One eval batch: forward, then pass it on, or score it on the last stage."""
        self.before(self.io.stats.steps)
        start = time.perf_counter()
        x, y = msg.tensors
        h = self._forward(x, msg.meta)
        self.io.trace("E", msg.step)
        if not self.io.last:
            self.io.stats.busy_s += time.perf_counter() - start
            self.io.send_forward(Message("eval", msg.step, self.io.stage, [h, y], msg.meta))
            return
        summary = self.score("eval", h, self.io.to_device(y), msg.meta)
        if summary is not None and "snapshot" in summary:
            self.curve_evals[int(summary["snapshot"])] = summary
        elif summary is not None:
            self.final_eval = summary
            if "split" in summary:
                self.evals[str(summary["split"])] = summary
            self.metrics.write({"stage": self.io.stage, "step": self.io.stats.steps, "time": time.time(),
                                **{f"eval_{k}": v for k, v in summary.items()}})
        self.io.stats.busy_s += time.perf_counter() - start

    def score(self, group: str, output: torch.Tensor, labels: torch.Tensor,
              meta: dict[str, Any]) -> dict[str, Any] | None:
        """Add a batch's metric sums to ``group``; at a ``last`` item, return the group's summary (and relay it)."""
        sums = self.sums[group]
        self.io.task.add_metrics(sums, output, labels)
        if not meta.get("last"):
            return None
        with host_sync("scored group"):
            figures = self.io.task.summary(sums)
        summary: dict[str, Any] = {**figures,
                                   **{k: v for k, v in meta.items() if k not in ("last", "reset")}}
        sums.clear()
        self.io.latest.update({f"{group}_{k}": v for k, v in summary.items()})
        return summary

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
        block = self.io.block
        self.snapshots.select(meta.get("snapshot"))
        block.eval()
        if meta.get("reset"):
            reset_states(block, training=False)
        out = block(self.io.to_device(x))
        block.train()
        return out  # type: ignore[no-any-return]
