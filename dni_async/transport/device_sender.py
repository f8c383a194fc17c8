"""A GPU stage's sends, off its training thread: no send makes the host wait for the device."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Mapping

import torch

from .base import Message, SendDeadline, Transport
from .ring_slots import wait_for_event
from .zmq_receiver import _WAIT_SLICE_S

__all__ = ["DEPTH", "DeviceSender"]

logger = logging.getLogger("dni_async.transport")

DEPTH = 2
"""Messages a GPU stage may have handed over and not yet sent, per stage (its staging is this deep)."""

# [Note: sends from a GPU stage]
#
#   training thread (compute stream)          sender thread (its own side stream)
#   h = block(x)                              side.wait_event(ready)          (device waits, not host)
#   ready.record(); queue.put(msg, ready) ──> to a ring (cuda-ipc): the ring copies device to device
#   next forward is queued at once            otherwise: copy into page-locked memory, non_blocking;
#                                             poll the copy's event; send the host tensors (zmq, rpc)
#
# The training thread only records an event and hands the message over: it never
# waits for the device, so the next step's kernels queue behind the send. A full
# hand-over queue (DEPTH) blocks it exactly as a full peer does: ``while_blocked``
# every ~0.1 s, PeerLost after ``peer_timeout``, and an error of the sender thread
# (PeerLost, Aborted) is raised by the stage's next send or recv.
#
# Hazard: the sent tensors were made on the compute stream and are read on the
# side stream. ``record_stream`` tells the caching allocator, so that their memory
# is not reused before the copy has run; the queued message holds them until the
# copy is queued. The page-locked copies are kept alive by the transport (zmq
# frames hold them) and freed to torch's host allocator, which reuses them only
# after their copies' events.


class DeviceSender(Transport):
    """Wraps a stage's transport when the stage is on a GPU: sends run on a thread of their own (see
    [Note: sends from a GPU stage]); receiving is the wrapped transport's.

    Args:
        inner: the transport (built with ``options.device`` the stage's GPU).
        device: the stage's GPU.
    """

    def __init__(self, inner: Transport, device: torch.device) -> None:
        super().__init__(inner.stage, inner.num_stages, inner.options)
        self.inner, self.device = inner, device
        self.stats = inner.stats
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=DEPTH)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._closed = False

    def bind(self) -> str:
        return self.inner.bind()

    def connect(self, endpoints: Mapping[int, str]) -> None:
        """Connect the wrapped transport and start the sender thread."""
        self.inner.connect(endpoints)
        self._thread = threading.Thread(target=self._main, name=f"dni-send-{self.stage}", daemon=True)
        self._thread.start()

    def carries_device_tensors(self, dst: int) -> bool:
        return self.inner.carries_device_tensors(dst)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def send(self, dst: int, msg: Message, while_blocked: Callable[[], None] | None = None) -> None:
        """Hand ``msg`` to the sender thread after an event on the current stream; see `Transport.send`.

        Raises:
            PeerLost, Aborted: the sender thread's error, or PeerLost when the hand-over stayed full for
                ``peer_timeout`` seconds.
            ValueError: for a message that cannot go to ``dst``.
            RuntimeError: before ``connect`` or after ``close``.
        """
        self.check_route(dst, msg)
        if self._closed or self._thread is None:
            raise RuntimeError(f"stage {self.stage}: send() before connect() or after close()")
        best_effort = msg.kind == "abort"  # never raises PeerLost: sent directly once the thread has ended
        if best_effort and not self._thread.is_alive():
            self.inner.send(dst, msg)
            return
        if not best_effort:
            self._raise_if_failed()
        ready = None
        if any(t.is_cuda for t in msg.tensors):
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        wait = SendDeadline(self, dst, msg)
        while True:
            try:
                self._queue.put((dst, msg, ready), timeout=_WAIT_SLICE_S)
                return
            except queue.Full:
                pass
            if not best_effort:
                self._raise_if_failed()
            if wait.remaining(None) is None:  # an abort is best effort
                return
            if while_blocked is not None:
                while_blocked()

    def recv(self, direction: str, timeout: float | None = None) -> Message | None:
        """As the wrapped transport's ``recv``, raising the sender thread's error while it waits."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            self._raise_if_failed()
            left = _WAIT_SLICE_S if deadline is None else min(_WAIT_SLICE_S, deadline - time.monotonic())
            msg = self.inner.recv(direction, max(left, 0.0))
            if msg is not None or (deadline is not None and time.monotonic() >= deadline):
                return msg

    def queue_depth(self, direction: str) -> int:
        return self.inner.queue_depth(direction)

    def _main(self) -> None:
        """Sender thread: stage and send every message in order until ``close``; keep its first error."""
        side = None  # made at the first message with GPU tensors
        try:
            while (item := self._queue.get()) is not None:
                dst, msg, ready = item
                del item
                if ready is None:
                    self.inner.send(dst, msg)
                    continue
                if side is None:
                    torch.cuda.set_device(self.device)
                    side = torch.cuda.Stream(self.device)
                with torch.cuda.stream(side):  # a ring's copies run on the side stream too
                    staged = self._stage(dst, msg, ready, side)
                    del msg
                    if staged is None:
                        return
                    self.inner.send(dst, staged)
                    del staged
        except BaseException as err:  # handed to the training thread by its next send or recv
            self._error = err

    def _stage(self, dst: int, msg: Message, ready: Any, side: Any) -> Message | None:
        """``msg`` ready to send from the side stream: after ``ready``, its tensors kept for the side stream's
        copies (a ring's, where every tensor is on the GPU), or copied to page-locked host memory (None if
        ``close`` stopped the wait)."""
        side.wait_event(ready)
        for tensor in msg.tensors:
            if tensor.is_cuda:
                tensor.record_stream(side)
        if self.inner.carries_device_tensors(dst) and all(t.is_cuda for t in msg.tensors):
            return msg
        host = []
        for tensor in msg.tensors:
            if tensor.is_cuda:
                pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                tensor = pinned.copy_(tensor, non_blocking=True)
            host.append(tensor)
        copied = torch.cuda.Event()
        copied.record(side)
        if not wait_for_event(copied, self._stop):
            return None
        return Message(msg.kind, msg.step, msg.src, host, msg.meta)

    def close(self) -> None:
        """Send what was handed over (up to ``peer_timeout``), stop the thread, close the wrapped transport."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            deadline = time.monotonic() + self.options.peer_timeout + 5.0
            while self._thread.is_alive():  # a thread that has failed takes nothing more
                try:
                    self._queue.put(None, timeout=_WAIT_SLICE_S)
                    break
                except queue.Full:
                    if time.monotonic() > deadline:
                        break
            self._thread.join(max(deadline - time.monotonic(), 0.0))
            if self._thread.is_alive():
                self._stop.set()
                logger.error("stage %d: the sender thread did not stop; its transport is left open", self.stage)
                return
        self.inner.close()
