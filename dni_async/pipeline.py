"""The Python API of the multi-process runtime: run one stage of a pipeline in this process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .checkpoint import Checkpointer, check_compatible, load_stage, newest_complete
from .config import PipelineConfig
from .host_sync import sync_check
from .lifecycle import StageRun, check_resume_step, stage_run
from .metrics import steady_samples_per_s, tee
from .runtime import await_key
from .stage import StageWorker
from .task import PipelineTask
from .tensorboard import stage_board
from .transport import TransportOptions, make_transport

__all__ = ["PipelineTask", "run_pipeline"]

log = logging.getLogger("dni_async")
RESUME_KEY = "dni_async/resume_set"


def _resume_state(run: StageRun) -> dict[str, Any] | None:
    """This stage's state from the set rank 0 picked (the newest complete one in ``--resume``); None: no resume."""
    config, env = run.config, run.env
    if not config.resume:
        return None
    if env.is_main:
        set_dir, manifest = newest_complete(config.resume)
        check_compatible(manifest, config.to_dict())
        env.store.set(RESUME_KEY, str(set_dir))
        log.info("resuming from %s (step %d)", set_dir, manifest["step"])
    return load_stage(Path(await_key(env.store, RESUME_KEY).decode()), env.rank)


def _connect(run: StageRun) -> str:
    """Build the data-plane transport, publish this stage's endpoint through the torchrun store, connect."""
    config, env = run.config, run.env
    options = TransportOptions(bind_host=config.bind, advertise_host=config.advertise, queue_size=config.queue_size,
                               peer_timeout=config.peer_timeout, curve_keys=config.curve_keys, device=str(env.device))
    run.transport = make_transport(run.transport_name, env.rank, config.stages, options)
    endpoint = run.transport.bind()
    env.store.set(f"dni_async/endpoint/{env.rank}", endpoint)
    run.transport.connect({r: await_key(env.store, f"dni_async/endpoint/{r}").decode() for r in range(config.stages)})
    return endpoint


def _train(run: StageRun, worker: StageWorker, data: Any) -> Any:
    """Train this stage (stage 0 reads ``data`` and shows progress), evaluate; the data set's description
    (stage 0) or None."""
    if data is None:
        worker.run_next()
        return None
    config = run.config
    batches, steps, eval_data, dataset = data
    bar = run.progress(steps)

    def on_step(t: int, latest: dict[str, Any]) -> None:
        bar.update(1)
        rate = steady_samples_per_s(worker.stats.step_times, config.batch_size, 0.0)
        post = {"samples/s": f"{rate:.0f}" if rate else "-"}
        post.update({k: f"{v:.3f}" for k, v in latest.items() if isinstance(v, float)})
        bar.set_postfix(post, refresh=False)

    worker.run_first(batches, steps, eval_data, on_step)
    bar.close()
    return dataset


def run_pipeline(task: PipelineTask, config: PipelineConfig) -> dict[str, Any] | None:
    """Run this process's stage of ``task`` (call it in every process torchrun starts).

    Returns:
        The summary on rank 0, None elsewhere.

    Raises:
        ValueError: for bad input, before any training.
        LaunchError: outside torchrun or with a world size other than ``config.stages``.
    """
    with stage_run(task, config) as run, stage_board(config, run.env.rank) as board:
        env = run.env
        # Stage 0 loads the data first, so that a fallback (e.g. the bundled MNIST subset) is the first line.
        data = task.data() if env.is_main else None
        if env.is_main:
            log.info("config: %s", config.to_dict())
        block = run.stages[env.rank].to(env.device)
        resume = _resume_state(run)  # before begin: a refused resume leaves the run folder as it was
        if resume is not None and data is not None:
            check_resume_step(int(resume["step"]), data[1])
        run.begin(_connect(run), events=True)
        assert run.transport is not None and run.metrics is not None
        checkpoints = None
        if config.checkpoint_every:
            checkpoints = Checkpointer(run.run_dir, env.rank, config.stages, config.checkpoint_every, env.store,
                                       {"config": config.to_dict(), "blocks_per_stage": [len(s) for s in run.stages]})
        worker = StageWorker(env.rank, config.stages, block, run.transport, config, env.device, task,
                             [tuple(s[1:]) for s in run.shapes], tee(run.metrics, board), run.events, checkpoints)
        if resume is not None:
            worker.restore(resume)
        run.started()
        with sync_check(config.sync_check):
            dataset = _train(run, worker, data)
        run.stopped()
        worker.stats.cpu_s = run.cpu_s
        per_stage = {**worker.stats.summary(run.transport.stats, run.wall, config.threads_per_stage),
                     **worker.summary_fields}
        if checkpoints is not None:
            per_stage.update(checkpoints_saved=checkpoints.saved, checkpoint_s=round(checkpoints.seconds, 3))
        resumed = {"run_dir": config.resume, "step": worker.start_step} if config.resume else None
        return run.finish(per_stage, worker.stats.step_times, worker.snapshots, worker.eval.final_eval,
                          worker.eval.curve_evals, dataset, run.transport_name, evals=worker.eval.evals,
                          resumed_from=resumed)
