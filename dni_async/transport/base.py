"""The transport interface: bounded, asynchronous message channels between neighbouring stages."""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

__all__ = [
    "KINDS",
    "DIRECTIONS",
    "DIRECTION_KINDS",
    "Message",
    "RejectLog",
    "SendDeadline",
    "ABORT_TIMEOUT_S",
    "TransportOptions",
    "TransportStats",
    "PeerLost",
    "Aborted",
    "Transport",
]

# Message kinds (DESIGN.md, "Messages"). `act`, `eval` and `stop` travel forward
# (stage i -> i+1) and `grad` travels backward (i+1 -> i); `stop` also travels
# backward at shutdown, and `abort` may travel either way.
KINDS = ("act", "grad", "eval", "stop", "abort")
# Inbound traffic is kept in one bounded queue per direction: "forward" holds
# what came from stage-1, "backward" what came from stage+1. Two queues (and two
# sockets) are what keep backpressure free of deadlock: a stage whose forward
# queue is full still drains the gradients coming back.
DIRECTIONS = ("forward", "backward")
# Which kinds travel in each direction.
DIRECTION_KINDS = {"forward": ("act", "eval", "stop", "abort"), "backward": ("grad", "stop", "abort")}
ABORT_TIMEOUT_S = 1.0  # how long a best-effort abort send may try
_LOG_FIRST, _LOG_EVERY_S = 10, 10.0  # rejections: log the first ten, then one line per ten seconds
logger = logging.getLogger("dni_async.transport")


@dataclass
class Message:
    """One message: a kind, the training step it belongs to, its sender and its tensors."""

    kind: str
    step: int
    src: int
    tensors: list[torch.Tensor] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class TransportOptions:
    """Settings shared by every transport."""

    bind_host: str = "127.0.0.1"
    """Address the data-plane sockets bind to (loopback unless told otherwise)."""
    advertise_host: str | None = None
    """Address peers use to reach this stage; None: ``bind_host``."""
    queue_size: int = 8
    """Inbound queue bound per direction, in messages."""
    peer_timeout: float = 60.0
    """Seconds a send may block on a full peer before the peer counts as lost."""
    max_message_bytes: int = 1 << 30
    """Largest message accepted from the network; larger ones are rejected."""
    curve_keys: str | None = None
    """Folder of ZeroMQ CURVE keys (``python -m dni_async keys DIR --stages N``): the zmq transport encrypts its
    connections and admits only the neighbour's key on each socket; None: plain tcp."""

    device: str = "cpu"
    """The stage's device: on a GPU (``cuda:N``) sends are staged off the training thread
    (transport/device_sender.py) and received tensors land in page-locked memory."""

    @property
    def pin_memory(self) -> bool:
        """Whether received tensors go to page-locked memory (a GPU stage copies them on without waiting)."""
        return self.device.startswith("cuda")

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.peer_timeout <= 0:
            raise ValueError(f"peer_timeout must be > 0, got {self.peer_timeout}")


@dataclass
class TransportStats:
    """Counters of one transport, reported in summary.json."""

    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rejected: int = 0


class PeerLost(RuntimeError):
    """A peer is gone, or did not take a message within ``peer_timeout``."""

    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(f"lost stage {peer}: {reason}")
        self.peer = peer


class Aborted(RuntimeError):
    """An ``abort`` message arrived: another stage failed."""

    def __init__(self, src: int, reason: str) -> None:
        super().__init__(f"stage {src} aborted the run: {reason}")
        self.src = src
        self.reason = reason


class RejectLog:
    """Logs what a stage rejects: the first few in full, then one line per interval with a count (the stage
    process's log format names the stage).

    Args:
        what: ``%``-format of one rejection, given ``(direction, reason)``.
        first: how many are logged in full.
    """

    def __init__(self, what: str = "dropped a malformed %s message: %s", first: int = _LOG_FIRST) -> None:
        self.what, self.first = what, first
        self.count = 0
        self.suppressed = 0
        self.last = 0.0

    def __call__(self, direction: str, reason: str) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count <= self.first or now - self.last >= _LOG_EVERY_S:
            more = f" ({self.suppressed} more rejected since the last report)" if self.suppressed else ""
            logger.warning(f"{self.what}%s", direction, reason, more)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1


