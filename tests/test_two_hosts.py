"""Two hosts for real: network namespaces joined by a veth pair, one torchrun agent in each (c10d rendezvous),
every stage bound to its host's own address. Training across the hosts, CURVE with each host holding only its own
secret keys, a link taken down mid-run, a host's agent killed and the run resumed bit for bit."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import netns
import pytest
import torch
from helpers import DATA, LAUNCH, SMALL, finish, kill_group, ok, read_json, stages, start
from netns import ADDRESSES, Host, two_hosts

from dni_async.checkpoint import load_stage, newest_complete
from dni_async.curve import generate_keys

pytestmark = pytest.mark.process
PORT = 29555


def agent(host: Host, node_rank: int, nproc: int, run_dir: Path, args: list[str]) -> list[str]:
    """The two-host recipe of docs/transports.md: one torchrun agent per host, host A's agent hosts the c10d
    rendezvous, each host binds (and so advertises) its own address."""
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{ADDRESSES[0]}:{PORT}", "--rdzv-id", "two-hosts",
            "--local-addr", host.address, *(["--rdzv-conf", "is_host=1"] if node_rank == 0 else [])]
    return host.cmd(["env", "OMP_NUM_THREADS=1", sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                     "--node-rank", str(node_rank), "--nproc-per-node", str(nproc), *rdzv, str(LAUNCH),
                     "--run-dir", str(run_dir), "--bind", host.address, *args])



@pytest.fixture
def hosts() -> Iterator[tuple[Host, Host]]:
    with two_hosts() as pair:
        yield pair


def run_both(hosts: tuple[Host, Host], nproc: int, run_dirs: tuple[Path, Path], args: list[str],
             timeout: float = 150, agents: list[int] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Run both hosts' agents to their end (``agents`` gets their pids: `ip netns exec` and `env` exec them)."""
    procs = [start(agent(host, rank, nproc, run, args)) for rank, (host, run) in enumerate(zip(hosts, run_dirs))]
    if agents is not None:
        agents.extend(p.pid for p in procs)
    try:
        return [finish(p, timeout) for p in procs]
    finally:
        for p in procs:
            kill_group(p)


def both_ok(results: list[subprocess.CompletedProcess[str]]) -> None:
    for host, result in zip("AB", results):
        assert result.returncode == 0, f"host {host}: exit {result.returncode}\n{result.stderr[-4000:]}"


def endpoint_hosts(stage_file: dict[str, object]) -> set[str]:
    """The addresses in a stage file's data-plane endpoints (``zmq;forward=tcp://A:P;backward=tcp://A:P``)."""
    return set(re.findall(r"tcp://([^:;]+):", str(stage_file["endpoints"])))


def veth_tx_bytes(host: Host) -> int:
    out = subprocess.run(host.cmd(["cat", f"/sys/class/net/{host.link}/statistics/tx_bytes"]), capture_output=True,
                         text=True, timeout=30, check=True)
    return int(out.stdout)


