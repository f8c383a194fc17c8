"""The Python API of the multi-process runtime: run one stage of a pipeline in this process."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import Checkpointer, check_compatible, load_stage, newest_complete
from .config import PipelineConfig
from .metrics import JsonLines, steady_samples_per_s, write_json_atomic
from .partition import check_stage_shapes, partition
from .runtime import AbortWatchdog, StageEnv, gather_json, init_stage, resolve_device, shutdown
from .snapshots import accuracy_curve
from .stage import StageWorker
from .synthetic import Conv2dDNI, DNINetwork, LinearBatchNormDNI, LinearDNI, LinearSigmoidDNI, LowRankDNI
from .task import PipelineTask
from .transport import PeerLost, TransportOptions, make_transport

__all__ = ["PipelineTask", "build_sg", "run_pipeline", "setup_logging", "start_stage", "validate", "write_summary"]

log = logging.getLogger("dni_async")
RESUME_KEY = "dni_async/resume_set"


def build_sg(kind: str, shape: int | tuple[int, ...], hidden: int, context_size: int) -> DNINetwork:
    """The SG module of a stage whose output has ``shape`` (per example: ``features`` or ``(C, H, W)``).

    Feature maps get a ``Conv2dDNI`` (``linear``: one 3x3 convolution; ``mlp``:
    one hidden convolution of ``hidden`` channels); vectors get the ``kind`` asked for.
    """
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    features = dims[0] if len(dims) == 3 else dims[-1]
    if len(dims) == 3:
        if kind not in ("linear", "mlp"):
            raise ValueError(f"--sg {kind} has no convolutional form; use linear or mlp for feature maps")
        return Conv2dDNI(features, hidden, features, num_layers=0 if kind == "linear" else 1,
                         context_size=context_size)
    if kind == "linear":
        return LinearDNI(features, hidden, features, num_layers=0, context_size=context_size)
    if kind == "mlp":
        return LinearDNI(features, hidden, features, num_layers=1, context_size=context_size)
    if kind == "low-rank":
        return LowRankDNI(features, hidden, features, context_size=context_size)
    if kind == "linear-bn":
        return LinearBatchNormDNI(features, hidden, features, context_size=context_size)
    if kind == "linear-sigmoid":
        return LinearSigmoidDNI(features, hidden, features, context_size=context_size)
    raise ValueError(f"unknown SG kind {kind!r}")


class _StageFormatter(logging.Formatter):
    def __init__(self, stage: int | str) -> None:
        super().__init__(f"%(asctime)s [stage {stage}] %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(stage: int | str) -> None:
    """stdlib logging with the stage in every line (stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_StageFormatter(stage))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def write_stage_file(config: PipelineConfig, env: StageEnv, endpoint: str | None, status: str) -> None:
    write_json_atomic(Path(config.run_dir) / "stages" / f"stage-{env.rank}.json", {
        "stage": env.rank, "rank": env.rank, "pid": os.getpid(), "host": env.host, "device": str(env.device),
        "threads": config.threads_per_stage, "transport": config.transport,
        "endpoints": {"data": endpoint} if endpoint else {}, "status": status,
    })


def clear_outputs(run_dir: Path, resumed: bool) -> None:
    """Remove a previous run's outputs from ``run_dir`` (shared files are appended to); a resumed run appends to
    metrics.jsonl. Checkpoints are never removed here (see :func:`validate`)."""
    for name in ("summary.json",) if resumed else ("metrics.jsonl", "summary.json"):
        (run_dir / name).unlink(missing_ok=True)
    for folder in ("events", "grads", "stages"):
        if (run_dir / folder).is_dir():
            shutil.rmtree(run_dir / folder)


