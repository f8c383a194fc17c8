"""Transport conformance: real processes, real sockets on 127.0.0.1, endpoints exchanged through a TCPStore."""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any, Callable, Iterator

import msgpack
import pytest
import torch
import zmq
from torch.distributed import TCPStore

from dni_async.protocol import DTYPES
from dni_async.transport import TRANSPORTS, Aborted, Message, PeerLost, Transport, TransportOptions, make_transport
from dni_async.transport.device_sender import DEPTH

pytestmark = pytest.mark.process

# [Note: how these tests run]
# The test process is one stage; the other stages run in "peer" processes
# started once per module with the spawn context (importing torch costs seconds
# per process on a small machine, so peers are reused: each test sends a peer
# the name of a scenario function below and waits for its result with a hard
# timeout, killing the peer on expiry). Each test has its own TCPStore on a
# free port, through which every stage publishes ``endpoint/{stage}`` and reads
# its neighbours', as the runtime does. A scenario that fails sends back its
# traceback; the peers' stderr is captured by pytest like the test's own.

RESULT_TIMEOUT = 30.0
OPTS: dict[str, Any] = {"queue_size": 4, "peer_timeout": 10.0}
DEVICE = {"cuda-ipc": "cuda:0"}
"""The stages' device per transport (cpu where not named)."""
NO_CUDA = "cuda-ipc carries GPU tensors between processes: no CUDA here (launch/gpu_check.sh runs these on a GPU)"


# ---------------------------------------------------------------- peer processes


