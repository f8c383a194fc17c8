"""The rpc transport's process-wide state: the custom ops that receive calls, and the one TensorPipe agent."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import warnings
from datetime import timedelta
from typing import Any, List, Mapping

import torch
import torch.distributed as dist
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from torch.distributed.rpc import api as rpc_api
from torch.distributed.rpc import internal as rpc_internal

from ..netif import interface_of
from .base import DIRECTIONS, RejectLog, TransportOptions
from .rpc_receiver import _NO_STAGE, RpcReceiver

__all__ = ["join", "leave", "listener_env", "rendezvous"]

logger = logging.getLogger("dni_async.transport")

# [Note: TorchScript calls and a custom op, so that nothing is unpickled]
#
# rpc_async(to, python_fn, args) pickles the function reference and the args and
# the receiver runs pickle.Unpickler on them (rpc/internal.py), and rpc.init_rpc
# and rpc.shutdown(graceful=True) themselves exchange pickled objects
# (all_gather_object, _all_gather). The wire must never be unpickled (DESIGN.md,
# "Messages"), so the rpc transport:
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

_NUM_RPC_THREADS = 4  # each sender has at most one call in flight per destination
_CLOSE_LINGER_S, _REPLY_GRACE_S = 1.0, 0.1  # close(): longest wait for replies; time given to the last one

_LOCK = threading.Lock()
_HUB: _Hub | None = None
_C10D_STORE = "c10d"  # endpoint `init` value: rendezvous through the default process group's store
_MASTERS: dict[str, dist.TCPStore] = {}  # init url -> the rendezvous store stage 0's bind() opened
_REFUSED = RejectLog()
_LAST_DELIVERY = [0.0]  # when a deliver kernel last returned (monotonic)


def listener_env(bind_host: str, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment that keeps TensorPipe's listener on ``--bind``'s interface.

    TensorPipe listens on the interface named by ``TP_SOCKET_IFNAME``, else on
    the address this host's name resolves to, whatever ``--bind`` says; and
    malformed bytes sent to that listener abort the process (``std::bad_alloc``
    inside TensorPipe, seen here), so it must not be reachable by accident. The
    interface that holds the ``--bind`` address is named; a variable the user set
    is left alone. Returns the variables to set (none, or ``TP_SOCKET_IFNAME``).
    """
    if "TP_SOCKET_IFNAME" in environ:
        return {}
    name = interface_of(bind_host)
    if name:
        return {"TP_SOCKET_IFNAME": name}
    logger.warning("rpc transport: no interface here holds --bind %s, so TensorPipe listens on the interface of "
                   "this host's name (set TP_SOCKET_IFNAME to choose it); malformed bytes sent to it abort the "
                   "process, so use rpc only on a trusted network (the zmq transport has no such failure)", bind_host)
    return {}


def _refuse_pickle(binary_data: Any, tensor_table: Any) -> Any:
    """Replacement of rpc's Python deserializer: refuse, never unpickle."""
    _REFUSED("rpc", f"a Python-pickled rpc payload of {len(binary_data)} bytes (never unpickled)")
    raise RuntimeError("dni_async: Python-pickled rpc messages are refused")


def _local(dst: int) -> RpcReceiver | None:
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
        self.stages: dict[int, RpcReceiver] = {}
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


def rendezvous(options: TransportOptions) -> str:
    """Where a new rpc world meets (stage 0's ``bind``): the process group's store, or one opened here.

    Returns:
        ``c10d`` under torchrun, else ``tcp://HOST:PORT`` of a store on a free port, HOST
        being ``advertise_host`` or ``bind_host`` (the host name for a wildcard bind).
    """
    if dist.is_initialized():
        # under torchrun: rendezvous through the process group's store, opening no port of our own
        # (a TCPStore server listens on every interface, whatever host it is given)
        return _C10D_STORE
    store = dist.TCPStore(options.bind_host, 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=options.peer_timeout))
    host = options.advertise_host or options.bind_host
    if host in ("0.0.0.0", "*", "::"):
        host = socket.gethostname()
    init = f"tcp://{f'[{host}]' if ':' in host else host}:{store.port}"
    _MASTERS[init] = store
    return init


def join(transport: RpcReceiver, init: str, rank: int, world: int) -> None:
    """Register a stage with this process's hub, building the hub (joining the rpc world) if there is none.

    Args:
        transport: the connecting stage's transport, to which calls for its stage are delivered.
        init: the world's rendezvous address, from stage 0's endpoint.
        rank: this process's rank.
        world: the number of processes.

    Raises:
        RuntimeError: if this process already runs torch.distributed.rpc, or another rpc session.
        torch.distributed.DistError, TimeoutError: if the world did not assemble (the store: a
            timeout, or no one at the address).
    """
    global _HUB
    with _LOCK:
        if _HUB is None:
            if rpc_api._is_current_rpc_agent_set():
                raise RuntimeError(f"stage {transport.stage}: torch.distributed.rpc is already in use in this process")
            _HUB = _Hub(init, rank, world, transport.options)
        elif _HUB.init != init:
            raise RuntimeError(f"stage {transport.stage}: this process already runs rpc session {_HUB.init}")
        _HUB.stages[transport.stage] = transport


def leave(transport: RpcReceiver, unused_init: str | None) -> None:
    """Unregister a stage; the last stage of the process shuts the agent down (locally).

    Args:
        transport: the closing stage's transport.
        unused_init: the `rendezvous` address of a stage 0 that never connected, whose store goes; or None.
    """
    global _HUB
    with _LOCK:
        if unused_init in _MASTERS:
            del _MASTERS[unused_init]
        if _HUB is not None and _HUB.stages.get(transport.stage) is transport:
            del _HUB.stages[transport.stage]
            if not _HUB.stages:
                _HUB.shutdown()
                _HUB = None
