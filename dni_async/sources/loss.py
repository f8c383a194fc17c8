"""The last stage's source in every method: the true gradient of the task's loss."""

from __future__ import annotations

from typing import Any, Callable

import torch

from .base import GradientSource
from .io import StageIO

__all__ = ["Loss"]

Score = Callable[[str, torch.Tensor, torch.Tensor, dict[str, Any]], Any]


class Loss(GradientSource):
    """``loss = task.loss_fn(h, y)``; backward, update, send the input's gradient back (unless nobody needs it).

    Args:
        io: the stage's shared parts.
        score: ``(group, output, labels, meta)`` adds a training batch's metric sums (tasks with ``train_metrics``).
    """

    def __init__(self, io: StageIO, score: Score) -> None:
        super().__init__(io)
        self.score = score
        self._loss: torch.Tensor | None = None  # read out at log time: float() here would sync a GPU every step

    def update(self, t: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, meta: dict[str, Any]) -> None:
        loss = self.io.task.loss_fn(h, y)
        loss.backward()
        self._loss = loss.detach()
        if self.io.task.train_metrics:
            self.score("train", h.detach(), y, meta)  # before the send: its summary travels with this gradient
        self.io.apply(t)
        self.io.send_grad(t, x)

    def log_fields(self) -> dict[str, Any]:
        if self._loss is not None:
            self.io.stats.loss_last = self.io.latest["loss"] = float(self._loss)
        return {"loss": self.io.stats.loss_last}
