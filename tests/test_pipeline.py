"""The multi-process runtime end to end: real torchrun processes, real sockets, real MNIST."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, ok, torchrun

from dni_async.partition import partition
from tasks.mnist import _batches, fcn_blocks

SMALL = ["--hidden-size", "64", "--num-layers", "2", "--no-progress", "--log-every", "5"]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("mode", ["dni", "cdni", "backprop", "delayed", "local"])
def test_end_to_end(tmp_path: Path, mnist_dir: Path, mnist_test_size: int, stages: int, mode: str) -> None:
    run = tmp_path / "run"
    # local: each stage learns for its own head, so the last stage (here a lone Linear) lags: 0.25 after 60 steps
    # with 3 stages, 0.68 after 150
    steps = 150 if mode == "local" else 60
    ok(torchrun(stages, ["--stages", str(stages), "--mode", mode, "--steps", str(steps), "--data-dir",
                         str(mnist_dir), "--run-dir", str(run), *SMALL]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mode"] == mode and summary["stages"] == stages and summary["steps"] == steps
    assert summary["transport"] == "zmq" and summary["dataset"] == "mnist" and summary["batch_size"] == 128
    assert summary["final_eval"]["examples"] == mnist_test_size and summary["final_eval"]["accuracy"] > 0.3
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    per_stage = summary["per_stage"]
    assert [s["stage"] for s in per_stage] == list(range(stages))
    assert len({s["pid"] for s in per_stage}) == stages, "every stage is its own process"
    for s in per_stage:
        assert s["steps"] == steps and 0 < s["busy_fraction"] <= 1
    for s in per_stage[:-1]:
        # the activations + 10 eval batches + stop forward
        assert s["messages_sent"] >= steps + 11 and s["bytes_sent"] > 0
        if mode in ("dni", "cdni"):
            assert s["sg_loss_last"] is not None and -1 <= s["sg_cosine_last"] <= 1
        if mode == "delayed":
            assert s["max_stash_mb"] > 0 and s["max_staleness"] >= 1
        if mode == "local":
            assert s["local_loss_last"] is not None
    assert per_stage[-1]["loss_last"] is not None
    # stage 0 receives the gradient of every step and `stop`; in local no gradient, only `stop`
    assert per_stage[0]["messages_received"] == (1 if mode == "local" else steps + 1)
    for i in range(stages):
        info = json.loads((run / "stages" / f"stage-{i}.json").read_text())
        assert info["status"] == "done" and info["stage"] == i and info["transport"] == "zmq"
        assert "127.0.0.1" in info["endpoints"]["data"]
        with pytest.raises(ProcessLookupError):  # no stage process left behind
            os.kill(info["pid"], 0)
    lines = read_lines(run / "metrics.jsonl")
    assert {line["stage"] for line in lines} == set(range(stages))
    assert all({"stage", "step", "time"} <= line.keys() for line in lines)
    assert any("eval_accuracy" in line for line in lines)
    assert any("loss" in line for line in lines if line["stage"] == stages - 1)


@pytest.mark.parametrize("mode", ["dni", "backprop"])
def test_rpc_transport_end_to_end(tmp_path: Path, mnist_dir: Path, mode: str) -> None:
    run = tmp_path / "run"
    ok(torchrun(2, ["--stages", "2", "--mode", mode, "--transport", "rpc", "--steps", "60", "--data-dir",
                    str(mnist_dir), "--run-dir", str(run), *SMALL]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["transport"] == "rpc" and summary["steps"] == 60
    assert summary["final_eval"]["accuracy"] > 0.3
    assert all(s["messages_sent"] >= 60 and s["rejected_messages"] == 0 for s in summary["per_stage"])


def test_cnn_task_with_conv_sgs(tmp_path: Path, mnist_dir: Path) -> None:
    run = tmp_path / "run"
    ok(torchrun(3, ["--stages", "3", "--task", "mnist-cnn", "--hidden-size", "8", "--mode", "cdni", "--steps", "40",
                    "--data-dir", str(mnist_dir), "--run-dir", str(run), "--no-progress"]))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "mnist-cnn" and summary["final_eval"]["accuracy"] > 0.3
    assert all(s["sg_loss_last"] is not None for s in summary["per_stage"][:-1])


def test_default_task_falls_back_to_the_bundled_subset(tmp_path: Path) -> None:
    """No --data-dir, no $DNI_ASYNC_DATA, empty cache, no mirrors: the bundled subset, recorded as such."""
    env = {k: v for k, v in os.environ.items() if k != "DNI_ASYNC_DATA"}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"), DNI_ASYNC_MNIST_MIRRORS="")
    run = tmp_path / "run"
    result = torchrun(2, ["--stages", "2", "--steps", "20", "--run-dir", str(run), *SMALL], env=env)
    ok(result)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "mnist-subset" and summary["final_eval"]["examples"] == 1000
    ours = [line for line in result.stderr.splitlines() if "[stage " in line]
    assert "using the bundled MNIST subset" in ours[0], f"not the first line of the run's output: {ours[:3]}"


def test_backprop_parity_with_one_process(tmp_path: Path, mnist_dir: Path) -> None:
    run = tmp_path / "run"
    ok(torchrun(2, ["--stages", "2", "--mode", "backprop", "--steps", "1", "--save-grads-step", "0",
                    "--data-dir", str(mnist_dir), "--run-dir", str(run), *SMALL]))
    # the same model (same seed) and the same first batch, in one process
    torch.manual_seed(0)
    stages = partition(fcn_blocks(64, 2), 2)
    from dni_async.data import load_mnist

    x, y = next(_batches(*load_mnist(str(mnist_dir), "train"), 128, 1, 0))
    F.cross_entropy(stages[1](stages[0](x)), y).backward()
    for i, stage in enumerate(stages):
        got = torch.load(run / "grads" / f"stage-{i}.pt", weights_only=True)
        expected = {n: p.grad for n, p in stage.named_parameters()}
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"stage {i} {name}")


def test_slow_stage_unlocked_and_bounded(tmp_path: Path, mnist_dir: Path) -> None:
    """Stage 1 sleeps 30 ms a step: stage 0 keeps updating before any gradient, queues stay bounded."""
    run = tmp_path / "run"
    ok(torchrun(2, ["--stages", "2", "--mode", "dni", "--steps", "120", "--slow-stage", "1:0.03",
                    "--queue-size", "4", "--stash-size", "16", "--max-in-flight", "16", "--data-dir", str(mnist_dir),
                    "--run-dir", str(run), *SMALL]))
    events = read_lines(run / "events" / "stage-0.jsonl")
    first_grad = min(e["t"] for e in events if e["event"] == "grad_arrived")
    early_updates = sorted(e["step"] for e in events if e["event"] == "update" and e["t"] < first_grad)
    assert early_updates[:3] == [0, 1, 2], "stage 0 applied updates for steps 0..2 before any gradient arrived"
    lines = [line for line in read_lines(run / "metrics.jsonl") if line["stage"] == 0 and "queue_depth" in line]
    assert max(line["queue_depth"]["backward"] for line in lines) <= 4
    assert max(line["stash"] for line in lines) <= 16
    rss = [line["rss_mb"] for line in lines]
    assert rss[-1] - rss[len(rss) // 4] < 50, f"stage 0 memory grew: {rss}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["per_stage"][0]["max_staleness"] >= 3


def test_a_failing_stage_ends_the_run(tmp_path: Path, mnist_dir: Path) -> None:
    start = time.monotonic()
    result = torchrun(3, ["--stages", "3", "--steps", "200", "--fail-stage", "1:5", "--data-dir", str(mnist_dir),
                          "--run-dir", str(tmp_path / "run"), *SMALL], timeout=90)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert "injected failure at step 5" in result.stderr
    assert "aborting: stage 1 failed: RuntimeError: injected failure at step 5" in result.stderr
    assert json.loads((tmp_path / "run" / "stages" / "stage-1.json").read_text())["status"] == "failed"


def test_world_size_must_match_stages(tmp_path: Path, mnist_dir: Path) -> None:
    result = torchrun(1, ["--stages", "2", "--data-dir", str(mnist_dir), "--run-dir", str(tmp_path), *SMALL], 60)
    assert result.returncode != 0
    assert "--nproc-per-node 2" in result.stderr
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--stages", "5"], "more than the model's 3 layers"),
    (["--threads-per-stage", "0"], "--threads-per-stage must be >= 1"),
    (["--devices", "cpu,gpu9"], "unknown device 'gpu9'"),
    (["--devices", "cpu"], "names 1 devices for 2 stages"),
    (["--data-dir", "/nonexistent"], "--data-dir /nonexistent: no such folder"),
    (["--data-dir", str(ROOT / "tests")], "no MNIST train files"),
    (["--resume", "/nonexistent"], "no complete checkpoint set in /nonexistent/checkpoints"),
    (["--lr", "-1"], "--lr and --sg-lr must be > 0"),
    (["--steps", "x"], "argument --steps: invalid int value"),
    (["--task", "copy", "--mode", "cdni", "--sg", "softmax"], "--sg softmax predicts the gradient"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_process(tmp_path: Path, args: list[str], message: str) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "pipeline.py"), "--stages", "2", *SMALL, "--run-dir", str(run), *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr[-3000:]
    assert message in result.stderr, result.stderr
    assert not run.exists(), "no stage process ever started: nothing was written"


def signal_a_stage(run: Path, mnist_dir: Path, victim: int, sig: int, *args: str) -> tuple[int, str, float, list[int]]:
    """Start a 3-stage run, send ``sig`` to stage ``victim`` once all three run, wait for torchrun's exit.

    Returns torchrun's exit code, its stderr, the seconds from the signal to its exit, and the stage pids (no
    stage process is left afterwards, whatever happened: the test then checks they were gone already).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
           str(ROOT / "launch" / "pipeline.py"), "--stages", "3", "--steps", "100000", "--slow-stage", "2:0.01",
           "--data-dir", str(mnist_dir), "--run-dir", str(run), *SMALL, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(pids) < 3:
            time.sleep(0.2)
            files = sorted((run / "stages").glob("stage-*.json")) if (run / "stages").exists() else []
            pids = [json.loads(f.read_text())["pid"] for f in files if f.stat().st_size]
        assert len(pids) == 3, "the stages did not start"
        time.sleep(1.0)
        os.kill(pids[victim], sig)
        sent_at = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent_at
        alive = [pid for pid in pids if _alive(pid)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        for pid in pids:  # never leave a (stopped) stage process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not alive, f"stage processes {alive} outlived torchrun"
    return proc.returncode, err, took, pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("victim,transport", [(1, "zmq"), (0, "zmq"), (1, "rpc")])
def test_a_killed_stage_ends_the_run(tmp_path: Path, mnist_dir: Path, victim: int, transport: str) -> None:
    """kill -9 of a stage (rank 0 too): torchrun and the other stages exit non-zero within 10 s, nothing left."""
    code, err, took, _ = signal_a_stage(tmp_path / "run", mnist_dir, victim, signal.SIGKILL, "--transport", transport)
    assert code != 0
    assert took < 10, f"the run took {took:.1f} s to end after the kill"
    assert f"rank      : {victim}" in err or f"local_rank: {victim}" in err, err[-3000:]


@pytest.mark.parametrize("victim,transport", [(1, "zmq"), (0, "zmq"), (1, "rpc")])
def test_a_stopped_stage_ends_the_run(tmp_path: Path, mnist_dir: Path, victim: int, transport: str) -> None:
    """kill -STOP of a stage: the others notice the missing heartbeat within --peer-timeout, name it, exit non-zero."""
    code, err, took, _ = signal_a_stage(tmp_path / "run", mnist_dir, victim, signal.SIGSTOP, "--transport", transport,
                                        "--peer-timeout", "4")
    assert code != 0
    # the missing heartbeat, or a send to it that timed out first (rpc's calls time out at --peer-timeout too)
    assert f"stage {victim} failed: no heartbeat" in err or f"lost stage {victim}: " in err, err[-3000:]
    assert 4 <= took < 4 + 10, f"the run took {took:.1f} s to end after the stop (--peer-timeout 4)"


def test_a_wait_longer_than_peer_timeout_is_not_a_hang(tmp_path: Path, mnist_dir: Path) -> None:
    """Locked backprop: stage 0 waits 3 s for each gradient of a slow (but beating) stage, with --peer-timeout 2."""
    result = torchrun(2, ["--stages", "2", "--mode", "backprop", "--steps", "3", "--slow-stage", "1:3",
                          "--peer-timeout", "2", "--data-dir", str(mnist_dir), "--run-dir", str(tmp_path), *SMALL],
                      120)
    ok(result)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3


USER_SCRIPT = '''
import sys, torch, torch.nn.functional as F
from torch import nn
from dni_async.config import PipelineConfig
from dni_async.pipeline import PipelineTask, run_pipeline

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
teacher = torch.randn(8)

def data():
    gen = torch.Generator().manual_seed(1)
    def batches():
        while True:
            x = torch.randn(64, 8, generator=gen)
            yield x, (x @ teacher > 0).long()
    x = torch.randn(1000, 8, generator=gen)
    return batches(), 150, [(x, (x @ teacher > 0).long())], "teacher"

task = PipelineTask(name="user", blocks=list(model.children()), loss_fn=F.cross_entropy, input_shape=(8,),
                    num_classes=2, data=data)
run_pipeline(task, PipelineConfig(stages=2, mode="dni", batch_size=64, lr=1e-2, run_dir=sys.argv[1], progress=False))
'''


def test_python_api_runs_a_users_model(tmp_path: Path) -> None:
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    for _ in range(2):  # the second run into the same folder replaces the first one's outputs
        ok(torchrun(2, [str(tmp_path / "run")], script=script))
    lines = read_lines(tmp_path / "run" / "metrics.jsonl")
    keys = [(line["stage"], line["step"]) for line in lines if "samples_per_s" in line]
    assert len(keys) == len(set(keys)) == 2 * 15
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "user" and summary["dataset"] == "teacher" and summary["steps"] == 150
    assert summary["final_eval"]["accuracy"] > 0.8


def test_two_torchrun_agents_multi_node_flags(tmp_path: Path, mnist_dir: Path) -> None:
    """Two torchrun agents (--nnodes 2, one stage each) meet through c10d rendezvous, as on two hosts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
         str(ROOT / "launch" / "pipeline.py"), "--stages", "2", "--steps", "30", "--data-dir", str(mnist_dir),
         "--run-dir", str(run), *SMALL],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for rank in (0, 1)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        import signal

        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and len({s["pid"] for s in summary["per_stage"]}) == 2
