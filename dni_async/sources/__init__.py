"""Gradient sources: where a stage's dL/dh comes from, one implementation per method (see [Note: gradient sources])."""

from __future__ import annotations

from typing import Callable

from .base import GradientSource
from .delayed import Delayed
from .io import StageIO
from .local import Local, local_head
from .locked import Locked
from .loss import Loss, Score
from .synthetic import Synthetic, build_sg

__all__ = ["GradientSource", "StageIO", "Delayed", "Local", "Locked", "Loss", "Synthetic", "build_sg", "build_source",
           "local_head"]

Shapes = list[tuple[int, ...]]


def _synthetic(io: StageIO, shapes: Shapes) -> GradientSource:
    config, task = io.config, io.task
    context = task.num_classes if config.method.sg_context else 0
    sg = build_sg(config.sg, shapes[io.stage], config.sg_hidden, context, classes=task.num_classes)
    return Synthetic(io, sg.to(io.device))


def _local(io: StageIO, shapes: Shapes) -> GradientSource:
    return Local(io, local_head(shapes[io.stage], shapes[-1]).to(io.device))


_BUILDERS: dict[str, Callable[[StageIO, Shapes], GradientSource]] = {
    "locked": lambda io, shapes: Locked(io), "synthetic": _synthetic, "delayed": lambda io, shapes: Delayed(io),
    "local": _local,
}


def build_source(io: StageIO, shapes: Shapes, score: Score) -> GradientSource:
    """The gradient source of stage ``io.stage`` under ``io.config.method``: the loss on the last stage.

    Args:
        io: the stage's shared parts.
        shapes: every stage's output shape, per example.
        score: how the last stage scores training batches (tasks with ``train_metrics``).
    """
    if io.last:
        return Loss(io, score)
    source = io.config.method.source
    assert source is not None, f"--mode {io.config.mode} is not run by the stage loop"
    return _BUILDERS[source](io, shapes)
