"""The multi-process runtime end to end: real stage processes, real sockets, real MNIST (the bundled subset)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DATA,
    LAUNCH,
    ROOT,
    SMALL,
    SUBSET,
    alive,
    free_port,
    kill_group,
    launcher_main,
    ok,
    read_json,
    read_jsonl,
    running,
    stage_pids,
    stages,
    start,
    torchrun,
    torchrun_cmd,
)

from dni_async.data import load_mnist
from dni_async.partition import partition
from tasks.mnist import _batches, fcn_blocks

pytestmark = pytest.mark.process
MODES = ["dni", "cdni", "backprop", "delayed", "local"]


@pytest.fixture(scope="module")
def mode_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, str]]:
    """One 3-stage run per mode (first, middle and last stage), shared by the tests that read it: no --data-dir,
    no $DNI_ASYNC_DATA, an empty cache and no mirrors, so the bundled subset (and its announcement); backprop also
    saves every stage's gradients of step 0."""
    runs: dict[str, tuple[Path, str]] = {}
    env = {k: v for k, v in os.environ.items() if k != "DNI_ASYNC_DATA"}
    home = tmp_path_factory.mktemp("home")
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "cache"), DNI_ASYNC_MNIST_MIRRORS="")

    def get(mode: str) -> tuple[Path, str]:
        if mode not in runs:
            run = tmp_path_factory.mktemp(mode) / "run"
            # local: each stage learns for its own head, so the last stage (a lone Linear) lags: 0.25 after 60
            # steps, 0.68 after 150
            steps = 150 if mode == "local" else 60
            extra = ["--save-grads-step", "0"] if mode == "backprop" else []
            result = stages(3, ["--stages", "3", "--mode", mode, "--steps", str(steps), "--run-dir", str(run),
                                *SMALL, *extra], env=env)
            ok(result)
            runs[mode] = run, result.stderr
        return runs[mode]

    return get


@pytest.mark.parametrize("mode", MODES)
def test_end_to_end(mode_run: Callable[[str], tuple[Path, str]], mode: str) -> None:
    run, stderr = mode_run(mode)
    summary = read_json(run / "summary.json")
    steps = summary["steps"]
    assert summary["mode"] == mode and summary["stages"] == 3 and steps == (150 if mode == "local" else 60)
    assert summary["transport"] == "zmq" and summary["dataset"] == "mnist-subset" and summary["batch_size"] == 128
    assert summary["final_eval"]["examples"] == 1000 and summary["final_eval"]["accuracy"] > 0.3
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0
    ours = [line for line in stderr.splitlines() if "[stage 0]" in line]
    assert "using the bundled MNIST subset" in ours[0], f"not the first line of the run's output: {ours[:3]}"
    assert ours[-1].endswith(f"done: {mode}, 3 stages, {steps} steps, {summary['samples_per_s']:,.0f} samples/s, "
                             f"test accuracy {summary['final_eval']['accuracy']:.4f} on mnist-subset; outputs in "
                             f"{run}"), ours[-1]
    assert "WARNING" not in stderr and "Warning" not in stderr, stderr[-3000:]
    per_stage = summary["per_stage"]
    assert [s["stage"] for s in per_stage] == [0, 1, 2]
    assert len({s["pid"] for s in per_stage}) == 3, "every stage is its own process"
    for s in per_stage:
        assert s["steps"] == steps and 0 < s["busy_fraction"] <= 1
    for s in per_stage[:-1]:
        # the activations + 1 eval batch + stop forward
        assert s["messages_sent"] >= steps + 2 and s["bytes_sent"] > 0
        if mode in ("dni", "cdni"):
            assert s["sg_loss_last"] is not None and -1 <= s["sg_cosine_last"] <= 1
        if mode == "delayed":
            assert s["max_stash_mb"] > 0 and s["max_staleness"] >= 1
        if mode == "local":
            assert s["local_loss_last"] is not None
    assert per_stage[-1]["loss_last"] is not None
    # stage 0 receives the gradient of every step and `stop`; in local no gradient, only `stop`
    assert per_stage[0]["messages_received"] == (1 if mode == "local" else steps + 1)
    for i in range(3):
        info = read_json(run / "stages" / f"stage-{i}.json")
        assert info["status"] == "done" and info["stage"] == i and info["transport"] == "zmq"
        assert "127.0.0.1" in info["endpoints"]["data"]
        assert info["malloc"].startswith("freed memory kept (glibc mmap threshold"), info["malloc"]
        assert not alive(info["pid"]), "no stage process left behind"
    lines = read_jsonl(run / "metrics.jsonl")
    assert {line["stage"] for line in lines} == {0, 1, 2}
    assert all({"stage", "step", "time"} <= line.keys() for line in lines)
    assert any("eval_accuracy" in line for line in lines)
    assert any("loss" in line for line in lines if line["stage"] == 2)


