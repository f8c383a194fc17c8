"""Each stage's training step timed alone, in one process: the ideal throughput of a pipeline of those stages."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import PipelineConfig
from .optim import fast_adam
from .pipeline import build_sg, validate
from .synthetic import DNINetwork, synthetic_gradient
from .task import PipelineTask, unpack

__all__ = ["stage_step_times"]


def _interleaved_medians(fns: list[Callable[[], None]], repeats: int, warmup: int) -> list[float]:
    """Median seconds of each function, timed round-robin so that a slow spell of the machine hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _one_stage(block: nn.Module, inp: torch.Tensor, y: torch.Tensor, last: bool, task: PipelineTask,
               config: PipelineConfig, sg: DNINetwork | None,
               out_shape: tuple[int, ...]) -> tuple[Callable[[], None], Callable[[], None] | None]:
    """One stage's training step, and its SG work alone (None without an SG), as functions to time."""
    opt = fast_adam(block.parameters(), config.lr)
    sg_opt = fast_adam(sg.parameters(), config.sg_lr) if sg is not None else None
    ctx = task.context(y) if config.mode == "cdni" else None
    target = torch.randn(inp.shape[0], *out_shape)

    def sg_forward(h: torch.Tensor) -> torch.Tensor:
        assert sg is not None
        return synthetic_gradient(sg, h, ctx)

    def sg_update(h: torch.Tensor) -> None:
        assert sg_opt is not None
        loss = F.mse_loss(sg_forward(h), target)
        sg_opt.zero_grad(set_to_none=True)
        loss.backward()
        sg_opt.step()

    def step() -> None:
        h = block(inp.detach().requires_grad_(inp.requires_grad))  # stages > 0 send their input's gradient
        if last:
            task.loss_fn(h, y).backward()
        else:
            if sg is not None:
                with torch.no_grad():
                    g = sg_forward(h.detach()) / h.shape[0]
            else:
                g = target / h.shape[0]  # backprop: the gradient the next stage sends
            h.backward(g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sg is not None:
            sg_update(h.detach())

    def sg_work() -> None:
        h = target  # an activation-shaped tensor
        with torch.no_grad():
            sg_forward(h)
        sg_update(h)

    return step, sg_work if sg is not None else None


def stage_step_times(task: PipelineTask, config: PipelineConfig, repeats: int = 20,
                     warmup: int = 5) -> list[dict[str, Any]]:
    """Median seconds of one training step of each stage alone, with ``config.threads_per_stage`` threads.

    A step is what the stage computes for one batch in ``config.mode``: its
    block's forward, backward and Adam step, plus on the last stage the loss,
    and on the other stages in ``dni`` / ``cdni`` the SG's forward (the
    synthetic gradient) and its update on one target (forward, backward, Adam
    step). Transport, waiting and Python outside the step are not in it, so
    ``batch / max(step_s)`` is the throughput a pipeline of these stages could
    reach at best. Runs on copies of the blocks, on the task's first batch;
    the stages take turns step by step, so that the machine's slow spells
    (this 2-core one has them) fall on every stage alike.

    Returns:
        Per stage: ``stage``, ``step_s`` (all of it), ``sg_s`` (the SG part, 0 without one).
    """
    torch.set_num_threads(config.threads_per_stage)
    stages, shapes = validate(task, config)
    x, y, _ = unpack(next(iter(task.data()[0])))
    fns: list[Callable[[], None]] = []
    has_sg = []
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        sg = None
        if config.mode in ("dni", "cdni") and not last:
            sg = build_sg(config.sg, tuple(shapes[i][1:]), config.sg_hidden,
                          task.num_classes if config.mode == "cdni" else 0)
        inp = x if i == 0 else torch.randn(x.shape[0], *shapes[i - 1][1:]).requires_grad_()
        step, sg_work = _one_stage(copy.deepcopy(stage), inp, y, last, task, config, sg, tuple(shapes[i][1:]))
        fns.append(step)
        has_sg.append(sg_work is not None)
        if sg_work is not None:
            fns.append(sg_work)
    medians = iter(_interleaved_medians(fns, repeats, warmup))
    return [{"stage": i, "step_s": next(medians), "sg_s": next(medians) if with_sg else 0.0}
            for i, with_sg in enumerate(has_sg)]
