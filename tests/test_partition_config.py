"""Pure logic of the runtime, no processes: balanced partition, shape checks, config, metrics helpers."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from torch import nn

from dni_async.config import MODES, PipelineConfig, config_from_args
from dni_async.lifecycle import validate
from dni_async.methods import METHODS
from dni_async.metrics import steady_samples_per_s
from dni_async.partition import balanced_split, check_stage_shapes, partition
from dni_async.sources import build_sg
from dni_async.synthetic import LowRankDNI
from tasks import get_pipeline_task


def brute_force(costs: list[int], parts: int) -> int:
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), parts - 1):
        bounds = [0, *cuts, len(costs)]
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    assert best is not None
    return best


def test_balanced_split_is_optimal() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        costs = [rng.randint(1, 100) for _ in range(n)]
        parts = rng.randint(1, n)
        starts = balanced_split(costs, parts)
        assert starts[0] == 0 and len(starts) == parts and starts == sorted(set(starts))
        bounds = [*starts, n]
        assert max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])) == brute_force(costs, parts)


def test_partition_balances_parameters_and_refuses_too_many_stages() -> None:
    blocks = [nn.Linear(784, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 10)]
    stages = partition(nn.Sequential(*blocks), 2)
    assert [len(s) for s in stages] == [2, 2]
    with pytest.raises(ValueError, match="--stages 5 is more than the model's 4 layers"):
        partition(blocks, 5)


def test_shape_mismatch_names_both_stages_and_shapes() -> None:
    stages = [nn.Sequential(nn.Flatten(), nn.Linear(784, 256)), nn.Sequential(nn.Linear(128, 10))]
    with pytest.raises(ValueError, match=r"stage 0 outputs shape \(2, 256\) but stage 1 expects \(\*, 128\)"):
        check_stage_shapes(stages, torch.zeros(2, 1, 28, 28))
    good = [nn.Sequential(nn.Flatten(), nn.Linear(784, 256)), nn.Linear(256, 10)]
    assert [tuple(s) for s in check_stage_shapes(good, torch.zeros(2, 1, 28, 28))] == [(2, 256), (2, 10)]


@pytest.mark.parametrize("field,value,message", [
    ("stages", 0, "--stages must be >= 1"),
    ("mode", "async", "--mode must be one of"),
    ("threads_per_stage", 0, "--threads-per-stage must be >= 1"),
    ("batch_size", 0, "--batch-size must be >= 1"),
    ("sg", "transformer", "--sg must be one of"),
    ("peer_timeout", 0, "--peer-timeout must be >= 1 s"),
    ("peer_timeout", float("nan"), "--peer-timeout must be a finite number, got nan"),
    ("lr", float("nan"), "--lr must be a finite number, got nan"),
    ("sg_lr", float("inf"), "--sg-lr must be a finite number, got inf"),
    ("epochs", float("nan"), "--epochs must be a finite number"),
    ("time_budget", float("inf"), "--time-budget must be a finite number"),
    ("max_in_flight", -1, "--max-in-flight must be >= 0"),
])
def test_config_validation(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**{field: value})  # type: ignore[arg-type]


def test_config_from_argv() -> None:
    config = config_from_args(["--stages", "3", "--devices", "cpu, cpu,cpu", "--slow-stage", "1:0.5",
                               "--no-progress", "--mode", "cdni"])
    assert config.devices == ["cpu", "cpu", "cpu"] and config.slow_stage == {1: 0.5}
    assert config.progress is False and config.mode == "cdni"
    with pytest.raises(ValueError, match="names 2 devices for 3 stages"):
        config_from_args(["--stages", "3", "--devices", "cpu,cpu"])


def test_each_mode_fills_in_its_own_defaults_and_explicit_values_win() -> None:
    for mode, method in METHODS.items():
        config = PipelineConfig(mode=mode)
        assert config.method is method
        for name, value in method.defaults.items():
            assert getattr(config, name) == value, (mode, name)
    assert PipelineConfig(mode="cdni").sg == "softmax" and PipelineConfig(mode="cdni", task="lm").sg == "linear"
    assert PipelineConfig(mode="delayed", max_in_flight=5).max_in_flight == 5
    assert PipelineConfig(mode="cdni", sg="mlp").sg == "mlp"
    assert PipelineConfig(mode="backprop").max_in_flight == 0  # not used: the mode has no window
    with pytest.raises(ValueError, match="--mode delayed needs --max-in-flight >= 1"):
        PipelineConfig(mode="delayed", max_in_flight=0)
    assert [m for m in MODES if METHODS[m].pipelining] == ["gpipe", "1f1b"]
    assert not METHODS["local"].sends_gradients and METHODS["cdni"].sg_context and not METHODS["delayed"].has_sg


@pytest.mark.parametrize("task,mode,sg,refusal", [
    ("copy", "cdni", "softmax", "--sg softmax predicts the gradient of one softmax"),
    ("lm", "dni", "softmax", "--sg softmax predicts the gradient of one softmax"),
    ("copy", "backprop", "softmax", None),  # a flag the mode does not use is accepted
    ("mnist-cnn", "cdni", "softmax", None),
    ("copy", "local", None, None),
    ("copy", "delayed", None, None),
])
def test_methods_the_task_cannot_run_are_refused_before_any_process(task: str, mode: str, sg: str | None,
                                                                    refusal: str | None) -> None:
    config = PipelineConfig(stages=2, task=task, mode=mode, sg=sg, hidden_size=8, steps=5)
    run = lambda: validate(get_pipeline_task(config), config)  # noqa: E731
    if refusal is None:
        run()
    else:
        with pytest.raises(ValueError, match=refusal):
            run()


def test_steady_throughput_skips_warmup() -> None:
    times = [0.0, 5.0] + [5.0 + k for k in range(1, 19)]  # a slow first step, then 1 step/s
    assert steady_samples_per_s(times, batch_size=10) == pytest.approx(10.0)
    assert steady_samples_per_s(times[:3], batch_size=10) is None


@pytest.mark.parametrize("kind", ["linear", "low-rank", "mlp", "linear-bn", "linear-sigmoid", "softmax"])
def test_build_sg_kinds(kind: str) -> None:
    sg = build_sg(kind, 16, 8, context_size=3, classes=3)
    h = torch.randn(4, 16)
    out, _ = sg(h, None, context=torch.eye(3)[[0, 1, 2, 0]])
    assert out.shape == h.shape and torch.count_nonzero(out) == 0


def test_low_rank_sg_is_a_linear_map_of_the_given_rank() -> None:
    sg = build_sg("low-rank", 16, 3, context_size=0)
    assert isinstance(sg, LowRankDNI) and sum(p.numel() for p in sg.parameters()) == 16 * 3 + 3 * 16 + 16
    for p in sg.parameters():
        torch.nn.init.normal_(p)
    h, g = torch.randn(5, 16), torch.randn(5, 16)
    out = lambda x: sg(x, None)[0]  # noqa: E731
    torch.testing.assert_close(out(h + g) - out(g), out(h) - out(torch.zeros(1, 16)))  # affine
    jacobian = torch.autograd.functional.jacobian(lambda x: out(x[None])[0], torch.zeros(16))
    assert torch.linalg.matrix_rank(jacobian) == 3


def test_build_sg_for_feature_maps() -> None:
    sg = build_sg("mlp", (8, 7, 7), 4, context_size=10)
    h = torch.randn(2, 8, 7, 7)
    out, _ = sg(h, None, context=torch.eye(10)[[3, 4]])
    assert out.shape == h.shape
    with pytest.raises(ValueError, match="no convolutional form"):
        build_sg("linear-bn", (8, 7, 7), 4, context_size=0)
    softmax = build_sg("softmax", (8, 7, 7), 4, context_size=10, classes=10)
    assert softmax(h, None, context=torch.eye(10)[[3, 4]])[0].shape == h.shape
