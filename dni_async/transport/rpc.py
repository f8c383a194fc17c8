"""The alternative transport: torch.distributed.rpc (TensorPipe) via TorchScript calls, never Python pickle."""

from __future__ import annotations

import collections
import ctypes
import functools
import ipaddress
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from datetime import timedelta
from typing import Any, Callable, List, Mapping

import torch
import torch.distributed as dist
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from torch.distributed.rpc import api as rpc_api
from torch.distributed.rpc import internal as rpc_internal

from .. import protocol
from .base import (
    DIRECTION_KINDS,
    DIRECTIONS,
    Aborted,
    Message,
    PeerLost,
    RejectLog,
    SendDeadline,
    Transport,
    TransportOptions,
)

__all__ = ["RpcTransport", "format_endpoint", "listener_env", "parse_endpoint"]

logger = logging.getLogger("dni_async.transport")

# [Note: TorchScript calls and a custom op, so that nothing is unpickled]
#
# rpc_async(to, python_fn, args) pickles the function reference and the args and
# the receiver runs pickle.Unpickler on them (rpc/internal.py), and rpc.init_rpc
# and rpc.shutdown(graceful=True) themselves exchange pickled objects
# (all_gather_object, _all_gather). The wire must never be unpickled (DESIGN.md,
# "Messages"), so this module:
#   * sends only ScriptCalls: `_remote_deliver` is a @torch.jit.script function;
#     its call (qualified name + IValues: ints, floats, uint8 tensors) is encoded
#     by the JIT's C++ IValue serializer, whose C++ decoder rebuilds only such
#     values and runs no Python code. On the receiver the JIT runs it, and it calls the custom op
#     dni_async::deliver, whose kernel is Python (`_deliver_kernel`): that is how
#     a message reaches this process's queues. The message itself is the frames of
#     `protocol.encode` as flat uint8 tensors, decoded and validated by
#     `protocol.decode` exactly as the zmq transport does.
#   * builds the TensorPipe agent itself (`_Hub`) over a TCPStore instead of
#     calling init_rpc, and shuts it down locally (graceful=False);
#   * replaces rpc's Python deserializer for the whole process by `_refuse_pickle`,
#     so that a PYTHON_CALL (or a pickled reply) that anyone sends is refused, not
#     unpickled. This stays in place once the transport has been used.
#
# One agent per process: torch allows one, so all the stages of a process share
# it (a "hub"; ranks are processes, ordered by their lowest stage, so stage 0's
# process is rank 0 and hosts the rendezvous store that stage 0's bind() opens).
#
# Backpressure and order: rpc has neither. A send waits for its call's reply
# before returning (one message in flight per destination, so order is kept);
# the kernel waits at most ~0.1 s for room and answers FULL instead of blocking
# an rpc thread, and the sender retries until peer_timeout. When the last reply
# said the queue was full, a large message is preceded by a cheap probe
# (`_remote_space`) so that megabytes are not resent for nothing.

_SCHEME = "rpc"
_WAIT_SLICE_S = 0.1  # kernel's longest wait for room; sender's poll tick for while_blocked and aborts
_PROBE_MIN_BYTES = 1 << 16  # payloads at least this large probe a full peer first instead of being resent
_FULL, _NO_STAGE, _REJECTED = -1, -2, -3  # kernel answers; >= 0: accepted, that many free slots left
_NUM_RPC_THREADS = 4  # each sender has at most one call in flight per destination
_CLOSE_LINGER_S, _REPLY_GRACE_S = 1.0, 0.1  # close(): longest wait for replies; time given to the last one


_BOOT_ID = uuid.uuid4().hex[:12]


