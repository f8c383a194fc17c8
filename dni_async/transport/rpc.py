"""The alternative transport: torch.distributed.rpc (TensorPipe) via TorchScript calls, never Python pickle."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.distributed.rpc as rpc

from .. import protocol
from . import rpc_hub
from .base import DIRECTIONS, Message, PeerLost, SendDeadline, TransportOptions
from .rpc_hub import _script_functions, listener_env
from .rpc_receiver import _REJECTED, _WAIT_SLICE_S, RpcReceiver

__all__ = ["RpcTransport", "format_endpoint", "listener_env", "parse_endpoint"]

logger = logging.getLogger("dni_async.transport")

# How a message reaches a stage without Python pickle, through the process's one agent:
# [Note: TorchScript calls and a custom op, so that nothing is unpickled] in rpc_hub.py.
#
# [Note: backpressure and order over rpc]
#
# rpc has neither. A send waits for its call's reply
# before returning (one message in flight per destination, so order is kept);
# the kernel waits at most ~0.1 s for room and answers FULL instead of blocking
# an rpc thread, and the sender retries until peer_timeout. When the last reply
# said the queue was full, a large message is preceded by a cheap probe
# (`_remote_space`) so that megabytes are not resent for nothing.

_SCHEME = "rpc"
_PROBE_MIN_BYTES = 1 << 16  # payloads at least this large probe a full peer first instead of being resent

_BOOT_ID = uuid.uuid4().hex[:12]


def _proc_id() -> str:
    """Identity of this process in endpoints (the pid tells a forked copy apart)."""
    return f"{_BOOT_ID}-{os.getpid()}"


def format_endpoint(proc: str, init: str | None) -> str:
    """Endpoint string of a stage: ``rpc;proc=ID`` plus ``;init=tcp://HOST:PORT`` for stage 0."""
    return f"{_SCHEME};proc={proc}" + (f";init={init}" if init else "")


def parse_endpoint(endpoint: str) -> dict[str, str]:
    """Inverse of `format_endpoint`: ``{"proc": id}`` and, for stage 0, ``"init"``.

    Raises:
        ValueError: if ``endpoint`` is not an rpc endpoint string.
    """
    scheme, *parts = endpoint.split(";")
    fields = dict(part.split("=", 1) for part in parts if "=" in part)
    if scheme != _SCHEME or "proc" not in fields or not set(fields) <= {"proc", "init"} or len(parts) != len(fields):
        raise ValueError(f"not an rpc endpoint: {endpoint!r}; expected 'rpc;proc=ID[;init=tcp://H:P]'")
    return fields


def _byte_tensor(frame: protocol.Frame) -> torch.Tensor:
    """A flat uint8 tensor over a frame's memory (a copy for read-only bytes)."""
    if len(memoryview(frame)) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(frame if not isinstance(frame, bytes) else bytearray(frame), dtype=torch.uint8)