def validate(task: PipelineTask, config: PipelineConfig,
             check_resume: bool = True) -> tuple[list[nn.Sequential], list[torch.Size]]:
    """Check what can be checked before any process starts; return the stages and their output shapes.

    ``check_resume=False`` leaves out verifying the ``--resume`` set (reading and hashing every file of it):
    the stage processes do not repeat it, rank 0 verifies the set it picks.

    Raises:
        ValueError: more stages than blocks, a device that is not there, stage
            shapes that do not fit together; a checkpoint set that does not fit
            this config; checkpoints of an earlier run where this one would write its own.
        FileNotFoundError: ``--resume`` names a folder without a complete checkpoint set.
    """
    for i, device in enumerate(config.devices or []):
        resolve_device(device, i)
    stages = partition(task.blocks, config.stages)
    if config.resume and check_resume:
        _, manifest = newest_complete(config.resume)
        check_compatible(manifest, config.to_dict())
    own = Path(config.run_dir) / "checkpoints"
    continuing = config.resume is not None and Path(config.resume).resolve() == Path(config.run_dir).resolve()
    if config.checkpoint_every and not continuing and any(own.glob("step-*")):
        raise ValueError(f"{own} holds checkpoints of an earlier run: continue it with --resume {config.run_dir}, "
                         f"or choose another --run-dir, or remove them")
    return stages, check_stage_shapes(stages, torch.zeros(2, *task.input_shape, dtype=task.input_dtype))


def _resume_state(config: PipelineConfig, env: StageEnv) -> dict[str, Any] | None:
    """This stage's state from the set rank 0 picked (the newest complete one in ``--resume``); None: no resume."""
    if not config.resume:
        return None
    if env.is_main:
        set_dir, manifest = newest_complete(config.resume)
        check_compatible(manifest, config.to_dict())
        env.store.set(RESUME_KEY, str(set_dir))
        log.info("resuming from %s (step %d)", set_dir, manifest["step"])
    return load_stage(Path(env.store.get(RESUME_KEY).decode()), env.rank)


def start_stage(task: PipelineTask, config: PipelineConfig) -> tuple[list[nn.Sequential], list[torch.Size],
                                                                    StageEnv, AbortWatchdog]:
    """What every stage process does first: check the input, join the torchrun world (gloo control plane),
    log with its stage in every line, set its threads, start the abort watchdog."""
    stages, shapes = validate(task, config, check_resume=False)
    env = init_stage(config.stages, config.devices)
    setup_logging(env.rank)
    torch.set_num_threads(config.threads_per_stage)
    return stages, shapes, env, AbortWatchdog(env, peer_timeout=config.peer_timeout).start()


def write_summary(config: PipelineConfig, task: PipelineTask, reports: list[dict[str, Any]], wall: float,
                  transport: str, **extra: Any) -> dict[str, Any]:
    """Rank 0: summary.json from every stage's report (stage order); returned too."""
    summary = {
        "mode": config.mode, "task": task.name, "stages": config.stages, "transport": transport,
        "steps": reports[0]["per_stage"]["steps"], "batch_size": config.batch_size, **extra,
        "wall_s": round(wall, 3), "samples_per_s": reports[-1]["samples_per_s"],
        "final_eval": reports[-1]["final_eval"], "evals": reports[-1].get("evals", {}),
        "task_result": reports[0].get("task_result"), "dataset": reports[0]["dataset"],
        "curve": accuracy_curve(reports, reports[0]["start_time"]),
        "threads_per_stage": config.threads_per_stage,
        "per_stage": [r["per_stage"] for r in reports], "config": config.to_dict(),
    }
    write_json_atomic(Path(config.run_dir) / "summary.json", summary)
    log.info("done: %s", {k: summary[k] for k in ("steps", "wall_s", "samples_per_s", "final_eval")})
    return summary