def test_backprop_parity_with_one_process(mode_run: Callable[[str], tuple[Path, str]]) -> None:
    """The gradients of step 0, each stage in its own process, are those of the same model in one process."""
    run, _ = mode_run("backprop")
    torch.manual_seed(0)  # the same model (same seed) and the same first batch, in one process
    blocks = partition(fcn_blocks(64, 2), 3)
    x, y = next(_batches(*load_mnist(str(SUBSET), "train"), 128, 1, 0))
    F.cross_entropy(blocks[2](blocks[1](blocks[0](x))), y).backward()
    for i, block in enumerate(blocks):
        got = torch.load(run / "grads" / f"stage-{i}.pt", weights_only=True)
        expected = {n: p.grad for n, p in block.named_parameters()}
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=f"stage {i} {name}")


def test_rpc_transport_end_to_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(stages(2, ["--stages", "2", "--transport", "rpc", "--steps", "60", *DATA, "--run-dir", str(run), *SMALL]))
    summary = read_json(run / "summary.json")
    assert summary["transport"] == "rpc" and summary["steps"] == 60
    assert summary["final_eval"]["accuracy"] > 0.3
    assert all(s["messages_sent"] >= 60 and s["rejected_messages"] == 0 for s in summary["per_stage"])


def test_shm_transport_trains_exactly_as_zmq(tmp_path: Path) -> None:
    # locked backprop is deterministic: the same run over shared memory and over tcp ends with the same figures
    summaries = {}
    for transport in ("shm", "zmq"):
        run = tmp_path / transport
        ok(stages(3, ["--stages", "3", "--mode", "backprop", "--transport", transport, "--steps", "40", *DATA,
                      "--run-dir", str(run), *SMALL]))
        summaries[transport] = read_json(run / "summary.json")
        assert read_json(run / "stages" / "stage-1.json")["transport"] == transport
    shm, zmq = summaries["shm"], summaries["zmq"]
    assert shm["transport"] == "shm" and shm["final_eval"] == zmq["final_eval"]
    assert [s["loss_last"] for s in shm["per_stage"]] == [s["loss_last"] for s in zmq["per_stage"]]
    assert shm["per_stage"][1]["bytes_sent"] > 40 * 64 * 64 * 4  # the activations went through the ring
    assert all(s["rejected_messages"] == 0 for s in shm["per_stage"])
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("dni-ring-")]


def test_cnn_task_with_conv_sgs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ok(stages(3, ["--stages", "3", "--task", "mnist-cnn", "--hidden-size", "8", "--mode", "cdni", "--sg", "linear",
                  "--steps", "40", *DATA, "--run-dir", str(run), "--no-progress"]))
    summary = read_json(run / "summary.json")
    assert summary["task"] == "mnist-cnn" and summary["final_eval"]["accuracy"] > 0.3
    assert all(s["sg_loss_last"] is not None for s in summary["per_stage"][:-1])