def listener_env(bind_host: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment that keeps TensorPipe's listener where ``--bind`` says, as far as TensorPipe allows.

    TensorPipe listens on the interface named by ``TP_SOCKET_IFNAME``, else on
    the address this host's name resolves to, whatever ``--bind`` says; and
    malformed bytes sent to that listener abort the process (``std::bad_alloc``
    inside TensorPipe, seen here), so it must not be reachable by accident. A
    loopback bind pins it to the loopback interface; a variable the user set is
    left alone. Returns the variables to set (none, or ``TP_SOCKET_IFNAME``).
    """
    if "TP_SOCKET_IFNAME" in environ:
        return {}
    try:
        loopback = bind_host == "localhost" or ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:  # a host name
        loopback = False
    names = [name for _, name in socket.if_nameindex()]
    if loopback and (lo := next((n for n in ("lo", "lo0") if n in names), None)):
        return {"TP_SOCKET_IFNAME": lo}
    logger.warning("rpc transport: TensorPipe listens on the interface of this host's name, which --bind %s does "
                   "not change (set TP_SOCKET_IFNAME to choose it); malformed bytes sent to it abort the process, so "
                   "use rpc only on a trusted network (the zmq transport has no such failure)", bind_host)
    return {}


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


# ------------------------------------------------------------- process-wide state: ops, agent, stages

_LOCK = threading.Lock()
_HUB: _Hub | None = None
_C10D_STORE = "c10d"  # endpoint `init` value: rendezvous through the default process group's store
_MASTERS: dict[str, dist.TCPStore] = {}  # init url -> the rendezvous store stage 0's bind() opened
_REFUSED = RejectLog(-1)
_LAST_DELIVERY = [0.0]  # when a deliver kernel last returned (monotonic)


def _refuse_pickle(binary_data: Any, tensor_table: Any) -> Any:
    """Replacement of rpc's Python deserializer: refuse, never unpickle."""
    _REFUSED("rpc", f"a Python-pickled rpc payload of {len(binary_data)} bytes (never unpickled)")
    raise RuntimeError("dni_async: Python-pickled rpc messages are refused")


def _local(dst: int) -> RpcTransport | None:
    """The live transport of stage ``dst`` in this process, if any."""
    hub = _HUB
    return hub.stages.get(dst) if hub is not None else None


def _deliver_kernel(dst: int, direction: int, header: torch.Tensor, frames: List[torch.Tensor], wait: float) -> int:
    """Kernel of dni_async::deliver, run on an rpc thread: hand a message to local stage ``dst``."""
    transport = _local(dst)
    try:
        return _NO_STAGE if transport is None else transport._accept(direction, header, frames, wait)
    finally:
        _LAST_DELIVERY[0] = time.monotonic()  # its reply is about to be written: see _Hub.shutdown


def _space_kernel(dst: int, direction: int, wait: float) -> int:
    """Kernel of dni_async::space: free slots of a local queue, after waiting up to ``wait`` s for one."""
    transport = _local(dst)
    if transport is None or direction not in (0, 1):
        return _NO_STAGE
    return transport._inbound[DIRECTIONS[direction]].wait_room(wait)


def _remote_deliver(dst: int, direction: int, header: torch.Tensor, frames: List[torch.Tensor], wait: float) -> int:
    return torch.ops.dni_async.deliver(dst, direction, header, frames, wait)  # type: ignore[no-any-return]


def _remote_space(dst: int, direction: int, wait: float) -> int:
    return torch.ops.dni_async.space(dst, direction, wait)  # type: ignore[no-any-return]


@functools.cache
def _script_functions() -> tuple[Any, Any, torch.library.Library]:
    """Register the custom ops (once per process) and script the two remote functions."""
    # Library.impl, not torch.library.custom_op: the latter wraps the kernel in a dynamo guard whose
    # first call imports torch._dynamo (seconds), on an rpc thread, past the rpc timeout.
    lib = torch.library.Library("dni_async", "FRAGMENT")
    lib.define("deliver(int dst, int direction, Tensor header, Tensor[] frames, float wait) -> int")
    lib.define("space(int dst, int direction, float wait) -> int")
    lib.impl("deliver", _deliver_kernel, "CompositeExplicitAutograd")
    lib.impl("space", _space_kernel, "CompositeExplicitAutograd")
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is rpc's only pickle-free call path
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
        return torch.jit.script(_remote_deliver), torch.jit.script(_remote_space), lib


class _Hub:
    """This process's TensorPipe agent, shared by its stages; built without init_rpc (see the Note)."""

    def __init__(self, init: str, rank: int, world: int, options: TransportOptions) -> None:
        self.init = init
        self.stages: dict[int, RpcTransport] = {}
        _script_functions()  # before the agent listens: peers may call at once
        timeout = timedelta(seconds=options.peer_timeout)
        os.environ.update(listener_env(options.bind_host, os.environ))  # read by the agent's constructor below
        if init == _C10D_STORE:
            self.store: dist.Store = dist.PrefixStore("dni-rpc-c10d", dist.distributed_c10d._get_default_store())
        elif init in _MASTERS:  # this process hosts stage 0: its bind() opened the store
            self.store = _MASTERS.pop(init)
        else:
            host, port = init.removeprefix("tcp://").rsplit(":", 1)
            self.store = dist.TCPStore(host.strip("[]"), int(port), is_master=False, timeout=timeout)
        self.store.set_timeout(timeout)
        rpc_internal.deserialize = _refuse_pickle  # type: ignore[assignment]
        rpc_internal._internal_rpc_pickler.deserialize = _refuse_pickle  # type: ignore[method-assign]
        try:
            dist_autograd._init(0)  # rpc_async needs the container; its worker id only matters to dist autograd
        except RuntimeError as err:
            if "already initialized" not in str(err):
                raise
        # the "basic" channel moves CPU tensors over the transport itself (shm on one host, tcp across
        # hosts): as fast here as the cma/mpt channels, whose loops cost ~17 more threads per process
        opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=_NUM_RPC_THREADS, rpc_timeout=options.peer_timeout,
                                               init_method="env://" if init == _C10D_STORE else init,
                                               _channels=["basic"])
        store = dist.PrefixStore("dni-rpc", self.store)
        # the constructor waits for every rank (store timeout: peer_timeout) and, started, has every
        # peer's address: only rank 0 (the store's host) must wait until all the others are that far
        agent = rpc.TensorPipeAgent(store, f"dni-rpc-{rank}", rank, world, opts, {}, [])
        rpc_api._init_rpc_states(agent)
        try:
            store.set(f"up/{rank}", "1")
            if rank == 0:
                store.wait([f"up/{r}" for r in range(world)])
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self) -> None:
        """Local, bounded shutdown (a graceful one needs every peer, and pickles)."""
        # A local shutdown drops replies not yet written, and a reply is a sender's only proof of
        # delivery: a final stop, taken from the queue at once, would read as PeerLost to its sender.
        # So linger (at most _CLOSE_LINGER_S) until no call is being served and the last reply had time to go.
        deadline = time.monotonic() + _CLOSE_LINGER_S
        agent = rpc_api._get_current_rpc_agent()
        while time.monotonic() < deadline and (
            agent.get_metrics().get("agent.server_active_calls", "0") != "0"
            or time.monotonic() - _LAST_DELIVERY[0] < _REPLY_GRACE_S
        ):
            time.sleep(0.005)
        try:
            rpc_api.shutdown(graceful=False)
        except Exception:  # teardown goes on regardless
            logger.exception("rpc agent shutdown failed")


