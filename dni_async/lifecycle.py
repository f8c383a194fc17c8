"""One run lifecycle for every runner: check, join, set up the outputs, run, gather the summary, tear down."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from .allocator import set_malloc
from .checkpoint import check_compatible, newest_complete
from .config import PipelineConfig
from .divergence import Diverged
from .metrics import JsonLines, dumps, steady_samples_per_s, write_json_atomic
from .partition import check_stage_shapes, partition
from .rundir import clear_outputs, remove_own_tmp
from .runtime import ABORT_KEY, AbortWatchdog, StageEnv, gather_json, init_stage, resolve_device, shutdown
from .snapshots import Snapshots, accuracy_curve
from .sources import local_head
from .task import PipelineTask
from .tensorboard import require_tensorboard
from .transport import PeerLost, Transport, resolve_transport

__all__ = ["STOP_SIGNALS", "StageRun", "headline", "prepare", "setup_logging", "stage_run", "validate",
           "write_summary"]

log = logging.getLogger("dni_async")
ENDED_KEY = "dni_async/ended"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
"""Signals that stop a stage cleanly: its file says ``stopped`` (or ``failed``, naming the stage that failed first,
when torchrun is ending the run because of it), rank 0 writes summary.json, the process exits 128 + signal."""


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


def _check_method(task: PipelineTask, config: PipelineConfig, shapes: list[torch.Size]) -> None:
    """Refuse a method the task cannot run (before any process starts)."""
    method = config.method
    if method.has_sg and config.sg == "softmax" and not task.classification:
        raise ValueError(f"--sg softmax predicts the gradient of one softmax over classes per example; the "
                         f"{task.name} task's loss is not that (use another --sg)")
    if method.source == "local":
        for shape in shapes[:-1]:
            local_head(tuple(shape[1:]), tuple(shapes[-1][1:]))


def prepare(task: PipelineTask, config: PipelineConfig) -> tuple[list[nn.Sequential], list[torch.Size]]:
    """The stages and their output shapes (per batch of 2).

    Raises:
        ValueError: more stages than blocks, stage shapes that do not fit together.
    """
    stages = partition(task.blocks, config.stages)
    return stages, check_stage_shapes(stages, torch.zeros(2, *task.input_shape, dtype=task.input_dtype))


def validate(task: PipelineTask, config: PipelineConfig) -> tuple[list[nn.Sequential], list[torch.Size]]:
    """Check what can be checked before any process starts (once per run: the launcher calls it); return the
    stages and their output shapes.

    The ``--resume`` set is checked by its manifest and file sizes here; rank 0 reads and hashes the set it
    resumes from.

    Raises:
        ValueError: more stages than blocks, a device that is not there, stage
            shapes that do not fit together, a method the task cannot run, data the task cannot read; a
            checkpoint set that does not fit this config or is at or past ``--steps``; checkpoints of an earlier
            run in ``--run-dir`` (unless this run continues them).
        FileNotFoundError: ``--resume`` names a folder without a complete checkpoint set; the task's data is
            not where ``--data-dir`` says.
    """
    for i, device in enumerate(config.devices or []):
        resolve_device(device, i)
    stages, shapes = prepare(task, config)
    if config.resume:
        _, manifest = newest_complete(config.resume, hashes=False)
        check_compatible(manifest, config.to_dict())
        check_resume_step(manifest["step"], config.steps)
    own = Path(config.run_dir) / "checkpoints"
    continuing = config.resume is not None and Path(config.resume).resolve() == Path(config.run_dir).resolve()
    if not continuing and own.is_dir() and any(own.glob("step-*")):
        raise ValueError(f"{own} holds checkpoints of an earlier run (export would mix them with this run's "
                         f"outputs): continue it with --resume {config.run_dir}, or choose another --run-dir, or "
                         f"remove them")
    _check_method(task, config, shapes)
    if config.tensorboard:
        require_tensorboard()
    if task.check_data is not None:
        task.check_data()
    return stages, shapes


def check_resume_step(step: int, steps: int | None) -> None:
    """Refuse to resume a set at ``step`` when the run would end there or before (``steps`` None: not known yet).

    Raises:
        ValueError: naming both.
    """
    if steps is not None and step >= steps:
        raise ValueError(f"the checkpoint to resume is at step {step}: --steps must be above it, got {steps}")


def write_summary(config: PipelineConfig, task: PipelineTask, reports: list[dict[str, Any]], wall: float,
                  transport: str, **extra: Any) -> dict[str, Any]:
    """Rank 0: summary.json from every stage's report (stage order); returned too."""
    summary = {
        "status": "done", "mode": config.mode, "task": task.name, "stages": config.stages, "transport": transport,
        "steps": reports[0]["per_stage"]["steps"], "batch_size": config.batch_size, **extra,
        "wall_s": round(wall, 3), "samples_per_s": reports[-1]["samples_per_s"],
        "final_eval": reports[-1]["final_eval"], "evals": reports[-1].get("evals", {}),
        "task_result": reports[0].get("task_result"), "dataset": reports[0]["dataset"],
        "curve": accuracy_curve(reports, reports[0]["start_time"]),
        "threads_per_stage": config.threads_per_stage,
        "per_stage": [r["per_stage"] for r in reports], "config": config.to_dict(),
    }
    write_json_atomic(Path(config.run_dir) / "summary.json", summary)
    log.info("%s", headline(summary))
    return summary


