"""Message channels between stages: ``zmq`` (default), ``rpc``, and the rings ``shm`` and ``cuda-ipc``, behind one
interface."""

from __future__ import annotations

import importlib

import torch

from .base import DIRECTIONS, KINDS, Aborted, Message, PeerLost, Transport, TransportOptions, TransportStats

__all__ = [
    "DIRECTIONS",
    "KINDS",
    "TRANSPORTS",
    "TRANSPORT_CHOICES",
    "Aborted",
    "Message",
    "PeerLost",
    "Transport",
    "TransportOptions",
    "TransportStats",
    "make_transport",
    "resolve_transport",
]

# name -> "module:class", imported on use so that a transport's machinery loads only when chosen
TRANSPORTS = {
    "zmq": "dni_async.transport.zmq:ZmqTransport",
    "rpc": "dni_async.transport.rpc:RpcTransport",
    "shm": "dni_async.transport.ring_transport:ShmTransport",
    "cuda-ipc": "dni_async.transport.ring_transport:CudaIpcTransport",
}


TRANSPORT_CHOICES = ["auto", *TRANSPORTS]
"""What ``--transport`` takes: a transport, or ``auto`` (:func:`resolve_transport`)."""


def resolve_transport(name: str, device: torch.device) -> str:
    """The transport a stage on ``device`` uses for ``--transport name``: ``auto`` is ``cuda-ipc`` on a GPU
    (which falls back to zmq, from page-locked memory, for a neighbour on no GPU of this host), else ``zmq``."""
    if name != "auto":
        return name
    return "cuda-ipc" if device.type == "cuda" else "zmq"


def make_transport(name: str, stage: int, num_stages: int, options: TransportOptions) -> Transport:
    """Build the transport called ``name`` for one stage; on a GPU (``options.device``), wrapped so that its sends
    never make the training thread wait for the device (transport/device_sender.py).

    Raises:
        ValueError: for an unknown name, or a device the transport cannot carry.
    """
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; choose one of {sorted(TRANSPORTS)}")
    module, cls = TRANSPORTS[name].split(":")
    transport: Transport = getattr(importlib.import_module(module), cls)(stage, num_stages, options)
    if options.device.startswith("cuda"):
        from .device_sender import DeviceSender

        return DeviceSender(transport, torch.device(options.device))
    return transport
