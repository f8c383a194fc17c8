"""What every gradient source of a stage shares: its block and optimizer, its channels, its trace and hooks."""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
from torch import nn

from ..config import PipelineConfig
from ..hooks import Hooks
from ..metrics import StageStats
from ..optim import fast_adam
from ..task import PipelineTask
from ..trace import Trace
from ..transport import Message, Transport

__all__ = ["StageIO"]

log = logging.getLogger("dni_async")


class StageIO:
    """One stage's block, optimizer, channels, counters, trace and hooks, as the gradient sources use them.

    The arguments are :class:`~dni_async.stage.StageWorker`'s, plus the stage's ``trace`` and its ``hooks``
    (``before_update`` runs before every optimizer step).
    """

    def __init__(self, stage: int, num_stages: int, block: nn.Module, transport: Transport, config: PipelineConfig,
                 device: torch.device, task: PipelineTask, trace: Trace, hooks: Hooks) -> None:
        self.stage, self.num_stages = stage, num_stages
        self.first, self.last = stage == 0, stage == num_stages - 1
        self.block, self.transport, self.config, self.device, self.task = block, transport, config, device, task
        self.trace, self.hooks = trace, hooks
        self.opt = fast_adam(block.parameters(), config.lr)
        self.stats = StageStats(stage=stage, device=str(device))
        self.latest = task.latest
        self.needs_input_grad = not self.first and config.method.sends_gradients
        """Whether this stage computes its input's gradient (to send back): not on stage 0, not in ``local``."""
        self.blocked_s = 0.0
        """Seconds spent blocked on peers (sends under backpressure, waits for gradients)."""
        self.staleness: list[int] = []
        """Steps between each gradient's step and the stage's step when it arrived, since the last metrics line."""
        self.while_sending_forward: Callable[[], None] | None = None
        """What a send forward does while backpressure blocks it (see :meth:`send_forward`)."""

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on this stage's device, without making the host wait: a host tensor goes through
        page-locked memory (received tensors already are) with ``non_blocking``."""
        if self.device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    # ------------------------------------------------------------ sending

    def send(self, dst: int, msg: Message, while_blocked: Callable[[], None] | None = None) -> None:
        """Send ``msg`` (the time blocked counts in :attr:`blocked_s`)."""
        start = time.perf_counter()
        self.transport.send(dst, msg, while_blocked)
        self.blocked_s += time.perf_counter() - start

    def send_forward(self, msg: Message) -> None:
        """Send ``msg`` to the next stage.

        Blocked sending forward, a stage whose gradients come back asynchronously
        keeps taking them (:attr:`while_sending_forward`): the next stage may
        itself be blocked sending them, and only this keeps the two from waiting
        on each other forever. (In backprop no gradient can be in flight while a
        forward send waits.)
        """
        self.send(self.stage + 1, msg, self.while_sending_forward)
        if msg.kind == "act":
            self.trace("S", msg.step)

    def send_grad(self, step: int, x: torch.Tensor) -> None:
        """Send the gradient of this stage's input ``x`` for ``step`` back, with the figures relayed from above."""
        if not self.needs_input_grad:
            return
        assert x.grad is not None, "the input's gradient was not computed"
        self.send(self.stage - 1, Message("grad", step, self.stage, [x.grad], dict(self.latest)))
        self.trace("B", step)

    # ---------------------------------------------------------- receiving

    def gradient(self, t: int, wait: bool) -> Message | None:
        """The next gradient from the next stage, for a stage at step ``t``; None if none is there (``wait`` False).

        Raises:
            RuntimeError: for a message that is not a gradient.
        """
        while (msg := self.next_backward(wait)) is not None:
            if self.check_gradient(msg, t):
                return msg
        return None

    def check_gradient(self, msg: Message, t: int) -> bool:
        """Whether ``msg``, received at step ``t``, is a gradient to use; it is traced and its relayed figures
        taken. Gradients from the future are rejected and counted.

        Raises:
            RuntimeError: for a message that is not a gradient.
        """
        if msg.kind != "grad":
            raise RuntimeError(f"unexpected {msg.kind!r} from stage {msg.src} at step {t}")
        if msg.step > t:
            self.reject(msg, f"a gradient from the future (this stage is at step {t})")
            return False
        self.latest.update(msg.meta)
        self.staleness.append(t - msg.step)
        self.stats.max_staleness = max(self.stats.max_staleness, t - msg.step)
        self.trace("G", msg.step)
        return True

    def next_backward(self, wait: bool) -> Message | None:
        """The next message from the next stage (gradient or ``stop``); None if none is there (``wait`` False)."""
        if not wait:
            return self.transport.recv("backward", timeout=0)
        start = time.perf_counter()
        msg = self.transport.recv("backward", timeout=None)
        self.blocked_s += time.perf_counter() - start
        return msg

    def target(self, msg: Message, like: torch.Tensor) -> torch.Tensor:
        """The gradient ``msg`` carries, on this stage's device, checked against the activation ``like``.

        Raises:
            RuntimeError: when its shape is not the activation's.
        """
        grad = self.to_device(msg.tensors[0])
        if grad.shape != like.shape:
            raise RuntimeError(f"gradient for step {msg.step} from stage {msg.src} has shape "
                               f"{tuple(grad.shape)}, the activation has {tuple(like.shape)}")
        return grad

    def reject(self, msg: Message, why: str) -> None:
        """Drop a message whose step cannot be right, log it (the first few) and count it."""
        self.stats.rejected_steps += 1
        if self.stats.rejected_steps <= 10:
            log.warning("rejected %s for step %d from stage %d: %s", msg.kind, msg.step,
                        msg.src, why)

    # ------------------------------------------------------------ updating

    def apply(self, step: int, *extra: torch.optim.Optimizer) -> None:
        """Step the block's optimizer (and ``extra`` ones) on the gradients of ``step`` just computed."""
        self.hooks.before_update(step)
        for opt in (self.opt, *extra):
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.trace("U", step)
