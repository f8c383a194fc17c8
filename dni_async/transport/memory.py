"""In-process channels for one stage alone: an inbox per direction, a record of sends, optional automatic answers."""

from __future__ import annotations

from collections import deque
from typing import Callable, Mapping

from .base import Message, Transport, TransportOptions

__all__ = ["MemoryTransport"]


class MemoryTransport(Transport):
    """A stage's channels with no neighbour behind them: for timing one stage (``stage_cost``) and for tests.

    ``recv`` pops what was put in :attr:`inbox`; where nothing is there and the
    caller would wait without bound, it raises instead of hanging.

    Args:
        stage: the stage.
        num_stages: number of stages.
        answer: called with every message sent; a message it returns is queued in the inbox of the direction
            it comes from (e.g. a gradient for each activation sent forward).
        record: keep every message sent in :attr:`sent`.
    """

    def __init__(self, stage: int, num_stages: int, answer: Callable[[Message], Message | None] | None = None,
                 record: bool = True) -> None:
        super().__init__(stage, num_stages, TransportOptions())
        self.answer, self.record = answer, record
        self.sent: list[Message] = []
        self.inbox: dict[str, deque[Message]] = {"forward": deque(), "backward": deque()}

    def bind(self) -> str:
        return f"memory://{self.stage}"

    def connect(self, endpoints: Mapping[int, str]) -> None:
        pass

    def send(self, dst: int, msg: Message, while_blocked: Callable[[], None] | None = None) -> None:
        if self.record:
            self.sent.append(msg)
        self.stats.messages_sent += 1
        reply = self.answer(msg) if self.answer is not None else None
        if reply is not None:
            self.inbox["backward" if reply.src > self.stage else "forward"].append(reply)

    def recv(self, direction: str, timeout: float | None = None) -> Message | None:
        box = self.inbox[direction]
        if box:
            self.stats.messages_received += 1
            return box.popleft()
        if timeout is None:
            raise RuntimeError(f"recv({direction!r}) would wait forever: nothing is queued")
        return None

    def queue_depth(self, direction: str) -> int:
        return len(self.inbox[direction])

    def close(self) -> None:
        pass
