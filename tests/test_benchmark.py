"""The benchmark: its pieces without processes, and one --quick run of every mode (files and fields, not speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, SUBSET, finish, start
from torch import nn

from dni_async.benchmark import BenchmarkSpec, _median_or_none, _micro_args, job_config, parse_label, time_to_target
from dni_async.config import PipelineConfig, config_from_args
from dni_async.plots import stage_intervals
from dni_async.snapshots import Snapshots, accuracy_curve

MODES = ["cdni:linear", "delayed", "backprop", "gpipe", "1f1b", "single"]
"""Every kind of entry: a mode with an SG kind, a mode whose curve ends before its final evaluation, the locked
baseline, both pipelining schedules, the single process (every mode's stage loop runs in test_pipeline.py)."""


def test_time_to_target_is_the_first_point_at_or_above_it() -> None:
    curve = [{"ready_s": 1.0, "accuracy": 0.5}, {"ready_s": 2.5, "accuracy": 0.97},
             {"ready_s": 3.0, "accuracy": 0.99}]
    assert time_to_target(curve, 0.97) == 2.5
    assert time_to_target(curve, 0.995) is None


def test_median_counts_never_as_slowest() -> None:
    assert _median_or_none([3.0, None, 1.0]) == 3.0
    assert _median_or_none([None, None, 1.0]) is None
    assert _median_or_none([4.0, 2.0]) == 3.0
    assert _median_or_none([]) is None


def test_snapshots_load_and_restore_the_weights() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    snaps = Snapshots(model, every=2)
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.add_(1.0)
        snaps.maybe_take(step)
    assert snaps.steps() == [2, 4] and list(snaps.times()) == ["2", "4"]
    live = model[0].weight.detach().clone()
    snaps.select(2)
    torch.testing.assert_close(model[0].weight.detach(), live - 2.0)
    assert torch.equal(model[1].running_mean, torch.full((3,), 2.0))
    snaps.select(4)
    assert torch.equal(model[0].weight, live)
    snaps.select(None)
    assert torch.equal(model[0].weight, live) and torch.equal(model[1].running_mean, torch.full((3,), 4.0))
    with pytest.raises(KeyError, match="no snapshot was taken at step 3"):
        snaps.select(3)


def test_accuracy_curve_waits_for_the_slowest_stage() -> None:
    reports = [{"snapshot_times": {"10": 101.0, "20": 102.0}},
               {"snapshot_times": {"10": 101.5, "20": 101.9},
                "curve_evals": {"20": {"accuracy": 0.9, "snapshot": 20}, "10": {"accuracy": 0.8, "snapshot": 10}}}]
    assert accuracy_curve(reports, 100.0) == [{"step": 10, "ready_s": 1.5, "accuracy": 0.8},
                                              {"step": 20, "ready_s": 2.0, "accuracy": 0.9}]


def test_stage_intervals_from_event_logs(tmp_path: Path) -> None:
    """Each event spans from the stage's previous event; waits are gradient arrivals and sends."""
    events = tmp_path / "events"
    events.mkdir()
    backprop = [("input", 0, 0.0), ("forward", 0, 1.0), ("act_sent", 0, 1.5), ("grad_arrived", 0, 4.0),
                ("update", 0, 5.0)]
    dni = [("input", 1, 0.0), ("grad_arrived", 0, 2.0), ("sg_update", 0, 2.5), ("forward", 1, 3.0),
           ("act_sent", 1, 3.5), ("sg_predicted", 1, 3.7), ("update", 1, 4.0)]
    for stage, log in enumerate([backprop, dni]):
        lines = [json.dumps({"t": t, "stage": stage, "event": e, "step": s}) for e, s, t in log]
        (events / f"stage-{stage}.jsonl").write_text("\n".join(lines) + "\n")
    spans = stage_intervals(tmp_path)
    assert spans[0] == {"forward": [(0.0, 1.0)], "backward": [(4.0, 5.0)], "sg": [], "wait": [(1.0, 1.5), (1.5, 4.0)]}
    assert spans[1] == {"forward": [(2.5, 3.0)], "backward": [(3.7, 4.0)], "sg": [(2.0, 2.5), (3.5, 3.7)],
                        "wait": [(0.0, 2.0), (3.0, 3.5)]}


def test_pipelining_modes_check_their_input() -> None:
    with pytest.raises(ValueError, match="runs the tasks"):
        PipelineConfig(mode="gpipe", task="copy")
    with pytest.raises(ValueError, match="divide --batch-size 128"):
        PipelineConfig(mode="1f1b", microbatches=3)
    with pytest.raises(ValueError, match="1f1b needs --microbatches >= --stages"):
        PipelineConfig(mode="1f1b", stages=4, microbatches=2)
    with pytest.raises(ValueError, match="--time-budget"):
        PipelineConfig(time_budget=0)


def test_benchmark_entries_name_a_mode_and_optionally_an_sg() -> None:
    assert parse_label("delayed") == ("delayed", [])
    assert parse_label("cdni:softmax") == ("cdni", ["--sg", "softmax"])
    with pytest.raises(ValueError, match="unknown SG kind 'huge'"):
        parse_label("cdni:huge")
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        parse_label("fast")


def test_the_model_costs_pipelining_as_backprop_on_one_microbatch() -> None:
    spec = BenchmarkSpec(modes=["gpipe", "dni"], stages=2, out=Path("."), entry=Path("."),
                         flags=["--batch-size", "64", "--microbatches", "4"])
    micro = _micro_args(spec, "gpipe")
    assert micro is not None and job_config(spec, "gpipe").mode == "gpipe"
    config = config_from_args(micro)
    assert (config.mode, config.batch_size, config.stages) == ("backprop", 16, 2)
    assert _micro_args(spec, "dni") is None and _micro_args(spec, "single") is None


@pytest.mark.process
def test_quick_benchmark_writes_results_and_plots(tmp_path: Path) -> None:
    """Each kind of entry once. GPipe and 1F1B compute the same thing in another order, and so do locked backprop
    and the single process: their accuracies agree."""
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "launch" / "benchmark.py"), "--quick", "--stages", "2", "--modes",
           ",".join(MODES), "--out", str(out), "--microbatches", "2", "--batch-size", "64",
           "--data-dir", str(SUBSET), "--hidden-size", "64", "--num-layers", "2"]
    result = finish(start(cmd), 420)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    results = json.loads((out / "results.json").read_text())
    assert {"torch", "cpu_model", "cpu_count", "threads_per_stage"} <= set(results["env"])
    runs = {r["mode"]: r for r in results["runs"]}
    assert list(runs) == MODES
    for mode, r in runs.items():
        assert r["samples_per_s"] > 0 and len(r["samples_per_s_all"]) == 1
        assert 0.1 < r["final_accuracy"] <= 1
        assert len(r["per_stage_busy_fraction"]) == (1 if mode == "single" else 2)
        assert all(0 < b <= 1.5 for b in r["per_stage_busy_fraction"])
        assert r["time_to_target_s"] is None or r["time_to_target_s"] > 0
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert [p["step"] for p in summary["curve"]] == [10, 20, 30, 40]
        if mode != "delayed":  # delayed evaluates after applying the gradients still in flight at the last snapshot
            assert summary["curve"][-1]["accuracy"] == pytest.approx(summary["final_eval"]["accuracy"])
        if mode == "single":
            assert r["ideal_samples_per_s"] is None and r["efficiency"] is None
            assert r["predicted_samples_per_s"] is None
        else:
            assert r["predicted_samples_per_s"] > 0
            assert r["ideal_samples_per_s"] > 0 and r["efficiency"] == pytest.approx(
                r["samples_per_s"] / r["ideal_samples_per_s"], rel=1e-2)
            assert len(r["stage_step_s"]) == 2
    assert runs["gpipe"]["final_accuracy"] == runs["1f1b"]["final_accuracy"]
    assert abs(runs["single"]["final_accuracy"] - runs["backprop"]["final_accuracy"]) <= 0.002
    assert results["ratios"]["samples_per_s"]["backprop"] == 1.0
    assert set(results["ratios"]["time_to_target_s"]) == set(MODES)
    for name in ("throughput.png", "accuracy_vs_time.png", "timeline.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
