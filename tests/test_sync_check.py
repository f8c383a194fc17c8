"""No wait for the device on the stage loop's hot path: the CPU check here, the CUDA one under --sync-check."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from inprocess import TwoStages, batches
from torch import nn

from dni_async import host_sync
from dni_async.config import PipelineConfig
from dni_async.divergence import check_finite
from dni_async.host_sync import REASONS
from dni_async.methods import METHODS, MODES
from dni_async.task import class_counts
from dni_async.transport import Message
from tasks.copy import BITS, bit_errors
from tasks.lm import nll_sums

STAGE_LOOP_MODES = [m for m in MODES if not METHODS[m].pipelining]
OURS = ("dni_async", "tasks")
"""The packages whose code the check watches (torch's own is the CUDA check's)."""
# What reads a tensor's value back to the host: on a GPU, each waits for every kernel queued so far.
VALUE_READS = ["item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"]


@pytest.fixture
def value_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every value read made by dni_async's own code outside a ``host_sync`` block, as ``module:line method``.

    The CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: a CPU run cannot tell which calls would
    wait for a GPU, but every such call in the stage loop's code is one of these reads. torch's own internals
    are left to the CUDA check (the caller must be a dni_async module)."""
    found: list[str] = []

    def watch(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith(OURS) and not host_sync.inside():
                found.append(f"{module}:{caller.f_lineno} {name}")
            return original(self, *args, **kwargs)
        return read

    for name in VALUE_READS:
        monkeypatch.setattr(torch.Tensor, name, watch(name, getattr(torch.Tensor, name)))
    yield found


def test_the_check_sees_a_value_read_outside_host_sync(value_reads: list[str]) -> None:
    check_finite(0, 0, {}, nn.Linear(2, 2))  # reads the weight norm: a sync on a GPU
    assert value_reads and value_reads[0].startswith("dni_async.divergence:")
    value_reads.clear()
    with host_sync.host_sync("metrics line"):
        check_finite(0, 0, {}, nn.Linear(2, 2))
    assert value_reads == []


@pytest.mark.parametrize("mode", STAGE_LOOP_MODES)
def test_training_steps_read_values_only_in_named_host_syncs(tmp_path: Path, mode: str,
                                                             value_reads: list[str]) -> None:
    pipe = TwoStages(tmp_path, mode, delay=1, log_every=2)
    for _ in pipe.train(batches(7)):
        pass
    pipe.flush()
    for k, (x, y) in enumerate(batches(2, seed=1)):  # an evaluation, scored on the last stage
        with torch.no_grad():
            h = pipe.blocks[0](x)
        pipe.second.eval.step(Message("eval", k, 0, [h, y], {"last": k == 1}))
    assert pipe.second.eval.final_eval is not None and "accuracy" in pipe.second.eval.final_eval
    assert [line for line in (tmp_path / "m1.jsonl").read_text().splitlines()], "no metrics line was written"
    assert value_reads == [], f"{mode}: values read back outside the named host syncs: {value_reads}"


def test_the_tasks_metric_sums_stay_on_the_device(value_reads: list[str]) -> None:
    logits, labels = torch.randn(4, 3, 5), torch.randint(0, 5, (4, 3))
    bits = torch.randint(0, 2, (4, 7, BITS + 2)).float()
    for sums in (class_counts(logits[:, 0], labels[:, 0]), nll_sums(logits, labels), bit_errors(bits[..., :-1], bits)):
        assert all(isinstance(v, (float, torch.Tensor)) for v in sums.values())
    assert value_reads == []  # each task's batch sums: read once per scored group, in a host_sync


def test_host_sync_names_are_checked() -> None:
    assert "metrics line" in REASONS
    with pytest.raises(ValueError, match="unknown host sync"):
        with host_sync.host_sync("because"):
            pass


def test_sync_check_needs_gpu_stages() -> None:
    with pytest.raises(ValueError, match="GPU stages"):
        PipelineConfig(sync_check=True, devices=["cpu", "cpu"], stages=2)
    with pytest.raises(ValueError, match="torch's schedule"):
        PipelineConfig(sync_check=True, devices=["0", "0"], stages=2, mode="gpipe", microbatches=2)
