"""The abort watchdog's heartbeat: a silent peer is blamed, a pause of this process or of the store is not (issue 14,
case 5: Ctrl-Z, then fg, killed a healthy stage)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from helpers import LAUNCH, SMALL, SUBSET, alive, finish, kill_group, read_json, start

from dni_async import runtime
from dni_async.runtime import ABORT_KEY, HEARTBEAT_KEY, AbortWatchdog, StageEnv

PEER = f"{HEARTBEAT_KEY}/1"


def _pauses(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("heartbeat paused for")]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class FakeStore:
    """The torchrun store's calls the watchdog makes, over a dict; ``hang_s`` makes the next ``add`` take that long."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.data: dict[str, Any] = {}
        self.hang_s = 0.0

    def add(self, key: str, amount: int) -> int:
        self.clock.now += self.hang_s
        self.hang_s = 0.0
        self.data[key] = int(self.data.get(key, 0)) + amount
        return int(self.data[key])

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        return cast(bytes, self.data[key])


class Stage0:
    """Stage 0's watchdog of a 2-stage run on a fake clock and store, its blames recorded instead of acted on; stage
    1 (the peer) beats every ``beat_s`` while it runs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, peer_timeout: float) -> None:
        self.clock = FakeClock()
        self.store = FakeStore(self.clock)
        monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=self.clock.monotonic))
        env = StageEnv(0, 2, 0, torch.device("cpu"), cast(Any, self.store), "host")
        self.wd = AbortWatchdog(env, peer_timeout=peer_timeout)
        self.blamed: list[tuple[float, int | None]] = []  # (when, whose process it would kill)
        self.reported: list[int | None] = []
        monkeypatch.setattr(self.wd, "report", lambda error, stage=None: self.reported.append(stage))
        monkeypatch.setattr(self.wd, "_exit", lambda info, kill=None: self.blamed.append((self.clock.now, kill)))
        monkeypatch.setattr(self.wd, "_kill_if_local", lambda rank: pytest.fail(f"would kill stage {rank}"))
        self.peer_next = 0.0

    def run(self, seconds: float, peer_from: float = -math.inf) -> None:
        """``seconds`` of the watchdog thread's polls (one every ``interval``); the peer beats from ``peer_from`` on."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            if self.clock.now >= max(peer_from, self.peer_next):
                self.store.data[PEER] = int(self.store.data.get(PEER, 0)) + 1
                self.peer_next = self.clock.now + self.wd.beat_s
            self.wd._beat()
            self.clock.now += self.wd.interval

    def first_blame(self) -> float:
        assert self.blamed, "the silent peer was never blamed"
        assert self.blamed[0][1] == 1 and self.reported[0] == 1, (self.blamed, self.reported)
        return self.blamed[0][0]


@pytest.mark.parametrize("peer_timeout", [1.0, 3.0])
def test_a_silent_peer_is_blamed_after_peer_timeout(monkeypatch: pytest.MonkeyPatch, peer_timeout: float) -> None:
    """The peer stops beating while this stage's rounds go on (at the smallest --peer-timeout too, where a round
    comes every 0.4 s against a 0.5 s pause threshold): it is blamed, and its process killed, after peer_timeout."""
    stage = Stage0(monkeypatch, peer_timeout)
    stage.run(2.0)
    stopped_at = stage.clock.now
    stage.run(peer_timeout + 2.0, peer_from=math.inf)
    took = stage.first_blame() - stopped_at
    # seen moving at most a beat and a poll before the stop; noticed at most a beat and two polls after the timeout
    slack = stage.wd.beat_s + 2 * stage.wd.interval
    assert peer_timeout - slack < took <= peer_timeout + slack, f"blamed {took:.2f} s after its last beat"


