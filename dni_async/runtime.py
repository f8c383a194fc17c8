"""Process setup for a stage: torchrun env -> rank/stage/device, control plane, abort watchdog, teardown."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["LaunchError", "StageEnv", "init_stage", "resolve_device", "gather_json", "AbortWatchdog", "shutdown"]

log = logging.getLogger("dni_async")
ABORT_KEY = "dni_async/abort"


class LaunchError(RuntimeError):
    """The processes were not started the way ``--stages`` needs (outside torchrun, wrong world size)."""


@dataclass
class StageEnv:
    """Who this process is: its rank (= stage), the world, its device and the torchrun store."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    store: dist.Store
    host: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str | None, local_rank: int) -> torch.device:
    """``cpu``, a GPU id (``0``, ``cuda:1``), or None (GPU ``local_rank`` when CUDA is there, else cpu).

    Raises:
        ValueError: for an unknown device or a GPU that is not there.
    """
    if spec is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    spec = spec.strip()
    if spec == "cpu":
        return torch.device("cpu")
    index = spec.removeprefix("cuda:")
    if not index.isdigit():
        raise ValueError(f"unknown device {spec!r}: use 'cpu' or a GPU id")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} is not available (CUDA devices here: "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    return torch.device("cuda", int(index))


def init_stage(stages: int, devices: list[str] | None, timeout_s: float = 120.0) -> StageEnv:
    """Read the torchrun environment, check it against ``stages``, start the gloo control plane.

    Raises:
        LaunchError: outside torchrun, or when the world size is not ``stages``.
        ValueError: for a bad device.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise LaunchError("not started by torchrun (RANK/WORLD_SIZE unset)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != stages:
        raise LaunchError(
            f"torchrun started {world} process(es) but --stages is {stages}; run "
            f"`torchrun --standalone --nproc-per-node {stages} launch/pipeline.py --stages {stages} ...` "
            f"or `python launch/pipeline.py --stages {stages} ...`, which starts them itself")
    device = resolve_device(devices[rank] if devices else None, local_rank)
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    store = dist.distributed_c10d._get_default_store()
    return StageEnv(rank, world, local_rank, device, store, socket.gethostname())


def gather_json(obj: Any) -> list[Any] | None:
    """Gather one JSON-able object per rank on rank 0 (others get None).

    The control plane carries JSON bytes in a tensor, never pickles: gloo's
    ``gather_object`` would unpickle bytes that came from a socket.
    """
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    chunks = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(chunks, padded)
    if dist.get_rank() != 0:
        return None
    return [json.loads(bytes(c[:int(s.item())].tolist()).decode()) for c, s in zip(chunks, sizes)]


class AbortWatchdog:
    """Make a failure anywhere end every stage quickly, naming the stage that failed.

    A failing stage calls :meth:`report`, which writes its error under a key of
    the torchrun store. Every stage runs this watchdog thread, which polls the
    key and, when it appears, logs the failing stage and its error and ends the
    process with exit code 1 (``os._exit``: the main thread may be blocked in a
    socket or a collective that would never return).
    """

    def __init__(self, env: StageEnv, on_abort: Any = None, interval: float = 0.2) -> None:
        self.env = env
        self.on_abort = on_abort
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abort-watchdog", daemon=True)

    def start(self) -> AbortWatchdog:
        self._thread.start()
        return self

    def report(self, error: BaseException) -> None:
        """Tell every stage that this one failed."""
        text = json.dumps({"stage": self.env.rank, "error": f"{type(error).__name__}: {error}"})
        try:
            self.env.store.set(ABORT_KEY, text)
        except Exception as err:  # noqa: BLE001 - the store may be gone with the agent
            log.error("[stage %d] could not report the failure to the other stages: %s", self.env.rank, err)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.env.store.check([ABORT_KEY]):
                    continue
                info = json.loads(self.env.store.get(ABORT_KEY).decode())
            except Exception:  # noqa: BLE001 - store gone: the agent is tearing the run down
                info = {"stage": "?", "error": "the torchrun store is gone (agent or rank 0 died)"}
            if info.get("stage") == self.env.rank:
                return
            log.error("[stage %d] aborting: stage %s failed: %s", self.env.rank, info.get("stage"), info.get("error"))
            if self.on_abort is not None:
                self.on_abort(info)
            logging.shutdown()
            os._exit(1)


def shutdown(timeout_s: float = 30.0) -> None:
    """Final barrier and process-group teardown (bounded: a dead peer cannot hang it)."""
    if not dist.is_initialized():
        return
    try:
        work = dist.barrier(async_op=True)
        deadline = time.monotonic() + timeout_s
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError("final barrier timed out")
            time.sleep(0.01)
    finally:
        dist.destroy_process_group()
