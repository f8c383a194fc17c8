"""Truncated BPTT with a synthetic gradient at chunk boundaries (dni_async.recurrent) and SG contexts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dni_async import LinearDNI, TruncatedLSTM
from dni_async.recurrent import carried_states, load_carried_states, reset_states, sg_fit


def randomise(module: torch.nn.Module, std: float = 0.1) -> None:
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)


@pytest.mark.parametrize("scale", [1.0, 0.1])
def test_final_state_gets_the_synthetic_gradient(scale: float) -> None:
    """The LSTM's gradients equal those of loss + <scale * SG(s_T)/B, s_T> computed by hand."""
    layer = TruncatedLSTM(3, 4, temporal_sg=True, sg_scale=scale)
    assert layer.sg is not None
    randomise(layer.sg)
    x = torch.randn(2, 5, 3)
    layer(x).pow(2).sum().backward()
    lstm = copy.deepcopy(layer.lstm)
    lstm.zero_grad(set_to_none=True)
    out, (h, c) = lstm(x)
    with torch.no_grad():
        g = layer.sg(torch.cat([h, c], dim=-1))[0] * scale / 2
    (out.pow(2).sum() + (h * g[..., :4]).sum() + (c * g[..., 4:]).sum()).backward()
    for mine, theirs in zip(layer.lstm.parameters(), lstm.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_without_sg_the_state_carries_but_the_gradient_stops() -> None:
    layer = TruncatedLSTM(3, 4)
    x1, x2 = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    layer(x1)
    out = layer(x2)
    reference, _ = layer.lstm(torch.cat([x1, x2], dim=1))
    torch.testing.assert_close(out, reference[:, 3:], msg="the state must carry over between chunks")
    out.sum().backward()  # no graph into chunk 1: would raise if the state were not cut
    layer.reset_state()
    torch.testing.assert_close(layer(x2), layer.lstm(x2)[0], msg="reset starts from a zero state")


def test_sg_is_trained_toward_the_gradient_at_the_chunk_start() -> None:
    """After chunk 2's backward, SG(s_0 of chunk 2) takes one Adam step on mse(SG(s_0), B * dL/ds_0)."""
    torch.manual_seed(1)
    layer = TruncatedLSTM(3, 4, temporal_sg=True, sg_lr=0.01)
    assert layer.sg is not None
    randomise(layer.sg)
    layer(torch.randn(2, 3, 3)).sum().backward()
    layer(torch.randn(2, 3, 3)).sum().backward()
    h0, c0 = layer._pending  # type: ignore[misc]
    state = torch.cat([h0.detach(), c0.detach()], dim=-1)
    target = torch.cat([h0.grad, c0.grad], dim=-1) * 2
    reference = copy.deepcopy(layer.sg)
    opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    loss = F.mse_loss(reference(state)[0], target)
    loss.backward()
    opt.step()
    assert layer._sg_opt is None, "no SG step before a first state with a gradient"
    layer(torch.randn(2, 3, 3))  # the (first) update happens here
    for mine, theirs in zip(layer.sg.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs)
    assert all(p.grad is None for p in layer.sg.parameters()), "the model's optimizer must not see SG gradients"


def test_reset_trains_the_final_state_toward_zero_and_eval_keeps_its_own_state() -> None:
    layer = TruncatedLSTM(3, 4, temporal_sg=True, sg_lr=0.05)
    assert layer.sg is not None
    randomise(layer.sg, 0.5)
    layer(torch.randn(2, 3, 3))
    final = torch.cat(layer._states[True], dim=-1)
    before = layer.sg(final)[0].abs().mean().item()
    for _ in range(20):
        layer._states[True] = (final[..., :4], final[..., 4:])
        layer.reset_state()
    assert layer.sg(final)[0].abs().mean().item() < 0.5 * before
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 3, 3))
    assert set(layer._states) == {False}
    reset_states(torch.nn.Sequential(layer), training=False)
    assert layer._states == {}


def test_class_id_context_equals_one_hot_context() -> None:
    for num_layers in (0, 1):
        sg = LinearDNI(8, 5, 8, num_layers=num_layers, context_size=11)
        randomise(sg, 1.0)
        h, ids = torch.randn(3, 4, 8), torch.randint(0, 11, (3, 4))
        torch.testing.assert_close(sg(h, None, context=ids)[0], sg(h, None, context=F.one_hot(ids, 11).float())[0])
    with pytest.raises(ValueError, match="class-id context"):
        sg(h, None, context=ids[:, :2])


def test_per_position_context() -> None:
    sg = LinearDNI(6, 5, 6, context_size=3)
    randomise(sg, 1.0)
    h, ctx = torch.randn(2, 4, 6), torch.randn(2, 4, 3)
    expected = F.linear(torch.cat([h, ctx], dim=-1), sg.final.weight, sg.final.bias)
    torch.testing.assert_close(sg(h, None, context=ctx)[0], expected)
    with pytest.raises(ValueError, match="context must have shape"):
        sg(h, None, context=torch.randn(2, 3, 3))


def test_sg_fit_reports_how_well_the_sg_predicted_its_targets() -> None:
    """A zero-initialised SG predicts 0: cosine 0 and a relative MSE of exactly 1 on its first update."""
    layer = TruncatedLSTM(3, 4, temporal_sg=True)
    model = torch.nn.Sequential(layer)
    assert sg_fit(model) is None
    for _ in range(3):
        layer(torch.randn(2, 3, 3)).sum().backward()
    assert sg_fit(model) == {"cosine": 0.0, "relative_mse": 1.0, "updates": 1}
    assert sg_fit(model) is None, "the counts restart after each read"
    assert sg_fit(torch.nn.Sequential(TruncatedLSTM(3, 4))) is None


def test_carried_state_round_trip_continues_training_identically(tmp_path: Path) -> None:
    """State, the SG's pending update and its Adam, saved (weights_only) and loaded into a fresh layer: the
    next chunk's output, gradients and SG update are the same."""
    model = torch.nn.Sequential(TruncatedLSTM(3, 4, temporal_sg=True, sg_lr=0.01))
    randomise(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # three chunks of one sequence: the SG has an optimizer and a pending target
        model(torch.randn(2, 5, 3)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    torch.save({"weights": model.state_dict(), "carried": carried_states(model)}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    other = torch.nn.Sequential(TruncatedLSTM(3, 4, temporal_sg=True, sg_lr=0.01))
    other.load_state_dict(saved["weights"])
    load_carried_states(other, saved["carried"])
    x = torch.randn(2, 5, 3)
    outs = [m(x) for m in (model, other)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # the carried state
    for out in outs:
        out.pow(2).sum().backward()
    for a, b in zip(model.parameters(), other.parameters()):  # the pending update trained both SGs alike
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="saved recurrent state for"):
        load_carried_states(torch.nn.Sequential(torch.nn.Linear(2, 2)), saved["carried"])
