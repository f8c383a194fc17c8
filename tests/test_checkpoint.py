"""Checkpoints: atomic sets and their manifest, weights-only loading, resume (bitwise in backprop), export."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from helpers import ROOT, SMALL, SUBSET, ok, read_jsonl, running, stage_pids, stages, torchrun_cmd
from inprocess import Scripted, batches, worker
from test_stage import SHAPES3, three_blocks

from dni_async import checkpoint
from dni_async.__main__ import main
from dni_async.checkpoint import Checkpointer, check_compatible, export_model, load_stage, newest_complete
from dni_async.config import PipelineConfig
from dni_async.lifecycle import validate
from tasks import get_pipeline_task
from tasks.mnist import evaluate, fcn_blocks, load_splits

META = {"config": {"task": "t", "stages": 2}, "blocks_per_stage": [1, 1]}


def write_set(run_dir: Path, step: int, stages: tuple[int, ...], store: Any) -> None:
    for stage in stages:
        Checkpointer(run_dir, stage, 2, 1, store, META).save(step, {"block": {"0.w": torch.full((3,), float(step))}})


def test_a_set_is_complete_only_when_every_stage_has_written(tmp_path: Path) -> None:
    store = dist.HashStore()
    write_set(tmp_path, 2, (0,), store)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint set"):
        newest_complete(tmp_path)
    write_set(tmp_path, 2, (1,), store)
    set_dir, manifest = newest_complete(tmp_path)
    assert manifest["step"] == 2 and [f["stage"] for f in manifest["files"]] == [0, 1]
    assert load_stage(set_dir, 1)["block"]["0.w"].tolist() == [2.0] * 3
    write_set(tmp_path, 4, (0,), store)  # stage 1 "dies" before its file of step 4
    assert newest_complete(tmp_path)[1]["step"] == 2


def test_a_file_damaged_after_the_manifest_makes_the_set_incomplete(tmp_path: Path) -> None:
    store = dist.HashStore()
    write_set(tmp_path, 2, (0, 1), store)
    write_set(tmp_path, 4, (0, 1), store)
    path = tmp_path / "checkpoints" / "step-00000004" / "stage-1.pt"
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert newest_complete(tmp_path)[1]["step"] == 2


def set_dir_of(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def edit_manifest(set_dir: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    """Replace the set's manifest by ``change(manifest)`` (a string is written as it is, anything else as JSON)."""
    path = set_dir / "manifest.json"
    new = change(json.loads(path.read_text()))
    path.write_text(new if isinstance(new, str) else json.dumps(new))


def replace_file(set_dir: Path, stage: int, state: Any) -> None:
    """Write ``state`` as the set's stage file and fix its size and SHA-256 in the manifest (a hostile edit)."""
    size, digest = checkpoint.save_atomic(state, set_dir / f"stage-{stage}.pt")

    def fix(manifest: dict[str, Any]) -> dict[str, Any]:
        manifest["files"][stage].update(bytes=size, sha256=digest)
        return manifest

    edit_manifest(set_dir, fix)


