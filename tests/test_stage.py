"""The stage loop's logic without processes: an in-memory stand-in for the transport, one stage at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni_async.config import PipelineConfig
from dni_async.metrics import JsonLines
from dni_async.optim import fast_adam
from dni_async.pipeline import build_sg
from dni_async.stage import StageWorker
from dni_async.task import PipelineTask
from dni_async.transport import Message, Transport, TransportOptions


class ScriptedTransport(Transport):
    """Records sends; ``recv`` pops scripted messages; sends may be scripted to block once."""

    def __init__(self, stage: int, num_stages: int) -> None:
        super().__init__(stage, num_stages, TransportOptions())
        self.sent: list[Message] = []
        self.inbox: dict[str, list[Message]] = {"forward": [], "backward": []}
        self.blocked_sends = 0
        self.on_blocked: Callable[[], None] | None = None

    def bind(self) -> str:
        return "scripted"

    def connect(self, endpoints: Mapping[int, str]) -> None:
        pass

    def send(self, dst: int, msg: Message, while_blocked: Callable[[], None] | None = None) -> None:
        if self.blocked_sends and msg.kind in ("act", "eval"):
            self.blocked_sends -= 1
            if self.on_blocked is not None:
                self.on_blocked()
            assert while_blocked is not None, "a DNI stage blocked sending forward must consume gradients"
            while_blocked()
        self.sent.append(msg)

    def recv(self, direction: str, timeout: float | None = None) -> Message | None:
        box = self.inbox[direction]
        if box:
            return box.pop(0)
        assert timeout is not None, f"recv({direction!r}) would wait forever"
        return None

    def queue_depth(self, direction: str) -> int:
        return len(self.inbox[direction])

    def close(self) -> None:
        pass


def first_stage(tmp_path: Path, **overrides: object) -> tuple[StageWorker, ScriptedTransport]:
    settings: dict = {"stages": 2, "mode": "dni", "run_dir": str(tmp_path), "log_every": 1000, **overrides}
    config = PipelineConfig(**settings)
    transport = ScriptedTransport(0, 2)
    block = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
    task = PipelineTask(name="test", blocks=[block], loss_fn=F.cross_entropy, input_shape=(4,), num_classes=3,
                        data=lambda: (iter([]), 0, [], "none"))
    worker = StageWorker(0, 2, block, transport, config, torch.device("cpu"), task, build_sg("linear", 6, 8, 0),
                         JsonLines(tmp_path / "m.jsonl"), JsonLines(tmp_path / "e.jsonl"))
    return worker, transport


def grad(step: int) -> Message:
    return Message("grad", step, 1, [torch.ones(5, 6)])


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(5, 4), torch.randint(0, 3, (5,))


def test_updates_without_waiting_and_sends_activation_first(tmp_path: Path) -> None:
    worker, transport = first_stage(tmp_path)
    assert worker.sg is not None
    with torch.no_grad():  # a zero-initialised SG predicts exactly 0 at first
        worker.sg.final.weight.normal_()
    before = worker.block[0].weight.detach().clone()
    worker._train_step(0, *batch(), {})
    assert [m.kind for m in transport.sent] == ["act"]
    assert not torch.equal(worker.block[0].weight, before), "updated from the SG, no gradient received"
    assert list(worker.stash) == [0]


def test_blocked_forward_send_consumes_gradients(tmp_path: Path) -> None:
    """The deadlock seen in 4-stage runs: stage 0 blocked sending while stage 1 blocks sending gradients."""
    worker, transport = first_stage(tmp_path)
    worker._train_step(0, *batch(), {})
    worker._train_step(1, *batch(), {})
    transport.inbox["backward"] = [grad(0), grad(1)]
    transport.blocked_sends = 1
    worker._send_eval([batch()], final=True)
    assert transport.inbox["backward"] == [], "gradients were consumed while the send was blocked"
    worker._read_losses()
    assert worker.stash == {} and worker.stats.sg_loss_last is not None


def test_window_bounds_steps_in_flight(tmp_path: Path) -> None:
    worker, transport = first_stage(tmp_path, max_in_flight=2)
    worker._train_step(0, *batch(), {})
    worker._train_step(1, *batch(), {})
    transport.inbox["backward"] = [grad(0)]
    worker._train_step(2, *batch(), {})  # waits for grad(0), which is there
    assert sorted(worker.stash) == [1, 2]
    with pytest.raises(AssertionError, match="wait forever"):
        worker._train_step(3, *batch(), {})  # two in flight and no gradient coming: it must wait


def test_stash_drops_oldest_and_counts(tmp_path: Path) -> None:
    worker, transport = first_stage(tmp_path, max_in_flight=0, stash_size=3)
    for t in range(5):
        worker._train_step(t, *batch(), {})
    assert sorted(worker.stash) == [2, 3, 4] and worker.stats.dropped_targets == 2
    transport.inbox["backward"] = [grad(0)]
    worker._drain_grads(5)
    assert worker.stats.dropped_targets == 3 and worker.stats.max_staleness == 5



def stop_when_finishing(worker: StageWorker, transport: ScriptedTransport) -> None:
    """The next stage answers `stop` only once this one has sent its own (as a real one does)."""
    finish = worker._finish

    def finish_with_answer() -> None:
        transport.inbox["backward"].append(Message("stop", worker.stats.steps, 1))
        finish()

    worker._finish = finish_with_answer  # type: ignore[method-assign]


def test_snapshots_are_evaluated_after_training_and_the_live_weights_come_back(tmp_path: Path) -> None:
    worker, transport = first_stage(tmp_path, snapshot_every=2)
    assert worker.sg is not None
    torch.nn.init.normal_(worker.sg.final.weight)  # a nonzero synthetic gradient: the block changes every step
    stop_when_finishing(worker, transport)
    eval_batches = [batch(), batch()]
    worker.run_first(iter([batch() for _ in range(5)]), 5, eval_batches)
    evals = [m for m in transport.sent if m.kind == "eval"]
    assert [m.meta.get("snapshot") for m in evals] == [None, None, 2, 2, 4, 4]
    assert [bool(m.meta.get("last")) for m in evals] == [False, True] * 3
    live = {k: v.clone() for k, v in worker.block.state_dict().items()}
    with torch.no_grad():
        for states, sent in ((live, evals[0:2]), (worker.snapshots.taken[2][1], evals[2:4]),
                             (worker.snapshots.taken[4][1], evals[4:6])):
            worker.block.load_state_dict(states)
            for (x, _), msg in zip(eval_batches, sent):
                torch.testing.assert_close(msg.tensors[0], worker.block(x))
    assert not torch.equal(live["0.weight"], worker.snapshots.taken[4][1]["0.weight"]), "step 5 trained on"


def test_time_budget_stops_training_early(tmp_path: Path) -> None:
    worker, transport = first_stage(tmp_path, time_budget=0.1, slow_stage={0: 0.03})
    stop_when_finishing(worker, transport)
    worker.run_first(iter([batch() for _ in range(50)]), 50, [batch()])
    assert 1 <= worker.stats.steps <= 6
    assert [m.kind for m in transport.sent][-2:] == ["eval", "stop"]


def test_fast_adam_takes_the_same_step_as_adam() -> None:
    a, b = nn.Linear(5, 3), nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opts = [fast_adam(a.parameters(), 0.01), torch.optim.Adam(b.parameters(), lr=0.01)]
    x = torch.randn(8, 5)
    for _ in range(3):
        for model, opt in zip((a, b), opts):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(a.weight, b.weight)


def test_a_gradient_for_the_wrong_step_is_rejected_and_counted(tmp_path: Path) -> None:
    worker, transport = first_stage(tmp_path, mode="backprop")
    transport.inbox["backward"] = [grad(5), grad(0)]  # a step from the future, then the one awaited
    stop_when_finishing(worker, transport)
    worker.run_first(iter([batch()]), 1, [batch()])
    assert worker.stats.steps == 1 and worker.stats.rejected_steps == 1

    worker, transport = first_stage(tmp_path / "dni")
    transport.inbox["backward"] = [grad(3)]  # dni, during step 0
    stop_when_finishing(worker, transport)
    worker.run_first(iter([batch()]), 1, [batch()])
    assert worker.stats.rejected_steps == 1 and worker.stats.dropped_targets == 0 and worker.stats.max_staleness == 0


def test_activations_out_of_step_order_are_rejected(tmp_path: Path) -> None:
    config = PipelineConfig(stages=2, mode="dni", run_dir=str(tmp_path), log_every=1000)
    transport = ScriptedTransport(1, 2)
    block = nn.Linear(4, 3)
    task = PipelineTask(name="test", blocks=[block], loss_fn=F.cross_entropy, input_shape=(4,), num_classes=3,
                        data=lambda: (iter([]), 0, [], "none"))
    worker = StageWorker(1, 2, block, transport, config, torch.device("cpu"), task, None,
                         JsonLines(tmp_path / "m.jsonl"), JsonLines(tmp_path / "e.jsonl"))
    transport.inbox["forward"] = [Message("act", step, 0, list(batch())) for step in (0, 0, 1, 0)]
    transport.inbox["forward"].append(Message("stop", 2, 0))
    worker.run_next()
    assert worker.stats.steps == 2 and worker.stats.rejected_steps == 2
    assert [m.step for m in transport.sent if m.kind == "grad"] == [0, 1]
