"""The stage loop without processes: every method's order of events as an exact trace, and its rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from inprocess import Scripted, batches, worker
from torch import nn

from dni_async.optim import fast_adam
from dni_async.stage import StageWorker
from dni_async.trace import Action, format_trace, parse_trace
from dni_async.transport import Message

SHAPES3 = [(6,), (6,), (3,)]


def three_blocks() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 6), nn.ReLU()), nn.Sequential(nn.Linear(6, 6), nn.ReLU()), nn.Linear(6, 3)]


def stage_of_three(tmp_path: Path, stage: int, mode: str, delay: int = 1, **overrides: object
                   ) -> tuple[StageWorker, Scripted]:
    transport = Scripted(stage, 3, delay=delay, gradients=mode != "local")
    w = worker(tmp_path, stage, 3, three_blocks(), transport, SHAPES3, mode=mode, **overrides)
    return w, transport


def run(tmp_path: Path, stage: int, mode: str, steps: int = 3, **overrides: object) -> str:
    """Stage ``stage`` of 3 trains ``steps`` steps, evaluates one batch and stops; its whole trace."""
    w, transport = stage_of_three(tmp_path, stage, mode, **overrides)
    data = batches(steps + 1)
    if stage == 0:
        w.run_first(iter(data[:steps]), steps, data[steps:])
    else:
        width = 4 if stage == 0 else 6
        for t, (_, y) in enumerate(data[:steps]):
            transport.inbox["forward"].append(Message("act", t, stage - 1, [torch.randn(5, width), y]))
        transport.inbox["forward"].append(Message("eval", 0, stage - 1, [torch.randn(5, width), data[-1][1]],
                                                  {"last": True}))
        transport.inbox["forward"].append(Message("stop", steps, stage - 1))
        w.run_next()
    return str(w.trace)


# Each step reads left to right: X input, F forward, S act sent, P SG predicted, G gradient arrived, U update,
# T SG trained, B gradient sent back, E eval batch. The scripted next stage returns the gradient of step s when
# the stage sends act(s + 1), or when the stage waits for it.
TRACES = {
    ("dni", 0): "0X0 0F0 0S0 0P0 0U0 0X1 0F1 0S1 0P1 0U1 0G0 0T0 0X2 0F2 0S2 0P2 0U2 0G1 0T1 0E0 0G2 0T2",
    ("dni", 1): "1X0 1F0 1S0 1P0 1U0 1B0 1X1 1F1 1S1 1P1 1U1 1B1 1G0 1T0 1X2 1F2 1S2 1P2 1U2 1B2 1G1 1T1 1E0 "
                "1G2 1T2",
    ("dni", 2): "2X0 2F0 2U0 2B0 2X1 2F1 2U1 2B1 2X2 2F2 2U2 2B2 2E0",
    ("backprop", 0): "0X0 0F0 0S0 0G0 0U0 0X1 0F1 0S1 0G1 0U1 0X2 0F2 0S2 0G2 0U2 0E0",
    ("backprop", 1): "1X0 1F0 1S0 1G0 1U0 1B0 1X1 1F1 1S1 1G1 1U1 1B1 1X2 1F2 1S2 1G2 1U2 1B2 1E0",
    ("delayed", 0): "0X0 0F0 0S0 0X1 0F1 0S1 0G0 0U0 0X2 0F2 0S2 0G1 0U1 0G2 0U2 0E0",
    ("delayed", 1): "1X0 1F0 1S0 1X1 1F1 1S1 1G0 1U0 1B0 1X2 1F2 1S2 1G1 1U1 1B1 1G2 1U2 1B2 1E0",
    ("local", 0): "0X0 0F0 0S0 0U0 0X1 0F1 0S1 0U1 0X2 0F2 0S2 0U2 0E0",
    ("local", 1): "1X0 1F0 1S0 1U0 1X1 1F1 1S1 1U1 1X2 1F2 1S2 1U2 1E0",
    ("local", 2): "2X0 2F0 2U0 2X1 2F1 2U1 2X2 2F2 2U2 2E0",
}


@pytest.mark.parametrize("mode,stage", sorted(TRACES))
def test_trace_of_every_method_and_stage(tmp_path: Path, mode: str, stage: int) -> None:
    assert run(tmp_path, stage, mode) == TRACES[(mode, stage)]


def test_the_last_stage_is_the_same_in_every_method_that_sends_gradients(tmp_path: Path) -> None:
    for mode in ("cdni", "backprop", "delayed"):
        assert run(tmp_path / mode, 2, mode) == TRACES[("dni", 2)]


def test_a_trace_prints_and_parses_back() -> None:
    actions = parse_trace(TRACES[("dni", 0)])
    assert actions[:2] == [Action(0, "X", 0), Action(0, "F", 0)] and format_trace(actions) == TRACES[("dni", 0)]
    with pytest.raises(ValueError, match="not an action"):
        Action.from_str("0Q3")


def test_dni_updates_before_any_gradient_and_the_window_waits(tmp_path: Path) -> None:
    """Unlocked: three updates with no gradient back; at --max-in-flight 2 the third step waits for one first."""
    w, transport = stage_of_three(tmp_path, 0, "dni", delay=3, max_in_flight=2)
    assert w.source.sg is not None
    with torch.no_grad():  # a zero-initialised SG predicts exactly 0 at first
        w.source.sg.final.weight.normal_()
    before = w.io.block[0].weight.detach().clone()
    for t, (x, y) in enumerate(batches(3)):
        w.train_step(t, x, y, {})
    assert not torch.equal(w.io.block[0].weight, before), "updated from the SG, no gradient received"
    assert w.trace.take() == "0F0 0S0 0P0 0U0 0F1 0S1 0P1 0U1 0G0 0T0 0F2 0S2 0P2 0U2"
    assert sorted(w.source.stash) == [1, 2]


def test_a_blocked_forward_send_takes_the_gradients_coming_back(tmp_path: Path) -> None:
    """The deadlock seen in 4-stage runs: stage 0 blocked sending while stage 1 blocks sending gradients."""
    for mode, taken in (("dni", "1G0 1T0 1G1 1T1"), ("delayed", "1G0 1U0 1B0 1G1 1U1 1B1")):
        w, transport = stage_of_three(tmp_path / mode, 1, mode, delay=10, max_in_flight=4)
        for t, (_, y) in enumerate(batches(3)):
            w.train_step(t, torch.randn(5, 6), y, {})
        w.trace.take()
        transport.inbox["backward"].extend(Message("grad", s, 2, [transport.owed.pop(s)]) for s in (0, 1))
        transport.blocked_sends = 1
        w.train_step(3, torch.randn(5, 6), torch.zeros(5).long(), {})
        assert w.trace.take().startswith(f"1F3 {taken} 1S3"), mode
        assert not transport.inbox["backward"]


def test_stash_drops_oldest_and_counts(tmp_path: Path) -> None:
    w, transport = stage_of_three(tmp_path, 0, "dni", delay=10, max_in_flight=0, stash_size=3)
    for t, (x, y) in enumerate(batches(5)):
        w.train_step(t, x, y, {})
    assert sorted(w.source.stash) == [2, 3, 4] and w.stats.dropped_targets == 2
    transport.inbox["backward"].append(Message("grad", 0, 1, [torch.ones(5, 6)]))
    w.source.absorb(5)
    assert w.stats.dropped_targets == 3 and w.stats.max_staleness == 5


def test_gradients_for_steps_that_cannot_be_right_are_rejected_and_counted(tmp_path: Path) -> None:
    for mode in ("backprop", "dni", "delayed"):
        w, transport = stage_of_three(tmp_path / mode, 0, mode, delay=0)
        transport.inbox["backward"].append(Message("grad", 5, 1, [torch.ones(5, 6)]))  # from the future
        w.train_step(0, *batches(1)[0], {})
        assert w.stats.rejected_steps == 1 and w.stats.steps == 1, mode
    w, transport = stage_of_three(tmp_path / "twice", 0, "delayed", delay=0)
    w.train_step(0, *batches(1)[0], {})
    transport.inbox["backward"].append(Message("grad", 0, 1, [torch.ones(5, 6)]))  # step 0 again
    w.source.absorb(1)
    assert w.stats.rejected_steps == 1


def test_activations_out_of_step_order_are_rejected(tmp_path: Path) -> None:
    w, transport = stage_of_three(tmp_path, 2, "dni")
    for step in (0, 0, 1, 0):
        transport.inbox["forward"].append(Message("act", step, 1, [torch.randn(5, 6), torch.zeros(5).long()]))
    transport.inbox["forward"].append(Message("stop", 2, 1))
    w.run_next()
    assert w.stats.steps == 2 and w.stats.rejected_steps == 2
    assert [m.step for m in transport.sent if m.kind == "grad"] == [0, 1]


def test_snapshots_are_evaluated_after_training_and_the_live_weights_come_back(tmp_path: Path) -> None:
    w, transport = stage_of_three(tmp_path, 0, "dni", snapshot_every=2)
    torch.nn.init.normal_(w.source.sg.final.weight)  # a nonzero synthetic gradient: the block changes every step
    data = batches(7)
    w.run_first(iter(data[:5]), 5, data[5:])
    evals = [m for m in transport.sent if m.kind == "eval"]
    assert [m.meta.get("snapshot") for m in evals] == [None, None, 2, 2, 4, 4]
    assert [bool(m.meta.get("last")) for m in evals] == [False, True] * 3
    block = w.io.block
    live = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        for states, sent in ((live, evals[0:2]), (w.snapshots.taken[2][1], evals[2:4]),
                             (w.snapshots.taken[4][1], evals[4:6])):
            block.load_state_dict(states)
            block.eval()
            for (x, _), msg in zip(data[5:], sent):
                torch.testing.assert_close(msg.tensors[0], block(x))
    assert not torch.equal(live["0.weight"], w.snapshots.taken[4][1]["0.weight"]), "step 5 trained on"


def test_time_budget_stops_training_early(tmp_path: Path) -> None:
    w, transport = stage_of_three(tmp_path, 0, "dni", time_budget=0.1, slow_stage={0: 0.03})
    data = batches(51)
    w.run_first(iter(data[:50]), 50, data[50:])
    assert 1 <= w.stats.steps <= 6
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
