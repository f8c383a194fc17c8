"""Message channels between stages: ``zmq`` (default) and ``rpc``, behind one interface."""

from __future__ import annotations

import importlib

from .base import DIRECTIONS, KINDS, Aborted, Message, PeerLost, Transport, TransportOptions, TransportStats

__all__ = [
    "DIRECTIONS",
    "KINDS",
    "TRANSPORTS",
    "Aborted",
    "Message",
    "PeerLost",
    "Transport",
    "TransportOptions",
    "TransportStats",
    "make_transport",
]

# name -> "module:class", imported on use so that a transport's machinery loads only when chosen
TRANSPORTS = {
    "zmq": "dni_async.transport.zmq:ZmqTransport",
    "rpc": "dni_async.transport.rpc:RpcTransport",
}


def make_transport(name: str, stage: int, num_stages: int, options: TransportOptions) -> Transport:
    """Build the transport called ``name`` for one stage.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; choose one of {sorted(TRANSPORTS)}")
    module, cls = TRANSPORTS[name].split(":")
    transport_cls = getattr(importlib.import_module(module), cls)
    return transport_cls(stage, num_stages, options)  # type: ignore[no-any-return]
