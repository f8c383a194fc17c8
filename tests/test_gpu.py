"""Stages on one GPU, end to end: both transports, no host sync on the hot path (--sync-check), torch's schedules."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
from helpers import DATA, SMALL, ok, read_json, stages
from torch import nn

from dni_async.pipelining import _ThroughHost, shares_a_gpu

NO_CUDA = "stages on a GPU: no CUDA here (launch/gpu_check.sh runs these on a GPU)"


def on_gpu(test: Callable[..., None]) -> Callable[..., None]:
    """Marks of a test that runs stages on a GPU: ``cuda``, ``process``, skipped without CUDA."""
    for mark in (pytest.mark.cuda, pytest.mark.process, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason=NO_CUDA)):
        test = mark(test)
    return test



@pytest.mark.parametrize("mode", ["dni", "backprop"])
@on_gpu
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
@on_gpu
def test_pipelining_baselines_share_one_gpu_through_the_host(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "run"
    ok(stages(2, ["--stages", "2", "--mode", mode, "--devices", "0,0", "--microbatches", "4", "--steps", "60", *DATA,
                  "--run-dir", str(run), *SMALL], timeout=240))
    summary = read_json(run / "summary.json")
    assert summary["final_eval"]["accuracy"] > 0.5 and all(s["device"] == "cuda:0" for s in summary["per_stage"])


def test_which_stages_share_a_gpu_and_how_their_blocks_meet_the_host() -> None:
    assert shares_a_gpu(["0", "cuda:0"]) and shares_a_gpu(["cpu", "1", "1"])
    assert not shares_a_gpu(["0", "1"]) and not shares_a_gpu(None) and not shares_a_gpu(["cpu", "cpu"])
    block = nn.Linear(3, 2)
    wrapped = _ThroughHost(block, torch.device("cpu"))  # on a GPU: the block there, its input and output here
    x = torch.randn(4, 3, requires_grad=True)
    wrapped(x).sum().backward()
    assert x.grad is not None and block.weight.grad is not None