def test_slow_stage_unlocked_and_bounded(tmp_path: Path) -> None:
    """Stage 1 sleeps 30 ms a step: stage 0 keeps updating before any gradient, queues stay bounded."""
    run = tmp_path / "run"
    ok(stages(2, ["--stages", "2", "--mode", "dni", "--steps", "120", "--slow-stage", "1:0.03", "--queue-size", "4",
                  "--stash-size", "16", "--max-in-flight", "16", *DATA, "--run-dir", str(run), *SMALL]))
    events = read_jsonl(run / "events" / "stage-0.jsonl")
    first_grad = min(e["t"] for e in events if e["event"] == "grad_arrived")
    early_updates = sorted(e["step"] for e in events if e["event"] == "update" and e["t"] < first_grad)
    assert early_updates[:3] == [0, 1, 2], "stage 0 applied updates for steps 0..2 before any gradient arrived"
    lines = [line for line in read_jsonl(run / "metrics.jsonl") if line["stage"] == 0 and "queue_depth" in line]
    assert max(line["queue_depth"]["backward"] for line in lines) <= 4
    assert max(line["stash"] for line in lines) <= 16
    rss = [line["rss_mb"] for line in lines]
    assert rss[-1] - rss[len(rss) // 4] < 50, f"stage 0 memory grew: {rss}"
    assert read_json(run / "summary.json")["per_stage"][0]["max_staleness"] >= 3


def test_a_failing_stage_ends_the_run(tmp_path: Path) -> None:
    began = time.monotonic()
    result = stages(3, ["--stages", "3", "--steps", "200", "--fail-stage", "1:5", *DATA,
                        "--run-dir", str(tmp_path / "run"), *SMALL], timeout=90)
    assert result.returncode != 0
    assert time.monotonic() - began < 60
    assert "aborting: stage 1 failed: RuntimeError: injected failure at step 5" in result.stderr
    reason = "stage 1: RuntimeError: injected failure at step 5 (--fail-stage)"
    for stage in range(3):  # the failed stage and the two the watchdog ended
        assert read_json(tmp_path / "run" / "stages" / f"stage-{stage}.json")["status"] == "failed"
        assert read_json(tmp_path / "run" / "stages" / f"stage-{stage}.json")["reason"] == reason
    summary = read_json(tmp_path / "run" / "summary.json")
    assert (summary["status"], summary["reason"]) == ("failed", reason)


def test_world_size_must_match_stages(tmp_path: Path) -> None:
    result = torchrun(1, ["--stages", "2", *DATA, "--run-dir", str(tmp_path), *SMALL], 60)
    assert result.returncode != 0
    assert "`torchrun --standalone --nproc-per-node 2 launch/pipeline.py --stages 2 ...`" in result.stderr
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
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--peer-timeout", "0.5"], "--peer-timeout must be >= 1 s (one heartbeat"),
    (["--batch-size", "8192", *DATA], "--batch-size 8192 is larger than the 6,000 training examples"),
    (["--steps", "x"], "argument --steps: invalid int value"),
    (["--task", "copy", "--mode", "cdni", "--sg", "softmax"], "--sg softmax predicts the gradient"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's checks, called in this process: the CLI's own (one subprocess) follows."""
    run = tmp_path / "run"
    code = launcher_main(["--stages", "2", *SMALL, "--run-dir", str(run), *args], monkeypatch)
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not run.exists(), "no stage process ever started: nothing was written"


def test_the_command_line_refuses_before_any_process_starts(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, str(LAUNCH), "--stages", "2", "--data-dir", "/nonexistent",
                             "--run-dir", str(run)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    refusal = "error: --data-dir /nonexistent: no such folder\n"
    assert (result.returncode, result.stdout, result.stderr) == (2, "", refusal)
    assert not run.exists()


def signal_a_stage(run: Path, victim: int, sig: int, *args: str) -> tuple[int, str, float]:
    """Start a 3-stage run under torchrun, send ``sig`` to stage ``victim`` once all three run, wait for torchrun's
    exit. Returns torchrun's exit code, its stderr and the seconds from the signal to its exit; no stage process is
    left afterwards, whatever happened (the test then checks they were gone already)."""
    cmd = torchrun_cmd(3, ["--stages", "3", "--steps", "100000", "--slow-stage", "2:0.01", *DATA, "--run-dir",
                           str(run), *SMALL, *args])
    pids: list[int] = []
    with running(cmd) as proc:
        try:
            pids = stage_pids(run, 3, proc)
            time.sleep(1.0)
            os.kill(pids[victim], sig)
            sent_at = time.monotonic()
            _, err = proc.communicate(timeout=60)
            took = time.monotonic() - sent_at
            left = [pid for pid in pids if alive(pid)]
        finally:
            for pid in pids:  # never leave a (stopped) stage process behind
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
    assert not left, f"stage processes {left} outlived torchrun"
    return proc.returncode, err, took


@pytest.mark.parametrize("victim,transport", [(1, "zmq"), (0, "zmq"), (1, "rpc")])
def test_a_killed_stage_ends_the_run(tmp_path: Path, victim: int, transport: str) -> None:
    """kill -9 of a stage (rank 0 too): torchrun and the other stages exit non-zero within 10 s, nothing left."""
    code, err, took = signal_a_stage(tmp_path / "run", victim, signal.SIGKILL, "--transport", transport)
    assert code != 0
    assert took < 10, f"the run took {took:.1f} s to end after the kill"
    assert f"rank      : {victim}" in err or f"local_rank: {victim}" in err, err[-3000:]


@pytest.mark.parametrize("victim,transport", [(1, "zmq"), (0, "zmq"), (1, "rpc")])
def test_a_stopped_stage_ends_the_run(tmp_path: Path, victim: int, transport: str) -> None:
    """kill -STOP of a stage: the others notice the missing heartbeat within --peer-timeout, name it, exit non-zero."""
    code, err, took = signal_a_stage(tmp_path / "run", victim, signal.SIGSTOP, "--transport", transport,
                                     "--peer-timeout", "4")
    assert code != 0
    # the missing heartbeat, or a send to it that timed out first (rpc's calls time out at --peer-timeout too)
    assert f"stage {victim} failed: no heartbeat" in err or f"lost stage {victim}: " in err, err[-3000:]
    # a heartbeat that came up to a second (one beat) before the stop counts from its own time
    assert 4 - 1 <= took < 4 + 10, f"the run took {took:.1f} s to end after the stop (--peer-timeout 4)"


def test_a_wait_longer_than_peer_timeout_is_not_a_hang(tmp_path: Path) -> None:
    """Locked backprop: stage 0 waits 2.5 s for each gradient of a slow (but beating) stage, with --peer-timeout 2."""
    ok(stages(2, ["--stages", "2", "--mode", "backprop", "--steps", "2", "--slow-stage", "1:2.5", "--peer-timeout", "2",
                  *DATA, "--run-dir", str(tmp_path), *SMALL], 120))
    assert read_json(tmp_path / "summary.json")["steps"] == 2


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
        ok(stages(2, [str(tmp_path / "run")], script=script))
    lines = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    keys = [(line["stage"], line["step"]) for line in lines if "samples_per_s" in line]
    assert len(keys) == len(set(keys)) == 2 * 15
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["task"] == "user" and summary["dataset"] == "teacher" and summary["steps"] == 150
    assert summary["final_eval"]["accuracy"] > 0.8


def test_two_torchrun_agents_multi_node_flags(tmp_path: Path) -> None:
    """Two torchrun agents (--nnodes 2, one stage each) meet through c10d rendezvous, as on two hosts."""
    port = free_port()
    run = tmp_path / "run"
    procs = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                    "--rdzv-id", "test", str(LAUNCH), "--stages", "2", "--steps", "30", *DATA, "--run-dir", str(run),
                    *SMALL]) for rank in (0, 1)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            kill_group(p)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-3000:] for e in errs)
    summary = read_json(run / "summary.json")
    assert summary["steps"] == 30 and len({s["pid"] for s in summary["per_stage"]}) == 2