def flip_last_bit(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped


def stage_file(set_dir: Path, stage: int, **changes: Any) -> dict[str, Any]:
    """The stage's file as loaded, with ``changes`` (a value of None removes the key)."""
    state = {**torch.load(set_dir / f"stage-{stage}.pt", weights_only=True), **changes}
    return {k: v for k, v in state.items() if v is not None}


DAMAGE: dict[str, tuple[Callable[[Path, Path], Any], str]] = {
    # the cases: (damage the newer set given (newer, older), the reason the warning gives)
    "a file of another step": (lambda new, old: replace_file(new, 1, stage_file(old, 1)),
                               r"stage-1\.pt holds \{'format': 2, 'step': 2, 'stage': 1\}, expected .*'step': 4"),
    "wrong blocks_per_stage": (lambda new, old: edit_manifest(new, lambda m: {**m, "blocks_per_stage": [2, 1]}),
                               r"stage-0\.pt holds 1 blocks, the manifest says 2"),
    "fewer files than stages": (lambda new, old: edit_manifest(new, lambda m: {**m, "files": m["files"][:1]}),
                                r"manifest lists 1 files and 2 blocks_per_stage for 2 stages"),
    "a failed checksum": (lambda new, old: flip_last_bit(new / "stage-1.pt"),
                          r"stage-1\.pt does not match the manifest's SHA-256"),
    # further inconsistencies and malformed manifests
    "a step that is not the folder's": (lambda new, old: edit_manifest(new, lambda m: {**m, "step": 6}),
                                        r"manifest step 6 is not the step of its folder step-00000004"),
    "files swapped": (lambda new, old: edit_manifest(new, lambda m: {**m, "files": m["files"][::-1]}),
                      r"manifest files\[0\] is not an entry of stage-0\.pt"),
    "files not a list": (lambda new, old: edit_manifest(new, lambda m: {**m, "files": "stage-0.pt"}),
                         r"manifest lists 'stage-0\.pt' files"),
    "an entry without its hash": (lambda new, old: edit_manifest(new, lambda m: {**m, "files": [
                                      m["files"][0], {k: v for k, v in m["files"][1].items() if k != "sha256"}]}),
                                  r"manifest files\[1\] is not an entry of stage-1\.pt"),
    "no config": (lambda new, old: edit_manifest(new, lambda m: {k: v for k, v in m.items() if k != "config"}),
                  r"manifest has no config with an integer stages"),
    "no blocks_per_stage": (lambda new, old: edit_manifest(new, lambda m: {**m, "blocks_per_stage": None}),
                            r"manifest blocks_per_stage None is not a list of positive integers"),
    "a manifest that is a list": (lambda new, old: edit_manifest(new, lambda m: [m]),
                                  r"manifest is not a JSON object"),
    "a manifest that is not JSON": (lambda new, old: edit_manifest(new, lambda m: "{"), r"Expecting"),
    "a legacy file keyed past its blocks": (
        lambda new, old: replace_file(new, 0, stage_file(new, 0, blocks=None, block={"1.w": torch.zeros(3)})),
        r"stage-0\.pt block key '1\.w' is not one of its 1 blocks"),
    "a file that is not weights only": (lambda new, old: replace_file(new, 0, stage_file(new, 0, path=Path("/etc"))),
                                        r"UnpicklingError: Weights only load failed"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_inconsistent_newer_set_is_skipped_with_its_reason(tmp_path: Path, caplog: Any, damage: str) -> None:
    """Export and resume (both through newest_complete) fall back to the older set and the warning says why."""
    store = dist.HashStore()
    write_set(tmp_path, 2, (0, 1), store)
    write_set(tmp_path, 4, (0, 1), store)
    older, newer = set_dir_of(tmp_path, 2), set_dir_of(tmp_path, 4)
    change, reason = DAMAGE[damage]
    change(newer, older)
    caplog.set_level(logging.WARNING, logger="dni_async")
    assert newest_complete(tmp_path) == (older, json.loads((older / "manifest.json").read_text()))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"skipping checkpoint set {newer}: "), warnings
    assert re.search(reason, warnings[0]), warnings[0]
    assert export_model(tmp_path, tmp_path / "model.pt") == (2, 2)
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    assert {k: v.tolist() for k, v in exported.items()} == {"0.w": [2.0] * 3, "1.w": [2.0] * 3}


def test_the_quick_check_checks_the_manifest_too(tmp_path: Path) -> None:
    store = dist.HashStore()
    write_set(tmp_path, 2, (0, 1), store)
    write_set(tmp_path, 4, (0, 1), store)
    edit_manifest(set_dir_of(tmp_path, 4), lambda m: {**m, "files": m["files"][:1]})
    assert newest_complete(tmp_path, hashes=False)[1]["step"] == 2


def test_a_legacy_format_2_set_without_block_counts_still_exports(tmp_path: Path) -> None:
    """Files written before ``blocks`` was recorded are checked by their block keys alone."""
    write_set(tmp_path, 2, (0, 1), dist.HashStore())
    set_dir = set_dir_of(tmp_path, 2)
    for stage in (0, 1):
        replace_file(set_dir, stage, stage_file(set_dir, stage, blocks=None))
    assert "blocks" not in load_stage(set_dir, 0)
    assert export_model(tmp_path, tmp_path / "model.pt") == (2, 2)


def test_load_stage_refuses_a_file_of_another_step_or_block_count(tmp_path: Path) -> None:
    store = dist.HashStore()
    write_set(tmp_path, 2, (0, 1), store)
    write_set(tmp_path, 4, (0, 1), store)
    newer = set_dir_of(tmp_path, 4)
    assert load_stage(newer, 1, blocks=1)["blocks"] == 1
    with pytest.raises(ValueError, match="holds 1 blocks, the manifest says 2"):
        load_stage(newer, 1, blocks=2)
    (newer / "stage-1.pt").write_bytes((set_dir_of(tmp_path, 2) / "stage-1.pt").read_bytes())
    with pytest.raises(ValueError, match=r"not stage 1's checkpoint of format 2: holds .*'step': 2"):
        load_stage(newer, 1)


def test_export_cli_says_in_one_line_when_no_set_is_complete(tmp_path: Path, capsys: Any) -> None:
    write_set(tmp_path, 2, (0, 1), dist.HashStore())
    edit_manifest(set_dir_of(tmp_path, 2), lambda m: {**m, "files": m["files"][:1]})
    assert main(["export", str(tmp_path), str(tmp_path / "model.pt")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: no complete checkpoint set in {tmp_path / 'checkpoints'} (looked at 1)\n"
    assert not (tmp_path / "model.pt").exists()


def test_a_crash_during_a_write_leaves_no_file_and_no_manifest(tmp_path: Path, monkeypatch: Any) -> None:
    store = dist.HashStore()
    write_set(tmp_path, 2, (0, 1), store)

    def dying_save(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise SystemExit("killed while writing")

    write_set(tmp_path, 4, (0,), store)
    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(SystemExit):
        write_set(tmp_path, 4, (1,), store)
    set_dir = tmp_path / "checkpoints" / "step-00000004"
    assert not (set_dir / "stage-1.pt").exists() and not (set_dir / "manifest.json").exists()
    assert newest_complete(tmp_path)[1]["step"] == 2


def test_only_the_newest_complete_sets_are_kept(tmp_path: Path) -> None:
    store = dist.HashStore()
    for step in (1, 2, 3, 4, 5):
        write_set(tmp_path, step, (0, 1), store)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000003", "step-00000004", "step-00000005"]


def test_loading_is_weights_only(tmp_path: Path) -> None:
    set_dir = tmp_path / "set"
    set_dir.mkdir()
    torch.save({"format": 1, "stage": 0, "payload": Path("/etc")}, set_dir / "stage-0.pt")  # a pickled object
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_stage(set_dir, 0)


def test_resume_refuses_another_model() -> None:
    manifest = {"config": {**PipelineConfig(stages=2).to_dict()}}
    check_compatible(manifest, PipelineConfig(stages=2, lr=0.5, steps=9).to_dict())  # training flags may change
    expected = r"--mode 'dni' \(checkpoint\) vs 'backprop'; --hidden-size 256 \(checkpoint\) vs 64"
    with pytest.raises(ValueError, match=expected):
        check_compatible(manifest, PipelineConfig(stages=2, hidden_size=64, mode="backprop").to_dict())


def test_validate_guards_checkpoint_folders(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = PipelineConfig(stages=2, resume=str(run), run_dir=str(run))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint set"):
        validate(get_pipeline_task(config), config)
    write_set(run, 2, (0,), dist.HashStore())
    config = PipelineConfig(stages=2, checkpoint_every=5, run_dir=str(run))
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run"):
        validate(get_pipeline_task(config), config)
    with pytest.raises(ValueError, match="not the --mode gpipe baseline"):
        PipelineConfig(stages=2, mode="gpipe", checkpoint_every=5)


def test_worker_state_round_trip_continues_identically(tmp_path: Path) -> None:
    """Block, SG and both optimizers restored (weights_only) give the next update bit for bit."""
    def first(path: Path) -> Any:
        return worker(path, 0, 3, three_blocks(), Scripted(0, 3, delay=0), SHAPES3)  # nothing in flight

    a = first(tmp_path / "a")
    for t, (x, y) in enumerate(batches(3)):
        a.train_step(t, x, y, {})
    path = tmp_path / "state.pt"
    torch.save({**a.checkpoint_state(), "step": 3}, path)
    b = first(tmp_path / "b")
    b.restore(torch.load(path, weights_only=True))
    assert b.start_step == 3 and b.stats.steps == 3
    (x, y), = batches(1, seed=1)
    a.train_step(3, x, y, {})
    b.train_step(3, x, y, {})
    for p, q in zip([*a.io.block.parameters(), *a.source.sg.parameters()],
                    [*b.io.block.parameters(), *b.source.sg.parameters()]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_resumed_first_stage_continues_the_data_position(tmp_path: Path) -> None:
    transport = Scripted(0, 3)
    w = worker(tmp_path, 0, 3, three_blocks(), transport, SHAPES3)
    w.restore({**w.checkpoint_state(), "step": 5, "data_position": 5})
    items = [(torch.full((5, 4), float(i)), torch.zeros(5, dtype=torch.long)) for i in range(8)]
    with torch.no_grad():
        expected = w.io.block(items[5][0])  # step 5 reads item 5 (before any update)
    w.run_first(iter(items), 8, [], None)
    acts = [m for m in transport.sent if m.kind == "act"]
    assert [m.step for m in acts] == [5, 6, 7]
    torch.testing.assert_close(acts[0].tensors[0], expected)
    assert w.stats.steps == 8
    with pytest.raises(ValueError, match="--steps must be above it"):
        w.run_first(iter(items), 5, [], None)


def run_args(run: Path, *extra: str) -> list[str]:
    return ["--stages", "2", "--steps", "30", "--checkpoint-every", "15", "--data-dir", str(SUBSET),
            "--run-dir", str(run), *SMALL, *extra]


@pytest.mark.process
def test_backprop_resume_is_bitwise_the_uninterrupted_run(tmp_path: Path) -> None:
    """N steps, a crash, a resume to 2N: the same parameters as 2N steps straight through; export matches both."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    ok(stages(2, run_args(straight, "--mode", "backprop"), 120))
    crashed = stages(2, run_args(broken, "--mode", "backprop", "--fail-stage", "1:17"), 120)
    assert crashed.returncode != 0 and "injected failure at step 17" in crashed.stderr
    assert newest_complete(broken)[1]["step"] == 15
    ok(stages(2, run_args(broken, "--mode", "backprop", "--resume", str(broken)), 120))
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["resumed_from"] == {"run_dir": str(broken), "step": 15} and summary["steps"] == 30
    for stage in (0, 1):
        a = load_stage(newest_complete(straight)[0], stage)
        b = load_stage(newest_complete(broken)[0], stage)
        assert a["step"] == b["step"] == 30
        torch.testing.assert_close(a["block"], b["block"], rtol=0, atol=0)
        torch.testing.assert_close(a["opt"]["state"], b["opt"]["state"], rtol=0, atol=0)

    out = tmp_path / "model.pt"
    cli = subprocess.run([sys.executable, "-m", "dni_async", "export", str(broken), str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "at step 30" in cli.stdout
    model = torch.nn.Sequential(*fcn_blocks(64, 2))
    model.load_state_dict(torch.load(out, weights_only=True))
    _, (x_test, y_test), _ = load_splits(str(SUBSET))
    assert evaluate(model, x_test, y_test) == summary["final_eval"]["accuracy"]
    # torch alone (dni_async unimportable) loads it into a plain model of the same layout
    plain = (
        "import sys, torch\nfrom torch import nn\nsys.modules['dni_async'] = None\n"
        "state = torch.load(sys.argv[1], weights_only=True)\n"
        "def block(i, o, flat=False): return nn.Sequential(*([nn.Flatten()] if flat else []), nn.Linear(i, o), "
        "nn.BatchNorm1d(o), nn.ReLU())\n"
        "model = nn.Sequential(block(784, 64, True), block(64, 64), nn.Linear(64, 10))\n"
        "model.load_state_dict(state)\nprint(len(state))\n")
    loaded = subprocess.run([sys.executable, "-c", plain, str(out)], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0 and loaded.stdout.strip() == str(len(model.state_dict())), loaded.stderr


@pytest.mark.process
@pytest.mark.parametrize("task,steps", [("copy", 60), ("lm", 20)])
def test_recurrent_backprop_resume_is_bitwise(tmp_path: Path, task: str, steps: int) -> None:
    """The LSTM state carried across the crash (and copy's data position and curriculum) is restored exactly."""
    half = steps // 2
    args = ["--stages", "2", "--task", task, "--mode", "backprop", "--steps", str(steps), "--checkpoint-every",
            str(half), "--hidden-size", "32", "--bptt", "10", "--no-progress", "--log-every", "5"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    ok(stages(2, [*args, "--run-dir", str(straight)], 180))
    crashed = stages(2, [*args, "--run-dir", str(broken), "--fail-stage", f"1:{half + 3}"], 180)
    assert crashed.returncode != 0
    ok(stages(2, [*args, "--run-dir", str(broken), "--resume", str(broken)], 180))
    for stage in (0, 1):
        a = load_stage(newest_complete(straight)[0], stage)
        b = load_stage(newest_complete(broken)[0], stage)
        assert a["step"] == b["step"] == steps
        torch.testing.assert_close(a["block"], b["block"], rtol=0, atol=0)
        torch.testing.assert_close(a["recurrent"], b["recurrent"], rtol=0, atol=0)
        assert a["recurrent"] and all(v["state"] is not None for v in a["recurrent"].values())
        torch.testing.assert_close(a["data"], b["data"], rtol=0, atol=0)
    summaries = [json.loads((run / "summary.json").read_text()) for run in (straight, broken)]
    assert summaries[0]["final_eval"] == summaries[1]["final_eval"]


@pytest.mark.process
@pytest.mark.parametrize("mode", ["dni", "delayed"])  # local's resume: tests/test_gradient_sources.py
def test_resume_continues_steps_and_metrics(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "run"
    crashed = stages(2, run_args(run, "--mode", mode, "--fail-stage", "1:20"), 120)
    assert crashed.returncode != 0
    set_dir, manifest = newest_complete(run)
    assert manifest["step"] == 15
    # stage 0's source: the SG or the local head with its Adam; delayed keeps nothing (in flight: applied first)
    assert set(load_stage(set_dir, 0)["source"]) == (set() if mode == "delayed" else {"module", "opt"})
    ok(stages(2, run_args(run, "--mode", mode, "--resume", str(run)), 120))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"]["step"] == 15 and summary["steps"] == 30
    assert [s["steps"] for s in summary["per_stage"]] == [30, 30]
    assert [s["checkpoints_saved"] for s in summary["per_stage"]] == [1, 1]  # step 30 only: 15 was there
    lines = read_jsonl(run / "metrics.jsonl")
    steps = [line["step"] for line in lines if line["stage"] == 0 and "samples_per_s" in line]
    assert steps[:2] == [4, 9] and steps[-1] == 29 and 14 in steps  # the first run's lines are kept
    assert newest_complete(run)[1]["step"] == 30


@pytest.mark.process
def test_kill_9_while_checkpointing_every_step_leaves_only_complete_manifests(tmp_path: Path) -> None:
    """A set is written every step; kill -9 lands at a random point of some write: no set that has a manifest is
    incomplete, and the newest complete set loads on every stage."""
    run = tmp_path / "run"
    cmd = torchrun_cmd(2, [*run_args(run, "--checkpoint-every", "1"), "--steps", "100000"])  # the later flags win
    with running(cmd, stdout=subprocess.DEVNULL) as proc:
        pid = stage_pids(run, 2, proc)[1]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list((run / "checkpoints").glob("step-*"))) < 2:
            time.sleep(0.1)
        time.sleep(random.uniform(0.5, 1.5))
        os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode != 0
    sets = sorted((run / "checkpoints").glob("step-*"))
    with_manifest = [d for d in sets if (d / "manifest.json").exists()]
    assert with_manifest
    for set_dir in with_manifest:
        checkpoint._verify(set_dir)  # raises, saying why, if the set is not complete
    set_dir, manifest = newest_complete(run)
    assert [load_stage(set_dir, s)["step"] for s in (0, 1)] == [manifest["step"]] * 2
