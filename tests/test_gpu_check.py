"""The GPU check's plan and report (launch/gpu_check.py), without a GPU: what it runs, and what makes it fail."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

from helpers import ROOT

from dni_async.config import MODES


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "launch" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(ratio: float, status: str = "done") -> dict[str, Any]:
    """A report as the check writes it; the figures are made up for the test, not measured."""
    gc = _script()
    runs = [{"stages": s, "mode": m, "transport": t, "sync_check": t != "torch", "status": status,
             "samples_per_s": 1000.0, "step_ms": 1.0, "busy_fraction": [0.5] * s, "accuracy": 0.9, "job_s": 9.0,
             **({"error": "Traceback ... made up"} if status == "failed" else {})} for s, m, t in gc.jobs()]
    link = {"latency_s": 1e-4, "bandwidth_bps": 1e10, "one_way_64mib_s": 0.01}
    return {"env": {"date": "today", "gpus": ["a GPU"], "torch": "x", "python": "3", "cpu_count": 16},
            "cuda": "13", "steps": 200, "command": "python launch/gpu_check.py", "wall_s": 1.0,
            "tests": {"exit_code": 0, "passed": 20, "failures": 0, "errors": 0, "skipped": 0},
            "links": {"zmq": link, "cuda-ipc": link, "ratio_64mib": ratio}, "runs": runs}


def test_the_check_runs_every_mode_at_two_and_four_stages_and_both_transports() -> None:
    jobs = _script().jobs()
    assert {m for s, m, _ in jobs if s == 2} == set(MODES)
    assert {(s, t) for s, m, t in jobs if m == "dni"} == {(2, "zmq"), (2, "cuda-ipc"), (4, "zmq"), (4, "cuda-ipc")}
    assert {m for s, m, _ in jobs if s == 4} >= {"dni", "cdni", "backprop", "gpipe", "1f1b"}


def test_the_verdict_fails_on_a_slow_ring_or_a_failed_job() -> None:
    gc = _script()
    good = _report(ratio=25.0)
    assert all(gc.verdict(good).values())
    slow = gc.verdict(_report(ratio=4.0))
    assert [k for k, ok in slow.items() if not ok] == ["cuda-ipc moves 64 MiB >= 10x faster than zmq"]
    failed = _report(ratio=25.0, status="failed")
    failed["verdict"] = gc.verdict(failed)
    assert not failed["verdict"]["sync check passed (every stage-loop job)"]
    text = gc.markdown(failed)
    assert "FAIL: every job ran" in text and "made up" in text and "25.0x faster" in text
