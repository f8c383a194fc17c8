"""Misuse and bad numbers: refusals before any process starts, divergence, one run per run folder, endings that say
what happened, a refused run that leaves the folder as it was."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist
from helpers import (
    DATA,
    LAUNCH,
    ROOT,
    SMALL,
    SUBSET,
    alive,
    finish,
    launcher_main,
    read_json,
    read_jsonl,
    running,
    stage_pids,
    stages,
    start,
)
from torch import nn

from dni_async.checkpoint import Checkpointer, save_atomic
from dni_async.config import PipelineConfig
from dni_async.data.text import TEXT_SUBSET_DIR
from dni_async.divergence import Diverged, check_finite
from dni_async.lifecycle import StageRun, validate
from dni_async.metrics import JsonLines, write_json_atomic
from dni_async.rundir import LOCK_FILE, lock_run_dir
from tasks import get_pipeline_task
from tasks.mnist import _batches

SMALL_MODEL = {"hidden_size": 64, "num_layers": 2}


def strict_loads(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity, as strict parsers do."""
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time (ns), but the lock (each run takes it)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` (root only: the test skips, saying so, elsewhere); unmounted on every exit."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (a full or read-only file system)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# ------------------------------------------------------------------ refused before any process starts


def test_a_batch_above_the_data_is_refused_naming_both() -> None:
    config = PipelineConfig(stages=2, batch_size=8192, data_dir=str(SUBSET), **SMALL_MODEL)
    with pytest.raises(ValueError, match="--batch-size 8192 is larger than the 6,000 training examples"):
        validate(get_pipeline_task(config), config)
    config = PipelineConfig(stages=2, task="lm", batch_size=100_000, data_dir=str(TEXT_SUBSET_DIR), **SMALL_MODEL)
    with pytest.raises(ValueError, match=r"--batch-size 100000 with --bptt 35 needs 3,600,000 tokens per split"):
        validate(get_pipeline_task(config), config)


def test_no_batch_iterator_spins_without_yielding() -> None:
    """A batch larger than the data is an error, not an endless loop (an alarm turns a hang into a failure)."""
    def hung(*_: Any) -> None:
        raise TimeoutError("_batches did not return within 10 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match="--batch-size 11 is larger than the 10 training examples"):
            next(_batches(torch.zeros(10, 1, 28, 28), torch.zeros(10, dtype=torch.long), 11, 5, 0))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_huge_batch_exits_2_in_seconds(tmp_path: Path) -> None:
    began = time.monotonic()
    result = subprocess.run([sys.executable, str(LAUNCH), "--stages", "2", "--steps", "5", "--batch-size", "100000",
                             *DATA, "--run-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert "--batch-size 100000 is larger than the 6,000 training examples" in result.stderr
    assert time.monotonic() - began < 30
    assert not (tmp_path / "run").exists()


def test_a_batch_above_the_subset_found_inside_the_run_exits_2_and_leaves_the_folder(tmp_path: Path) -> None:
    """No data here, no download: the loader falls back to the 6,000-image subset inside stage 0, which refuses the
    batch before it touches the run folder; the other stage, waiting for stage 0's endpoint, ends with it."""
    run = tmp_path / "run"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "DNI_ASYNC_MNIST_MIRRORS": ""}
    env.pop("DNI_ASYNC_DATA", None)
    began = time.monotonic()
    result = finish(start([sys.executable, str(LAUNCH), "--stages", "2", "--steps", "5", "--batch-size", "8000",
                           "--run-dir", str(run), *SMALL], env=env), 60)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "error: --batch-size 8000 is larger than the 6,000 training examples\n" in result.stderr
    assert time.monotonic() - began < 30, "the other stage was left waiting"
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]


def test_a_run_dir_that_is_a_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert launcher_main(["--stages", "2", *SMALL, *DATA, "--run-dir", str(path)], monkeypatch) == 2
    assert capsys.readouterr().err == f"error: --run-dir {path} is a file, not a folder\n"
    assert path.read_text() == "mine"


def test_a_read_only_run_dir_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        assert launcher_main(["--stages", "2", *SMALL, *DATA, "--run-dir", str(folder / "run")], monkeypatch) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --run-dir {folder / 'run'} cannot be written: "), err
        assert "Read-only file system" in err


def test_stale_checkpoints_refuse_a_fresh_run(tmp_path: Path) -> None:
    """Without --checkpoint-every too: export would pair the old weights with the new run's summary."""
    (tmp_path / "checkpoints" / "step-00000010").mkdir(parents=True)
    config = PipelineConfig(stages=2, run_dir=str(tmp_path), data_dir=str(SUBSET), **SMALL_MODEL)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        validate(get_pipeline_task(config), config)


def checkpoint_set(run: Path, config: PipelineConfig, step: int) -> None:
    """A complete set of ``config``'s two stages at ``step`` (made with the checkpointer, as a run makes it)."""
    store = dist.HashStore()
    meta = {"config": config.to_dict(), "blocks_per_stage": [2, 1]}
    for stage in range(2):
        Checkpointer(run, stage, 2, step, store, meta).save(step, {"block": {"0.weight": torch.zeros(1)}})


def test_a_resume_at_or_past_steps_is_refused_before_any_process_starts(tmp_path: Path) -> None:
    config = PipelineConfig(stages=2, run_dir=str(tmp_path), data_dir=str(SUBSET), **SMALL_MODEL)
    checkpoint_set(tmp_path, config, 10)
    for steps in (5, 10):
        resumed = PipelineConfig(stages=2, run_dir=str(tmp_path), data_dir=str(SUBSET), resume=str(tmp_path),
                                 steps=steps, **SMALL_MODEL)
        with pytest.raises(ValueError, match=f"at step 10: --steps must be above it, got {steps}"):
            validate(get_pipeline_task(resumed), resumed)


# ------------------------------------------------------------------ strict JSON, divergence


def test_everything_written_is_strict_json(tmp_path: Path) -> None:
    figures = {"loss": float("nan"), "sg_loss": float("inf"), "nested": [float("-inf"), 1.5], "steps": 3}
    write_json_atomic(tmp_path / "summary.json", figures)
    lines = JsonLines(tmp_path / "metrics.jsonl")
    lines.write(figures)
    lines.close()
    expected = {"loss": None, "sg_loss": None, "nested": [None, 1.5], "steps": 3}
    assert strict_loads((tmp_path / "summary.json").read_text()) == expected
    assert strict_loads((tmp_path / "metrics.jsonl").read_text()) == expected


def test_check_finite_names_the_step_stage_and_figure() -> None:
    check_finite(3, 1, {"loss": 0.5, "sg_cosine": None, "stash": 2}, nn.Linear(2, 2))
    with pytest.raises(Diverged, match=r"^diverged at step 7 \(stage 1: loss nan\)$"):
        check_finite(7, 1, {"loss": float("nan")})
    block = nn.Linear(2, 2)
    with torch.no_grad():
        block.weight[0, 0] = float("inf")
    with pytest.raises(Diverged, match=r"^diverged at step 9 \(stage 0: weight norm inf\)$"):
        check_finite(9, 0, {"sg_loss": 1.0}, block)


def test_a_diverging_run_stops_non_zero_and_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, str(LAUNCH), "--stages", "2", "--steps", "40", "--lr", "1e9",
                             "--log-every", "5", "--no-progress", *DATA, "--run-dir", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"error: run diverged: diverged at step \d+ \(stage \d: (sg_)?loss nan\)", last), last
    summary = read_json(run / "summary.json")
    assert summary["status"] == "diverged" and summary["reason"] in last
    strict_loads((run / "summary.json").read_text())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict_loads(line)
    assert {read_json(f)["status"] for f in (run / "stages").glob("stage-*.json")} == {"failed"}


# ------------------------------------------------------------------ one run per run folder


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", f"from dni_async.rundir import LOCK_FILE, lock_run_dir; "
                               f"lock_run_dir({str(tmp_path)!r}); print('locked', flush=True); input()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=f"is in use by another run \\(pid {holder.pid}\\)"):
            lock_run_dir(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    lock_run_dir(tmp_path)  # the kernel released it with the holder


def test_a_second_run_into_a_busy_run_dir_exits_2_and_the_first_keeps_its_outputs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [sys.executable, str(LAUNCH), "--stages", "2", "--steps", "60", "--slow-stage", "0:0.05", *DATA,
            "--run-dir", str(run), *SMALL]
    with running(args) as first:
        stage_pids(run, 2, first)
        second = subprocess.run([*args, "--seed", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr == (f"error: --run-dir {run} is in use by another run (pid {first.pid}): wait for it "
                                 f"to end, or choose another --run-dir\n")
        done = finish(first, 120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_json(run / "summary.json")
    assert summary["status"] == "done" and summary["config"]["seed"] == 0
    steps = [line["step"] for line in read_jsonl(run / "metrics.jsonl") if "samples_per_s" in line]
    assert sorted(steps) == sorted(list(range(4, 60, 5)) * 2), "the metrics are the first run's, all of them"


def test_a_refused_resume_leaves_the_run_dir_as_it_was(tmp_path: Path) -> None:
    """--epochs: the step count is known only inside the run, so the refusal comes from stage 0, before it clears."""
    run = tmp_path / "run"
    base = ["--stages", "2", *DATA, "--run-dir", str(run), *SMALL]
    result = stages(2, [*base, "--steps", "10", "--checkpoint-every", "10"], timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    before = snapshot(run)
    assert {"summary.json", "metrics.jsonl", "stages/stage-0.json", "events/stage-1.jsonl"} <= set(before)
    refused = stages(2, [*base, "--resume", str(run), "--epochs", "0.1"], timeout=90)
    assert refused.returncode != 0
    assert "the checkpoint to resume is at step 10: --steps must be above it, got 4" in refused.stderr
    assert snapshot(run) == before


# ------------------------------------------------------------------ endings


def test_a_stage_file_ends_failed_on_a_full_disk_and_no_tmp_file_is_left(tmp_path: Path) -> None:
    config = PipelineConfig(stages=2, data_dir=str(SUBSET), **SMALL_MODEL)
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        env = SimpleNamespace(rank=1, host="here", device=torch.device("cpu"), is_main=False)
        run = StageRun(task=None, config=PipelineConfig(**{**config.to_dict(), "run_dir": str(disk)}),  # type: ignore[arg-type]
                       env=env, stages=[], shapes=[], watchdog=None)  # type: ignore[arg-type]
        run.begun = True
        run.write_stage_file("running")
        filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError) as full:
            while True:
                os.write(filler, b"\0" * 4096)
        os.close(filler)
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            write_json_atomic(disk / "summary.json", {"status": "failed"})
        with pytest.raises(OSError):
            save_atomic({"block": torch.zeros(100_000)}, disk / "checkpoints" / "step-00000010" / "stage-1.pt")
        assert not [p for p in disk.rglob("*.tmp")], "a failed write left its temporary file"
        run.end("stage 0: RuntimeError: boom")
        stage_file = read_json(disk / "stages" / "stage-1.json")
        assert (stage_file["status"], stage_file["reason"]) == ("failed", "stage 0: RuntimeError: boom")


def launcher_run(run: Path) -> list[str]:
    return [sys.executable, str(LAUNCH), "--stages", "2", "--steps", "100000", "--slow-stage", "0:0.02", *DATA,
            "--run-dir", str(run), *SMALL]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_the_launcher_ends_every_stage_file_stopped(tmp_path: Path, sig: signal.Signals) -> None:
    run = tmp_path / "run"
    with running(launcher_run(run)) as proc:
        stage_pids(run, 2, proc)
        proc.send_signal(sig)
        result = finish(proc, 60)
    assert result.returncode == 128 + sig, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: run stopped: stage ")
    for stage in range(2):
        stage_file = read_json(run / "stages" / f"stage-{stage}.json")
        assert stage_file["status"] == "stopped" and f"stopped by {sig.name}" in stage_file["reason"]
    assert read_json(run / "summary.json")["status"] == "stopped"


GONE = re.compile(r"torchrun (store|agent \(pid \d+\)) is gone")
"""What a stage says when the launcher is killed: whichever it notices first, its agent (its parent) or the store
in it."""


def test_a_killed_launcher_ends_every_stage_file_failed(tmp_path: Path) -> None:
    """kill -9 of the launcher: its store goes with it, and the stages' watchdogs end them, saying so."""
    run = tmp_path / "run"
    with running(launcher_run(run)) as proc:
        pids = stage_pids(run, 2, proc)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while [pid for pid in pids if alive(pid)]:
            assert time.monotonic() < deadline, "the stages still run 30 s after the launcher died"
            time.sleep(0.1)
    for stage in range(2):
        stage_file = read_json(run / "stages" / f"stage-{stage}.json")
        assert stage_file["status"] == "failed" and GONE.search(stage_file["reason"]), stage_file
    summary = read_json(run / "summary.json")
    assert summary["status"] == "failed" and GONE.search(summary["reason"]), summary
