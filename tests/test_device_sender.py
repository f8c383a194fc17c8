"""A GPU stage's sender thread: order, backpressure, errors and close (on CPU tensors), and staging (on CUDA)."""

from __future__ import annotations

import time
from typing import Iterator

import pytest
import torch

from dni_async.transport import Message, PeerLost, Transport, TransportOptions, make_transport
from dni_async.transport.device_sender import DeviceSender


def _pair(device: str = "cpu", **options: float) -> list[Transport]:
    """Stage 0 (its sends through a DeviceSender) and stage 1, over zmq in this process."""
    opts = TransportOptions(device=device, **options)  # type: ignore[arg-type]
    first = make_transport("zmq", 0, 2, opts)  # on a GPU: wrapped in a DeviceSender by make_transport
    if device == "cpu":
        first = DeviceSender(first, torch.device("cpu"))  # the sender thread alone, on CPU tensors
    second = make_transport("zmq", 1, 2, opts)
    endpoints = {0: first.bind(), 1: second.bind()}
    first.connect(endpoints)
    second.connect(endpoints)
    return [first, second]


@pytest.fixture
def pair() -> Iterator[list[Transport]]:
    stages = _pair(queue_size=1, peer_timeout=1.0)
    yield stages
    for transport in stages:
        transport.close()


def test_messages_leave_in_order_from_the_sender_thread(pair: list[Transport]) -> None:
    first, second = pair
    for step in range(40):
        first.send(1, Message("act", step, 0, [torch.full((3,), float(step))]))
        got = second.recv("forward", 5)
        assert got is not None and got.step == step and got.tensors[0][0] == step
    second.send(0, Message("grad", 0, 1, [torch.ones(2)]))
    assert first.recv("backward", 5) is not None  # receiving is the wrapped transport's
    assert first.stats.messages_sent == 40 and first.stats.messages_received == 1


def test_a_full_hand_over_keeps_draining_then_the_thread_s_peer_lost_is_raised(pair: list[Transport]) -> None:
    first, second = pair
    calls = []
    start = time.monotonic()
    with pytest.raises(PeerLost, match="stage 1"):
        for step in range(100):  # stage 1 never reads: its queue, zmq, the hand-over fill up
            first.send(1, Message("act", step, 0, [torch.ones(2**16)]), while_blocked=lambda: calls.append(1))
    assert 0.9 <= time.monotonic() - start < 6 and calls
    with pytest.raises(PeerLost):
        first.recv("backward", 0.5)  # a stage waiting for gradients hears of it too
    start = time.monotonic()
    first.send(1, Message("abort", 0, 0, meta={"reason": "x"}))  # best effort: returns, never raises
    assert time.monotonic() - start < 3


def test_close_sends_what_was_handed_over() -> None:
    first, second = _pair()
    try:
        for step in range(3):
            first.send(1, Message("act", step, 0, [torch.ones(4)]))
        first.send(1, Message("stop", 3, 0))
        first.close()
        assert [second.recv("forward", 5).kind for _ in range(4)] == ["act", "act", "act", "stop"]  # type: ignore
        with pytest.raises(RuntimeError, match="after close"):
            first.send(1, Message("act", 4, 0))
    finally:
        first.close()
        second.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="stages GPU tensors: no CUDA here (launch/gpu_check.sh)")
def test_gpu_tensors_are_staged_without_a_host_sync_on_the_training_thread() -> None:
    first, second = _pair("cuda:0")
    try:
        sent = [torch.randn(1024, 1024, device="cuda:0") for _ in range(4)]
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step, tensor in enumerate(sent):
                first.send(1, Message("act", step, 0, [tensor * 2, torch.arange(3, device="cuda:0")]))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for tensor in sent:
            got = second.recv("forward", 10)
            assert got is not None and got.tensors[0].is_pinned()
            assert torch.equal(got.tensors[0], (tensor * 2).cpu()) and got.tensors[1].tolist() == [0, 1, 2]
    finally:
        first.close()
        second.close()
