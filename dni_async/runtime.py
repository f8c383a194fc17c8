"""Process setup for a stage: torchrun env -> rank/stage/device, control plane, abort watchdog, teardown."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .netif import interface_of

__all__ = ["LaunchError", "StageEnv", "init_stage", "resolve_device", "await_key", "gather_json", "AbortWatchdog",
           "shutdown"]

log = logging.getLogger("dni_async")
ABORT_KEY = "dni_async/abort"
HEARTBEAT_KEY = "dni_async/heartbeat"
DONE_KEY = "dni_async/done"
PROCESS_KEY = "dni_async/process"
STORE_GRACE_S = 5.0
"""How much longer than ``--peer-timeout`` a store call may block before the store counts as lost."""
GUARD_POLL_S = 0.5
END_GRACE_S = 2.0
"""How long an ending that lost the store may take before the process exits anyway."""


class LaunchError(RuntimeError):
    """The processes were not started the way ``--stages`` needs (outside torchrun, wrong world size)."""


@dataclass
class StageEnv:
    """Who this process is: its rank (= stage), the world, its device and the torchrun store."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    store: dist.Store
    host: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str | None, local_rank: int) -> torch.device:
    """``cpu``, a GPU id (``0``, ``cuda:1``), or None (GPU ``local_rank`` when CUDA is there, else cpu).

    Raises:
        ValueError: for an unknown device or a GPU that is not there.
    """
    if spec is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    spec = spec.strip()
    if spec == "cpu":
        return torch.device("cpu")
    index = spec.removeprefix("cuda:")
    if not index.isdigit():
        raise ValueError(f"unknown device {spec!r}: use 'cpu' or a GPU id")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r} is not available (CUDA devices here: "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    return torch.device("cuda", int(index))


def init_stage(stages: int, devices: list[str] | None, bind_host: str = "127.0.0.1",
               timeout_s: float = 120.0) -> StageEnv:
    """Read the torchrun environment, check it against ``stages``, start the gloo control plane on ``bind_host``'s
    interface (``--bind``: the address the other hosts reach this one at).

    gloo listens on the interface ``GLOO_SOCKET_IFNAME`` names, else on the address this host's name resolves to:
    inside a network namespace, or on a host whose name maps to 127.0.0.1, that is loopback, and the other host's
    connect is refused. So the interface that holds ``bind_host`` is named for it, unless the user named one.

    Raises:
        LaunchError: outside torchrun, or when the world size is not ``stages``.
        ValueError: for a bad device.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise LaunchError("not started by torchrun (RANK/WORLD_SIZE unset)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != stages:
        raise LaunchError(
            f"torchrun started {world} process(es) but --stages is {stages}; run "
            f"`torchrun --standalone --nproc-per-node {stages} launch/pipeline.py --stages {stages} ...` "
            f"or `python launch/pipeline.py --stages {stages} ...`, which starts them itself")
    device = resolve_device(devices[rank] if devices else None, local_rank)
    if "GLOO_SOCKET_IFNAME" not in os.environ and (interface := interface_of(bind_host)):
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    store = dist.distributed_c10d._get_default_store()
    return StageEnv(rank, world, local_rank, device, store, socket.gethostname())


def process_space() -> str:
    """Where a pid means this process's pid: the kernel (its boot id), pid namespace and network namespace. Two
    stages report the same only where one can signal the other's pid; stages in another network namespace count
    as another host (as in the two-host tests), so that a watchdog never kills across what stands for a host."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    for ns in ("pid", "net"):
        with contextlib.suppress(OSError):
            parts.append(os.readlink(f"/proc/self/ns/{ns}"))
    return "/".join(parts) or socket.gethostname()


def is_local_address(host: str) -> bool:
    """Whether ``host`` is an address of this host (a socket can bind to it)."""
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, kind, proto, _, address in infos:
        with contextlib.suppress(OSError), socket.socket(family, kind, proto) as probe:
            probe.bind(address)
            return True
    return False


def await_key(store: dist.Store, key: str, poll_s: float = 0.02) -> bytes:
    """``store.get(key)``, polling for the key rather than blocking in ``get``: the client serialises calls, so a
    blocking ``get`` would keep this stage's watchdog thread from the store until the key came, and a stage that
    failed before setting it would leave this one waiting instead of aborting."""
    while not store.check([key]):
        time.sleep(poll_s)
    return store.get(key)


def gather_json(obj: Any) -> list[Any] | None:
    """Gather one JSON-able object per rank on rank 0 (others get None).

    The control plane carries JSON bytes in a tensor, never pickles: gloo's
    ``gather_object`` would unpickle bytes that came from a socket.
    """
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    chunks = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(chunks, padded)
    if dist.get_rank() != 0:
        return None
    return [json.loads(bytes(c[:int(s.item())].tolist()).decode()) for c, s in zip(chunks, sizes)]


class AbortWatchdog:
    """Make a failure anywhere, or a stage that stops answering, end every stage quickly and say which.

    A failing stage calls :meth:`report`, which writes its error under a key of
    the torchrun store. Every stage runs this watchdog thread, which polls the
    key and, when it appears, logs the failing stage and its error and ends the
    process with exit code 1 (``os._exit``: the main thread may be blocked in a
    socket or a collective that would never return).

    The thread also beats: it adds 1 to this stage's heartbeat counter in the
    store every ``beat_s`` and watches every other stage's counter. A counter
    that has not moved for ``peer_timeout`` seconds means that stage's process
    is stopped (``kill -STOP``) or wedged: the watchdog reports it as failed,
    naming it, kills its process if it runs on this host, and exits. The beat
    comes from this thread, not the stage loop, so long legitimate waits (a
    neighbour's evaluation, backpressure) never look like a hang. A stage that has finished marks itself done first.

    A watchdog that was held up itself blames no one. When more than ``pause_s``
    (``peer_timeout / 2``) passed from the end of its previous round to the end
    of this one (this round's store calls included), this process was stopped
    (Ctrl-Z stops the whole process group) or the store was (the launcher that
    hosts it was stopped), and the other stages were most likely held up by the
    same cause: it restarts every peer's silence clock from the end of this
    round and logs the pause once. ``peer_timeout / 2`` lies between the two
    bounds that ``peer_timeout >= 1`` (the config's minimum) gives: it is above
    a normal time between rounds, at most ``beat_s + interval`` (<=
    ``peer_timeout / 4 + 0.2``), so a busy machine does not excuse a silent
    peer; and a pause it lets through, plus a resumed peer's time to its next
    beat, stays below ``peer_timeout``, so no healthy peer is blamed for it. A
    stopped peer is still named within about ``peer_timeout``: the watchdogs
    of the stages that run keep their rounds meanwhile.

    Two more ways a stage learns that the run is over. Its parent, torchrun's
    agent, is gone (``kill -9``: torchrun starts every worker in a session of
    its own, so nothing else ends it): it reports that and ends. The store
    stops answering (a link down to the host that holds it: a store call then
    blocks without an error, for as long as TCP retries): a second thread ends
    the stage once a round has waited ``peer_timeout + STORE_GRACE_S``
    (:meth:`_guard_store`).
    """

    def __init__(self, env: StageEnv, on_abort: Any = None, interval: float = 0.2, peer_timeout: float = 60.0,
                 beat_s: float = 1.0) -> None:
        self.env = env
        self.on_abort = on_abort
        self.interval = interval
        self.peer_timeout = peer_timeout
        self.beat_s = min(beat_s, peer_timeout / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="abort-watchdog", daemon=True)
        self.pause_s = peer_timeout / 2
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (last counter value, when it last moved)
        self._next_beat = 0.0
        self._last_round: float | None = None  # when the previous round's store calls ended
        self.store_timeout = peer_timeout + STORE_GRACE_S
        self._round_began: float | None = None  # when the current round's store calls began (None between rounds)
        self._guard = threading.Thread(target=self._guard_store, name="store-guard", daemon=True)
        self._agent = os.getppid()  # torchrun's agent on this host (or whoever started this process)

    def start(self) -> AbortWatchdog:
        self.env.store.set(f"{PROCESS_KEY}/{self.env.rank}", json.dumps({"space": process_space(), "pid": os.getpid()}))
        self._thread.start()
        self._guard.start()
        return self

    def report(self, error: BaseException | str, stage: int | None = None) -> None:
        """Tell every stage that ``stage`` (default: this one) failed, unless a failure was reported already: the
        first one is the cause, later ones (a peer lost because of it) its consequences."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        info = json.dumps({"stage": self.env.rank if stage is None else stage, "error": text})
        try:
            self.env.store.compare_set(ABORT_KEY, "", info)
        except Exception as err:  # noqa: BLE001 - the store may be gone with the agent
            log.error("could not report the failure to the other stages: %s", err)

    def stop(self) -> None:
        """This stage is done: stop watching, and tell the others not to miss its heartbeat."""
        self._stop.set()
        with contextlib.suppress(Exception):  # the store may already be going away at the very end
            self.env.store.set(f"{DONE_KEY}/{self.env.rank}", "1")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if os.getppid() != self._agent:
                error = f"this host's torchrun agent (pid {self._agent}) is gone"
                self.report(error)
                self._exit({"stage": self.env.rank, "error": error})
            self._round_began = time.monotonic()
            try:
                self._beat()
                if not self.env.store.check([ABORT_KEY]):
                    continue
                info = json.loads(self.env.store.get(ABORT_KEY).decode())
            except Exception:  # noqa: BLE001 - store gone: the agent is tearing the run down
                info = {"stage": "?", "error": "the torchrun store is gone (agent or rank 0 died)"}
            finally:
                self._round_began = None
            if self._stop.is_set() or info.get("stage") == self.env.rank:
                return
            self._exit(info)

    def _guard_store(self) -> None:
        """End this process when a round's store calls have not returned for ``store_timeout``: the store's host
        is unreachable (a link down: the calls block without an error, however short the store's timeout) or
        its agent is stopped. Every stage's ending, the watchdog's included, talks to the store, so the ending
        runs in a thread of its own and the process exits ``END_GRACE_S`` later whatever it still waits for
        (the stage file is written before any store call). Time this process itself was stopped does not count.
        """
        excused = last = time.monotonic()
        poll = min(GUARD_POLL_S, self.pause_s / 4)  # well below a pause, so that its own polls never look like one
        while not self._stop.wait(poll):
            now = time.monotonic()
            if now - last > self.pause_s:  # this process was stopped: the wait was not the store's
                excused = now
            last = now
            began = self._round_began
            if began is None or now - max(began, excused) <= self.store_timeout:
                continue
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            info = {"stage": "?", "error": f"the torchrun store at {where} has not answered for "
                                           f"{now - max(began, excused):.0f} s (its host is unreachable, or its "
                                           f"agent is stopped)"}
            threading.Thread(target=self._exit, args=(info,), name="store-lost", daemon=True).start()
            if "TORCHELASTIC_RUN_ID" in os.environ and not is_local_address(os.environ.get("MASTER_ADDR", "127.0.0.1")):
                # the store is on another host: this host's agent is blocked in its own calls to it (its rendezvous
                # keeps asking it) and would wait for TCP to give up, many minutes; end it with its stages
                log.error("ending this host's torchrun agent (pid %d): it cannot reach the store either", self._agent)
                with contextlib.suppress(OSError):
                    os.kill(self._agent, signal.SIGKILL)
            time.sleep(END_GRACE_S)
            os._exit(1)

    def _beat(self) -> None:
        """Beat once a ``beat_s``; report a stage whose counter has not moved for ``peer_timeout``, unless more
        than ``pause_s`` passed since the previous round ended (then restart every peer's clock instead)."""
        now = time.monotonic()
        if now < self._next_beat:
            return
        self._next_beat = now + self.beat_s
        self.env.store.add(f"{HEARTBEAT_KEY}/{self.env.rank}", 1)
        counts = {rank: self.env.store.add(f"{HEARTBEAT_KEY}/{rank}", 0)
                  for rank in range(self.env.world_size) if rank != self.env.rank}
        ended = time.monotonic()
        took = ended - (now if self._last_round is None else self._last_round)
        self._last_round = ended
        if took > self.pause_s:
            log.warning("heartbeat paused for %.1f s (this process or the store was stopped); not blaming peers",
                        took)
            self._seen = {rank: (count, ended) for rank, count in counts.items()}
            return
        for rank, count in counts.items():
            last = self._seen.get(rank)
            if last is None or count != last[0]:
                self._seen[rank] = (count, now)
            elif now - last[1] > self.peer_timeout and not self.env.store.check([f"{DONE_KEY}/{rank}"]):
                error = (f"no heartbeat for {now - last[1]:.0f} s (--peer-timeout {self.peer_timeout:g}): its "
                         f"process is stopped or hung")
                if self._stop.is_set():
                    return
                self.report(error, stage=rank)
                self._exit({"stage": rank, "error": error}, kill=rank)

    def kill_if_silent(self, rank: int) -> None:
        """Kill stage ``rank``'s process if it runs on this host and its heartbeat has stopped (it is stopped or
        wedged, not merely slow): called when a send to it timed out, so that the run ends now."""
        seen = self._seen.get(rank)
        if seen is not None and time.monotonic() - seen[1] > 3 * self.beat_s:
            self._kill_if_local(rank)

    def _kill_if_local(self, rank: int) -> None:
        """SIGKILL a hung stage's process if it runs on this host: a stopped process ignores torchrun's SIGTERM,
        and torchrun would wait 30 s before its SIGKILL."""
        try:
            where = json.loads(self.env.store.get(f"{PROCESS_KEY}/{rank}").decode())
            if where["space"] == process_space():
                os.kill(int(where["pid"]), signal.SIGKILL)
                log.error("killed the process of stage %d (pid %d)", rank, where["pid"])
        except Exception as err:  # noqa: BLE001 - best effort: torchrun's agent on its host ends it too
            log.warning("could not kill stage %d's process: %s", rank, err)

    def _exit(self, info: dict[str, Any], kill: int | None = None) -> None:
        """Say why, kill stage ``kill``'s process if given (after saying why: its death makes torchrun end the
        other stages at once), and end this process."""
        log.error("aborting: stage %s failed: %s", info.get("stage"), info.get("error"))
        if kill is not None:
            self._kill_if_local(kill)
        if self.on_abort is not None:
            self.on_abort(info)
        logging.shutdown()
        os._exit(1)


def shutdown(timeout_s: float = 30.0) -> None:
    """Final barrier and process-group teardown (bounded: a dead peer cannot hang it)."""
    if not dist.is_initialized():
        return
    try:
        work = dist.barrier(async_op=True)
        deadline = time.monotonic() + timeout_s
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError("final barrier timed out")
            time.sleep(0.01)
    finally:
        dist.destroy_process_group()
