"""The pipeline-parallel baselines: the same task, stages and data trained by ``torch.distributed.pipelining``.

``--mode gpipe`` and ``--mode 1f1b`` run ``PipelineStage`` with ``ScheduleGPipe``
or ``Schedule1F1B`` (PyTorch's own, not a re-implementation): each batch is
split into ``--microbatches`` microbatches, gradients are averaged over them,
and every stage steps its Adam once per batch, as locked backprop does. The
stages, blocks, seed, data order, optimizer and outputs (summary.json,
metrics.jsonl, snapshots) are those of :func:`dni_async.pipeline.run_pipeline`,
so the benchmark compares the methods, not the set-ups.

The last stage computes the loss, so it reads the data too (the same seeded
order as stage 0). Evaluation after training sends each eval batch forward
with plain ``torch.distributed`` send/recv (eval mode, no microbatches).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import pipelining
from torch.distributed.pipelining import PipelineStage

from .config import PipelineConfig
from .divergence import check_finite
from .host_sync import host_sync
from .lifecycle import stage_run
from .metrics import tee
from .optim import fast_adam
from .runtime import StageEnv
from .snapshots import Snapshots
from .task import Item, PipelineTask, Sum, unpack
from .tensorboard import stage_board

__all__ = ["run_pipelining"]

log = logging.getLogger("dni_async")


def _broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (the control plane, gloo)."""
    box = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(box, src=0)
    return int(box.item())


@torch.no_grad()
def _evaluate(block: nn.Module, env: StageEnv, shapes: list[torch.Size], task: PipelineTask,
              items: list[Item] | None) -> dict[str, Any] | None:
    """One pass over the eval items through every stage (eval mode); the summary on the last stage."""
    first, last = env.rank == 0, env.rank == env.world_size - 1
    count = _broadcast_int(len(items) if first and items is not None else 0)
    sums: dict[str, Sum] = {}
    block.eval()
    for k in range(count):
        if first:
            assert items is not None
            x = unpack(items[k])[0].to(env.device)
        else:
            size = torch.zeros(1, dtype=torch.int64)
            dist.recv(size, src=env.rank - 1)
            x = torch.empty(int(size.item()), *shapes[env.rank - 1][1:])
            dist.recv(x, src=env.rank - 1)
            x = x.to(env.device)
        h = block(x)
        if last:
            assert items is not None
            task.add_metrics(sums, h, unpack(items[k])[1].to(env.device))
        else:
            dist.send(torch.tensor([h.shape[0]], dtype=torch.int64), dst=env.rank + 1)
            dist.send(h.detach().cpu().contiguous(), dst=env.rank + 1)
    block.train()
    return task.summary(sums) if last else None


class _ThroughHost(nn.Module):
    """A block on a GPU that another stage shares, for torch's schedule on the host: its input goes to the GPU,
    its output comes back (NCCL cannot put two ranks on one GPU, and gloo sends host tensors only)."""

    def __init__(self, block: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.block, self.device = block, device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.to(self.device)).cpu()  # type: ignore[no-any-return]


def shares_a_gpu(devices: list[str] | None) -> bool:
    """Whether ``--devices`` puts two stages on one GPU."""
    gpus = [d.strip().removeprefix("cuda:") for d in devices or [] if d.strip() != "cpu"]
    return len(set(gpus)) < len(gpus)


def run_pipelining(task: PipelineTask, config: PipelineConfig) -> dict[str, Any] | None:
    """:func:`dni_async.pipeline.run_pipeline` for ``--mode gpipe`` / ``1f1b``: this process's stage of
    ``task`` under that schedule; the same checks, errors, outputs and return value."""
    with stage_run(task, config) as run, stage_board(config, run.env.rank) as board:
        env, shapes = run.env, run.shapes
        first, last = env.rank == 0, env.rank == config.stages - 1
        data = task.data() if first or last else None
        if env.is_main:
            log.info("config: %s", config.to_dict())
        block = run.stages[env.rank].to(env.device)
        # stages on GPUs of their own talk over NCCL; stages that share a GPU through the host, over gloo
        through_host = env.device.type == "cuda" and shares_a_gpu(config.devices)
        schedule_device = torch.device("cpu") if through_host else env.device
        group = dist.new_group(backend="nccl") if schedule_device.type == "cuda" else None
        # Shapes given up front (PipelineStage's static mode). Otherwise it infers them at the first step by
        # running the block on uninitialised placeholders in training mode, which puts garbage into BatchNorm's
        # running statistics, and sends the shapes between stages as pickled objects.
        micro = config.batch_size // config.microbatches
        in_shape = task.input_shape if first else tuple(shapes[env.rank - 1][1:])
        stage = PipelineStage(_ThroughHost(block, env.device) if through_host else block, env.rank, config.stages,
                              schedule_device, group=group,
                              input_args=torch.empty(micro, *in_shape, dtype=task.input_dtype, device="meta",
                                                     requires_grad=not first),
                              output_args=torch.empty(micro, *shapes[env.rank][1:], device="meta",
                                                      requires_grad=True))
        schedule_cls = getattr(pipelining, str(config.method.schedule))
        schedule = schedule_cls(stage, config.microbatches, loss_fn=task.loss_fn)
        opt = fast_adam(block.parameters(), config.lr)
        steps = _broadcast_int(data[1] if first and data is not None else 0)
        run.begin()
        assert run.metrics is not None
        metrics = tee(run.metrics, board)
        snapshots = Snapshots(block, config.snapshot_every)
        batches = data[0] if data is not None else None
        bar = run.progress(steps)
        run.started()
        step_times: list[float] = []
        losses: list[torch.Tensor] = []
        for t in range(steps):
            if config.time_budget is not None and not _broadcast_int(
                    int(time.perf_counter() - run.start < config.time_budget)):
                log.info("time budget of %.1f s spent after %d steps", config.time_budget, t)
                break
            opt.zero_grad(set_to_none=True)
            if first or last:
                assert batches is not None
                x, y, _ = unpack(next(batches))
            if first:
                schedule.step(x.to(schedule_device))
            elif last:
                losses = []
                schedule.step(target=y.to(schedule_device), losses=losses, return_outputs=False)
            else:
                schedule.step()
            opt.step()
            step_times.append(time.perf_counter())
            snapshots.maybe_take(t + 1)
            if (t + 1) % config.log_every == 0:
                with host_sync("metrics line"):
                    line = {"loss": float(torch.stack(losses).detach().mean())} if last and losses else {}
                    if line:
                        metrics.write({"stage": env.rank, "step": t, "time": time.time(), **line})
                    check_finite(t, env.rank, line, block)
            bar.update(1)
        bar.close()
        run.stopped()
        eval_items = None
        if data is not None:
            eval_items = data[2](True) if callable(data[2]) else data[2]
        final_eval = _evaluate(block, env, shapes, task, eval_items)
        curve_evals = {}
        for step in snapshots.steps():
            snapshots.select(step)
            summary = _evaluate(block, env, shapes, task, eval_items)
            if summary is not None:
                curve_evals[step] = summary
        snapshots.select(None)
        per_stage = {"stage": env.rank, "pid": os.getpid(), "device": str(env.device), "steps": len(step_times),
                     "cpu_fraction": round(run.cpu_s / (run.wall * config.threads_per_stage), 4),
                     "loss_last": float(torch.stack(losses).detach().mean()) if losses else None}
        return run.finish(per_stage, step_times, snapshots, final_eval, curve_evals,
                          data[3] if data is not None else None, "torch.distributed.pipelining",
                          microbatches=config.microbatches)
