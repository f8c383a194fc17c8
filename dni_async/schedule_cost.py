"""Each stage's batch under torch.distributed.pipelining's own schedule, timed alone: what gpipe / 1f1b stages cost.

``stage_cost.stage_step_times`` times the stage loop's step; a gpipe or 1f1b
stage runs ``PipelineStage`` and its schedule instead, which do more per
microbatch (on the benchmark model, up to 34% more per batch than locked
backprop's step on one microbatch, summed over the batch: docs/benchmark.md). This module times
the schedule on each stage's block in a one-process world: the stage is first
and last there, so the block's input is given with ``requires_grad`` where the
real stage would send its gradient back, and a block that is not the last ends
in the loss ``(output * g).sum()`` with a fixed ``g`` of the output's shape (the
gradient the next stage would send). Transport and waiting are not in it.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed import pipelining
from torch.distributed.pipelining import PipelineStage

from .config import PipelineConfig
from .stage_cost import alone, interleaved_medians
from .task import PipelineTask

__all__ = ["schedule_batch_times", "scale_microbatch_costs"]


def schedule_batch_times(task: PipelineTask, config: PipelineConfig, repeats: int = 10,
                         warmup: int = 3) -> list[float]:
    """Per stage: median seconds of one batch of ``config.mode``'s schedule (``--microbatches`` microbatches,
    forward and backward) on that stage's block alone, in a one-process gloo world; the optimizer step not in it.

    Raises:
        ValueError: for a mode that is not a pipelining schedule, or a process that already has a process group.
    """
    if not config.method.pipelining:
        raise ValueError(f"--mode {config.mode} has no pipelining schedule to time")
    if dist.is_initialized():
        raise ValueError("schedule_batch_times needs a process without a torch.distributed process group")
    start = alone(task, config)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        last = len(start.stages) - 1
        fns = [_batch(task, config, block, start.input_of(i), start.y, start.shapes[i], i == last, i > 0)
               for i, block in enumerate(start.stages)]
        return interleaved_medians(fns, repeats, warmup)
    finally:
        dist.destroy_process_group()


def _batch(task: PipelineTask, config: PipelineConfig, block: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor,
           out_shape: torch.Size, last: bool, input_grad: bool) -> Callable[[], None]:
    """One batch of the schedule on a copy of ``block`` (gradients zeroed before, not stepped)."""
    block = copy.deepcopy(block)
    m = config.microbatches
    micro = (x.shape[0] // m, *out_shape[1:])
    g = torch.randn(micro) / x.shape[0]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = task.loss_fn if last else \
        (lambda h, _: (h * g).sum())
    stage = PipelineStage(block, 0, 1, torch.device("cpu"),
                          input_args=torch.empty(x.shape[0] // m, *x.shape[1:], dtype=x.dtype, device="meta",
                                                 requires_grad=input_grad),
                          output_args=torch.empty(micro, device="meta", requires_grad=True))
    schedule = getattr(pipelining, str(config.method.schedule))(stage, m, loss_fn=loss)
    inp = x.detach().requires_grad_(input_grad)

    def step() -> None:
        block.zero_grad(set_to_none=True)
        inp.grad = None
        schedule.step(inp, target=y)

    return step


def scale_microbatch_costs(costs: list[dict[str, Any]], batch_s: list[float],
                           microbatches: int) -> list[dict[str, Any]]:
    """The stage loop's costs of one microbatch (``stage_step_times`` of locked backprop), their forward and
    backward scaled per stage so that ``microbatches`` of them take ``batch_s`` (the schedule's batch alone); the
    optimizer step, once a batch, as it was."""
    out = []
    for cost, total in zip(costs, batch_s):
        work = cost["forward_s"] + cost["backward_s"] - cost["optimizer_s"]
        k = total / (microbatches * work) if work > 0 else 1.0
        out.append({**cost, "forward_s": cost["forward_s"] * k,
                    "backward_s": (cost["backward_s"] - cost["optimizer_s"]) * k + cost["optimizer_s"],
                    "schedule_scale": k})
    return out
