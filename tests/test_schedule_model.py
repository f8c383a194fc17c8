"""The schedule model (dni_async.schedule_model): closed forms it must reproduce, the blocking rules, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dni_async import schedule_model
from dni_async.__main__ import main
from dni_async.config import PipelineConfig
from dni_async.core_probe import measure_sharing
from dni_async.link_probe import Link
from dni_async.schedule_model import StageCost, predict, simulate
from dni_async.schedule_report import bubble_check, validate_results, what_if

FREE = Link(0.0, math.inf)
"""A link that costs nothing."""
F, B = 0.010, 0.020
EQUAL = StageCost(forward_s=F, backward_s=B, act_bytes=1000, grad_bytes=1000)


def equal(n: int) -> list[StageCost]:
    return [EQUAL] * n


@pytest.mark.parametrize("mode", ["dni", "cdni", "delayed", "local", "backprop", "gpipe", "1f1b"])
def test_one_stage_runs_at_its_compute_time(mode: str) -> None:
    got = simulate(mode, [StageCost(forward_s=F, backward_s=B, input_s=0.005)], batch_size=100, link=FREE,
                   max_in_flight=1)
    assert got.samples_per_s == pytest.approx(100 / (F + B + 0.005))
    assert got.busy == [pytest.approx(1.0)] and got.bubble == pytest.approx(0.0, abs=1e-9)


def test_two_stage_backprop_is_all_the_work_and_both_messages_in_turn() -> None:
    link = Link(latency_s=0.001, bandwidth_bps=1e6)  # 1000 bytes: 1 ms on the wire
    costs = [StageCost(forward_s=0.004, backward_s=0.006, act_bytes=1000),
             StageCost(forward_s=0.003, backward_s=0.009, grad_bytes=1000)]
    got = simulate("backprop", costs, batch_size=64, link=link)
    step = 0.004 + 0.006 + 0.003 + 0.009 + 2 * (0.001 + 0.001)
    assert got.samples_per_s == pytest.approx(64 / step)
    assert got.busy == [pytest.approx(0.010 / step), pytest.approx(0.012 / step)]


def test_latency_adds_two_trips_per_locked_step_and_nothing_to_unbounded_dni() -> None:
    slow = Link(latency_s=0.005, bandwidth_bps=math.inf)
    locked = [simulate("backprop", equal(3), batch_size=1, link=link).step_s for link in (FREE, slow)]
    assert locked[1] - locked[0] == pytest.approx(2 * 2 * 0.005)
    dni = [simulate("dni", equal(3), batch_size=1, link=link).step_s for link in (FREE, slow)]
    assert dni[1] == pytest.approx(dni[0]) == pytest.approx(F + B)


def test_dni_at_equal_costs_runs_at_the_slowest_stage() -> None:
    costs = [EQUAL, StageCost(forward_s=F, backward_s=2 * B, sg_predict_s=0.001, sg_update_s=0.002), EQUAL]
    got = simulate("dni", costs, batch_size=10, link=Link(1e-4, 1e9), max_in_flight=2)
    assert got.samples_per_s == pytest.approx(10 / (F + 2 * B + 0.003), rel=1e-6)
    assert got.busy[1] == pytest.approx(1.0) and got.busy[0] < 1.0


def test_the_window_bounds_dni_by_the_round_trip() -> None:
    """With a slow link, a stage may run only --max-in-flight steps ahead of its gradients: max_in_flight=1 waits
    a whole round trip every step (towards locked backprop), a larger window hides it, 0 is no bound."""
    link = Link(latency_s=0.05, bandwidth_bps=math.inf)
    step = {w: simulate("dni", equal(2), batch_size=1, link=link, max_in_flight=w).step_s for w in (1, 2, 8, 0)}
    assert step[1] > step[2] > step[8] == pytest.approx(step[0]) == pytest.approx(F + B)
    locked = simulate("backprop", equal(2), batch_size=1, link=link).step_s
    assert step[1] == pytest.approx(locked - B)  # only stage 0's own backward overlaps the round trip


def test_delayed_with_a_window_of_one_is_locked_backprop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same schedule; but for the middle stage, which waits for act(t + 1) while grad(t) is owed to it and so
    takes grad(t) at its next poll tick: at most POLL_S later a step, and exactly as fast without the poll."""
    link = Link(latency_s=0.002, bandwidth_bps=1e8)
    backprop = simulate("backprop", equal(3), batch_size=1, link=link)
    delayed = simulate("delayed", equal(3), batch_size=1, link=link, max_in_flight=1)
    assert backprop.step_s < delayed.step_s <= backprop.step_s + schedule_model.POLL_S + 1e-9
    monkeypatch.setattr(schedule_model, "POLL_S", 0.0)
    delayed = simulate("delayed", equal(3), batch_size=1, link=link, max_in_flight=1)
    assert delayed.samples_per_s == pytest.approx(backprop.samples_per_s)
    with pytest.raises(ValueError, match="needs max_in_flight >= 1"):
        simulate("delayed", equal(3), batch_size=1, link=link, max_in_flight=0)


