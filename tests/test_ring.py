"""The ring transports' slot protocol without CUDA: layout, control block, ring maps, and shm in one process."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Iterator

import msgpack
import pytest
import torch
import zmq

from dni_async.protocol import ProtocolError, decode, decode_header, encode
from dni_async.transport import Message, PeerLost, TransportOptions, make_transport, resolve_transport
from dni_async.transport import ring as ring_mod
from dni_async.transport.ring import (
    ALIGN,
    Control,
    check_announce,
    check_ref,
    place,
    ring_name,
    shm_dir,
    slot_bytes_for,
)
from dni_async.transport.ring_transport import RingTransport

MiB = 1 << 20


def _ring_files() -> list[str]:
    return sorted(f for f in os.listdir(shm_dir()) if f.startswith("dni-ring-"))


@pytest.fixture
def pair() -> Iterator[list[RingTransport]]:
    """Stages 0 and 1 over shm in this process (rings of 2 slots)."""
    stages = [make_transport("shm", s, 2, TransportOptions(queue_size=2, peer_timeout=1.0)) for s in range(2)]
    endpoints = {s: t.bind() for s, t in enumerate(stages)}
    for transport in stages:
        transport.connect(endpoints)
    yield stages  # type: ignore[misc]
    for transport in stages:
        transport.close()
    assert _ring_files() == []


# ------------------------------------------------------------------ layout and maps


def test_tensors_are_placed_aligned_one_after_another() -> None:
    assert place([]) == ([], 0)
    assert place([4, 0, 300, 1]) == ([0, ALIGN, ALIGN, 3 * ALIGN], 4 * ALIGN)
    assert slot_bytes_for(10) == MiB
    assert slot_bytes_for(3 * MiB + 1) == 4 * MiB
    assert slot_bytes_for(MiB + 1, previous=4 * MiB) == 8 * MiB  # grows at least twofold


def _announce(**changes: Any) -> dict[str, Any]:
    return {"slots": 2, "slot_bytes": MiB, "control": ring_name(), "memory": {}, **changes}


@pytest.mark.parametrize("bad", [
    [1], {"slots": 2}, _announce(slots=0), _announce(slots=65), _announce(slots=True), _announce(slot_bytes=100),
    _announce(slot_bytes=MiB + 1), _announce(slot_bytes=1 << 40), _announce(control="../../etc/passwd"),
    _announce(control="dni-ring-1-zz"), _announce(memory=[]), {**_announce(), "extra": 1},
])
def test_malformed_announcements_are_refused(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        check_announce(bad, max_bytes=1 << 30)


def test_ring_maps_must_follow_the_ring_in_order_and_fit_their_slot() -> None:
    ref = check_ref({"gen": 0, "slot": 0, "offsets": [0, ALIGN], "new": _announce()}, [8, 8], None, 0, 1 << 30)
    assert ref.new is not None and ref.new.slots == 2
    assert check_ref({"gen": 0, "slot": 1, "offsets": [0]}, [8], (0, 1), MiB, 1 << 30).slot == 1
    bad = [
        ({"gen": 0, "slot": 0, "offsets": [0]}, [8], None),  # no ring announced yet
        ({"gen": 0, "slot": 0, "offsets": [0]}, [8], (0, 1)),  # slot out of order (a replay)
        ({"gen": 1, "slot": 1, "offsets": [0]}, [8], (0, 1)),  # a generation nobody announced
        ({"gen": 0, "slot": 1, "offsets": [0, 8]}, [8, 8], (0, 1)),  # not aligned
        ({"gen": 0, "slot": 1, "offsets": [ALIGN, 0]}, [8, 8], (0, 1)),  # overlapping, backwards
        ({"gen": 0, "slot": 1, "offsets": [MiB - 4]}, [8], (0, 1)),  # leaves the slot
        ({"gen": 0, "slot": 1, "offsets": [0]}, [8, 8], (0, 1)),  # an offset missing
        ({"gen": 0, "slot": 1, "offsets": [0], "exec": 1}, [8], (0, 1)),
        ({"gen": -1, "slot": 1, "offsets": [0]}, [8], (0, 1)),
        ({"gen": 1, "slot": 1, "offsets": [0], "new": _announce()}, [8], (0, 1)),  # a new ring starts at slot 0
    ]
    for value, nbytes, expected in bad:
        with pytest.raises(ProtocolError):
            check_ref(value, nbytes, expected, MiB, 1 << 30)


def test_a_ring_header_declares_tensors_without_their_data() -> None:
    msg = Message("act", 3, 0, [torch.ones(2, 3), torch.arange(4)], {"k": 1})
    frames = encode(msg, ring={"gen": 0, "slot": 0, "offsets": [0, ALIGN]})
    assert len(frames) == 1
    header = decode_header(frames[0], 1 << 20)
    assert header.ring == {"gen": 0, "slot": 0, "offsets": [0, ALIGN]} and [n for *_, n in header.specs] == [24, 32]
    with pytest.raises(ProtocolError, match="ring transport"):
        decode(frames, 1 << 20)  # a plain channel refuses it


# ------------------------------------------------------------------ control block


def test_the_control_block_is_unlinked_once_the_receiver_holds_it() -> None:
    sender = Control(ring_name(), 8192, create=True)
    try:
        assert os.path.exists(sender.path) and not sender.attached
        with pytest.raises(ProtocolError, match="bytes"):
            Control(sender.name, 4096, create=False)  # another size than announced
        receiver = Control(sender.name, 8192, create=False)
        assert not os.path.exists(sender.path) and sender.attached  # nothing is left behind on a crash now
        receiver.release()
        receiver.release()
        assert sender.consumed.value == 2
        receiver.close()
    finally:
        sender.close()
    stranger = os.path.join(shm_dir(), ring_name())
    with open(stranger, "wb") as f:
        f.write(bytes(4096))
    try:
        with pytest.raises(ProtocolError, match="not a ring"):
            Control(os.path.basename(stranger), 4096, create=False)
    finally:
        os.unlink(stranger)


# ------------------------------------------------------------------ shm in one process


def test_messages_through_the_ring_keep_order_dtypes_and_grow_it(pair: list[RingTransport]) -> None:
    a, b = pair
    sent = [Message("act", 0, 0, [torch.randn(3, 5).t(), torch.arange(7)], {"x": 1}),
            Message("act", 1, 0, [torch.zeros(0, 4), torch.tensor(True), torch.randn(2).to(torch.bfloat16)]),
            Message("act", 2, 0, [torch.randn(600_000)]),  # larger than a slot: a new ring
            Message("act", 3, 0, [torch.randint(0, 9, (5,), dtype=torch.int8)])]
    for msg in sent:
        a.send(1, msg)
        got = b.recv("forward", 5)
        assert got is not None and (got.kind, got.step, got.meta) == (msg.kind, msg.step, msg.meta)
        assert all(g.dtype == t.dtype and torch.equal(g, t) for g, t in zip(got.tensors, msg.tensors))
    assert a._sending[1].gen == 1 and a._sending[1].slot_bytes == 3 * MiB  # 2.4 MB, in whole MiB
    a.send(1, Message("stop", 4, 0))  # no tensors: a plain zmq message, in order behind the ring ones
    assert b.recv("forward", 5).kind == "stop"  # type: ignore[union-attr]
    assert b.stats.bytes_received > 2_400_000 and b.stats.rejected == 0


def test_a_full_ring_blocks_the_sender_which_keeps_draining_then_raises_peer_lost(pair: list[RingTransport]) -> None:
    a, b = pair
    calls = []
    for step in range(2):
        a.send(1, Message("act", step, 0, [torch.ones(4)]))
    start = time.monotonic()
    with pytest.raises(PeerLost, match="stage 1"):
        a.send(1, Message("act", 2, 0, [torch.ones(4)]), while_blocked=lambda: calls.append(1))
    assert 0.9 <= time.monotonic() - start < 5 and calls
    assert [b.recv("forward", 5).step for _ in range(2)] == [0, 1]  # type: ignore[union-attr]
    a.send(1, Message("act", 2, 0, [torch.ones(4)]))  # a slot is free again
    assert b.recv("forward", 5).step == 2  # type: ignore[union-attr]


def test_close_waits_until_the_neighbour_has_copied_out_what_was_sent() -> None:
    a, b = stages = [make_transport("shm", s, 2, TransportOptions(queue_size=1)) for s in range(2)]
    endpoints = {s: t.bind() for s, t in enumerate(stages)}
    for transport in stages:
        transport.connect(endpoints)
    try:
        a.send(1, Message("eval", 0, 0))  # fills stage 1's queue: its I/O thread leaves the next message unread
        tensor = torch.randn(1000)
        a.send(1, Message("act", 1, 0, [tensor]))  # in its slot, the ring not yet opened by stage 1
        closing = threading.Thread(target=a.close)
        closing.start()
        time.sleep(0.3)
        assert closing.is_alive(), "close() did not wait for the message in the ring"
        assert b.recv("forward", 5).kind == "eval"  # type: ignore[union-attr]
        got = b.recv("forward", 5)
        assert got is not None and torch.equal(got.tensors[0], tensor) and b.stats.rejected == 0
        closing.join(5)
        assert not closing.is_alive()
    finally:
        for transport in stages:
            transport.close()
    assert _ring_files() == []


def test_hostile_ring_headers_are_dropped_and_good_traffic_goes_on(pair: list[RingTransport],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    a, b = pair
    a.send(1, Message("act", 0, 0, [torch.ones(4)]))
    assert b.recv("forward", 5) is not None

    def header(**ring: Any) -> bytes:
        return msgpack.packb({"v": 1, "kind": "act", "step": 9, "src": 0, "meta": {},
                              "tensors": [{"dtype": "float32", "shape": [4]}], "ring": ring})

    hostile = [
        [header(gen=0, slot=0, offsets=[0])],  # a replay of slot 0 (slot 1 is next)
        [header(gen=0, slot=1, offsets=[MiB])],  # out of the slot
        [header(gen=0, slot=1, offsets=[0]), bytes(16)],  # a raw frame besides
        [header(gen=1, slot=0, offsets=[0], new=_announce())],  # a ring whose control block does not exist
        [header(gen=1, slot=0, offsets=[0], new=_announce(control="../x"))],
        [msgpack.packb({"v": 1, "kind": "act", "step": 9, "src": 1, "meta": {}, "tensors": [],
                        "ring": {"gen": 0, "slot": 1, "offsets": []}})],  # not from this channel's neighbour
    ]
    caplog.set_level(logging.WARNING, logger="dni_async.transport")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUSH)
    try:
        raw.connect(b._inbound["forward"].socket.getsockopt_string(zmq.LAST_ENDPOINT))
        for frames in hostile:
            raw.send_multipart(frames)
        deadline = time.monotonic() + 10
        while b.stats.rejected < len(hostile) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        raw.close(linger=0)
        ctx.term()
    assert b.stats.rejected == len(hostile) and b.queue_depth("forward") == 0
    assert any("cannot open ring control block" in r.getMessage() for r in caplog.records)
    for step in (1, 2, 3):  # the real ring is where it was
        a.send(1, Message("act", step, 0, [torch.full((4,), float(step))]))
        got = b.recv("forward", 5)
        assert got is not None and got.step == step and torch.equal(got.tensors[0], torch.full((4,), float(step)))


def test_a_ring_that_cannot_be_made_falls_back_to_whole_messages(pair: list[RingTransport],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ring_mod.os, "posix_fallocate", full)
    tensor = torch.randn(5)
    a.send(1, Message("act", 0, 0, [tensor]))
    got = b.recv("forward", 5)
    assert got is not None and torch.equal(got.tensors[0], tensor)
    assert not a._sending and 1 not in a._ring_peers and _ring_files() == []


def test_neighbours_that_cannot_share_memory_get_whole_messages() -> None:
    a = make_transport("shm", 0, 2, TransportOptions())
    b = make_transport("zmq", 1, 2, TransportOptions())  # a plain zmq stage: its endpoint offers no ring
    try:
        endpoints = {0: a.bind(), 1: b.bind()}
        a.connect(endpoints)
        b.connect(endpoints)
        a.send(1, Message("act", 0, 0, [torch.ones(3)]))
        got = b.recv("forward", 5)
        assert got is not None and torch.equal(got.tensors[0], torch.ones(3))
        assert isinstance(a, RingTransport) and not a._ring_peers
        b.send(0, Message("grad", 0, 1, [torch.ones(2)]))
        assert a.recv("backward", 5) is not None
    finally:
        a.close()
        b.close()


def test_devices_and_transports_must_match() -> None:
    with pytest.raises(ValueError, match="cuda-ipc"):
        make_transport("shm", 0, 2, TransportOptions(device="cuda:0"))
    with pytest.raises(ValueError, match="carries cuda tensors"):
        make_transport("cuda-ipc", 0, 2, TransportOptions())
    assert resolve_transport("auto", torch.device("cpu")) == "zmq"
    assert resolve_transport("auto", torch.device("cuda", 1)) == "cuda-ipc"
    assert resolve_transport("shm", torch.device("cuda", 1)) == "shm"