class Listeners:
    """Every listening TCP socket seen in either host while a run trains: (host, address:port, pid)."""

    def __init__(self, hosts: tuple[Host, Host]) -> None:
        self.hosts = hosts
        self.seen: set[tuple[str, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.3):
            for host in self.hosts:
                self.seen.update((host.address, local, pid) for local, _, pid in host.listeners())

    def __enter__(self) -> Listeners:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_four_stages_over_two_hosts_train_like_one_host(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    """Stages 0-1 on host A, 2-3 on host B: the run trains to the one-host accuracy, the data plane between stages
    1 and 2 runs over the veth addresses, and the stages listen on nothing but their host's address."""
    args = ["--stages", "4", "--steps", "1000", *DATA, *SMALL, "--num-layers", "4"]
    runs = (tmp_path / "a", tmp_path / "b")
    tx_before = veth_tx_bytes(hosts[0])
    agents: list[int] = []
    with Listeners(hosts) as listeners:
        both_ok(run_both(hosts, 2, runs, args, agents=agents))
    summary = read_json(runs[0] / "summary.json")
    one_host = tmp_path / "one-host"
    ok(stages(4, [*args, "--run-dir", str(one_host)], 150))
    reference = read_json(one_host / "summary.json")["final_eval"]["accuracy"]
    assert summary["steps"] == 1000 and summary["final_eval"]["accuracy"] > 0.8
    assert abs(summary["final_eval"]["accuracy"] - reference) < 0.03, (summary["final_eval"], reference)

    stage_pids = {}
    for stage in range(4):
        host = hosts[stage // 2]
        info = read_json(runs[stage // 2] / "stages" / f"stage-{stage}.json")
        assert info["status"] == "done" and endpoint_hosts(info) == {host.address}, info
        assert not (runs[1 - stage // 2] / "stages" / f"stage-{stage}.json").exists()
        stage_pids[info["pid"]] = host.address
    # every forward activation of stage 1 (batch x hidden float32 a step) left host A over the veth
    assert veth_tx_bytes(hosts[0]) - tx_before > 1000 * 64 * 64 * 4
    # the stages listen on their host's address only; besides them, only host A's agent listens: torchrun's
    # rendezvous store and the workers' store, on every address of its host (torchrun's own, see docs/security.md).
    # A socket sampled as its process ends may have no owner in `ss`: it too must be on its host's address.
    assert {pid for _, _, pid in listeners.seen} >= set(stage_pids), listeners.seen
    for addr, local, pid in listeners.seen:
        if pid == agents[0]:
            assert addr == hosts[0].address and local.startswith("*:"), (addr, local)
        else:
            assert local.rsplit(":", 1)[0] == addr, (addr, local, pid)
    assert (hosts[0].address, f"*:{PORT}", agents[0]) in listeners.seen


def test_curve_across_hosts_with_each_hosts_own_secret_keys(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    made = tmp_path / "made"
    generate_keys(made, 2)
    folders = []
    for stage, host in enumerate(hosts):  # every public key, and only this host's stage's secret key
        folder = tmp_path / f"keys-{host.address}"
        folder.mkdir()
        for name in ("stage-0.key", "stage-1.key", f"stage-{stage}.key_secret"):
            shutil.copy2(made / name, folder / name)
        folders.append(folder)
    runs = (tmp_path / "a", tmp_path / "b")
    procs = [start(agent(host, rank, 1, run, ["--stages", "2", "--steps", "400", *DATA, *SMALL,
                                              "--curve-keys", str(folder)]))
             for rank, (host, run, folder) in enumerate(zip(hosts, runs, folders))]
    try:
        both_ok([finish(p, 150) for p in procs])
    finally:
        for p in procs:
            kill_group(p)
    summary = read_json(runs[0] / "summary.json")
    assert summary["final_eval"]["accuracy"] > 0.8 and summary["config"]["curve_keys"] == str(folders[0])
    assert endpoint_hosts(read_json(runs[1] / "stages" / "stage-1.json")) == {hosts[1].address}


def wait_for(predicate: object, procs: list[subprocess.Popen[str]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, f"a host ended first:\n{ended[0].communicate()[1][-3000:]}"
        time.sleep(0.05)


def end_times(procs: list[subprocess.Popen[str]], since: float, timeout: float) -> list[tuple[int, float, str]]:
    """Each agent's exit status, seconds from ``since`` to its end, and stderr."""
    ended = []
    for p in procs:
        result = finish(p, max(1.0, since + timeout - time.monotonic()))
        ended.append((result.returncode, time.monotonic() - since, result.stderr))
    return ended


def no_process_left(hosts: tuple[Host, Host], grace_s: float = 5.0) -> None:
    """Once the agents have ended, their stages end too, within ``grace_s`` (a stage's ending after a lost store
    takes at most 2 s)."""
    deadline = time.monotonic() + grace_s
    while hosts[0].pids() or hosts[1].pids():
        assert time.monotonic() < deadline, f"left running: {hosts[0].pids()} {hosts[1].pids()}"
        time.sleep(0.1)


def test_a_link_taken_down_ends_the_run_on_both_hosts(hosts: tuple[Host, Host], tmp_path: Path) -> None:
    peer_timeout = 5
    runs = (tmp_path / "a", tmp_path / "b")
    args = ["--stages", "2", "--steps", "1000000", *DATA, *SMALL, "--peer-timeout", str(peer_timeout)]
    procs = [start(agent(host, rank, 1, run, args)) for rank, (host, run) in enumerate(zip(hosts, runs))]
    try:
        metrics = runs[1] / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.stat().st_size > 2000, procs, 120, "training")
        hosts[0].set_link(False)
        down = time.monotonic()
        ended = end_times(procs, down, peer_timeout + 10 + 30)
    finally:
        for p in procs:
            kill_group(p)
    for (code, took, err), host in zip(ended, "AB"):
        print(f"host {host}: exit {code}, {took:.1f} s after the link went down")
        assert code != 0 and took <= peer_timeout + 10, f"host {host}: exit {code} after {took:.1f} s\n{err[-3000:]}"
    assert re.search(r"stage 1\b.*(no heartbeat|lost)", ended[0][2]), ended[0][2][-3000:]
    assert re.search(r"(lost stage 0|store at 10\.77\.0\.1)", ended[1][2]), ended[1][2][-3000:]
    for stage, run in enumerate(runs):
        assert read_json(run / "stages" / f"stage-{stage}.json")["status"] == "failed"
    no_process_left(hosts)


def test_a_killed_agent_ends_both_hosts_and_backprop_resumes_bit_for_bit(hosts: tuple[Host, Host],
                                                                         tmp_path: Path) -> None:
    """kill -9 of host B's agent: its stage and host A's end, naming the lost stage; both hosts resume from the last
    checkpoint set (one run folder, shared by the hosts as over NFS) and end where one uninterrupted run on one
    host does, bit for bit."""
    peer_timeout = 5
    run = tmp_path / "run"
    args = ["--stages", "2", "--steps", "3000", "--mode", "backprop", *DATA, *SMALL, "--log-every", "100",
            "--checkpoint-every", "100", "--peer-timeout", str(peer_timeout)]
    procs = [start(agent(host, rank, 1, run, args)) for rank, host in enumerate(hosts)]
    try:
        wait_for(lambda: any(run.glob("checkpoints/step-*/manifest.json")), procs, 120, "a checkpoint set")
        os.kill(procs[1].pid, signal.SIGKILL)  # `ip netns exec` execs the agent: this pid is torchrun's agent
        killed = time.monotonic()
        ended = end_times(procs, killed, peer_timeout + 10 + 30)
    finally:
        for p in procs:
            kill_group(p)
    assert ended[1][0] == -signal.SIGKILL
    code, took, err = ended[0]
    print(f"host A: exit {code}, {took:.1f} s after host B's agent was killed; resumed from step "
          f"{newest_complete(run)[1]['step']}")
    assert code != 0 and took <= peer_timeout + 10, f"host A: exit {code} after {took:.1f} s\n{err[-3000:]}"
    assert "stage 1" in err and "agent" in err, err[-3000:]
    no_process_left(hosts)
    crashed_at = newest_complete(run)[1]["step"]
    assert 100 <= crashed_at < 3000

    both_ok(run_both(hosts, 1, (run, run), [*args, "--resume", str(run)]))
    summary = read_json(run / "summary.json")
    assert summary["resumed_from"] == {"run_dir": str(run), "step": crashed_at} and summary["steps"] == 3000
    straight = tmp_path / "straight"
    ok(stages(2, [*args, "--run-dir", str(straight)], 150))
    for stage in (0, 1):
        a, b = (load_stage(newest_complete(r)[0], stage) for r in (straight, run))
        assert a["step"] == b["step"] == 3000
        torch.testing.assert_close(a["block"], b["block"], rtol=0, atol=0)
        torch.testing.assert_close(a["opt"]["state"], b["opt"]["state"], rtol=0, atol=0)


def test_a_killed_runs_namespaces_are_removed_at_the_next_start() -> None:
    """A pair left by a test run that was killed (its pid gone) is removed; one of a live run is left alone."""
    if netns.missing():
        pytest.skip(netns.missing())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, live = f"{netns.PREFIX}{gone.pid}x1a", f"{netns.PREFIX}{os.getpid()}x99a"
    try:
        for name in (dead, live):
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
        assert dead in netns.remove_leftovers()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert dead not in listed and live in listed
    finally:
        for name in (dead, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
