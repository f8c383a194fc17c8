"""Two "hosts" on this machine: network namespaces joined by a veth pair, each with its own address.

Traffic between them goes only over the veth pair (10.77.0.1 <-> 10.77.0.2) and their own loopbacks. Names carry
this process's pid (``dnit<pid>x<n>``); every exit path removes them, and one left by a killed run (its pid no
longer alive) is removed when the next pair is made. Needs root and ``ip``: :func:`two_hosts` skips with the
reason where either is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterator

import pytest

PREFIX = "dnit"
ADDRESSES = ("10.77.0.1", "10.77.0.2")
_NAME = re.compile(rf"^{PREFIX}(\d+)x\d+[ab]$")
_made = [0]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def missing() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need the `ip` command (iproute2)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Remove the namespaces and veth ends of earlier runs whose process is gone; their names."""
    names = [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]
    links = [m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)", _ip("-o", "link", "show").stdout, re.M)]
    removed = []
    for name in names + links:
        match = _NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _ip(*(("netns", "del", name) if name in names else ("link", "del", name)), check=False)
            removed.append(name)
    return removed


@dataclass
class Host:
    """One namespace: its name, address and its end of the veth pair."""

    netns: str
    address: str
    link: str

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def set_link(self, up: bool) -> None:
        _ip("-n", self.netns, "link", "set", self.link, "up" if up else "down")

    def listeners(self) -> list[tuple[str, str, int]]:
        """(local address:port, process name, pid) of every TCP socket that listens inside this host."""
        out = subprocess.run(self.cmd(["ss", "-Hltnp"]), capture_output=True, text=True, timeout=30, check=True)
        found = []
        for line in out.stdout.splitlines():
            owner = re.search(r'users:\(\("([^"]+)",pid=(\d+)', line)
            found.append((line.split()[3], owner.group(1) if owner else "?", int(owner.group(2)) if owner else -1))
        return found

    def pids(self) -> list[int]:
        """Processes that still run inside this host."""
        return [int(p) for p in _ip("netns", "pids", self.netns, check=False).stdout.split()]


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Host A (10.77.0.1) and host B (10.77.0.2), joined by a veth pair, loopback up in each; removed on exit."""
    reason = missing()
    if reason:
        pytest.skip(reason)
    remove_leftovers()
    _made[0] += 1
    base = f"{PREFIX}{os.getpid()}x{_made[0]}"
    hosts = tuple(Host(f"{base}{side}", address, f"{base}{side}") for side, address in zip("ab", ADDRESSES))
    try:
        for host in hosts:
            _ip("netns", "add", host.netns)
        _ip("link", "add", hosts[0].link, "type", "veth", "peer", "name", hosts[1].link)
        for host in hosts:
            _ip("link", "set", host.link, "netns", host.netns)
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.link)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "link", "set", host.link, "up")
        yield hosts[0], hosts[1]
    finally:
        for host in hosts:
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.link, check=False)  # a veth end not yet moved into its namespace