def headline(summary: dict[str, Any]) -> str:
    """The run in one human line: mode, stages, steps, samples/s, the final evaluation, data set, run folder."""
    figures = {k: v for k, v in (summary["final_eval"] or {}).items() if isinstance(v, float)}
    name, value = next(iter(figures.items()), ("evaluation", None))
    result = f"test {name} {value:.4f}" if value is not None else "no evaluation"
    rate = f"{summary['samples_per_s']:,.0f} samples/s" if summary["samples_per_s"] else "samples/s n/a"
    return (f"done: {summary['mode']}, {summary['stages']} stages, {summary['steps']} steps, {rate}, {result} on "
            f"{summary['dataset']}; outputs in {summary['config']['run_dir']}")


@dataclass
class StageRun:
    """This process's stage of a run, as :func:`stage_run` hands it to a runner."""

    task: PipelineTask
    config: PipelineConfig
    env: StageEnv
    stages: list[nn.Sequential]
    shapes: list[torch.Size]
    watchdog: AbortWatchdog
    endpoint: str | None = None
    """This stage's data-plane endpoint (the stage file records it)."""
    malloc: str = ""
    """What ``dni_async.allocator`` did to this process's malloc, in words (the stage file records it)."""
    transport: Transport | None = None
    """Closed on every path."""
    metrics: JsonLines | None = None
    events: JsonLines | None = None
    start: float = 0.0
    start_time: float = 0.0
    cpu_start: float = 0.0
    wall: float = 0.0
    """Seconds training took (:meth:`stopped`)."""
    cpu_s: float = 0.0
    """CPU seconds this process spent training."""
    begun: bool = False
    """The outputs are this run's (:meth:`begin`): before, an ending leaves the run folder as it was."""
    _files: list[JsonLines] = field(default_factory=list)
    _ended: bool = False
    _end_lock: threading.RLock = field(default_factory=threading.RLock)  # a signal may come during end()

    @property
    def transport_name(self) -> str:
        """This stage's transport (``--transport``, ``auto`` resolved for its device)."""
        return resolve_transport(self.config.transport, self.env.device)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    def begin(self, endpoint: str | None = None, events: bool = False) -> None:
        """Clear the previous run's outputs (rank 0), write this stage's file and open metrics.jsonl (and the
        stage's event log); every stage waits for the others here."""
        self.endpoint = endpoint
        if self.env.is_main:
            clear_outputs(self.run_dir, resumed=self.config.resume is not None)
        torch.distributed.barrier()  # nobody appends to the previous run's files
        self.begun = True
        self.write_stage_file("running")
        self.metrics = JsonLines(self.run_dir / "metrics.jsonl")
        self._files.append(self.metrics)
        if events:
            self.events = JsonLines(self.run_dir / "events" / f"stage-{self.env.rank}.jsonl")
            self._files.append(self.events)

    def started(self) -> None:
        """Training starts now (after a barrier: every stage is ready)."""
        torch.distributed.barrier()
        self.start, self.start_time, self.cpu_start = time.perf_counter(), time.time(), time.process_time()

    def stopped(self) -> None:
        """Training (and the evaluation after it) is over: stop the clocks."""
        self.wall = time.perf_counter() - self.start
        self.cpu_s = time.process_time() - self.cpu_start

    def progress(self, steps: int) -> tqdm:
        """The progress bar (rank 0 with ``--progress`` only)."""
        return tqdm(total=steps, disable=not (self.config.progress and self.env.is_main),
                    desc=f"{self.config.mode} x{self.config.stages}", unit="step")

    def write_stage_file(self, status: str, reason: str | None = None) -> None:
        """``stages/stage-<rank>.json`` with ``status`` (``running``, ``done``, ``failed``, ``stopped``) and the
        reason of an ending. Where the disk is full, an ending overwrites the file in place (padded to its size:
        no new block is needed) rather than leave it saying ``running``."""
        config, env = self.config, self.env
        path = self.run_dir / "stages" / f"stage-{env.rank}.json"
        content = {
            "stage": env.rank, "rank": env.rank, "pid": os.getpid(), "host": env.host, "device": str(env.device),
            "threads": config.threads_per_stage, "transport": self.transport_name,
            "endpoints": {"data": self.endpoint} if self.endpoint else {}, "malloc": self.malloc, "status": status,
            **({"reason": reason} if reason else {}),
        }
        try:
            write_json_atomic(path, content)
        except OSError:
            if status == "running" or not path.exists():
                raise
            text = dumps({**content, "reason": (reason or "")[:200]}).encode()
            with open(path, "r+b") as f:
                f.write(text.ljust(os.fstat(f.fileno()).st_size))

    def end(self, reason: str) -> None:
        """The run ends here without finishing (an error, an abort, a signal): this stage's file says ``stopped``
        (the run was stopped by a signal) or ``failed``, and why; rank 0 writes summary.json with the run's status
        (``failed``, ``stopped``, ``diverged``: :func:`run_status`) and the reason; no temporary file of this
        process is left. Once per run, whichever path gets here first; never raises. Before :meth:`begin` the
        folder is the previous run's, and nothing is written."""
        with self._end_lock:
            if self._ended or not self.begun:
                return
            self._ended = True
        status = run_status(reason)
        with contextlib.suppress(Exception):
            self.write_stage_file("stopped" if status == "stopped" else "failed", reason)
        if self.env.is_main:
            with contextlib.suppress(Exception):
                write_json_atomic(self.run_dir / "summary.json", {
                    "status": status, "reason": reason, "mode": self.config.mode, "task": self.task.name,
                    "stages": self.config.stages, "config": self.config.to_dict()})
        with contextlib.suppress(Exception):
            remove_own_tmp(self.run_dir)
        self._wait_for_the_others()

    def _wait_for_the_others(self, timeout_s: float = 2.0) -> None:
        """Count this stage's ending in the store; rank 0 waits (at most ``timeout_s``) for every stage's: where
        it hosts the store (stages started without torchrun's agent), ending first would take the store, and
        with it the reason, from the stages that have not read it yet."""
        with contextlib.suppress(Exception):
            ended = self.env.store.add(ENDED_KEY, 1)
            deadline = time.monotonic() + timeout_s
            while self.env.is_main and ended < self.env.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
                ended = self.env.store.add(ENDED_KEY, 0)

    def first_failure(self) -> str | None:
        """The failure reported first (by any stage, this one included: the cause; later ones are its
        consequences), as one line; None if none was, or the store is gone."""
        with contextlib.suppress(Exception):  # the store may be gone with the agent
            if self.env.store.check([ABORT_KEY]):
                info = json.loads(self.env.store.get(ABORT_KEY).decode())
                return _reason(info.get("stage"), info["error"])
        return None

    def finish(self, per_stage: dict[str, Any], step_times: list[float], snapshots: Snapshots,
               final_eval: dict[str, Any] | None, curve_evals: dict[int, dict[str, Any]], dataset: str | None,
               transport: str, evals: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any] | None:
        """After :meth:`stopped`: gather every stage's report on rank 0, write summary.json, tear down; the
        summary on rank 0."""
        config = self.config
        for f in self._files:
            f.close()
        report = {"per_stage": per_stage, "final_eval": final_eval,
                  "samples_per_s": steady_samples_per_s(step_times, config.batch_size),
                  "dataset": dataset, "evals": evals or {}, "start_time": self.start_time,
                  "snapshot_times": snapshots.times(), "curve_evals": {str(k): v for k, v in curve_evals.items()},
                  "task_result": self.task.result() if self.env.is_main and self.task.result is not None else None}
        self.write_stage_file("done")
        with self._end_lock:
            self._ended = True
        reports = gather_json(report)
        self.watchdog.stop()
        summary = None
        if reports is not None:
            summary = write_summary(config, self.task, reports, self.wall, transport, **extra)
        if self.transport is not None:
            self.transport.close()
        shutdown()
        return summary