def test_this_stage_stopped_blames_no_peer(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Both stages stopped for twice the timeout (Ctrl-Z): after fg, the peer gets a whole peer_timeout again."""
    stage = Stage0(monkeypatch, 3.0)
    stage.run(2.0)
    with caplog.at_level(logging.WARNING, logger="dni_async"):
        stage.clock.now += 6.0
        resumed_at = stage.clock.now
        stage.run(6.0, peer_from=math.inf)  # the peer never beats again: it is blamed, but only a timeout later
    took = stage.first_blame() - resumed_at
    assert 3.0 < took <= 3.0 + stage.wd.beat_s + 2 * stage.wd.interval, f"blamed {took:.2f} s after the resume"
    assert [m.split(" (")[0] for m in _pauses(caplog)] == ["heartbeat paused for 6.4 s"]  # 6 s + its last poll gap


def test_a_stalled_store_blames_no_peer(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """This stage's beat hangs 6 s in the store (the launcher that hosts it was stopped); the peer, held up too,
    beats again a second later."""
    stage = Stage0(monkeypatch, 3.0)
    stage.run(2.0)
    stage.store.hang_s = 6.0
    with caplog.at_level(logging.WARNING, logger="dni_async"):
        stage.run(stage.wd.beat_s + stage.wd.interval, peer_from=math.inf)
        assert stage.store.hang_s == 0, "no round beat"
        stage.run(6.0, peer_from=stage.clock.now + 1.0)
    assert not stage.blamed
    assert len(_pauses(caplog)) == 1


def test_the_first_failure_reported_stays_the_one_every_stage_reads() -> None:
    """A stage that fails because of another's failure (a peer lost) must not replace the cause."""
    store = torch.distributed.HashStore()
    first = AbortWatchdog(StageEnv(1, 3, 1, torch.device("cpu"), store, "host"))
    second = AbortWatchdog(StageEnv(0, 3, 0, torch.device("cpu"), store, "host"))
    first.report(RuntimeError("injected failure"))
    second.report("PeerLost: lost stage 1")
    assert json.loads(store.get(ABORT_KEY)) == {"stage": 1, "error": "RuntimeError: injected failure"}


class _Exited(BaseException):
    """Raised by the stand-in for ``os._exit``: ends the thread that called it."""


def _real_watchdog(monkeypatch: pytest.MonkeyPatch, store: Any) -> tuple[AbortWatchdog, list[Any], threading.Event]:
    """A watchdog with real threads and clock, whose ``os._exit`` records the call and ends its thread."""
    ended, aborts = threading.Event(), []

    def fake_exit(code: int) -> None:
        ended.set()
        raise _Exited

    monkeypatch.setattr(runtime.os, "_exit", fake_exit)
    monkeypatch.setattr(runtime, "STORE_GRACE_S", 0.5)
    monkeypatch.setattr(runtime, "END_GRACE_S", 0.1)
    monkeypatch.setattr(threading, "excepthook", lambda args: None if args.exc_type is _Exited else print(args))
    wd = AbortWatchdog(StageEnv(0, 2, 0, torch.device("cpu"), store, "host"), on_abort=aborts.append,
                       peer_timeout=1.0)
    return wd, aborts, ended


class HangingStore:
    """A store whose ``add`` blocks once ``hang`` is set, as over a link that went down (no error, no answer)."""

    def __init__(self) -> None:
        self.store = torch.distributed.HashStore()
        self.hang, self.release = threading.Event(), threading.Event()

    def add(self, key: str, value: int) -> int:
        if self.hang.is_set():
            self.release.wait()
        return int(self.store.add(key, value))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_store_that_stops_answering_ends_the_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    store = HangingStore()
    wd, aborts, ended = _real_watchdog(monkeypatch, store)
    try:
        wd.start()
        time.sleep(0.5)
        assert not ended.is_set()
        store.hang.set()
        hung = time.monotonic()
        assert ended.wait(10), "the stage did not end"
        took = time.monotonic() - hung
    finally:
        store.release.set()
        wd.stop()
        for thread in threading.enumerate():  # none may call the next test's stand-in for os._exit
            if thread.name in ("abort-watchdog", "store-guard", "store-lost"):
                thread.join(5)
    assert 1.5 <= took <= 1.5 + 2 * runtime.GUARD_POLL_S + 0.3 + 1.0, took  # peer_timeout + grace, + poll and end
    assert "has not answered for" in aborts[0]["error"]


def test_a_stage_whose_agent_is_gone_reports_it_and_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    store = torch.distributed.HashStore()
    wd, aborts, ended = _real_watchdog(monkeypatch, store)
    error = f"this host's torchrun agent (pid {os.getppid()}) is gone"
    try:
        wd.start()
        time.sleep(0.5)
        assert not ended.is_set()
        monkeypatch.setattr(runtime.os, "getppid", lambda: 1)
        assert ended.wait(5), "the stage did not end"
    finally:
        wd.stop()
    assert aborts == [{"stage": 0, "error": error}]
    assert json.loads(store.get(ABORT_KEY)) == {"stage": 0, "error": error}


def _stage_files(run: Path) -> list[dict[str, Any]]:
    files = [run / "stages" / f"stage-{i}.json" for i in range(2)]
    return [read_json(f) if f.exists() else {} for f in files]


def _training(run: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> list[int]:
    """Wait until both stages run and stage 0 has logged a step; their pids."""
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (all(s.get("status") == "running" for s in _stage_files(run)) and metrics.exists()
               and metrics.stat().st_size):
        assert proc.poll() is None, f"the run ended before it trained:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"the stages did not start training within {timeout} s"
        time.sleep(0.05)
    return [int(s["pid"]) for s in _stage_files(run)]


@pytest.mark.process
@pytest.mark.parametrize("everything", [False, True], ids=["launcher", "group-and-stages"])
def test_a_stop_and_continue_ends_well(tmp_path: Path, everything: bool) -> None:
    """SIGSTOP for 6 s (> 2 x --peer-timeout 3), then SIGCONT, of the launcher, which hosts the store (Ctrl-Z and fg:
    the terminal's foreground process group holds the launcher alone, torchrun starts every stage in a session of
    its own), or of the launcher's group and every stage: the run ends well."""
    run = tmp_path / "run"
    proc = start([sys.executable, str(LAUNCH), "--stages", "2", "--steps", "250", "--peer-timeout", "3",
                  "--data-dir", str(SUBSET), "--run-dir", str(run), "--slow-stage", "0:0.05", *SMALL])
    pids: list[int] = []
    try:
        pids = _training(run, proc)
        if everything:  # stage 1 first, so that stage 0 has seen its last beat; stage 0 continues first, and looks
            os.kill(pids[1], signal.SIGSTOP)
            time.sleep(1.5)  # > a round of stage 0's watchdog (0.8 s)
            for pid in (-proc.pid, pids[0]):
                os.kill(pid, signal.SIGSTOP)
            time.sleep(6.0)
            for pid in (-proc.pid, pids[0]):
                os.kill(pid, signal.SIGCONT)
            time.sleep(0.5)
            os.kill(pids[1], signal.SIGCONT)
        else:
            os.kill(proc.pid, signal.SIGSTOP)
            time.sleep(6.0)
            os.kill(proc.pid, signal.SIGCONT)
        result = finish(proc, 60)
    finally:
        kill_group(proc)
        for pid in filter(alive, pids):  # never leave a stopped stage behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert "no heartbeat" not in result.stderr and "aborting" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, result.stderr[-4000:]
    assert [s.get("status") for s in _stage_files(run)] == ["done", "done"]
