"""ZeroMQ CURVE on the data plane: key files, encrypted and authenticated stages on 127.0.0.1, unknown keys refused."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import helpers
import pytest
import torch
import zmq
from helpers import ROOT, SMALL, SUBSET, ok

from dni_async.curve import generate_keys, key_paths, load_keys
from dni_async.protocol import encode
from dni_async.transport import Message, PeerLost, TransportOptions
from dni_async.transport.zmq import ZmqTransport, format_endpoint, parse_endpoint

# Every wait below is bounded: recv() takes a timeout, loops poll a deadline,
# sockets have linger 0, subprocesses a hard timeout (killed with their group).
OPTS: dict[str, Any] = {"queue_size": 4, "peer_timeout": 5.0}
QUIET_S = 1.5  # how long a refused sender is given to get anything through
ENDPOINTS: dict[int, str] = {}  # the `stages` fixture's endpoints, by stage


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """Keys of a three-stage run (stage 2's key is a valid run key that is nobody's neighbour of stage 0)."""
    generate_keys(tmp_path / "keys", 3)
    return tmp_path / "keys"


@pytest.fixture
def stages(keys: Path) -> Iterator[list[ZmqTransport]]:
    """Stages 0 and 1 of two, with CURVE, connected to each other in this process."""
    pair = [ZmqTransport(s, 2, TransportOptions(**OPTS, curve_keys=str(keys))) for s in range(2)]
    ENDPOINTS.clear()
    ENDPOINTS.update({s: t.bind() for s, t in enumerate(pair)})
    for transport in pair:
        transport.connect(ENDPOINTS)
    yield pair
    for transport in pair:
        transport.close()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dni-")], "a transport thread outlived close"


def _act(step: int, src: int = 0, numel: int = 128) -> Message:
    return Message("act", step, src, [torch.randn(numel), torch.arange(5)], {"step": step})


def _frames(msg: Message) -> list[bytes]:
    return [bytes(f) for f in encode(msg)]


def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _forward_url(endpoint: str) -> str:
    return parse_endpoint(endpoint)["forward"]


# ------------------------------------------------------------------ key files


def test_generate_keys_writes_a_pair_per_stage_secret_0600(tmp_path: Path) -> None:
    paths = generate_keys(tmp_path / "new" / "keys", 3)
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    assert sorted(p.name for p in (tmp_path / "new" / "keys").iterdir()) == sorted(p.name for p in paths)
    for i in range(3):
        public, secret = key_paths(tmp_path / "new" / "keys", i)
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert b"secret-key" not in public.read_bytes()
        assert zmq.auth.load_certificate(secret)[0] == zmq.auth.load_certificate(public)[0]
    loaded = [load_keys(tmp_path / "new" / "keys", i, 3) for i in range(3)]
    assert len({k.public for k in loaded}) == 3 and all(k.publics == loaded[0].publics for k in loaded)


def test_generate_keys_never_overwrites_and_needs_a_stage(tmp_path: Path) -> None:
    generate_keys(tmp_path, 2)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    for stages in (1, 2, 4):
        with pytest.raises(ValueError, match="refusing to overwrite.*stage-0.key"):
            generate_keys(tmp_path, stages)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
    for stages in (0, -1):
        with pytest.raises(ValueError, match="--stages must be >= 1"):
            generate_keys(tmp_path / "other", stages)
    assert not (tmp_path / "other").exists()


def test_load_keys_needs_every_public_key_and_only_its_own_secret(keys: Path) -> None:
    key_paths(keys, 1)[1].unlink()  # stage 1's secret lives on another host
    assert load_keys(keys, 0, 3).stage == 0
    with pytest.raises(FileNotFoundError, match="stage-1.key_secret"):
        load_keys(keys, 1, 3)
    key_paths(keys, 2)[0].unlink()
    with pytest.raises(FileNotFoundError, match="stage-2.key is missing"):
        load_keys(keys, 0, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_keys(keys / "nope", 0, 3)


def test_load_keys_refuses_bad_and_mismatched_files(keys: Path) -> None:
    public0, secret0 = key_paths(keys, 0)
    secret1 = key_paths(keys, 1)[1]
    good = secret0.read_bytes()
    secret0.write_bytes(secret1.read_bytes())  # stage 1's pair in stage 0's secret file
    with pytest.raises(ValueError, match="stage-0.key_secret and .*stage-0.key hold different key pairs"):
        load_keys(keys, 0, 3)
    secret0.write_bytes(good.replace(b"secret-key", b"secret-kex"))
    with pytest.raises(ValueError, match="stage-0.key_secret holds no secret key"):
        load_keys(keys, 0, 3)
    secret0.write_bytes(good)
    public0.write_bytes(b"just some text\n")
    with pytest.raises(ValueError, match="stage-0.key is not a key certificate"):
        load_keys(keys, 1, 3)
    public0.write_bytes(b'public-key = "short"\n')
    with pytest.raises(ValueError, match="stage-0.key holds a malformed key"):
        load_keys(keys, 1, 3)


def test_a_transport_with_missing_keys_fails_before_binding(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ZmqTransport(0, 2, TransportOptions(curve_keys=str(tmp_path / "missing")))


def test_keys_command(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "dni_async", "keys", str(tmp_path / "k"), "--stages", "2"]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "stage-0.key", "stage-0.key_secret", "stage-1.key", "stage-1.key_secret"]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "error: refusing to overwrite" in again.stderr, again.stderr


# ------------------------------------------------------------ live sockets


def test_curve_stages_exchange_acts_and_grads(stages: list[ZmqTransport]) -> None:
    first, second = stages
    for step in range(20):
        act = _act(step)
        first.send(1, act)
        got = second.recv("forward", timeout=5)
        assert got is not None and (got.kind, got.step, got.src) == ("act", step, 0)
        for a, b in zip(got.tensors, act.tensors, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        grad = Message("grad", step, 1, [torch.randn(8, 16)])
        second.send(0, grad)
        back = first.recv("backward", timeout=5)
        assert back is not None and (back.kind, back.step, back.src) == ("grad", step, 1)
        torch.testing.assert_close(back.tensors[0], grad.tensors[0], rtol=0, atol=0)
    assert [t.gate.refused for t in stages if t.gate] == [0, 0]


def test_backpressure_and_order_hold_with_curve(stages: list[ZmqTransport]) -> None:
    """More messages than every buffer holds: the sender blocks on the full queue and resumes, nothing is lost."""
    first, second = stages
    sent: list[int] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for step in range(40):
                first.send(1, _act(step, numel=1 << 18))  # 1 MiB: more than the kernel's buffers hold
                sent.append(step)
        except BaseException as err:  # handed to the test thread below
            errors.append(err)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    assert _wait_for(lambda: len(sent) >= 3)
    time.sleep(0.3)
    assert len(sent) < 40, "nothing held the sender back"
    for step in range(40):
        got = second.recv("forward", timeout=5)
        assert got is not None and got.step == step
    producer.join(10)
    assert not errors and sent == list(range(40))


@pytest.mark.parametrize("who", ["fresh key pair", "stage 2 of the run", "stage 1 itself"])
def test_an_unknown_key_gets_nothing_through(stages: list[ZmqTransport], keys: Path, who: str) -> None:
    """A CURVE client that knows stage 1's public key but is not stage 0 is refused at the handshake."""
    first, second = stages
    if who == "fresh key pair":
        public, secret = zmq.curve_keypair()
    else:
        own = load_keys(keys, 2 if who == "stage 2 of the run" else 1, 3)
        public, secret = own.public, own.secret
    ctx = zmq.Context()
    intruder = ctx.socket(zmq.PUSH)
    try:
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.setsockopt(zmq.CURVE_PUBLICKEY, public)
        intruder.setsockopt(zmq.CURVE_SECRETKEY, secret)
        intruder.setsockopt(zmq.CURVE_SERVERKEY, load_keys(keys, 1, 3).public)
        intruder.connect(_forward_url(ENDPOINTS[1]))
        for step in range(3):
            try:
                intruder.send_multipart(_frames(_act(step)), flags=zmq.NOBLOCK)  # src=0: claims to be stage 0
            except zmq.Again:
                pass
        assert second.recv("forward", timeout=QUIET_S) is None
        assert second.gate is not None and _wait_for(lambda: second.gate.refused >= 1), "the gate never saw it"
        first.send(1, _act(7))  # the real stage 0 is still heard
        got = second.recv("forward", timeout=5)
        assert got is not None and (got.src, got.step) == (0, 7)
        assert second.recv("forward", timeout=0.3) is None
        assert second.stats.rejected == 0  # refused at the handshake, not as a malformed message
    finally:
        intruder.close(linger=0)
        ctx.term()


