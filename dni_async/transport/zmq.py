"""The default transport: zmq PUSH/PULL over tcp, one I/O thread draining into bounded per-direction queues."""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from typing import Any, Callable, Mapping

import zmq

from .. import protocol
from ..curve import Gate, HandshakeWatch, load_keys, start_gate
from .base import DIRECTIONS, Message, PeerLost, RejectLog, SendDeadline, TransportOptions
from .zmq_receiver import _WAIT_SLICE_S, Inbound, ZmqReceiver

__all__ = ["ZmqTransport", "format_endpoint", "parse_endpoint"]

logger = logging.getLogger("dni_async.transport")

# [Note: sockets, threads and backpressure]
#
#   stage i-1                      stage i                          stage i+1
#   PUSH next ──act/eval/stop──> PULL forward  ─┐
#   PULL backward <──grad/stop── PUSH prev      ├─ I/O thread ─> queue["forward"], queue["backward"]
#                                PULL backward ─┘ <──grad/stop── PUSH prev      (bounded: queue_size)
#                                PUSH next ──act/eval/stop─────> PULL forward
#
# zmq sockets are not thread-safe, so each has one owner: the PUSH sockets are
# used only by the caller's thread (send), the PULL sockets only by the I/O
# thread (created and bound by bind() before the thread starts, closed by
# close() after it has been joined: both are the full memory barriers zmq asks
# for when a socket changes threads).
#
# The I/O thread (zmq_receiver.py) polls only the PULL sockets whose queue has room. A full
# queue therefore leaves its socket unread: zmq's buffers fill up to the
# high-water marks (RCVHWM here, SNDHWM at the sender, 1 message each, RCVHWM 2
# with CURVE, plus the kernel's tcp buffers) and the sender's send() blocks, then raises PeerLost after
# peer_timeout. The other direction keeps being drained, which is what keeps a
# stage blocked on sending activations able to receive gradients: no deadlock.
# recv() pokes the I/O thread through a pipe when it frees a slot in a paused
# queue, so a paused socket resumes at once instead of on the next poll tick.
# With ``curve_keys`` the sockets are CURVE servers/clients and a ZAP handler
# thread (owning its own sockets) admits one key per PULL socket: [Note: CURVE on
# the data plane] in curve.py.
#
# [Note: zero-copy sends]
# send_multipart(copy=False) hands zmq memoryviews of the tensors' own memory
# (protocol.encode); the zmq.Frame keeps the buffer (and so the tensor) alive
# until zmq's I/O thread has written it out, which may be after send() has
# returned. Lifetime is therefore safe, but a tensor modified in place after
# send() may go out modified. Callers must not mutate sent tensors (fresh
# activations and input gradients are never mutated by the stage loop).
# Frames under zmq.COPY_THRESHOLD (64 KiB) are copied by pyzmq anyway.

_SCHEME = "zmq"
_CLOSE_LINGER_MS = 1000  # how long close() lets sent messages (a final stop or abort) leave, then drops them


def _host_in_url(host: str) -> str:
    """Bracket an IPv6 literal for a zmq tcp URL."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def format_endpoint(forward: str, backward: str) -> str:
    """Endpoint string of a stage: ``zmq;forward=tcp://HOST:PORT;backward=tcp://HOST:PORT``."""
    return f"{_SCHEME};forward={forward};backward={backward}"


def parse_endpoint(endpoint: str) -> dict[str, str]:
    """Inverse of `format_endpoint`: ``{"forward": url, "backward": url}``, plus ``"ring"`` where a ring transport
    (ring_transport.py) added what its slots are and where they can be shared.

    Raises:
        ValueError: if ``endpoint`` is not a zmq endpoint string.
    """
    scheme, *parts = endpoint.split(";")
    urls = dict(part.split("=", 1) for part in parts if "=" in part)
    if scheme != _SCHEME or set(urls) - {"ring"} != set(DIRECTIONS) or len(parts) != len(urls):
        raise ValueError(f"not a zmq endpoint: {endpoint!r}; expected 'zmq;forward=tcp://H:P;backward=tcp://H:P'")
    return urls


