"""The rpc transport's own guarantees: endpoints, no Python unpickling of anything received, malformed calls refused."""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import torch.distributed.rpc as torch_rpc
from torch.distributed import TCPStore

from dni_async.netif import interface_of
from dni_async.transport import Message, PeerLost, TransportOptions, make_transport, rpc_hub
from dni_async.transport import rpc as rpc_transport

pytestmark = pytest.mark.process

# ------------------------------------------------------------------ pure logic


def test_endpoint_round_trip_and_refusals() -> None:
    assert rpc_transport.parse_endpoint(rpc_transport.format_endpoint("p-1", "tcp://h:5")) == {
        "proc": "p-1",
        "init": "tcp://h:5",
    }
    assert rpc_transport.parse_endpoint(rpc_transport.format_endpoint("p-1", None)) == {"proc": "p-1"}
    for bad in ("zmq;forward=tcp://h:1;backward=tcp://h:2", "rpc", "rpc;init=tcp://h:5", "rpc;proc=a;x=1", "rpc;proc"):
        with pytest.raises(ValueError, match="not an rpc endpoint"):
            rpc_transport.parse_endpoint(bad)


# ------------------------------------------------------- in-process (world of one)


def test_connect_gives_up_when_a_process_never_joins() -> None:
    transport = make_transport("rpc", 0, 2, TransportOptions(peer_timeout=1.0))
    try:
        endpoints = {0: transport.bind(), 1: "rpc;proc=never-started"}
        start = time.monotonic()
        with pytest.raises(PeerLost, match="stage 1"):
            transport.connect(endpoints)
        assert time.monotonic() - start < 6
    finally:
        transport.close()
    # nothing is left behind: a new world starts in the same process
    a, b = (make_transport("rpc", s, 2, TransportOptions()) for s in range(2))
    endpoints = {0: a.bind(), 1: b.bind()}
    a.connect(endpoints)
    b.connect(endpoints)
    try:
        a.send(1, Message("act", 0, 0, [torch.ones(2)]))
        assert b.recv("forward", 5) is not None
    finally:
        a.close()
        b.close()


def test_normal_traffic_never_reaches_a_python_deserializer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def spy(binary_data: Any, tensor_table: Any) -> Any:
        calls.append(len(binary_data))
        raise RuntimeError("refused")

    monkeypatch.setattr(rpc_hub, "_refuse_pickle", spy)  # installed by connect()
    stages = [make_transport("rpc", s, 3, TransportOptions(queue_size=2)) for s in range(3)]
    endpoints = {s: t.bind() for s, t in enumerate(stages)}
    for transport in stages:
        transport.connect(endpoints)
    try:
        assert torch_rpc.internal.deserialize is spy
        for step in range(20):
            stages[0].send(1, Message("act", step, 0, [torch.randn(3, 4)], {"lr": 0.1}))
            stages[2].send(1, Message("grad", step, 2, [torch.randn(5).to(torch.bfloat16)]))
            assert stages[1].recv("forward", 5) is not None and stages[1].recv("backward", 5) is not None
        assert calls == []  # ScriptCalls only: their args are decoded by the JIT's C++ deserializer
        with pytest.raises(RuntimeError, match="refused"):  # a Python call is not even unpickled
            torch_rpc.rpc_sync("dni-rpc-0", max, args=(1, 2))
        assert len(calls) == 1
    finally:
        for transport in stages:
            transport.close()


# ------------------------------------------- a hostile stage 0 in another process


def _frames(header: Any, *payload: torch.Tensor) -> list[torch.Tensor]:
    raw = header if isinstance(header, bytes) else msgpack.packb(header)
    return [torch.frombuffer(bytearray(raw), dtype=torch.uint8), *payload]


def _bad_calls() -> list[tuple[int, list[torch.Tensor]]]:
    """(direction, frames) of malformed deliver calls to stage 1's forward queue."""
    head = {"v": 1, "kind": "act", "step": 0, "src": 0, "tensors": [{"dtype": "float32", "shape": [2]}], "meta": {}}
    eight = torch.zeros(8, dtype=torch.uint8)
    return [
        (0, _frames(b"\x80\x04\x95pickle?")),
        (0, _frames([1, 2], eight)),
        (0, _frames({**head, "v": 9}, eight)),
        (0, _frames({**head, "kind": "exec"}, eight)),
        (0, _frames(head, torch.zeros(7, dtype=torch.uint8))),
        (0, _frames({**head, "tensors": [{"dtype": "float64", "shape": [10**12]}]}, eight)),
        (0, _frames({**head, "src": 5}, eight)),  # not the forward neighbour
        (0, _frames({**head, "kind": "grad"}, eight)),  # grads do not travel forward
        (0, _frames(head, torch.zeros(2))),  # a float tensor where raw bytes belong
        (0, _frames(head, torch.zeros(2, 4, dtype=torch.uint8))),
        (7, _frames(head, eight)),  # no such direction
    ]