def test_stages_share_the_cores() -> None:
    """4 equal stages that never wait: on 2 cores half the throughput of 4; on 1 core a quarter."""
    rates = {c: simulate("local", equal(4), batch_size=1, link=FREE, cores=c).samples_per_s for c in (4, 2, 1)}
    assert rates[2] == pytest.approx(rates[4] / 2, rel=0.02)
    assert rates[1] == pytest.approx(rates[4] / 4, rel=0.02)
    locked = {c: simulate("backprop", equal(4), batch_size=1, link=FREE, cores=c).samples_per_s for c in (4, 1)}
    assert locked[1] == pytest.approx(locked[4])  # one stage computes at a time: nothing to share


def test_sharing_costs_only_where_the_cores_are_oversubscribed() -> None:
    """A sharing cost of 1.25 makes 4 stages on 2 cores 1.25 times slower, each still charged half a core, and
    backprop too (one stage computes at a time, on a core the others used); on 4 cores it changes nothing."""
    def run(mode: str, cores: int, cost: float):
        return simulate(mode, equal(4), batch_size=1, link=FREE, cores=cores, sharing_cost=cost)

    shared, free = run("local", 2, 1.25), run("local", 2, 1.0)
    assert shared.samples_per_s == pytest.approx(free.samples_per_s / 1.25, rel=0.02)
    assert shared.busy == pytest.approx([0.5] * 4, abs=0.02) and free.busy == pytest.approx([0.5] * 4, abs=0.02)
    assert run("local", 4, 1.25).samples_per_s == pytest.approx(run("local", 4, 1.0).samples_per_s)
    assert run("backprop", 2, 1.25).samples_per_s == pytest.approx(run("backprop", 2, 1.0).samples_per_s / 1.25)
    assert run("backprop", 4, 1.25).samples_per_s == pytest.approx(run("backprop", 4, 1.0).samples_per_s)
    with pytest.raises(ValueError, match="sharing_cost"):
        simulate("local", equal(2), batch_size=1, link=FREE, sharing_cost=0.0)


def test_a_full_queue_holds_the_sender_back() -> None:
    """local sends nothing back: stage 0 runs ahead of a slow stage 1 until its queue is full, then at its pace."""
    costs = [EQUAL, StageCost(forward_s=F, backward_s=3 * B)]
    got = simulate("local", costs, batch_size=1, link=FREE, queue_size=2)
    assert got.step_s == pytest.approx(F + 3 * B)
    assert got.busy[0] == pytest.approx((F + B) / (F + 3 * B))


@pytest.mark.parametrize("stages,microbatches", [(2, 4), (4, 4), (4, 16), (8, 8), (16, 64)])
def test_1f1b_and_gpipe_bubbles_match_the_formula(stages: int, microbatches: int) -> None:
    for mode in ("1f1b", "gpipe"):
        model, formula = bubble_check(stages, microbatches, mode)
        assert model == pytest.approx(formula, abs=1e-9)


def test_pipelining_steps_the_optimizer_once_a_batch() -> None:
    costs = [StageCost(forward_s=F, backward_s=B + 0.005, optimizer_s=0.005)]
    got = simulate("gpipe", costs, batch_size=8, link=FREE, microbatches=4)
    assert got.step_s == pytest.approx(4 * (F + B) + 0.005)