class ZmqTransport(ZmqReceiver):
    """zmq PUSH/PULL channels to the two neighbours, drained by one I/O thread.

    Args:
        stage: this stage's index.
        num_stages: number of stages.
        options: shared settings; ``queue_size`` bounds each inbound queue and is
            every socket's high-water mark; ``curve_keys`` turns on CURVE (see curve.py).

    Attributes:
        gate: with CURVE, the ZAP check of inbound handshakes (``gate.refused`` counts refused ones).

    Raises:
        FileNotFoundError, ValueError: if a CURVE key file this stage needs is missing or invalid.
    """

    def __init__(self, stage: int, num_stages: int, options: TransportOptions) -> None:
        super().__init__(stage, num_stages, options)
        # keys first: a missing or bad key file fails here, before any socket or thread exists
        self._curve = load_keys(options.curve_keys, stage, num_stages) if options.curve_keys else None
        self._auth: Any = None  # ThreadAuthenticator (ZAP handler) while CURVE is on; see curve.py
        self.gate: Gate | None = None
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._inbound = {}
        self._outbound: dict[int, zmq.Socket[Any]] = {}
        self._watches: dict[int, HandshakeWatch] = {}  # CURVE: handshake failures per peer, owned like the PUSHes
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._abort = None
        self._io_error = None
        self._closed = False
        self._log_reject = RejectLog()

    def _socket(self, kind: int, url_host: str) -> zmq.Socket[Any]:
        """A socket with this transport's high-water marks."""
        sock = self._ctx.socket(kind)
        # The in-process queue is the bound that matters; zmq's own buffers hold
        # one message each way, so that they add little to the lag between
        # stages (staleness) on top of ``queue_size``.
        sock.setsockopt(zmq.SNDHWM, 1)
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.LINGER, 0)
        if url_host.startswith("["):
            sock.setsockopt(zmq.IPV6, 1)
        return sock

    def bind(self) -> str:
        """Bind both PULL sockets to random free ports and start the I/O thread.

        Returns:
            ``zmq;forward=tcp://HOST:PORT;backward=tcp://HOST:PORT``, HOST being
            ``advertise_host`` or ``bind_host`` (the host name for a wildcard bind).

        Raises:
            RuntimeError: if already bound or closed.
        """
        if self._closed or self._inbound:
            raise RuntimeError(f"stage {self.stage}: bind() called twice or after close()")
        bind_host = _host_in_url(self.options.bind_host)
        advertise = self.options.advertise_host or self.options.bind_host
        if advertise in ("0.0.0.0", "*", "::"):
            advertise = socket.gethostname()
            logger.info("wildcard bind; advertising host name %r", advertise)
        peers = {"forward": self.stage - 1, "backward": self.stage + 1}
        if self._curve is not None:  # the ZAP handler must be up before a CURVE server binds (curve.py)
            self._auth, self.gate = start_gate(self._ctx, self._curve, peers)
        urls = {}
        for direction in DIRECTIONS:
            sock = self._socket(zmq.PULL, bind_host)
            if self._curve is not None:
                self._curve.serve(sock, domain=direction)
            # refuse a frame larger than any valid one before zmq buffers it whole
            sock.setsockopt(zmq.MAXMSGSIZE, self.options.max_message_bytes + protocol.MAX_HEADER_BYTES)
            self._inbound[direction] = Inbound(direction, peers[direction], sock, queue.Queue(self.options.queue_size))
            sock.bind(f"tcp://{bind_host}:*")
            port = sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
            urls[direction] = f"tcp://{_host_in_url(advertise)}:{port}"
        self._thread = threading.Thread(target=self._io_main, name=f"dni-zmq-io-{self.stage}", daemon=True)
        self._thread.start()
        return format_endpoint(urls["forward"], urls["backward"])

    def connect(self, endpoints: Mapping[int, str]) -> None:
        """Connect a PUSH socket to each neighbour's matching PULL socket.

        Args:
            endpoints: every stage's endpoint (at least the neighbours'), as returned by their ``bind``.

        Raises:
            ValueError: if a neighbour's endpoint is missing or malformed.
        """
        if self._outbound or self._closed:
            raise RuntimeError(f"stage {self.stage}: connect() called twice or after close()")
        # stage i's "next" PUSH feeds stage i+1's forward PULL; its "prev" PUSH stage i-1's backward PULL
        targets = {self.stage + 1: "forward", self.stage - 1: "backward"}
        for peer, direction in targets.items():
            if not 0 <= peer < self.num_stages:
                continue
            if peer not in endpoints:
                raise ValueError(f"stage {self.stage}: no endpoint for neighbour stage {peer}")
            url = parse_endpoint(endpoints[peer])[direction]
            sock = self._socket(zmq.PUSH, url.split("//", 1)[-1])
            # IMMEDIATE: queue nothing for a peer that is not (or no longer) connected,
            # so that sending to a dead peer blocks and times out instead of piling up.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            if self._curve is not None:
                self._curve.connect_to(sock, peer)
                self._watches[peer] = HandshakeWatch(sock)
            sock.connect(url)
            self._outbound[peer] = sock

    def send(self, dst: int, msg: Message, while_blocked: Callable[[], None] | None = None) -> None:
        """Send ``msg`` to neighbour ``dst``, zero-copy; see `Transport.send`.

        Blocks while the peer is full, up to ``options.peer_timeout`` seconds. An
        ``abort`` is best effort: it waits at most about a second and never raises
        PeerLost. The tensors must not be modified in place afterwards.

        Raises:
            PeerLost: if the peer took nothing for ``options.peer_timeout`` seconds, or (CURVE) refused
                this stage's handshake.
            Aborted: if an abort arrives while this send is blocked on a full peer.
            ValueError: if ``dst`` is not a neighbour, ``msg.src`` is not this stage, the kind
                does not travel that way (grad goes to stage - 1, act/eval to stage + 1), or
                the message cannot be encoded (`protocol.ProtocolError`).
            RuntimeError: before ``connect`` or after ``close``.
        """
        self.check_route(dst, msg)
        if self._closed or dst not in self._outbound:
            raise RuntimeError(f"stage {self.stage}: send() before connect() or after close()")
        self._send_frames(dst, protocol.encode(msg), SendDeadline(self, dst, msg), while_blocked)

    def _send_frames(self, dst: int, frames: list[protocol.Frame], wait: SendDeadline,
                     while_blocked: Callable[[], None] | None) -> None:
        """Hand ``frames`` to ``dst``'s PUSH socket, waiting (``while_blocked`` every ~0.1 s) while it is full."""
        sock = self._outbound[dst]
        while True:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                pass
            remaining = wait.remaining(self._abort)
            if remaining is None:
                return
            if dst in self._watches and (failure := self._watches[dst].failure()):
                if wait.best_effort:  # an abort never raises PeerLost
                    return
                raise PeerLost(dst, failure)  # a refused key: waiting out peer_timeout would not help
            if while_blocked is not None:
                while_blocked()
            sock.poll(int(min(remaining, _WAIT_SLICE_S) * 1000) + 1, zmq.POLLOUT)
        self.stats.messages_sent += 1
        self.stats.bytes_sent += sum(protocol.frame_nbytes(f) for f in frames)

    def close(self) -> None:
        """Stop the I/O thread and close every socket; idempotent.

        Messages already handed to zmq get up to one second to leave (so that a
        final ``stop`` or ``abort`` is not lost), then are discarded. Call it from
        the thread that sends and receives, not while another thread is in recv().
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            if self._thread.is_alive():
                logger.error("transport I/O thread did not stop")
                return  # leave its sockets, pipe and context alone rather than pull them from under it
        for watch in self._watches.values():
            watch.close()
        for sock in self._outbound.values():
            sock.close(linger=_CLOSE_LINGER_MS)
        for inb in self._inbound.values():
            inb.socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()  # its sockets live in our context: before term()
        self._ctx.term()
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            os.close(fd)
