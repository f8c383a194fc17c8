"""The gradient-source interface: where a stage's dL/dh comes from, and what it does with the gradients that return."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..transport import Message
from .io import StageIO

__all__ = ["GradientSource", "load_trained_state", "trained_state"]

# [Note: gradient sources]
#
# The stage loop (stage.py) is the same for every method; a method is the
# source of the gradient a stage updates with. At step t, with h = block(x_t):
#
#   loop                    source (locked / synthetic / delayed / local / loss)
#   ----                    ------------------------------------------------
#                           before_forward(t)   wait while the window is full
#   h = forward(t, x)       forward(t, x)       delayed: stash the weights used
#   send act(t, h, y)
#                           update(t, x, h, y)  the step's update (or, delayed, none yet)
#                           absorb(t)           gradients that came back: never waits
#   hooks.after_step(t)
#
# A source owns its state (SG and its optimizer, stashes, graphs, head) and
# its state_dict. `flush` empties what is in flight (delayed: apply every
# outstanding gradient) before an evaluation or a checkpoint. `on_gradient`
# handles one returned gradient wherever it is received: between steps, while
# a send forward is blocked (`absorbs`: see StageIO.send's callers), while the
# stage waits for its next input, and at shutdown.


def trained_state(module: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A module a source trains and its optimizer, for a checkpoint."""
    return {"module": module.state_dict(), "opt": opt.state_dict()}


def load_trained_state(module: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any], lr: float) -> None:
    """Restore :func:`trained_state`; the learning rate is this run's ``lr``, not the checkpoint's."""
    module.load_state_dict(state["module"])
    opt.load_state_dict(state["opt"])
    for group in opt.param_groups:
        group["lr"] = lr


class GradientSource:
    """Base class: one implementation per method (``dni_async.methods.SOURCES``) plus the last stage's loss.

    Args:
        io: the stage's shared parts.
    """

    absorbs = False
    """Gradients keep coming back between steps (the loop feeds them to :meth:`on_gradient` whenever it waits)."""

    def __init__(self, io: StageIO) -> None:
        self.io = io

    def before_forward(self, t: int) -> None:
        """Called before step ``t``'s forward pass (window waits)."""

    def forward(self, t: int, x: torch.Tensor) -> torch.Tensor:
        """Step ``t``'s forward pass."""
        return self.io.block(x)  # type: ignore[no-any-return]

    def update(self, t: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, meta: dict[str, Any]) -> None:
        """Step ``t``'s update, once its activation has been sent on."""
        raise NotImplementedError

    def absorb(self, t: int) -> None:
        """Handle every gradient that has already come back (never waits)."""
        while self.absorbs and (msg := self.io.gradient(t, wait=False)) is not None:
            self.on_gradient(msg, t)

    def on_gradient(self, msg: Message, t: int) -> None:
        """One gradient from the next stage (already checked by :meth:`StageIO.gradient`), at step ``t``."""
        self.io.reject(msg, f"{self.io.config.mode} stages expect no gradient here")

    def pending(self) -> int:
        """Steps whose gradient this source still expects."""
        return 0

    def wait_while_pending(self, t: int, limit: int) -> None:
        """Take gradients (waiting for them) until fewer than ``limit`` steps are pending."""
        while self.pending() >= limit:
            msg = self.io.gradient(t, wait=True)
            assert msg is not None
            self.on_gradient(msg, t)

    def flush(self, t: int) -> None:
        """Leave nothing in flight that the block still owes an update to (before an evaluation, a checkpoint)."""

    def state_dict(self) -> dict[str, Any]:
        """What resuming this source needs (between steps, after :meth:`flush`)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""

    def log_fields(self) -> dict[str, Any]:
        """This source's figures for a metrics line (a CPU-GPU sync point: called at log time only)."""
        return {}

    def summary_fields(self) -> dict[str, Any]:
        """This source's figures for summary.json's ``per_stage``."""
        return {}