def test_bad_input_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        simulate("fast", equal(2), batch_size=1, link=FREE)
    with pytest.raises(ValueError, match="forward_s must be a finite number >= 0"):
        StageCost(forward_s=-1.0, backward_s=B)
    with pytest.raises(ValueError, match="backward_s must be a finite number >= 0"):
        StageCost(forward_s=F, backward_s=math.nan)
    with pytest.raises(ValueError, match="at least one stage"):
        simulate("dni", [], batch_size=1, link=FREE)
    with pytest.raises(ValueError, match="cores must be > 0"):
        simulate("dni", equal(2), batch_size=1, link=FREE, cores=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        simulate("dni", equal(2), batch_size=0, link=FREE)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        Link(latency_s=0.0, bandwidth_bps=0.0)
    with pytest.raises(ValueError, match="the stages cost no time"):
        simulate("dni", [StageCost(forward_s=0.0, backward_s=0.0)], batch_size=1, link=FREE)
    with pytest.raises(ValueError, match="3 stage costs for 2 stages"):
        predict(PipelineConfig(stages=2), [EQUAL.__dict__] * 3, FREE)


def test_predict_reads_the_mode_and_window_from_the_config() -> None:
    costs = [dict(EQUAL.__dict__, stage=i, step_s=F + B) for i in range(2)]  # stage_step_times entries
    slow = Link(latency_s=0.05, bandwidth_bps=math.inf)
    step = {w: predict(PipelineConfig(stages=2, mode="dni", max_in_flight=w), costs, slow).step_s for w in (1, None, 0)}
    assert step[1] > step[None] > step[0] == pytest.approx(F + B)  # None: the mode's default window, 2


def _results(measured: float) -> dict:
    costs = [dict(EQUAL.__dict__, stage=i) for i in range(2)]
    return {"config": {"modes": ["backprop", "single"], "stages": 2, "flags": ["--batch-size", "100"]},
            "model": {"link": FREE.to_dict(), "cores": 2},
            "runs": [{"mode": "backprop", "stages": 2, "samples_per_s": measured, "stage_step_s": costs,
                      "stage_microbatch_s": None, "per_stage_busy_fraction": [0.5, 0.5]},
                     {"mode": "single", "stages": 1, "samples_per_s": 1.0}]}


def test_validation_rows_compare_with_the_target() -> None:
    exact = 100 / (2 * (F + B))
    rows = validate_results(_results(exact * 1.05))
    assert [r["mode"] for r in rows] == ["backprop"] and rows[0]["within_target"]
    assert rows[0]["predicted"] == pytest.approx(exact, abs=0.1) and rows[0]["target"] == 0.10
    assert not validate_results(_results(exact * 1.2))[0]["within_target"]
    with pytest.raises(ValueError, match="no measured link"):
        validate_results({"runs": []})


def test_what_if_is_labelled_and_dni_scales_with_the_stages() -> None:
    result = what_if()
    assert result["assumptions"]["note"] == "model output, not measured"
    rows = {(r["link"], r["sg_fraction"], r["stages"], r["mode"]): r for r in result["rows"]}
    assert rows["NVLink", 0.0, 64, "backprop"]["vs_backprop"] == 1.0
    assert rows["NVLink", 0.0, 64, "dni"]["vs_backprop"] == pytest.approx(64, rel=0.05)
    assert rows["NVLink", 0.4, 64, "dni"]["vs_backprop"] < rows["NVLink", 0.1, 64, "dni"]["vs_backprop"]
    assert rows["WAN", 0.0, 8, "backprop"]["samples_per_s"] < rows["NVLink", 0.0, 8, "backprop"]["samples_per_s"]


def test_cli_predicts_from_a_costs_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps([EQUAL.__dict__] * 2))
    out = tmp_path / "prediction.json"
    assert main(["model", "--costs", str(costs), "--latency-us", "0", "--out", str(out), "--mode", "backprop",
                 "--stages", "2", "--batch-size", "60"]) == 0
    printed = capsys.readouterr().out
    assert "MODEL OUTPUT" in printed and "backprop" in printed
    step = 2 * (F + B) + 2 * 1000 / 2.5e9  # the work of both stages, both messages at the default 2.5 GB/s
    assert json.loads(out.read_text())["samples_per_s"] == pytest.approx(60 / step, rel=1e-3)
    costs.write_text(json.dumps([EQUAL.__dict__] * 4))
    rates = []
    for sharing in ("1.0", "1.25"):
        assert main(["model", "--costs", str(costs), "--latency-us", "0", "--cores", "2", "--sharing-cost", sharing,
                     "--out", str(out), "--mode", "local", "--stages", "4"]) == 0
        rates.append(json.loads(out.read_text())["samples_per_s"])
    assert rates[1] == pytest.approx(rates[0] / 1.25, rel=0.02)
    assert main(["model", "--costs", str(costs), "--sharing-cost", "0", "--mode", "local", "--stages", "4"]) == 2


def test_cli_refuses_bad_input_with_exit_2(tmp_path: Path) -> None:
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps([{"forward_s": -1, "backward_s": 0.01}]))
    cmd = [sys.executable, "-m", "dni_async", "model", "--costs", str(costs), "--stages", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "forward_s must be a finite number >= 0" in result.stderr
    assert main(["model", "--costs", str(tmp_path / "missing.json")]) == 2
    assert main(["model", "--what-if", "--mode", "dni"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["model"])
    assert exit_info.value.code == 2


def test_sharing_probe() -> None:
    """Processes that fit the cores cost nothing to share (no probe runs); three processes said to share one
    core are measured (each step's CPU time over its time alone): a real ratio, 1.0-1.3 on 2 cores here."""
    assert measure_sharing(2, 2) == 1.0 and measure_sharing(1, 4, threads=4) == 1.0
    ratio = measure_sharing(3, 1, steps=20)
    assert 0.8 < ratio < 3.0, ratio
    with pytest.raises(ValueError, match="must be >= 1"):
        measure_sharing(0, 2)
