"""``local``: a small head on the stage's output and the task's loss give the stage its gradient (decoupled greedy
learning); nothing is sent back, so the next stage never computes its input's gradient."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..optim import fast_adam
from .base import GradientSource, load_trained_state, trained_state
from .io import StageIO

__all__ = ["Local", "local_head"]


def local_head(h_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> nn.Module:
    """A linear map from a stage's output (per example ``h_shape``) to the model's output (``out_shape``).

    Vectors and sequences map their last dimension (``(F,) -> (C,)``, ``(T, H) -> (T, V)``); feature maps are
    flattened first (``(C, H, W) -> (K,)``).

    Raises:
        ValueError: for shapes no linear head joins.
    """
    if len(h_shape) == len(out_shape) and h_shape[:-1] == out_shape[:-1]:
        return nn.Linear(h_shape[-1], out_shape[-1])
    if len(out_shape) == 1:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(h_shape), out_shape[0]))
    raise ValueError(f"--mode local has no head from a stage output of shape {h_shape} to the model's output "
                     f"{out_shape}")


class Local(GradientSource):
    """``loss = task.loss_fn(head(h), y)``; backward into the head and the block, update both.

    The head is trained with the block's Adam learning rate (``--lr``).

    Args:
        io: the stage's shared parts.
        head: the stage's head (:func:`local_head`), on the stage's device.
    """

    def __init__(self, io: StageIO, head: nn.Module) -> None:
        super().__init__(io)
        self.head = head
        self.head_opt = fast_adam(head.parameters(), io.config.lr)
        self._loss: torch.Tensor | None = None
        self._loss_last: float | None = None

    def update(self, t: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, meta: dict[str, Any]) -> None:
        loss = self.io.task.loss_fn(self.head(h), y)
        loss.backward()
        self._loss = loss.detach()
        self.io.apply(t, self.head_opt)

    def state_dict(self) -> dict[str, Any]:
        return trained_state(self.head, self.head_opt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_trained_state(self.head, self.head_opt, state, self.io.config.lr)

    def log_fields(self) -> dict[str, Any]:
        if self._loss is not None:
            self._loss_last = float(self._loss)
        return {"local_loss": self._loss_last}

    def summary_fields(self) -> dict[str, Any]:
        return {"local_loss_last": self._loss_last}