def test_a_plain_tcp_client_gets_nothing_through(stages: list[ZmqTransport]) -> None:
    first, second = stages
    ctx = zmq.Context()
    plain = ctx.socket(zmq.PUSH)
    try:
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(_forward_url(ENDPOINTS[1]))
        try:
            plain.send_multipart(_frames(_act(0)), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert second.recv("forward", timeout=QUIET_S) is None
        first.send(1, _act(1))
        got = second.recv("forward", timeout=5)
        assert got is not None and got.step == 1
    finally:
        plain.close(linger=0)
        ctx.term()


@pytest.mark.parametrize("mixup", ["client key unknown", "server key stale"])
def test_a_stage_with_the_wrong_keys_fails_fast_with_the_reason(keys: Path, tmp_path: Path, mixup: str) -> None:
    """Stage 0 with keys that stage 1 does not run with: its first send raises PeerLost naming CURVE, well before
    peer_timeout, and stage 1 receives nothing."""
    other = tmp_path / "other"
    generate_keys(other, 2)
    # "client key unknown": stage 0 runs with a key pair stage 1 never saw, but knows stage 1's real public key;
    # "server key stale": stage 0 runs with its real pair but holds an old public key of stage 1
    for path in [key_paths(keys, 1)[0]] if mixup == "client key unknown" else key_paths(keys, 0):
        (other / path.name).write_bytes(path.read_bytes())
    second = ZmqTransport(1, 2, TransportOptions(**{**OPTS, "peer_timeout": 20.0, "curve_keys": str(keys)}))
    first = ZmqTransport(0, 2, TransportOptions(**{**OPTS, "peer_timeout": 20.0, "curve_keys": str(other)}))
    try:
        endpoints = {0: first.bind(), 1: second.bind()}
        first.connect(endpoints)
        second.connect(endpoints)
        start = time.monotonic()
        reason = "refused this stage's CURVE key" if mixup == "client key unknown" else "CURVE handshake failed 5"
        with pytest.raises(PeerLost, match=f"lost stage 1: .*{reason}"):
            first.send(1, _act(0))
        assert time.monotonic() - start < 10
        assert second.recv("forward", timeout=0.2) is None
        first.send(1, Message("abort", 0, 0, meta={"reason": "test"}))  # best effort: gives up quietly
    finally:
        first.close()
        second.close()


class _Tap:
    """A tcp relay on 127.0.0.1 that records every byte going from its client to ``target``."""

    def __init__(self, target: str) -> None:
        host, port = target.split("//", 1)[1].rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = bytearray()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        src.settimeout(0.1)
        while not self.stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if record:
                self.seen += data
            dst.sendall(data)

    def _run(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(self.target, timeout=10)
        back = threading.Thread(target=self._pump, args=(server, client, False), daemon=True)
        back.start()
        self._pump(client, server, True)
        back.join(5)
        client.close()
        server.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


@pytest.mark.parametrize("curve", [False, True])
def test_the_wire_is_encrypted(keys: Path, curve: bool) -> None:
    """Stage 0 reaches stage 1 through a recording relay: the payload's bytes show on plain tcp, never with CURVE."""
    options = TransportOptions(**{**OPTS, "curve_keys": str(keys) if curve else None})
    first, second = ZmqTransport(0, 2, options), ZmqTransport(1, 2, options)
    tap = None
    try:
        endpoints = {0: first.bind(), 1: second.bind()}
        tap = _Tap(_forward_url(endpoints[1]))
        second.connect(endpoints)
        first.connect({0: endpoints[0], 1: format_endpoint(tap.url, parse_endpoint(endpoints[1])["backward"])})
        marker = "the-plaintext-marker-" * 8
        payload = torch.frombuffer(bytearray(b"SECRET-TENSOR-BYTES!" * 64), dtype=torch.uint8)
        first.send(1, Message("act", 3, 0, [payload], {"note": marker}))
        got = second.recv("forward", timeout=5)
        assert got is not None and bytes(got.tensors[0].numpy()) == bytes(payload.numpy())
        assert got.meta["note"] == marker
        seen = bytes(tap.seen)
        assert len(seen) > payload.numel()
        assert (b"SECRET-TENSOR-BYTES!" in seen, marker.encode() in seen) == (not curve, not curve)
    finally:
        first.close()
        second.close()
        if tap is not None:
            tap.close()


# ------------------------------------------------------------- end to end


@pytest.mark.process
def test_a_training_run_with_curve_keys(tmp_path: Path) -> None:
    generate_keys(tmp_path / "keys", 2)
    run = tmp_path / "run"
    result = helpers.stages(2, ["--stages", "2", "--mode", "dni", "--steps", "30", *SMALL, "--curve-keys",
                                str(tmp_path / "keys"), "--data-dir", str(SUBSET), "--run-dir", str(run)], 180)
    ok(result)
    err = result.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["config"]["curve_keys"] == str(tmp_path / "keys")
    assert "refused a CURVE handshake" not in err