def run_pipeline(task: PipelineTask, config: PipelineConfig) -> dict[str, Any] | None:
    """Run this process's stage of ``task`` (call it in every process torchrun starts).

    Returns:
        The summary on rank 0, None elsewhere.

    Raises:
        ValueError: for bad input, before any training.
        LaunchError: outside torchrun or with a world size other than ``config.stages``.
    """
    stages, shapes, env, watchdog = start_stage(task, config)
    transport = None
    endpoint = None
    try:
        # Stage 0 loads the data first, so that a fallback (e.g. the bundled MNIST subset) is the first line.
        data = task.data() if env.is_main else None
        if env.is_main:
            log.info("config: %s", config.to_dict())
        block = stages[env.rank].to(env.device)
        last = env.rank == config.stages - 1
        sg = None
        if config.mode != "backprop" and not last:
            context = task.num_classes if config.mode == "cdni" else 0
            sg = build_sg(config.sg, tuple(shapes[env.rank][1:]), config.sg_hidden, context).to(env.device)
        options = TransportOptions(bind_host=config.bind, advertise_host=config.advertise,
                                   queue_size=config.queue_size, peer_timeout=config.peer_timeout,
                                   curve_keys=config.curve_keys)
        transport = make_transport(config.transport, env.rank, config.stages, options)
        endpoint = transport.bind()
        env.store.set(f"dni_async/endpoint/{env.rank}", endpoint)
        endpoints = {r: env.store.get(f"dni_async/endpoint/{r}").decode() for r in range(config.stages)}
        transport.connect(endpoints)
        run_dir = Path(config.run_dir)
        if env.is_main:
            clear_outputs(run_dir, resumed=config.resume is not None)
        torch.distributed.barrier()  # nobody appends to the previous run's files
        write_stage_file(config, env, endpoint, "running")
        metrics = JsonLines(run_dir / "metrics.jsonl")
        events = JsonLines(run_dir / "events" / f"stage-{env.rank}.jsonl")
        checkpoints = None
        if config.checkpoint_every:
            checkpoints = Checkpointer(run_dir, env.rank, config.stages, config.checkpoint_every, env.store,
                                       {"config": config.to_dict(), "blocks_per_stage": [len(s) for s in stages]})
        worker = StageWorker(env.rank, config.stages, block, transport, config, env.device, task, sg, metrics, events,
                             checkpoints)
        resume = _resume_state(config, env)
        if resume is not None:
            worker.restore(resume)
        torch.distributed.barrier()
        start, start_time, cpu_start = time.perf_counter(), time.time(), time.process_time()
        dataset = None
        if data is not None:
            batches, steps, eval_data, dataset = data
            bar = tqdm(total=steps, disable=not config.progress, desc=f"{config.mode} x{config.stages}", unit="step")

            def on_step(t: int, latest: dict[str, Any]) -> None:
                bar.update(1)
                rate = steady_samples_per_s(worker.stats.step_times, config.batch_size, 0.0)
                post = {"samples/s": f"{rate:.0f}" if rate else "-"}
                post.update({k: f"{v:.3f}" for k, v in latest.items() if isinstance(v, float)})
                bar.set_postfix(post, refresh=False)

            worker.run_first(batches, steps, eval_data, on_step)
            bar.close()
        else:
            worker.run_next()
        wall = time.perf_counter() - start
        worker.stats.cpu_s = time.process_time() - cpu_start
        metrics.close()
        events.close()
        per_stage = worker.stats.summary(transport.stats, wall, config.threads_per_stage)
        if checkpoints is not None:
            per_stage.update(checkpoints_saved=checkpoints.saved, checkpoint_s=round(checkpoints.seconds, 3))
        report = {"per_stage": per_stage,
                  "final_eval": worker.final_eval,
                  "samples_per_s": steady_samples_per_s(worker.stats.step_times, config.batch_size),
                  "dataset": dataset, "evals": worker.evals, "start_time": start_time,
                  "snapshot_times": worker.snapshots.times(),
                  "curve_evals": {str(k): v for k, v in worker.curve_evals.items()},
                  "task_result": task.result() if env.is_main and task.result is not None else None}
        write_stage_file(config, env, endpoint, "done")
        reports = gather_json(report)
        watchdog.stop()
        summary = None
        if reports is not None:
            resumed = {"run_dir": config.resume, "step": worker.start_step} if config.resume else None
            summary = write_summary(config, task, reports, wall, config.transport, resumed_from=resumed)
        transport.close()
        shutdown()
        return summary
    except BaseException as err:
        log.error("failed: %s: %s", type(err).__name__, err)
        watchdog.report(err)
        if isinstance(err, PeerLost):
            watchdog.kill_if_silent(err.peer)
        try:
            write_stage_file(config, env, endpoint, "failed")
        finally:
            if transport is not None:
                transport.close()
        raise