class RpcTransport(RpcReceiver):
    """Channels to the two neighbours over torch.distributed.rpc, without Python pickle.

    Every stage's endpoint must be given to ``connect`` (rpc needs the whole
    world), which waits until every process has connected, at most
    ``options.peer_timeout`` seconds.

    Args:
        stage: this stage's index.
        num_stages: number of stages.
        options: shared settings; ``queue_size`` bounds each inbound queue.
    """

    def __init__(self, stage: int, num_stages: int, options: TransportOptions) -> None:
        super().__init__(stage, num_stages, options)
        self._workers: dict[int, str] = {}
        self._send_locks = {peer: threading.Lock() for peer in (stage - 1, stage + 1)}
        self._peer_full = {peer: False for peer in (stage - 1, stage + 1)}
        self._endpoint: str | None = None

    def bind(self) -> str:
        """Return this stage's endpoint; stage 0 also opens the rendezvous store on a free port.

        Returns:
            ``rpc;proc=ID`` (the process), plus ``;init=tcp://HOST:PORT`` for stage 0,
            HOST being ``advertise_host`` or ``bind_host`` (the host name for a wildcard bind).

        Raises:
            RuntimeError: if already bound or closed.
        """
        if self._closed or self._endpoint is not None:
            raise RuntimeError(f"stage {self.stage}: bind() called twice or after close()")
        init = rpc_hub.rendezvous(self.options) if self.stage == 0 else None
        self._endpoint = format_endpoint(_proc_id(), init)
        return self._endpoint

    def connect(self, endpoints: Mapping[int, str]) -> None:
        """Join the rpc world (or the one this process already runs) and register this stage.

        Args:
            endpoints: every stage's endpoint, as returned by their ``bind``.

        Raises:
            ValueError: if an endpoint is missing or malformed.
            PeerLost: if not every process joined within ``options.peer_timeout`` seconds.
            RuntimeError: if called twice, before ``bind`` or after ``close``, or if this
                process already runs another rpc session.
        """
        if self._closed or self._endpoint is None or self._workers:
            raise RuntimeError(f"stage {self.stage}: connect() before bind(), twice or after close()")
        missing = sorted(set(range(self.num_stages)) - set(endpoints))
        if missing:
            raise ValueError(f"stage {self.stage}: the rpc transport needs every stage's endpoint; missing {missing}")
        parsed = [parse_endpoint(endpoints[s]) for s in range(self.num_stages)]
        init = parsed[0].get("init")
        if init is None:
            raise ValueError(f"stage {self.stage}: stage 0's endpoint {endpoints[0]!r} has no init address")
        ranks: dict[str, int] = {}
        for fields in parsed:  # stage order: a process's rank is fixed by its lowest stage
            ranks.setdefault(fields["proc"], len(ranks))
        names = [f"dni-rpc-{ranks[fields['proc']]}" for fields in parsed]
        try:
            rpc_hub.join(self, init, ranks[parsed[self.stage]["proc"]], len(ranks))
        except (dist.DistError, TimeoutError) as err:  # the store: a timeout, or no one at the address
            mine = [s for s, fields in enumerate(parsed) if fields["proc"] == parsed[self.stage]["proc"]]
            peer = min((s for s in range(self.num_stages) if s not in mine), default=self.stage)
            raise PeerLost(peer, f"the rpc world of {len(ranks)} processes did not assemble: {err}") from err
        self._workers = {p: names[p] for p in (self.stage - 1, self.stage + 1) if 0 <= p < self.num_stages}

    def send(self, dst: int, msg: Message, while_blocked: Callable[[], None] | None = None) -> None:
        """Send ``msg`` to neighbour ``dst`` and wait until it is queued there; see `Transport.send`.

        Blocks while the peer's queue is full, up to ``options.peer_timeout`` seconds. An
        ``abort`` is best effort: it tries for about a second and never raises PeerLost.

        Raises:
            PeerLost: if the peer took nothing for ``options.peer_timeout`` seconds, or the call failed.
            Aborted: if an abort arrives while this send is blocked on a full peer.
            ValueError: if ``dst`` is not a neighbour, ``msg.src`` is not this stage, the kind does
                not travel that way, or the message cannot be encoded (`protocol.ProtocolError`).
            RuntimeError: before ``connect``, after ``close``, or if the peer rejected the message.
        """
        direction = self.check_route(dst, msg)  # the queue it lands in at dst
        if self._closed or dst not in self._workers:
            raise RuntimeError(f"stage {self.stage}: send() before connect() or after close()")
        frames = protocol.encode(msg)
        header, payload = _byte_tensor(frames[0]), [_byte_tensor(f) for f in frames[1:]]
        nbytes = sum(protocol.frame_nbytes(f) for f in frames)
        deadline = SendDeadline(self, dst, msg)
        deliver, space, _ = _script_functions()
        code = DIRECTIONS.index(direction)
        with self._send_locks[dst]:
            while True:
                remaining = deadline.remaining(self._abort)
                if remaining is None:
                    return
                wait = min(_WAIT_SLICE_S, remaining)
                probe = self._peer_full[dst] and nbytes >= _PROBE_MIN_BYTES
                args = (dst, code, wait) if probe else (dst, code, header, payload, wait)
                try:
                    status = self._call(dst, space if probe else deliver, args, remaining, while_blocked)
                except RuntimeError as err:
                    if deadline.best_effort:
                        logger.warning("could not deliver abort to stage %d: %s", dst, err)
                        return
                    raise PeerLost(dst, f"rpc to it failed ({msg.kind}, step {msg.step}): {err}") from err
                if status == _REJECTED:
                    raise RuntimeError(f"stage {dst} rejected {msg.kind} step {msg.step} from stage {self.stage}")
                if status >= 0 and not probe:
                    self._peer_full[dst] = status == 0
                    break
                self._peer_full[dst] = status < 1
                if status < 1 and while_blocked is not None:  # full, or not (yet, or any more) there
                    while_blocked()
        with self._stats_lock:
            self.stats.messages_sent += 1
            self.stats.bytes_sent += nbytes

    def _call(self, dst: int, fn: Any, args: tuple[Any, ...], remaining: float,
              while_blocked: Callable[[], None] | None) -> int:
        """One rpc to ``dst``'s process, calling ``while_blocked`` every ~0.1 s until it answers."""
        done = threading.Event()
        fut = rpc.rpc_async(self._workers[dst], fn, args=args, timeout=max(remaining, 2 * _WAIT_SLICE_S))
        fut.add_done_callback(lambda _: done.set())
        while not done.wait(_WAIT_SLICE_S):  # rpc's own timeout ends the wait
            if while_blocked is not None:
                while_blocked()
        return int(fut.value())

    def close(self) -> None:
        """Unregister this stage; the last stage of the process shuts the agent down (locally); idempotent."""
        if self._closed:
            return
        self._closed = True
        # stage 0, bound but never connected: its rendezvous store goes
        init = parse_endpoint(self._endpoint).get("init") if self._endpoint and not self._workers else None
        rpc_hub.leave(self, init)
