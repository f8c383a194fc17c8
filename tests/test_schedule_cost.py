"""The pipelining schedules' stage costs (dni_async.schedule_cost): timed under torch's own schedule, alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch.distributed as dist
from helpers import SUBSET

from dni_async.config import PipelineConfig
from dni_async.schedule_cost import scale_microbatch_costs, schedule_batch_times
from dni_async.stage_cost import stage_step_times
from tasks import get_pipeline_task


def test_microbatch_costs_scale_to_the_schedules_batch() -> None:
    """4 microbatches of 1 ms forward + 2 ms backward (the optimizer's 1 ms apart) take 12 ms; a schedule that
    takes 24 ms doubles the forward and the backward, not the optimizer step."""
    cost = {"stage": 0, "forward_s": 0.001, "backward_s": 0.003, "optimizer_s": 0.001, "act_bytes": 5}
    scaled = scale_microbatch_costs([cost], [0.024], 4)[0]
    assert scaled["forward_s"] == pytest.approx(0.002) and scaled["backward_s"] == pytest.approx(0.005)
    assert scaled["optimizer_s"] == 0.001 and scaled["act_bytes"] == 5 and scaled["schedule_scale"] == pytest.approx(2)


@pytest.mark.parametrize("mode", ["gpipe", "1f1b"])
def test_each_stage_is_timed_under_the_schedule(tmp_path: Path, mode: str) -> None:
    config = PipelineConfig(stages=3, mode=mode, microbatches=3, hidden_size=32, num_layers=2, batch_size=24,
                            data_dir=str(SUBSET), run_dir=str(tmp_path / "run"))
    times = schedule_batch_times(get_pipeline_task(config), config, repeats=2, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert not dist.is_initialized(), "the one-process world is taken down again"


def test_only_pipelining_modes_have_a_schedule(tmp_path: Path) -> None:
    config = PipelineConfig(stages=2, mode="backprop", data_dir=str(SUBSET), run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="has no pipelining schedule"):
        schedule_batch_times(get_pipeline_task(config), config)


def test_costs_are_measured_beside_an_earlier_runs_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark's cost configs name the default run folder; checkpoints of an earlier run there are no reason
    to refuse timing the stages (the launcher refuses them, for the run it starts)."""
    (tmp_path / "runs" / "latest" / "checkpoints" / "step-5").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config = PipelineConfig(stages=2, mode="gpipe", microbatches=2, hidden_size=32, num_layers=2, batch_size=16,
                            data_dir=str(SUBSET))
    assert len(schedule_batch_times(get_pipeline_task(config), config, repeats=1, warmup=1)) == 2
    config = dataclasses.replace(config, mode="backprop")
    assert len(stage_step_times(get_pipeline_task(config), config, repeats=1, warmup=1)) == 2