def _peer_main(conn: Connection) -> None:
    """Body of a peer process: run scenarios by name until told to stop."""
    logging.basicConfig(level=logging.WARNING, format="[peer] %(name)s: %(message)s")
    torch.manual_seed(0)
    conn.send(("ready", None))
    while True:
        request = conn.recv()
        if request is None:
            return
        name, kwargs = request
        try:
            conn.send(("ok", globals()[name](**kwargs)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class _Peer:
    """One spawned peer process."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_peer_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.pending = False  # a scenario started whose result nobody took (its test failed first)

    def start(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        if not self.ready:  # first use: wait for the interpreter and torch to load
            assert self.conn.poll(120), "peer process did not start"
            assert self.conn.recv()[0] == "ready"
            self.ready = True
        self.conn.send((fn.__name__, kwargs))
        self.pending = True

    def result(self, timeout: float = RESULT_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            self.kill()
            pytest.fail(f"peer scenario did not finish within {timeout} s (peer killed; see captured stderr)")
        status, value = self.conn.recv()
        self.pending = False
        if status == "error":
            pytest.fail(f"peer scenario failed:\n{value}")
        return value

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.kill()


class _Pool:
    """Peers shared by the module's tests; a peer killed by a test is replaced on the next request."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.peers = [_Peer(self.ctx) for _ in range(2)]

    def __getitem__(self, i: int) -> _Peer:
        if not self.peers[i].proc.is_alive():
            self.peers[i] = _Peer(self.ctx)
        return self.peers[i]


@pytest.fixture(scope="module")
def peers() -> Iterator[_Pool]:
    pool = _Pool()
    yield pool
    for peer in pool.peers:
        peer.stop()


@pytest.fixture
def pool(peers: _Pool) -> Iterator[_Pool]:
    """The module's peers; one that a failed test left running a scenario is killed (and replaced on the next
    request), so that no test reads another's result."""
    yield peers
    for peer in peers.peers:
        if peer.pending:
            peer.kill()


@pytest.fixture(params=[pytest.param(n, marks=pytest.mark.cuda) if n in DEVICE else n for n in sorted(TRANSPORTS)])
def name(request: pytest.FixtureRequest) -> str:
    if request.param in DEVICE and not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return str(request.param)


def _on(name: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` on the device that stages of transport ``name`` are on."""
    return [t.to(DEVICE.get(name, "cpu")) for t in tensors]


def _options(name: str, **options: Any) -> TransportOptions:
    return TransportOptions(**{**OPTS, "device": DEVICE.get(name, "cpu"), **options})


@pytest.fixture
def store() -> Iterator[TCPStore]:
    """A store on a free port, as torchrun's rendezvous provides."""
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    yield store
    del store


# ------------------------------------------------------------------ helpers


def _join(name: str, stage: int, num_stages: int, port: int, **options: Any) -> tuple[TCPStore, Transport]:
    """Build a stage's transport and exchange endpoints through the store, as the runtime does."""
    store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
    transport = make_transport(name, stage, num_stages, _options(name, **options))
    store.set(f"endpoint/{stage}", transport.bind())
    transport.connect({s: store.get(f"endpoint/{s}").decode() for s in range(num_stages)})
    return store, transport


def _io_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dni-")]


def _payload(step: int, salt: int) -> list[torch.Tensor]:
    """Deterministic tensors for a step: 0 to 2 of them, every dtype, 0-d, empty and non-contiguous ones."""
    gen = torch.Generator().manual_seed(step * 31 + salt)
    names = sorted(DTYPES)
    out = []
    for k in range(step % 3):
        dtype = DTYPES[names[(step + k) % len(names)]]
        shape = tuple(int(d) for d in torch.randint(0, 5, ((step + k) % 4,), generator=gen))
        if dtype.is_floating_point:
            tensor = torch.randn(shape, generator=gen).to(dtype)
        else:
            tensor = torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=gen).to(dtype)
        out.append(tensor.t() if tensor.dim() == 2 else tensor)
    return out


def _check(msg: Message | None, kind: str, step: int, src: int, salt: int) -> None:
    assert msg is not None, f"no {kind} for step {step} from stage {src}"
    assert (msg.kind, msg.step, msg.src) == (kind, step, src), f"expected {kind} step {step}, got {msg}"
    want = _payload(step, salt)
    assert len(msg.tensors) == len(want)
    for got, expected in zip(msg.tensors, want):
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)
    assert msg.meta == {"step": step, "tag": "t" * (step % 3)}


def _msg(name: str, kind: str, step: int, src: int, salt: int) -> Message:
    return Message(kind, step, src, _on(name, _payload(step, salt)), {"step": step, "tag": "t" * (step % 3)})


# ---------------------------------------------------------- peer scenarios


def scenario_first_stage(name: str, port: int, steps: int) -> dict[str, int]:
    """Stage 0 of 3: send acts, draining the grads that come back in order without blocking."""
    _, transport = _join(name, 0, 3, port)
    grads = 0
    try:
        for step in range(steps):
            transport.send(1, _msg(name, "act", step, 0, salt=1))
            while (msg := transport.recv("backward", 0)) is not None:
                _check(msg, "grad", grads, 1, salt=2)
                grads += 1
        transport.send(1, Message("stop", steps, 0))
        while (msg := transport.recv("backward", 10)) is not None and msg.kind != "stop":
            _check(msg, "grad", grads, 1, salt=2)
            grads += 1
        assert msg is not None and grads == steps
        return {"grads": grads, "sent": transport.stats.messages_sent}
    finally:
        transport.close()
        assert not _io_threads()


def scenario_last_stage(name: str, port: int) -> int:
    """Stage 2 of 3: receive acts in order, answer each with a grad, echo stop."""
    _, transport = _join(name, 2, 3, port)
    try:
        step = 0
        while (msg := transport.recv("forward", 10)) is not None and msg.kind != "stop":
            _check(msg, "act", step, 1, salt=3)
            transport.send(1, _msg(name, "grad", step, 2, salt=4))
            step += 1
        assert msg is not None, "stage 2 got no stop"
        transport.send(1, Message("stop", step, 2))
        return step
    finally:
        transport.close()


def scenario_echo(name: str, port: int, numel: int) -> float:
    """Stage 1 of 2: receive one large act, check it, send it straight back as a grad."""
    _, transport = _join(name, 1, 2, port)
    try:
        msg = transport.recv("forward", 20)
        assert msg is not None and msg.tensors[0].shape == (numel,)
        expected = torch.randn(numel, generator=torch.Generator().manual_seed(5))
        assert torch.equal(msg.tensors[0].cpu(), expected)
        transport.send(0, Message("grad", msg.step, 1, _on(name, msg.tensors)))
        return float(msg.tensors[0].sum())
    finally:
        transport.close()


def scenario_idle(name: str, port: int, num_stages: int = 2, stage: int = 1) -> dict[str, Any]:
    """Join, read nothing until the store says "done", then report and drain the forward queue in order."""
    store, transport = _join(name, stage, num_stages, port, queue_size=2, peer_timeout=2.0)
    try:
        store.set(f"ready/{stage}", "1")
        store.wait(["done"], timedelta(seconds=60))
        depth = transport.queue_depth("forward")
        steps = []
        while (msg := transport.recv("forward", 2.0)) is not None:
            steps.append(msg.step)
        return {"depth": depth, "steps": steps}
    finally:
        transport.close()


def scenario_abort(name: str, port: int) -> None:
    """Stage 1 of 2: abort the run shortly after joining."""
    _, transport = _join(name, 1, 2, port)
    try:
        time.sleep(0.3)
        transport.send(0, Message("abort", 0, 1, meta={"reason": "out of memory on stage 1"}))
    finally:
        transport.close()


def _bad_messages() -> list[list[bytes]]:
    """Malformed messages for stage 1's forward socket (each a list of frames)."""

    def header(**kw: Any) -> bytes:
        head = {"v": 1, "kind": "act", "step": 0, "src": 0, "tensors": [{"dtype": "float32", "shape": [2]}], "meta": {}}
        return msgpack.packb({**head, **kw})

    return [
        [b"\x80\x04\x95pickle?"],
        [b"\xc1", bytes(8)],
        [msgpack.packb([1, 2]), bytes(8)],
        [header(v=9), bytes(8)],
        [header(kind="exec"), bytes(8)],
        [header(step=-3), bytes(8)],
        [header(tensors=[{"dtype": "object", "shape": [2]}]), bytes(8)],
        [header(tensors=[{"dtype": "float32", "shape": [-2]}]), bytes(8)],
        [header()],
        [header(), bytes(7)],
        [header(tensors=[{"dtype": "float64", "shape": [10**12]}]), bytes(8)],
        [header(meta=[1]), bytes(8)],
        [header(src=5), bytes(8)],  # a stage that is not the forward neighbour
        [header(kind="grad"), bytes(8)],  # grads do not travel forward
    ]


def scenario_malformed(name: str, port: int, good: int, repeat: int) -> int:
    """Stage 0 of 2, plus a raw zmq PUSH to stage 1's forward socket: interleave good and malformed messages."""
    store, transport = _join(name, 0, 2, port)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUSH)
    try:
        raw.connect(store.get("endpoint/1").decode().split(";forward=")[1].split(";")[0])
        bad = _bad_messages()
        for step in range(good):
            transport.send(1, _msg(name, "act", step, 0, salt=6))
            for _ in range(repeat):
                for frames in bad:
                    raw.send_multipart(frames)
        store.wait(["rejected"], timedelta(seconds=30))
        transport.send(1, _msg(name, "act", good, 0, salt=6))  # still heard after all that
        store.wait(["done"], timedelta(seconds=30))
        return len(bad) * repeat * good
    finally:
        raw.close(linger=0)
        ctx.term()
        transport.close()


def _in_process(name: str, num_stages: int, **options: Any) -> list[Transport]:
    """All stages in this process (no store needed): for unit tests of the queues."""
    if name in DEVICE:
        pytest.skip("a CUDA IPC handle cannot be opened by the process that made it")
    stages = [make_transport(name, s, num_stages, _options(name, **options)) for s in range(num_stages)]
    endpoints = {s: t.bind() for s, t in enumerate(stages)}
    for transport in stages:
        transport.connect(endpoints)
    return stages


# ------------------------------------------------------------------- tests


def test_order_shapes_and_dtypes_through_a_three_stage_pipeline(name: str, store: TCPStore, pool: _Pool) -> None:
    steps = 150
    pool[0].start(scenario_first_stage, name=name, port=store.port, steps=steps)
    pool[1].start(scenario_last_stage, name=name, port=store.port)
    _, middle = _join(name, 1, 3, store.port)
    try:
        acts = grads = 0
        stops = 0
        deadline = time.monotonic() + RESULT_TIMEOUT
        while stops < 2:
            assert time.monotonic() < deadline, f"pipeline stuck after {acts} acts and {grads} grads"
            if (msg := middle.recv("forward", 0.01)) is not None:
                if msg.kind == "stop":
                    middle.send(2, Message("stop", acts, 1))
                    stops += 1
                else:
                    _check(msg, "act", acts, 0, salt=1)
                    middle.send(2, _msg(name, "act", acts, 1, salt=3))
                    middle.send(0, _msg(name, "grad", acts, 1, salt=2))
                    acts += 1
            while (msg := middle.recv("backward", 0)) is not None:  # drain every grad, as a stage does
                if msg.kind == "stop":
                    middle.send(0, Message("stop", grads, 1))
                    stops += 1
                else:
                    _check(msg, "grad", grads, 2, salt=4)
                    grads += 1
        assert acts == grads == steps
        assert pool[0].result() == {"grads": steps, "sent": steps + 1}
        assert pool[1].result() == steps
        assert middle.stats.messages_received == 2 * steps + 2 and middle.stats.rejected == 0
    finally:
        middle.close()
    assert not _io_threads()


def test_large_tensor_both_ways(name: str, store: TCPStore, pool: _Pool) -> None:
    numel = 16 * 2**20  # 64 MiB of float32
    pool[0].start(scenario_echo, name=name, port=store.port, numel=numel)
    _, transport = _join(name, 0, 2, store.port)
    try:
        tensor = torch.randn(numel, generator=torch.Generator().manual_seed(5))
        transport.send(1, Message("act", 9, 0, _on(name, [tensor])))
        back = transport.recv("backward", 30)
        assert back is not None and back.step == 9 and torch.equal(back.tensors[0].cpu(), tensor)
        assert pool[0].result() == pytest.approx(float(tensor.sum()))
        assert transport.stats.bytes_sent > tensor.nbytes and transport.stats.bytes_received > tensor.nbytes
    finally:
        transport.close()


def test_backpressure_blocks_then_raises_peer_lost(name: str, store: TCPStore, pool: _Pool) -> None:
    pool[0].start(scenario_idle, name=name, port=store.port)
    _, transport = _join(name, 0, 2, store.port, queue_size=2, peer_timeout=2.0)
    try:
        store.wait(["ready/1"], timedelta(seconds=30))
        payload = _on(name, [torch.zeros(2**18)])  # 1 MiB
        sent = 0
        with pytest.raises(PeerLost) as err:
            for step in range(200):
                start = time.monotonic()
                transport.send(1, Message("act", step, 0, payload))
                sent += 1
        blocked = time.monotonic() - start
        assert err.value.peer == 1
        assert 1.9 <= blocked < 8, f"send gave up after {blocked:.1f} s, peer_timeout is 2 s"
        # zmq and the kernel buffer a bounded amount: the sender cannot run ahead without limit
        assert 2 <= sent < 64, f"{sent} messages of 1 MiB went out before the sender blocked"
        store.set("done", "1")
        report = pool[0].result()
        assert report["depth"] == 2  # the idle stage's queue filled up to its bound
        steps = report["steps"]  # nothing reordered under backpressure, and nothing lost but what a GPU stage's
        assert steps == list(range(len(steps)))  # send thread held when the peer counted as lost: the message
        assert sent - (DEPTH + 1 if name in DEVICE else 0) <= len(steps) <= sent  # it sends and DEPTH behind it
    finally:
        transport.close()


def test_peer_killed_raises_peer_lost(name: str, store: TCPStore) -> None:
    ctx = mp.get_context("spawn")
    peer = _Peer(ctx)  # a process of its own: this test kills it
    transport: Transport | None = None
    try:
        peer.start(scenario_idle, name=name, port=store.port)
        _, transport = _join(name, 0, 2, store.port, queue_size=2, peer_timeout=2.0)
        store.wait(["ready/1"], timedelta(seconds=30))
        transport.send(1, Message("act", 0, 0, _on(name, [torch.ones(3)])))
        peer.kill()
        start = time.monotonic()
        with pytest.raises(PeerLost):
            for step in range(1, 100):
                transport.send(1, Message("act", step, 0, _on(name, [torch.ones(3)])))
        assert time.monotonic() - start < 8
    finally:
        peer.kill()
        if transport is not None:
            transport.close()


def test_peer_that_never_answers_raises_peer_lost(name: str, store: TCPStore) -> None:
    # stage 1 publishes an endpoint, then is never started: nothing listens there
    ghost = make_transport(name, 1, 2, _options(name))
    ghost_endpoint = ghost.bind()
    ghost.close()
    store.set("endpoint/1", ghost_endpoint)
    _, transport = _join(name, 0, 2, store.port, peer_timeout=1.0)
    try:
        start = time.monotonic()
        with pytest.raises(PeerLost, match="stage 1"):  # from a GPU stage's send thread: at a later call
            for step in range(10 * DEPTH):
                transport.send(1, Message("act", step, 0, _on(name, [torch.ones(2)])))
        assert 0.9 <= time.monotonic() - start < 5
        start = time.monotonic()
        transport.send(1, Message("abort", 0, 0, meta={"reason": "x"}))  # best effort: returns, never raises
        assert time.monotonic() - start < 3
    finally:
        transport.close()


def test_abort_wakes_a_blocked_recv(name: str, store: TCPStore, pool: _Pool) -> None:
    pool[0].start(scenario_abort, name=name, port=store.port)
    _, transport = _join(name, 0, 2, store.port)
    errors: list[BaseException] = []

    def wait_forever() -> None:
        try:
            transport.recv("backward", None)
        except BaseException as err:
            errors.append(err)

    waiter = threading.Thread(target=wait_forever, daemon=True)
    try:
        waiter.start()
        waiter.join(20)
        assert not waiter.is_alive(), "recv(timeout=None) did not wake up on abort"
        assert len(errors) == 1 and isinstance(errors[0], Aborted), errors
        assert errors[0].src == 1 and errors[0].reason == "out of memory on stage 1"
        with pytest.raises(Aborted, match="out of memory"):
            transport.recv("forward", 0)  # every later recv, either direction
        pool[0].result()
    finally:
        transport.close()


def test_malformed_frames_are_dropped_and_counted(
    name: str, store: TCPStore, pool: _Pool, caplog: pytest.LogCaptureFixture
) -> None:
    if name == "rpc":
        pytest.skip("raw zmq frames only reach the zmq-based transports")
    good, repeat = 20, 10
    pool[0].start(scenario_malformed, name=name, port=store.port, good=good, repeat=repeat)
    caplog.set_level(logging.WARNING, logger="dni_async.transport")
    _, transport = _join(name, 1, 2, store.port)
    try:
        for step in range(good):
            _check(transport.recv("forward", 10), "act", step, 0, salt=6)
        expected = good * repeat * len(_bad_messages())
        deadline = time.monotonic() + 20
        while transport.stats.rejected < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert transport.stats.rejected == expected
        store.set("rejected", "1")
        _check(transport.recv("forward", 10), "act", good, 0, salt=6)
        store.set("done", "1")
        assert pool[0].result() == expected
        logged = [r for r in caplog.records if r.name == "dni_async.transport"]
        assert 1 <= len(logged) <= 20, f"{len(logged)} log lines for {expected} bad frames: not rate-limited"
        assert "dropped a malformed forward message" in logged[0].getMessage()
    finally:
        transport.close()


def test_close_is_idempotent_and_stops_the_thread(name: str, store: TCPStore) -> None:
    never_bound = make_transport(name, 0, 2, _options(name))
    never_bound.close()
    never_bound.close()
    a = make_transport(name, 0, 2, _options(name))
    b = make_transport(name, 1, 2, _options(name))
    endpoints = {0: a.bind(), 1: b.bind()}
    a.connect(endpoints)
    b.connect(endpoints)
    # Both stages are in this process, which cannot open its own CUDA IPC handle: cuda-ipc sends this one whole.
    a.send(1, Message("act", 0, 0, [torch.ones(1)]))
    assert b.recv("forward", 5) is not None
    for transport in (a, b, a, b):
        transport.close()
    assert not _io_threads()
    with pytest.raises(RuntimeError, match="closed"):
        b.recv("forward", 0)
    with pytest.raises(RuntimeError):
        a.send(1, Message("act", 1, 0))


# ------------------------------------------------------- in-process unit tests


def test_full_forward_queue_still_drains_backward(name: str) -> None:
    first, middle, last = stages = _in_process(name, 3, queue_size=2, peer_timeout=1.0)
    try:
        sent = 0
        with pytest.raises(PeerLost):
            for step in range(200):
                first.send(1, Message("act", step, 0, [torch.zeros(2**16)]))
                sent += 1
        assert middle.queue_depth("forward") == 2
        for step in range(10):  # more than the queue bound: each is taken before the next
            last.send(1, Message("grad", step, 2, [torch.full((3,), float(step))]))
            msg = middle.recv("backward", 5)
            assert msg is not None and msg.step == step and msg.tensors[0][0] == step
        assert [middle.recv("forward", 5).step for _ in range(sent)] == list(range(sent))  # type: ignore[union-attr]
        assert middle.recv("forward", 0) is None and middle.queue_depth("forward") == 0
        first.send(1, Message("act", sent, 0))  # the sender recovers once the queue drains
        assert middle.recv("forward", 5) is not None
    finally:
        for transport in stages:
            transport.close()


def test_a_paused_queue_resumes_without_waiting_for_a_poll_tick(name: str) -> None:
    a, b = stages = _in_process(name, 2, queue_size=1)
    count = 300
    try:
        sender = threading.Thread(target=lambda: [a.send(1, Message("act", i, 0)) for i in range(count)], daemon=True)
        start = time.monotonic()
        sender.start()
        steps = [b.recv("forward", 5).step for _ in range(count)]  # type: ignore[union-attr]
        elapsed = time.monotonic() - start
        sender.join(10)
        assert steps == list(range(count))
        assert elapsed < 3.0, f"{count} messages through a queue of 1 took {elapsed:.1f} s"
    finally:
        for transport in stages:
            transport.close()


def test_misuse_is_refused(name: str) -> None:
    first, middle, last = stages = _in_process(name, 3)
    try:
        with pytest.raises(ValueError, match="neighbours"):
            first.send(2, Message("act", 0, 0))
        with pytest.raises(ValueError, match="src"):
            first.send(1, Message("act", 0, 1))
        with pytest.raises(ValueError):
            middle.send(0, Message("act", 0, 1))  # activations only travel forward
        with pytest.raises(ValueError):
            middle.send(2, Message("grad", 0, 1))  # gradients only travel backward
        with pytest.raises(ValueError):
            middle.send(2, Message("nonsense", 0, 1))
        with pytest.raises(ValueError, match="direction"):
            middle.recv("sideways", 0)
        assert middle.recv("forward", 0) is None and middle.recv("backward", 0.05) is None
    finally:
        for transport in stages:
            transport.close()


def test_death_of_the_io_thread_is_raised_by_recv(monkeypatch: pytest.MonkeyPatch) -> None:
    from dni_async.transport.zmq import ZmqTransport

    def explode(self: ZmqTransport, inbound: Any, frames: Any) -> None:
        raise MemoryError("simulated failure in the I/O thread")

    monkeypatch.setattr(ZmqTransport, "_accept", explode)
    logging.getLogger("dni_async.transport").setLevel(logging.CRITICAL)
    a, b = stages = _in_process("zmq", 2)
    errors: list[BaseException] = []

    def wait_forever() -> None:
        try:
            b.recv("forward", None)
        except BaseException as err:
            errors.append(err)

    try:
        waiter = threading.Thread(target=wait_forever, daemon=True)
        waiter.start()
        a.send(1, Message("act", 0, 0))
        waiter.join(10)
        assert not waiter.is_alive(), "recv(timeout=None) hung after the I/O thread died"
        assert isinstance(errors[0], RuntimeError) and "I/O thread died" in str(errors[0])
        assert isinstance(errors[0].__cause__, MemoryError)
    finally:
        logging.getLogger("dni_async.transport").setLevel(logging.NOTSET)
        for transport in stages:
            transport.close()
    assert not _io_threads()