def run_status(reason: str) -> str:
    """A failed run's status from its reason: ``diverged``, ``stopped`` (a signal) or ``failed``."""
    if reason.startswith("diverged at step"):
        return "diverged"
    return "stopped" if "stopped by SIG" in reason else "failed"


def _reason(stage: int | str | None, error: str) -> str:
    """A failure as one line: ``stage i: Error: text``; a divergence says its stage itself."""
    if error.startswith(f"{Diverged.__name__}: "):
        return error.split(": ", 1)[1]
    return error if stage in (None, "?") else f"stage {stage}: {error}"


@contextlib.contextmanager
def stage_run(task: PipelineTask, config: PipelineConfig) -> Iterator[StageRun]:
    """What every stage process does around its runner: check the input, join the torchrun world (gloo control
    plane), log with its stage in every line, set its threads, start the abort watchdog; on any failure, report
    it to the other stages, mark the stage file ``failed`` and close the transport, then re-raise.

    Raises:
        ValueError: for bad input, before any training.
        LaunchError: outside torchrun or with a world size other than ``config.stages``.
    """
    stages, shapes = prepare(task, config)
    env = init_stage(config.stages, config.devices, config.bind)
    setup_logging(env.rank)
    torch.set_num_threads(config.threads_per_stage)
    run = StageRun(task, config, env, stages, shapes, AbortWatchdog(env, peer_timeout=config.peer_timeout))
    run.malloc = set_malloc(config.system_malloc)
    run.watchdog.on_abort = lambda info: run.end(_reason(info.get("stage"), info["error"]))
    run.watchdog.start()
    with _stop_on_signals(run):
        try:
            yield run
        except BaseException as err:
            log.error("failed: %s: %s", type(err).__name__, err)
            run.watchdog.report(err)
            if isinstance(err, PeerLost):
                run.watchdog.kill_if_silent(err.peer)
            try:
                run.end(run.first_failure() or _reason(env.rank, f"{type(err).__name__}: {err}"))
            finally:
                for f in run._files:
                    f.close()
                if run.transport is not None:
                    run.transport.close()
            raise


@contextlib.contextmanager
def _stop_on_signals(run: StageRun) -> Iterator[None]:
    """While the stage runs, :data:`STOP_SIGNALS` end it cleanly (Python's default would end it at once, its
    file still saying ``running``); the previous handlers come back afterwards. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        log.error("stopped by %s", name)
        run.watchdog.report(f"stopped by {name}")
        run.end(run.first_failure() or f"stage {run.env.rank}: stopped by {name}")
        logging.shutdown()
        os._exit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
