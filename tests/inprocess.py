"""Stage workers without processes: scripted neighbours, and two real stages joined in one process."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dni_async.config import PipelineConfig
from dni_async.metrics import JsonLines
from dni_async.stage import StageWorker
from dni_async.task import PipelineTask
from dni_async.transport import Message
from dni_async.transport.memory import MemoryTransport

Respond = Callable[[Message], torch.Tensor]


class Scripted(MemoryTransport):
    """A stage's channels with a scripted next stage: the gradient of step s comes back when the stage sends the
    activation of step s + ``delay``, or sooner if the stage waits for it; ``stop`` brings back every gradient
    still owed, then ``stop``. With ``gradients=False`` (a ``local`` pipeline) none ever comes back.

    Args:
        respond: the gradient of an activation (default: ones of its shape).
        blocked_sends: that many sends forward block once (and must take gradients meanwhile).
    """

    def __init__(self, stage: int, num_stages: int, delay: int = 0, gradients: bool = True,
                 respond: Respond | None = None, blocked_sends: int = 0) -> None:
        super().__init__(stage, num_stages)
        self.delay, self.gradients, self.blocked_sends = delay, gradients, blocked_sends
        self.respond = respond or (lambda msg: torch.ones_like(msg.tensors[0]))
        self.owed: dict[int, torch.Tensor] = {}

    def send(self, dst: int, msg: Message, while_blocked: Callable[[], None] | None = None) -> None:
        if dst > self.stage and self.blocked_sends and msg.kind in ("act", "eval"):
            self.blocked_sends -= 1
            assert while_blocked is not None, "a stage blocked sending forward must take the gradients coming back"
            while_blocked()
        super().send(dst, msg, while_blocked)
        if dst < self.stage or msg.kind == "eval":
            return
        if msg.kind == "act":
            gradient = self.respond(msg)
            if self.gradients:
                self.owed[msg.step] = gradient
        due = [s for s in self.owed if msg.kind == "stop" or s <= msg.step - self.delay]
        for step in sorted(due):
            self.inbox["backward"].append(Message("grad", step, self.stage + 1, [self.owed.pop(step)]))
        if msg.kind == "stop":
            self.inbox["backward"].append(Message("stop", msg.step, self.stage + 1))

    def recv(self, direction: str, timeout: float | None = None) -> Message | None:
        if direction == "backward" and timeout is None and not self.inbox[direction] and self.owed:
            step = min(self.owed)  # a stage waits: its oldest gradient arrives
            self.inbox[direction].append(Message("grad", step, self.stage + 1, [self.owed.pop(step)]))
        return super().recv(direction, timeout)


def small_task(blocks: list[nn.Module], in_features: int = 4, classes: int = 3) -> PipelineTask:
    return PipelineTask(name="test", blocks=blocks, loss_fn=F.cross_entropy, input_shape=(in_features,),
                        num_classes=classes, data=lambda: (iter([]), 0, [], "none"))


def worker(tmp_path: Path, stage: int, num_stages: int, blocks: list[nn.Module], transport: MemoryTransport,
           shapes: list[tuple[int, ...]], **overrides: Any) -> StageWorker:
    """Stage ``stage`` of a pipeline whose stage i is ``blocks[i]`` (output shape ``shapes[i]`` per example)."""
    settings: dict[str, Any] = {"stages": num_stages, "mode": "dni", "run_dir": str(tmp_path), "log_every": 1000,
                                **overrides}
    return StageWorker(stage, num_stages, blocks[stage], transport, PipelineConfig(**settings), torch.device("cpu"),
                       small_task(blocks), shapes, JsonLines(tmp_path / f"m{stage}.jsonl"), None, keep_trace=True)


def batches(n: int, seed: int = 0, size: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def mlp_blocks(seed: int = 0) -> list[nn.Module]:
    """Two stages: Linear(4, 6) + BatchNorm + ReLU, then Linear(6, 3)."""
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU()), nn.Linear(6, 3)]


class TwoStages:
    """Stages 0 and 1 of a real 2-stage pipeline in one process: stage 1 trains on each activation the moment
    stage 0 sends it, and its gradient reaches stage 0 ``delay`` steps later (or when stage 0 waits for it)."""

    def __init__(self, tmp_path: Path, mode: str, delay: int, seed: int = 0, **overrides: Any) -> None:
        self.blocks = mlp_blocks(seed)
        shapes = [(6,), (3,)]
        self.last_in = MemoryTransport(1, 2)
        self.second = worker(tmp_path, 1, 2, self.blocks, self.last_in, shapes, mode=mode, **overrides)
        self.returned: dict[int, torch.Tensor] = {}  # the gradient stage 1 sent back for each step
        self.link = Scripted(0, 2, delay=delay, gradients=self.second.config.method.sends_gradients,
                             respond=self._stage_1)
        self.first = worker(tmp_path, 0, 2, self.blocks, self.link, shapes, mode=mode, **overrides)

    def _stage_1(self, msg: Message) -> torch.Tensor:
        h, y = msg.tensors
        self.second.train_step(msg.step, h, y, msg.meta)
        grads = [m for m in self.last_in.sent if m.kind == "grad" and m.step == msg.step]
        self.returned[msg.step] = grads[-1].tensors[0] if grads else torch.zeros(0)
        return self.returned[msg.step]

    def train(self, items: list[tuple[torch.Tensor, torch.Tensor]], start: int = 0) -> Iterator[int]:
        """Train stage 0 (and so stage 1) on ``items``, from step ``start``; yields each step before it runs."""
        for t, (x, y) in enumerate(items, start):
            yield t
            self.first.train_step(t, x, y, {})

    def flush(self) -> None:
        self.first.source.flush(self.first.stats.steps)


def round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` through torch.save and a weights-only load, as a checkpoint file carries it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # type: ignore[no-any-return]
