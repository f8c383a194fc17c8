"""Which network interface holds an address: gloo and TensorPipe listen on an interface they are told by name
(``GLOO_SOCKET_IFNAME``, ``TP_SOCKET_IFNAME``), else on the address the host name resolves to, which inside a
network namespace, or on a host whose name maps to 127.0.0.1, is loopback; ``--bind`` names an address."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct

__all__ = ["interface_of"]

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def interface_of(host: str) -> str | None:
    """The interface whose IPv4 address ``host`` (an address or a name) is, the loopback interface for a loopback
    address (v4 or v6); None for a wildcard, an address of no interface here, or where interfaces cannot be
    asked (not Linux)."""
    host = host.strip("[]")
    with contextlib.suppress(ValueError):
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            names = [name for _, name in socket.if_nameindex()]
            return next((n for n in ("lo", "lo0") if n in names), None)
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return None
    if address == "0.0.0.0":
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                raw = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
                if socket.inet_ntoa(raw[20:24]) == address:
                    return name
    return None