class RpcTransport(Transport):
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
        self._inbound = {d: _Inbound(d, p, options.queue_size) for d, p in zip(DIRECTIONS, (stage - 1, stage + 1))}
        self._workers: dict[int, str] = {}
        self._send_locks = {peer: threading.Lock() for peer in (stage - 1, stage + 1)}
        self._peer_full = {peer: False for peer in (stage - 1, stage + 1)}
        self._stats_lock = threading.Lock()
        self._endpoint: str | None = None
        self._abort: tuple[int, str] | None = None
        self._closed = False
        self._log_reject = RejectLog(stage)

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
        init = None
        if self.stage == 0 and dist.is_initialized():
            # under torchrun: rendezvous through the process group's store, opening no port of our own
            # (a TCPStore server listens on every interface, whatever host it is given)
            init = _C10D_STORE
        elif self.stage == 0:
            store = dist.TCPStore(self.options.bind_host, 0, is_master=True, wait_for_workers=False,
                                  timeout=timedelta(seconds=self.options.peer_timeout))
            host = self.options.advertise_host or self.options.bind_host
            if host in ("0.0.0.0", "*", "::"):
                host = socket.gethostname()
            init = f"tcp://{f'[{host}]' if ':' in host else host}:{store.port}"
            _MASTERS[init] = store
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
        global _HUB
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
        mine = [s for s, fields in enumerate(parsed) if fields["proc"] == parsed[self.stage]["proc"]]
        with _LOCK:
            if _HUB is None:
                if rpc_api._is_current_rpc_agent_set():
                    raise RuntimeError(f"stage {self.stage}: torch.distributed.rpc is already in use in this process")
                try:
                    _HUB = _Hub(init, ranks[parsed[self.stage]["proc"]], len(ranks), self.options)
                except (dist.DistError, TimeoutError) as err:  # the store: a timeout, or no one at the address
                    peer = min((s for s in range(self.num_stages) if s not in mine), default=self.stage)
                    raise PeerLost(peer, f"the rpc world of {len(ranks)} processes did not assemble: {err}") from err
            elif _HUB.init != init:
                raise RuntimeError(f"stage {self.stage}: this process already runs rpc session {_HUB.init}")
            self._workers = {p: names[p] for p in (self.stage - 1, self.stage + 1) if 0 <= p < self.num_stages}
            _HUB.stages[self.stage] = self

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
        if abs(dst - self.stage) != 1 or not 0 <= dst < self.num_stages:
            raise ValueError(f"stage {self.stage} can only send to its neighbours, not to stage {dst}")
        if msg.src != self.stage:
            raise ValueError(f"stage {self.stage} sends a message with src={msg.src}")
        direction = "forward" if dst > self.stage else "backward"  # the queue it lands in at dst
        if msg.kind not in DIRECTION_KINDS[direction]:
            raise ValueError(f"stage {self.stage} cannot send a {msg.kind!r} message to stage {dst}")
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
                        logger.warning("[Stage %d] could not deliver abort to stage %d: %s", self.stage, dst, err)
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

    def _accept(self, direction: int, header: torch.Tensor, frames: List[torch.Tensor], wait: float) -> int:
        """Decode and validate one message (rpc thread); queue it, record an abort, or reject it."""
        name = DIRECTIONS[direction] if direction in (0, 1) else f"direction {direction}"
        try:
            if direction not in (0, 1):
                raise protocol.ProtocolError(f"unknown direction {direction}")
            inb = self._inbound[name]
            msg = protocol.decode([_byte_view(header), *map(_byte_view, frames)], self.options.max_message_bytes)
            if msg.src != inb.peer or msg.kind not in DIRECTION_KINDS[name]:
                raise protocol.ProtocolError(f"{msg.kind} from src={msg.src} on the channel of stage {inb.peer}")
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

    def close(self) -> None:
        """Unregister this stage; the last stage of the process shuts the agent down (locally); idempotent."""
        global _HUB
        if self._closed:
            return
        self._closed = True
        with _LOCK:
            init = parse_endpoint(self._endpoint).get("init") if self._endpoint and not self._workers else None
            if init in _MASTERS:  # stage 0, bound but never connected: its store goes
                del _MASTERS[init]
            if _HUB is not None and _HUB.stages.get(self.stage) is self:
                del _HUB.stages[self.stage]
                if not _HUB.stages:
                    _HUB.shutdown()
                    _HUB = None
