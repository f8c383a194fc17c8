"""The rpc transport's receiving side: bounded inbound queues, filled by the deliver kernel on rpc threads."""

from __future__ import annotations

import collections
import ctypes
import threading
import time
from typing import List

import torch

from .. import protocol
from .base import DIRECTIONS, Aborted, Message, RejectLog, Transport, TransportOptions

__all__ = ["RpcReceiver"]

_WAIT_SLICE_S = 0.1  # kernel's longest wait for room; sender's poll tick for while_blocked and aborts
_FULL, _NO_STAGE, _REJECTED = -1, -2, -3  # kernel answers; >= 0: accepted, that many free slots left


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a received flat uint8 CPU tensor, valid while the tensor lives."""
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise protocol.ProtocolError(f"frames must be flat uint8 cpu tensors, got {tensor.dtype} {list(tensor.shape)}")
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * tensor.numel()).from_address(tensor.data_ptr())).cast("B")


class _Inbound:
    """One bounded inbound queue, with a wait for room that the kernel uses (rpc threads put, the caller gets)."""

    def __init__(self, direction: str, peer: int, size: int) -> None:
        self.direction, self.peer, self.size = direction, peer, size
        self.items: collections.deque[Message] = collections.deque()
        self.cond = threading.Condition()

    def wait_room(self, timeout: float, msg: Message | None = None) -> int:
        """Free slots after waiting up to ``timeout`` s for one, and queueing ``msg`` if given; or _FULL."""
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.items) < self.size, timeout=max(timeout, 0.0)):
                return _FULL if msg is not None else 0
            if msg is not None:
                self.items.append(msg)
                self.cond.notify_all()
            return self.size - len(self.items)

    def get(self, timeout: float) -> Message | None:
        """Oldest message, waiting up to ``timeout`` s; None if none came."""
        with self.cond:
            if not self.cond.wait_for(lambda: bool(self.items), timeout=max(timeout, 0.0)):
                return None
            msg = self.items.popleft()
            self.cond.notify_all()
            return msg


class RpcReceiver(Transport):
    """The receiving half of `RpcTransport` (same arguments): what the deliver kernel hands over, and ``recv``."""

    def __init__(self, stage: int, num_stages: int, options: TransportOptions) -> None:
        super().__init__(stage, num_stages, options)
        self._inbound = {d: _Inbound(d, p, options.queue_size) for d, p in zip(DIRECTIONS, (stage - 1, stage + 1))}
        self._stats_lock = threading.Lock()
        self._abort: tuple[int, str] | None = None
        self._closed = False
        self._log_reject = RejectLog()

    def _accept(self, direction: int, header: torch.Tensor, frames: List[torch.Tensor], wait: float) -> int:
        """Decode and validate one message (rpc thread); queue it, record an abort, or reject it."""
        name = DIRECTIONS[direction] if direction in (0, 1) else f"direction {direction}"
        try:
            if direction not in (0, 1):
                raise protocol.ProtocolError(f"unknown direction {direction}")
            inb = self._inbound[name]
            msg = protocol.decode([_byte_view(header), *map(_byte_view, frames)], self.options.max_message_bytes,
                                  pin_memory=self.options.pin_memory)
            protocol.check_channel(msg.kind, msg.src, inb.peer, name)
        except protocol.ProtocolError as err:
            with self._stats_lock:
                self.stats.rejected += 1
                self._log_reject(name, str(err))
            return _REJECTED
        if msg.kind == "abort":
            if self._abort is None:
                self._abort = (msg.src, str(msg.meta.get("reason", "no reason given")))
            status = self.options.queue_size
        else:
            status = inb.wait_room(wait, msg)
        if status != _FULL:
            with self._stats_lock:
                self.stats.messages_received += 1
                self.stats.bytes_received += header.numel() + sum(f.numel() for f in frames)
        return status

    def recv(self, direction: str, timeout: float | None = None) -> Message | None:
        """Next message from one direction; see `Transport.recv`.

        Raises:
            Aborted: once an ``abort`` message has arrived (from either neighbour), on every call.
            RuntimeError: after ``close()``.
            ValueError: for an unknown direction.
        """
        inbound = self._inbound_for(direction)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            if self._abort is not None:
                raise Aborted(*self._abort)
            if self._closed:
                raise RuntimeError(f"stage {self.stage}: transport is closed")
            remaining = _WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
            msg = inbound.get(min(remaining, _WAIT_SLICE_S))
            if msg is not None:
                return msg
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def queue_depth(self, direction: str) -> int:
        """Messages waiting in one direction's queue."""
        return len(self._inbound_for(direction).items)

    def _inbound_for(self, direction: str) -> _Inbound:
        """The queue of one direction, or ValueError."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        return self._inbound[direction]