class SendDeadline:
    """The wait of one send: PeerLost once ``peer_timeout`` has passed, Aborted if an abort arrives meanwhile.

    An ``abort`` send is best effort: it tries for ``ABORT_TIMEOUT_S`` and then gives up quietly.
    """

    def __init__(self, transport: Transport, dst: int, msg: Message) -> None:
        self.transport, self.dst, self.msg = transport, dst, msg
        self.best_effort = msg.kind == "abort"
        peer_timeout = transport.options.peer_timeout
        self.timeout = min(ABORT_TIMEOUT_S, peer_timeout) if self.best_effort else peer_timeout
        self.deadline = time.monotonic() + self.timeout

    def remaining(self, abort: tuple[int, str] | None) -> float | None:
        """Seconds left to wait, or None when a best-effort send should give up (logged).

        Raises:
            PeerLost: past the deadline.
            Aborted: when ``abort`` (the transport's received abort) is set.
        """
        left = self.deadline - time.monotonic()
        if left <= 0:
            if self.best_effort:
                logger.warning("could not deliver abort to stage %d", self.dst)
                return None
            raise PeerLost(self.dst, f"it took no message for {self.timeout:g} s ({self.msg.kind}, step "
                                     f"{self.msg.step}): its queue stayed full or it is gone")
        if abort is not None and not self.best_effort:
            raise Aborted(*abort)
        return left


class Transport(abc.ABC):
    """Channels of one stage to its neighbours (stage - 1 and stage + 1).

    Lifecycle: ``endpoint = t.bind()`` (start listening; the runtime publishes
    the endpoint through the torchrun store), ``t.connect(endpoints)`` (all
    stages' endpoints, by stage), then ``send``/``recv``, then ``close()``.
    An implementation drains its inbound channels on its own I/O thread into
    the bounded per-direction queues, so that a stage blocked in ``send`` keeps
    receiving.

    Args:
        stage: this stage's index.
        num_stages: number of stages.
        options: shared settings.
    """

    def __init__(self, stage: int, num_stages: int, options: TransportOptions) -> None:
        if not 0 <= stage < num_stages:
            raise ValueError(f"stage {stage} out of range for {num_stages} stages")
        self.stage = stage
        self.num_stages = num_stages
        self.options = options
        self.stats = TransportStats()

    def check_route(self, dst: int, msg: Message) -> str:
        """The direction ``msg`` lands in at ``dst`` (``"forward"`` for stage + 1), checked.

        Raises:
            ValueError: if ``dst`` is not a neighbour, ``msg.src`` is not this stage, or the kind does not travel
                that way (grad goes to stage - 1, act/eval to stage + 1).
        """
        if abs(dst - self.stage) != 1 or not 0 <= dst < self.num_stages:
            raise ValueError(f"stage {self.stage} can only send to its neighbours, not to stage {dst}")
        if msg.src != self.stage:
            raise ValueError(f"stage {self.stage} sends a message with src={msg.src}")
        direction = "forward" if dst > self.stage else "backward"
        if msg.kind not in DIRECTION_KINDS[direction]:
            raise ValueError(f"stage {self.stage} cannot send a {msg.kind!r} message to stage {dst}")
        return direction

    def carries_device_tensors(self, dst: int) -> bool:
        """Whether ``send`` to ``dst`` takes GPU tensors as they are (a ring in GPU memory); else a GPU stage's
        tensors reach it in host memory."""
        return False

    @abc.abstractmethod
    def bind(self) -> str:
        """Start listening; return the endpoint that peers connect to."""

    @abc.abstractmethod
    def connect(self, endpoints: Mapping[int, str]) -> None:
        """Connect to the neighbours, given every stage's endpoint."""

    @abc.abstractmethod
    def send(self, dst: int, msg: Message, while_blocked: Callable[[], None] | None = None) -> None:
        """Send ``msg`` to neighbour ``dst``.

        Blocks while the peer's inbound queue is full (backpressure). The
        tensors must not be modified afterwards (sends may be zero-copy).
        ``while_blocked`` is called every ~0.1 s while the send waits: a stage
        blocked sending forward uses it to consume the gradients coming back,
        without which two stages whose queues toward each other are both full
        would wait on each other forever.

        Raises:
            PeerLost: if the peer took nothing for ``options.peer_timeout`` seconds.
            ValueError: if ``dst`` is not a neighbour or the kind is unknown.
        """

    @abc.abstractmethod
    def recv(self, direction: str, timeout: float | None = None) -> Message | None:
        """Next message from one direction's queue, in the sender's order.

        Args:
            direction: ``"forward"`` (from stage - 1) or ``"backward"`` (from stage + 1).
            timeout: seconds to wait; 0 polls; None waits without bound.

        Returns:
            The message, or None if none came in time.

        Raises:
            Aborted: when an ``abort`` message has arrived from any stage.
        """

    @abc.abstractmethod
    def queue_depth(self, direction: str) -> int:
        """Messages waiting in one direction's queue."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release sockets, threads and files; idempotent."""