def _touch(path: str) -> None:
    Path(path).touch()


def _hostile_stage_0(port: int, marker: str, conn: Connection) -> None:
    """Stage 0 of 2: send malformed ScriptCalls and a Python-pickled call, then one good message."""
    try:
        store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        transport = make_transport("rpc", 0, 2, TransportOptions(peer_timeout=10.0))
        store.set("endpoint/0", transport.bind())
        transport.connect({s: store.get(f"endpoint/{s}").decode() for s in range(2)})
        deliver = rpc_transport._script_functions()[0]
        statuses = [torch_rpc.rpc_sync("dni-rpc-1", deliver, args=(1, d, f[0], f[1:], 0.0)) for d, f in _bad_calls()]
        try:
            torch_rpc.rpc_sync("dni-rpc-1", _touch, args=(marker,))  # pickled by us, must not be unpickled there
            outcome = "ran"
        except RuntimeError as err:
            outcome = str(err)
        transport.send(1, Message("act", 1, 0, [torch.arange(3.0)]))
        store.wait(["done"], timedelta(seconds=30))
        transport.close()
        conn.send(("ok", (statuses, outcome)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def test_malformed_and_pickled_calls_are_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="dni_async.transport")
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    marker = tmp_path / "pickle-ran"
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_hostile_stage_0, args=(store.port, str(marker), child_conn), daemon=True)
    child.start()
    transport = make_transport("rpc", 1, 2, TransportOptions(peer_timeout=10.0))
    try:
        store.set("endpoint/1", transport.bind())
        transport.connect({s: store.get(f"endpoint/{s}").decode() for s in range(2)})
        msg = transport.recv("forward", 60)
        assert msg is not None and (msg.kind, msg.step, msg.src) == ("act", 1, 0)  # still heard after all that
        assert torch.equal(msg.tensors[0], torch.arange(3.0))
        store.set("done", "1")
        assert conn.poll(30), "stage 0 did not finish"
        status, value = conn.recv()
        assert status == "ok", value
        statuses, outcome = value
        assert statuses == [rpc_transport._REJECTED] * len(_bad_calls())
        assert transport.stats.rejected == len(_bad_calls()) and transport.stats.messages_received == 1
        assert outcome != "ran" and "refused" in outcome and not marker.exists()
        logged = [r.getMessage() for r in caplog.records if r.name == "dni_async.transport"]
        assert any("dropped a malformed forward message" in line for line in logged)
        assert any("Python-pickled rpc payload" in line for line in logged)
    finally:
        transport.close()
        child.join(10)
        if child.is_alive():
            child.kill()


def test_tensorpipe_listener_follows_a_loopback_bind(caplog: pytest.LogCaptureFixture) -> None:
    loopback = "lo" if "lo" in [n for _, n in socket.if_nameindex()] else "lo0"
    assert rpc_transport.listener_env("127.0.0.1", {}) == {"TP_SOCKET_IFNAME": loopback}
    assert rpc_transport.listener_env("::1", {}) == {"TP_SOCKET_IFNAME": loopback}
    assert rpc_transport.listener_env("127.0.0.1", {"TP_SOCKET_IFNAME": "eth0"}) == {}  # the user's choice stays
    caplog.set_level(logging.WARNING, logger="dni_async.transport")
    assert rpc_transport.listener_env("0.0.0.0", {}) == {}
    assert "use rpc only on a trusted network" in caplog.text


def test_an_address_of_no_interface_names_none() -> None:
    loopback = "lo" if "lo" in [n for _, n in socket.if_nameindex()] else "lo0"
    assert interface_of("localhost") == interface_of("127.0.0.1") == loopback
    assert interface_of("0.0.0.0") is None and interface_of("203.0.113.7") is None  # TEST-NET-3: on no interface
    assert interface_of("no-such-host.invalid") is None
