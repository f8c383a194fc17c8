"""The zmq transport's receiving side: one I/O thread draining the PULL sockets into bounded per-direction queues."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from .. import protocol
from .base import DIRECTIONS, Aborted, Message, RejectLog, Transport

__all__ = ["Inbound", "ZmqReceiver"]

logger = logging.getLogger("dni_async.transport")

_POLL_MS = 100  # I/O thread's poll tick: only bounds how fast it notices close()
_WAIT_SLICE_S = 0.1  # recv/send wait in slices this long to notice an abort or a dead I/O thread
_DRAIN_BATCH = 64  # messages taken from one socket before looking at the other (fairness)


@dataclass(eq=False)
class Inbound:
    """One inbound direction: its PULL socket, its bounded queue and the only stage allowed to send on it."""

    direction: str
    peer: int
    socket: zmq.Socket[Any]
    queue: queue.Queue[Message]
    paused: bool = False
    registered: bool = False


class ZmqReceiver(Transport):
    """The receiving half of `ZmqTransport`: its I/O thread, ``recv`` and the wake-up pipe between them.

    Holds no state of its own making: `ZmqTransport.__init__` sets up the attributes
    declared here (CURVE keys are loaded before any pipe or socket exists), and
    [Note: sockets, threads and backpressure] in zmq.py says who owns what.
    """

    _inbound: dict[str, Inbound]
    _stop: threading.Event
    _wake_r: int
    _wake_w: int
    _abort: tuple[int, str] | None
    _io_error: BaseException | None
    _closed: bool
    _log_reject: RejectLog

    def _inbound_for(self, direction: str) -> Inbound:
        """The inbound state of one direction, or ValueError."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if direction not in self._inbound:
            raise RuntimeError(f"stage {self.stage}: recv() before bind()")
        return self._inbound[direction]

    def _raise_if_failed(self) -> None:
        """Raise Aborted if an abort arrived, the I/O thread's error if it died, RuntimeError if closed."""
        if self._abort is not None:
            raise Aborted(*self._abort)
        if self._io_error is not None:
            raise RuntimeError(f"stage {self.stage}: transport I/O thread died: {self._io_error!r}") from self._io_error
        if self._closed:
            raise RuntimeError(f"stage {self.stage}: transport is closed")

    def recv(self, direction: str, timeout: float | None = None) -> Message | None:
        """Next message from one direction; see `Transport.recv`.

        Waits in short slices so that an abort, or the death of the I/O thread,
        is noticed even by an unbounded wait.

        Raises:
            Aborted: once an ``abort`` message has arrived (from either neighbour), on every call.
            RuntimeError: after ``close()``, or if the I/O thread died (chained to its error).
            ValueError: for an unknown direction.
        """
        inbound = self._inbound_for(direction)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            self._raise_if_failed()
            remaining = _WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
            try:
                if remaining <= 0:
                    msg = inbound.queue.get_nowait()
                else:
                    msg = inbound.queue.get(timeout=min(remaining, _WAIT_SLICE_S))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            if inbound.paused:
                self._wake()
            return msg

    def queue_depth(self, direction: str) -> int:
        """Messages waiting in one direction's queue."""
        return self._inbound_for(direction).queue.qsize()

    def _wake(self) -> None:
        """Poke the I/O thread (a byte on the wake pipe); never blocks."""
        if self._wake_w < 0:
            return  # closed
        with contextlib.suppress(OSError):  # a full pipe means a wake-up is pending anyway
            os.write(self._wake_w, b"\0")

    def _io_main(self) -> None:
        """I/O thread body: record an unexpected error for recv() to raise."""
        try:
            self._io_loop()
        except BaseException as err:  # handed over to the caller's thread by recv(), never swallowed
            logger.exception("transport I/O thread died")
            self._io_error = err

    def _io_loop(self) -> None:
        """Poll the PULL sockets whose queues have room; drain them into the queues."""
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        inbound = list(self._inbound.values())
        while not self._stop.is_set():
            for inb in inbound:
                # paused is set before the queue is re-checked, and recv() frees a slot
                # before it reads paused: one of the two always sees the other (no lost wake-up).
                has_room = not inb.queue.full()
                if not has_room:
                    inb.paused = True
                    has_room = not inb.queue.full()
                inb.paused = not has_room
                if has_room != inb.registered:
                    if has_room:
                        poller.register(inb.socket, zmq.POLLIN)
                    else:
                        poller.unregister(inb.socket)
                    inb.registered = has_room
            events = dict(poller.poll(_POLL_MS))
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)  # if more is left, the next poll returns at once
            for inb in inbound:
                if inb.registered and inb.socket in events:
                    self._drain(inb)

    def _drain(self, inb: Inbound) -> None:
        """Move messages from one socket to its queue while the queue has room."""
        for _ in range(_DRAIN_BATCH):
            if inb.queue.full():
                return
            try:
                frames = inb.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._accept(inb, frames)

    def _decode(self, inb: Inbound, header: protocol.Header, frames: list[Any]) -> Message:
        """One message from its checked header and its frames (a GPU stage's tensors land in page-locked memory).

        Raises:
            protocol.ProtocolError: for a malformed message.
        """
        return protocol.decode_payload(header, frames[1:], pin_memory=self.options.pin_memory)

    def _accept(self, inb: Inbound, frames: list[Any]) -> None:
        """Decode and validate one message; queue it, record an abort, or drop it with a logged reason."""
        try:
            header = protocol.decode_header(frames[0], self.options.max_message_bytes)
            protocol.check_channel(header.kind, header.src, inb.peer, inb.direction)
            msg = self._decode(inb, header, frames)
        except protocol.ProtocolError as err:
            self.stats.rejected += 1
            self._log_reject(inb.direction, str(err))
            return
        self.stats.messages_received += 1
        self.stats.bytes_received += sum(protocol.frame_nbytes(f) for f in frames)
        if msg.kind == "abort":
            if self._abort is None:
                self._abort = (msg.src, str(msg.meta.get("reason", "no reason given")))
            return
        inb.queue.put_nowait(msg)  # only this thread puts, and it checked for room
