"""What sharing the cores costs: the CPU time of a step when the stage processes outnumber the cores.

The schedule model shares the cores among the stages that compute (processor
sharing). That alone would be free; a real kernel switches processes every few
milliseconds, and each one refills its caches when it runs again. Measured here
(2 cores, one 1024 x 1024 layer's step at batch 256, one thread each): 9.2 ms of
CPU a step alone or two at once, 11.0 ms with four processes on the two cores.
:func:`measure_sharing` measures that ratio on the machine it runs on; where a
run has more stage threads than cores, the model divides the speed of every
compute by it (see [Note: the schedule model] in ``schedule_model.py``).
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection

import torch

from .allocator import set_malloc

__all__ = ["measure_sharing"]

WIDTH, BATCH = 1024, 256
"""The probe's step: one ``WIDTH`` x ``WIDTH`` linear layer and ReLU, forward, backward and Adam, on ``BATCH`` rows."""


def _cpu_per_step(threads: int, steps: int, keep_memory: bool, start: mp.synchronize.Event, pipe: Connection) -> None:
    """One probe process: CPU seconds per step, once the others are ready too (sent down ``pipe``)."""
    torch.set_num_threads(threads)
    set_malloc(not keep_memory)  # as the stages do, unless --system-malloc
    layer = torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU())
    opt = torch.optim.Adam(layer.parameters())
    x = torch.randn(BATCH, WIDTH)

    def step() -> None:
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(5):
        step()
    pipe.send("ready")
    start.wait()
    cpu = time.process_time()
    for _ in range(steps):
        step()
    pipe.send((time.process_time() - cpu) / steps)


def _run(processes: int, threads: int, steps: int, keep_memory: bool, timeout: float) -> list[float]:
    """CPU seconds per step of each of ``processes`` probe processes that step at the same time."""
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    pipes, procs = [], []
    try:
        for _ in range(processes):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_cpu_per_step, args=(threads, steps, keep_memory, start, there), daemon=True)
            proc.start()
            pipes.append(here)
            procs.append(proc)
        for pipe in pipes:
            if not pipe.poll(timeout) or pipe.recv() != "ready":
                raise RuntimeError(f"a core probe process did not start in {timeout:g} s")
        start.set()
        out = []
        for pipe in pipes:
            if not pipe.poll(timeout):
                raise RuntimeError(f"a core probe process did not finish in {timeout:g} s")
            out.append(pipe.recv())
        return out
    finally:
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()


def measure_sharing(processes: int, cores: int, threads: int = 1, steps: int = 100, keep_memory: bool = True,
                    timeout: float = 120.0) -> float:
    """CPU time of a step with ``processes`` processes of ``threads`` threads each stepping at once on ``cores``
    cores, over the same step's alone (median over the processes); 1.0 where they fit the cores (not measured).

    Raises:
        ValueError: for counts below 1.
        RuntimeError: if a probe process does not start or finish within ``timeout`` seconds.
    """
    if min(processes, cores, threads, steps) < 1:
        raise ValueError(f"processes, cores, threads and steps must be >= 1, got {processes}, {cores}, {threads}, "
                         f"{steps}")
    if processes * threads <= cores:
        return 1.0
    alone = _run(1, threads, steps, keep_memory, timeout)[0]
    shared = statistics.median(_run(processes, threads, steps, keep_memory, timeout))
    return shared / alone
