"""One-way latency and bandwidth of the data plane between two stage processes on this host, measured."""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from .allocator import set_malloc
from .transport import Message, TransportOptions, make_transport

__all__ = ["Link", "measure_link"]

SIZES = (64, 4 << 20)
"""Bytes of the small and the large message of the probe: latency from the first, bandwidth from the difference."""


@dataclass(frozen=True)
class Link:
    """A link between neighbouring stages: a message of ``n`` bytes arrives ``latency_s + n / bandwidth_bps``
    after it is sent (and occupies the link for ``n / bandwidth_bps``)."""

    latency_s: float
    """Seconds from send to receipt of an empty message: both ends' software, the wire."""
    bandwidth_bps: float
    """Bytes per second."""

    def __post_init__(self) -> None:
        if not self.latency_s >= 0 or not self.bandwidth_bps > 0:
            raise ValueError(f"a link needs latency >= 0 s and bandwidth > 0 B/s, got {self.latency_s} s and "
                             f"{self.bandwidth_bps} B/s")

    def to_dict(self) -> dict[str, float]:
        return {"latency_s": self.latency_s, "bandwidth_bps": self.bandwidth_bps}


def _echo(transport_name: str, keep_memory: bool, device: str, pipe: Connection) -> None:
    """Stage 1 of the probe: answer every ``act`` with a ``grad`` of the same tensor, on ``device``, until
    ``stop``."""
    torch.set_num_threads(1)
    set_malloc(not keep_memory)  # as the stages do, unless --system-malloc
    transport = make_transport(transport_name, 1, 2, TransportOptions(device=device))
    try:
        pipe.send(transport.bind())
        transport.connect(pipe.recv())
        while (msg := transport.recv("forward")) is not None and msg.kind == "act":
            transport.send(0, Message("grad", msg.step, 1, [t.to(device, non_blocking=True) for t in msg.tensors]))
    finally:
        transport.close()


def measure_link(transport_name: str = "zmq", round_trips: int = 40, timeout: float = 60.0,
                 keep_memory: bool = True, device: str = "cpu", sizes: tuple[int, int] = SIZES) -> Link:
    """Measure :class:`Link` between two processes over ``transport_name`` on this host, as stages use it: a
    message of each of ``sizes`` bytes sent forward and echoed back ``round_trips`` times; one way is half the
    median round trip (receiving thread, queue and decoding included). On a GPU (``device``) both processes use
    it, and a round trip ends when the echoed tensor is on the device (copies included, a device sync).

    Raises:
        RuntimeError: if the echoing process does not answer within ``timeout`` seconds.
    """
    torch.set_num_threads(1)
    set_malloc(not keep_memory)  # as the stages do, unless --system-malloc
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    echo = ctx.Process(target=_echo, args=(transport_name, keep_memory, device, there), daemon=True)
    echo.start()
    transport = make_transport(transport_name, 0, 2, TransportOptions(peer_timeout=timeout, device=device))
    try:
        endpoints: dict[int, Any] = {0: transport.bind()}
        if not here.poll(timeout):
            raise RuntimeError(f"the {transport_name} link probe's second process did not start in {timeout:g} s")
        endpoints[1] = here.recv()
        here.send(endpoints)
        transport.connect(endpoints)
        one_way = []
        for size in sizes:
            tensor = torch.ones(size // 4, device=device)
            times = []
            for step in range(round_trips + 3):  # the first three warm the connection (and a ring) up
                start = time.perf_counter()
                transport.send(1, Message("act", step, 0, [tensor]))
                if (back := transport.recv("backward", timeout=timeout)) is None:
                    raise RuntimeError(f"the link probe got no answer in {timeout:g} s")
                if device != "cpu":
                    back.tensors[0].to(device, non_blocking=True)
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            one_way.append(statistics.median(times[3:]) / 2)
        transport.send(1, Message("stop", 0, 0))
    finally:
        echo.join(timeout=5.0)
        if echo.is_alive():
            echo.kill()
        transport.close()
    extra = max(one_way[1] - one_way[0], 1e-9)
    return Link(latency_s=one_way[0], bandwidth_bps=(sizes[1] - sizes[0]) / extra)
