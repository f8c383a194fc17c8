"""Parity of the gradient sources, two real stages in one process: delayed is backprop when nothing is delayed,
and with a delay its update is the hand-computed one from the step's own graph and weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from inprocess import TwoStages, batches, round_trip
from torch import nn

from dni_async.hooks import CheckpointEvery
from dni_async.optim import fast_adam
from dni_async.sources import local_head


def weights(pipe: TwoStages) -> list[torch.Tensor]:
    return [t.detach().clone() for block in pipe.blocks for t in block.state_dict().values()]


def trained(tmp_path: Path, mode: str, delay: int, steps: int = 6, **overrides: Any) -> TwoStages:
    pipe = TwoStages(tmp_path, mode, delay, **overrides)
    for _ in pipe.train(batches(steps)):
        pass
    pipe.flush()
    return pipe


def test_delayed_with_no_delay_is_backprop_bit_for_bit(tmp_path: Path) -> None:
    locked = trained(tmp_path / "b", "backprop", 0)
    delayed = trained(tmp_path / "d", "delayed", 0, max_in_flight=1)
    assert locked.first.stats.steps == delayed.first.stats.steps == 6
    for a, b in zip(weights(locked), weights(delayed)):
        assert torch.equal(a, b)
    assert str(delayed.first.trace).split()[:6] == ["0F0", "0S0", "0G0", "0U0", "0F1", "0S1"]
    # and both are plain backprop of the whole model in one process
    model = nn.Sequential(*TwoStages(tmp_path / "ref", "backprop", 0).blocks)
    opts = [fast_adam(block.parameters(), 3e-4) for block in model]
    for x, y in batches(6):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    for a, b in zip(weights(locked), [t for block in model for t in block.state_dict().values()]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_delayed_by_two_applies_each_gradient_through_its_own_steps_graph_and_weights(tmp_path: Path) -> None:
    pipe = TwoStages(tmp_path, "delayed", 2, max_in_flight=3)
    block, opt = pipe.first.io.block, pipe.first.io.opt
    data = batches(8)
    used: dict[int, dict[str, torch.Tensor]] = {}   # the weights each step's forward used
    before_update: dict[int, tuple[dict, dict]] = {}  # weights and Adam state just before step t's update
    after: dict[int, dict[str, torch.Tensor]] = {}
    for t in pipe.train(data):
        used[t] = copy.deepcopy(block.state_dict())
        before_update[t] = (copy.deepcopy(block.state_dict()), copy.deepcopy(opt.state_dict()))
        if t:
            after[t - 1] = copy.deepcopy(block.state_dict())
    after[len(data) - 1] = copy.deepcopy(block.state_dict())
    assert pipe.first.trace.take().split()[-4:] == ["0F7", "0S7", "0G5", "0U5"]

    def by_hand(t: int, graph_weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Step t's update: the gradient of step t - 2, through a forward with ``graph_weights``."""
        ref = copy.deepcopy(block)
        ref.load_state_dict(graph_weights)
        x, _ = data[t - 2]
        ref(x).backward(pipe.returned[t - 2])
        grads = [p.grad for p in ref.parameters()]
        ref.load_state_dict(before_update[t][0])  # the live weights at step t, with step t's Adam state
        ref_opt = fast_adam(ref.parameters(), 3e-4)
        ref_opt.load_state_dict(before_update[t][1])
        for p, g in zip(ref.parameters(), grads):
            p.grad = g
        ref_opt.step()
        return {k: v for k, v in ref.state_dict().items() if "running" not in k and "num_batches" not in k}

    for t in range(2, 8):
        expected = by_hand(t, used[t - 2])
        for name, value in expected.items():
            assert torch.equal(after[t][name], value), f"step {t}: {name}"
    # the same with the weights of step t instead of step t - 2 (no stashing) is not what happened
    wrong = by_hand(5, used[5])
    assert not torch.equal(after[5]["0.weight"], wrong["0.weight"])


def test_local_never_sends_a_gradient_and_the_next_stage_skips_its_input_gradient(tmp_path: Path) -> None:
    pipe = trained(tmp_path, "local", 0)
    assert pipe.second.stats.steps == 6 and [m.kind for m in pipe.last_in.sent] == []
    assert pipe.link.inbox["backward"] == type(pipe.link.inbox["backward"])()
    assert "G" not in {a.kind for a in pipe.first.trace.actions} | {a.kind for a in pipe.second.trace.actions}
    assert not pipe.second.io.needs_input_grad
    before = weights(pipe)
    for _ in pipe.train(batches(2, seed=1), start=6):
        pass
    assert all(not torch.equal(a, b) for a, b in zip(before[:2], weights(pipe)[:2])), "stage 0 learns on its own"


def test_local_heads_fit_every_output_shape() -> None:
    assert isinstance(local_head((64,), (10,)), nn.Linear)
    assert local_head((8, 7, 7), (10,))(torch.zeros(2, 8, 7, 7)).shape == (2, 10)
    assert local_head((35, 256), (35, 1000))(torch.zeros(2, 35, 256)).shape == (2, 35, 1000)
    with pytest.raises(ValueError, match="no head from a stage output of shape"):
        local_head((3, 4, 5), (6, 7))


class MemoryCheckpointer:
    """A checkpointer that keeps the sets in memory (through a weights-only round trip)."""

    def __init__(self, every: int) -> None:
        self.every, self.saved = every, {}

    def due(self, steps_done: int) -> bool:
        return steps_done % self.every == 0

    def save(self, steps_done: int, state: dict[str, Any]) -> None:
        self.saved[steps_done] = round_trip({**state, "step": steps_done})


@pytest.mark.parametrize("mode,delay,overrides", [("delayed", 2, {"max_in_flight": 3}), ("local", 0, {})])
def test_a_resumed_run_is_the_uninterrupted_run_bit_for_bit(tmp_path: Path, mode: str, delay: int,
                                                            overrides: dict[str, Any]) -> None:
    """At a checkpoint the gradients in flight are applied first (delayed), so a set holds no graph: a run resumed
    from it matches the run that went straight on, when the gradients arrive on the same schedule."""
    data = batches(9)

    def checkpointing(pipe: TwoStages) -> list[MemoryCheckpointer]:
        sets = [MemoryCheckpointer(4), MemoryCheckpointer(4)]
        for worker, checkpointer in zip((pipe.first, pipe.second), sets):
            worker.hooks.add(CheckpointEvery(checkpointer, worker.source, worker.checkpoint_state))  # type: ignore
        return sets

    straight = TwoStages(tmp_path / "a", mode, delay, **overrides)
    sets = checkpointing(straight)
    for _ in straight.train(data):
        pass
    straight.flush()
    assert all(sorted(s.saved) == [4, 8] for s in sets)
    resumed = TwoStages(tmp_path / "b", mode, delay, seed=1, **overrides)  # other initial weights: all restored
    checkpointing(resumed)
    resumed.first.restore(sets[0].saved[4])
    resumed.second.restore(sets[1].saved[4])
    for _ in resumed.train(data[4:], start=4):
        pass
    resumed.flush()
    for a, b in zip(weights(straight), weights(resumed)):
        assert torch.equal(a, b)
    for a, b in zip(straight.first.io.opt.state_dict()["state"].values(),
                    resumed.first.io.opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
