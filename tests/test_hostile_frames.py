"""A training run keeps going while thousands of malformed frames hit its stages' data-plane sockets."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from helpers import SUBSET, finish, ok, stage_pids, start, torchrun_cmd

from dni_async.protocol import ProtocolError, decode, encode
from dni_async.transport import Message
from dni_async.transport.zmq import parse_endpoint

pytestmark = pytest.mark.process

STEPS = 500
RUN = ["--stages", "2", "--mode", "dni", "--steps", str(STEPS), "--hidden-size", "64", "--num-layers", "2",
       "--no-progress", "--log-every", "50"]


def _start(run: Path) -> subprocess.Popen[str]:
    """The run under torchrun (whose agent's store is one of the ports attacked)."""
    return start(torchrun_cmd(2, [*RUN, "--data-dir", str(SUBSET), "--run-dir", str(run)]), stdout=subprocess.DEVNULL)


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> None:
    ok(finish(proc, timeout))


def _hostile_frames(rng: random.Random) -> list[list[bytes]]:
    """One malformed message of each kind the decoder must refuse."""
    valid = [bytes(f) for f in encode(Message("grad", 3, 1, [torch.ones(4, 64)]))]
    header = valid[0]
    return [
        [rng.randbytes(rng.randint(0, 300))],                                  # random bytes
        [header],                                                              # tensor frame missing
        [header, valid[1][:100]],                                              # truncated tensor
        [header.replace(b"\xa1v\x01", b"\xa1v\x07"), valid[1]],                # unknown version
        [header.replace(b"grad", b"junk"), valid[1]],                          # unknown kind
        [header.replace(b"\x04", b"\x05", 1), valid[1]],                       # shape does not match the frame
        [header.replace(b"\xa3src\x01", b"\xa3src\x05"), valid[1]],            # not a neighbour
        [rng.randbytes(8), rng.randbytes(64), rng.randbytes(3)],               # several random frames
        [msgpack.packb({"v": 1, "kind": "grad", "step": 3, "src": 1, "meta": {},
                        "tensors": [{"dtype": "float32", "shape": [10**6, 10**6]}]}), b"\0" * 64],  # 10^12 elements
        [bytes(f) for f in encode(Message("grad", 10**9, 1, [torch.ones(4, 64)]))],  # a step from the far future
    ]


def test_every_hostile_message_is_refused_by_the_decoder_or_the_receiver() -> None:
    for k, frames in enumerate(_hostile_frames(random.Random(0))):
        if k in (6, 9):  # well-formed: the transport refuses src 5, the stage the step (both live, below)
            assert decode(frames, 1 << 30).src in (1, 5)
            continue
        with pytest.raises(ProtocolError):
            decode(frames, 1 << 30)


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The summary of the same run with nobody attacking it."""
    run = tmp_path_factory.mktemp("clean")
    _finish(_start(run))
    return json.loads((run / "summary.json").read_text())  # type: ignore[no-any-return]


def test_thousands_of_malformed_frames_do_not_stop_or_spoil_training(tmp_path: Path, clean_run: dict) -> None:
    attacked = tmp_path / "attacked"
    proc = _start(attacked)
    stage_pids(attacked, 2, proc)
    stage_files = [attacked / "stages" / f"stage-{i}.json" for i in range(2)]
    targets = [parse_endpoint(json.loads(stage_files[0].read_text())["endpoints"]["data"])["backward"],
               parse_endpoint(json.loads(stage_files[1].read_text())["endpoints"]["data"])["forward"]]
    ctx = zmq.Context()
    socks = []
    for url in targets:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(url)
        socks.append(sock)
    rng = random.Random(0)
    sent = 0
    attack_ends = time.monotonic() + 120  # a hard bound even if the run hung with every send refused
    try:
        while proc.poll() is None and sent < 20_000 and time.monotonic() < attack_ends:
            for frames in _hostile_frames(rng):
                for sock in socks:
                    try:
                        sock.send_multipart(frames, flags=zmq.NOBLOCK)
                        sent += 1
                    except zmq.Again:
                        time.sleep(0.001)
    finally:
        for sock in socks:
            sock.close()
        ctx.term()
    _finish(proc)
    base = clean_run
    hit = json.loads((attacked / "summary.json").read_text())
    rejected = sum(s["rejected_messages"] + s["rejected_steps"] for s in hit["per_stage"])
    assert sent >= 2000, f"only {sent} frames went out while the run trained"
    assert rejected >= 0.9 * sent, (rejected, sent)  # a few may still be queued when the run ends
    assert hit["per_stage"][0]["rejected_steps"] > 0, "the far-future gradients reached stage 0's loop"
    assert hit["steps"] == base["steps"] == STEPS
    assert hit["final_eval"]["accuracy"] >= base["final_eval"]["accuracy"] - 0.02, (hit["final_eval"],
                                                                                    base["final_eval"])


def listening_ports(pids: list[int]) -> list[int]:
    """TCP ports on which any of ``pids`` listens (Linux: /proc)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                link = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="finds the listening ports through Linux's /proc")
def test_raw_bytes_on_every_listening_port_do_not_stop_training(tmp_path: Path, clean_run: dict) -> None:
    """Random bytes on fresh tcp connections to every port the run listens on: both stages' zmq sockets, gloo's
    listeners and torchrun's store (the agent). The run finishes with its accuracy."""
    attacked = tmp_path / "attacked"
    proc = _start(attacked)
    ports = listening_ports([proc.pid, *stage_pids(attacked, 2, proc)])
    assert len(ports) >= 5, ports  # 2 zmq sockets per stage, and the store
    rng = random.Random(1)
    connections = 0
    attack_ends = time.monotonic() + 8
    while proc.poll() is None and time.monotonic() < attack_ends:
        for port in ports:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(rng.randbytes(rng.choice([1, 8, 64, 1024, 65536])))
                connections += 1
            except OSError:  # a listener that has just closed, or refused this one
                pass
    _finish(proc)
    print(f"{connections} connections with random bytes to ports {ports}")
    hit = json.loads((attacked / "summary.json").read_text())
    assert connections >= 200, f"only {connections} connections were made while the run trained"
    assert hit["steps"] == clean_run["steps"] == STEPS
    assert hit["final_eval"]["accuracy"] >= clean_run["final_eval"]["accuracy"] - 0.02, (hit["final_eval"],
                                                                                          clean_run["final_eval"])
