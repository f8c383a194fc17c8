"""What the multi-process tests share: starting torchrun (or the launcher) with a hard timeout, killing its process
group, waiting for the stages' files, reading a run's outputs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ROOT / "dni_async" / "data" / "mnist_subset"
DATA = ["--data-dir", str(SUBSET)]
"""The bundled MNIST subset, as launcher flags."""
"""The MNIST subset bundled in the package (the first 6,000 train and 1,000 test images of the real files)."""
LAUNCH = ROOT / "launch" / "pipeline.py"
SMALL = ["--hidden-size", "64", "--num-layers", "2", "--no-progress", "--log-every", "5"]
"""A small MLP (3 blocks) for the runs whose claims do not need a big one."""


def torchrun_cmd(nproc: int, args: list[str], script: Path = LAUNCH) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(script), *args]


def start(cmd: list[str], env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start ``cmd`` in the repository root, in a process group of its own (so that it can be killed whole)."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=env)


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL ``proc``'s whole process group if it still runs, and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def finish(proc: subprocess.Popen[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Wait for ``proc`` at most ``timeout`` seconds; on expiry kill its group and fail the test with its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"{' '.join(map(str, proc.args))[:300]} did not finish in {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun(nproc: int, args: list[str], timeout: float = 120, env: dict[str, str] | None = None,
             script: Path = LAUNCH) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (default launch/pipeline.py) under torchrun with a hard timeout."""
    return finish(start(torchrun_cmd(nproc, args, script), env), timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stages(nproc: int, args: list[str], timeout: float = 120, script: Path = LAUNCH,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script``'s ``nproc`` stage processes directly, with the environment torchrun would give them (rank 0
    hosts the store): the same processes, sockets and code as under torchrun, without its agent, which costs a
    second import of torch per run. The tests of what torchrun itself adds (its failure reports, killed or
    stopped stages, multi-node rendezvous) use :func:`torchrun`.

    Returns:
        Every process's stderr, in rank order; the exit status is the first non-zero one (0 if none).
    """
    port = free_port()
    procs = []
    for rank in range(nproc):
        rank_env = {**(os.environ if env is None else env), "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(start([sys.executable, str(script), *args], env=rank_env))
    deadline = time.monotonic() + timeout
    try:
        results = [finish(p, max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    code = next((r.returncode for r in results if r.returncode), 0)
    return subprocess.CompletedProcess(procs[0].args, code, "".join(r.stdout or "" for r in results),
                                       "".join(r.stderr for r in results))


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstderr:\n{result.stderr[-6000:]}"


@contextlib.contextmanager
def running(cmd: list[str], stdout: Any = subprocess.PIPE) -> Iterator[subprocess.Popen[str]]:
    """``start(cmd)`` for a test that acts on the run while it trains; its process group is killed on every exit."""
    proc = start(cmd, stdout=stdout)
    try:
        yield proc
    finally:
        kill_group(proc)


def stage_pids(run: Path, stages: int, proc: subprocess.Popen[str], timeout: float = 60) -> list[int]:
    """The stage processes' pids, once every stage has written its stage file (fails if the run ends first)."""
    files = [run / "stages" / f"stage-{i}.json" for i in range(stages)]
    deadline = time.monotonic() + timeout
    while not all(f.exists() and f.stat().st_size for f in files):
        assert time.monotonic() < deadline, f"the stages did not start within {timeout} s"
        assert proc.poll() is None, f"the run ended before its stages started:\n{proc.communicate()[1][-3000:]}"
        time.sleep(0.05)
    return [int(read_json(f)["pid"]) for f in files]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def launcher_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int | str | None:
    """Call launch/pipeline.py's ``main`` in this process as the command line would (not as a stage): its checks
    before any process starts, without a second import of torch. Returns the exit code it leaves with."""
    import importlib.util

    monkeypatch.delenv("RANK", raising=False)
    spec = importlib.util.spec_from_file_location("launch_pipeline", LAUNCH)
    assert spec is not None and spec.loader is not None
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    with pytest.raises(SystemExit) as exit_:
        launcher.main(argv)
    return exit_.value.code
