"""Stages on one GPU, end to end: both transports, no host sync on the hot path (--sync-check), torch's schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SMALL, SUBSET, ok, read_json, stages

pytestmark = [pytest.mark.cuda, pytest.mark.process,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="stages on a GPU: no CUDA here (launch/gpu_check.sh runs these on a GPU)")]

DATA = ["--data-dir", str(SUBSET)]


@pytest.mark.parametrize("mode", ["dni", "backprop"])
def test_cuda_ipc_and_zmq_train_alike_with_no_host_sync(tmp_path: Path, mode: str) -> None:
    summaries = {}
    for transport in ("cuda-ipc", "zmq"):
        run = tmp_path / transport
        ok(stages(3, ["--stages", "3", "--mode", mode, "--devices", "0,0,0", "--transport", transport, "--sync-check",
                      "--steps", "80", *DATA, "--run-dir", str(run), *SMALL], timeout=240))
        summaries[transport] = summary = read_json(run / "summary.json")
        assert summary["transport"] == transport and summary["steps"] == 80
        assert all(s["device"] == "cuda:0" and s["rejected_messages"] == 0 for s in summary["per_stage"])
    assert summaries["cuda-ipc"]["final_eval"]["accuracy"] > 0.5
    if mode == "backprop":  # locked: the same run whichever way the tensors travel
        assert summaries["cuda-ipc"]["final_eval"]["accuracy"] == pytest.approx(
            summaries["zmq"]["final_eval"]["accuracy"], abs=0.01)


@pytest.mark.parametrize("mode", ["gpipe", "1f1b"])
def test_pipelining_baselines_share_one_gpu_through_the_host(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "run"
    ok(stages(2, ["--stages", "2", "--mode", mode, "--devices", "0,0", "--microbatches", "4", "--steps", "60", *DATA,
                  "--run-dir", str(run), *SMALL], timeout=240))
    summary = read_json(run / "summary.json")
    assert summary["final_eval"]["accuracy"] > 0.5 and all(s["device"] == "cuda:0" for s in summary["per_stage"])
