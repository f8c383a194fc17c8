"""The in-process DNI wrapper: λ semantics, update unlocking, bootstrapping, context, state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni_async import DNI, LinearDNI, SoftmaxDNI


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it applied at each step."""

    def __init__(self, params: list[nn.Parameter], lr: float = 0.1) -> None:
        super().__init__(params, lr=lr)
        self.applied: list[list[torch.Tensor | None]] = []

    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        self.applied.append([None if p.grad is None else p.grad.clone()
                             for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def randomize_sgs(net: DNI, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in net.synthetic.parameters():
            p.normal_(std=scale)


def test_units_and_output_unit() -> None:
    net = DNI(mlp())
    assert net.units == ["0", "1", "3", "5"]
    assert net.output_unit == "5"
    assert sorted(net.synthetic.keys()) == ["0", "1", "3"], "the output unit needs no SG"
    assert all(isinstance(sg, LinearDNI) for sg in net.synthetic.values())
    single = DNI(nn.Linear(4, 4), recursive=False)
    assert single.units == [""] and single.output_unit is None and list(single.synthetic) == ["network"]


def test_lambda_one_equals_backprop() -> None:
    model = mlp()
    reference = copy.deepcopy(model)
    ref_opt = RecordingSGD(list(reference.parameters()))
    net = DNI(model, λ=1.0, optim=lambda ps: RecordingSGD(ps))
    randomize_sgs(net)  # a non-zero SG must still have no effect at λ = 1
    for _ in range(3):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        F.cross_entropy(net(x), y).backward()
        ref_opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    names = [n for n, _ in reference.named_parameters()]
    got = {}
    for unit in net.units:
        opt = net.unit_optimizer(unit)
        assert len(opt.applied) == 3
        unit_names = [f"{unit}.{n}" for n, _ in model.get_submodule(unit).named_parameters()]
        got.update(zip(unit_names, opt.applied[-1]))
    assert sorted(got) == sorted(names)
    ref_grads = dict(zip(names, ref_opt.applied[-1]))
    for name in names:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_lambda_half_mixes_true_and_synthetic() -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    reference = copy.deepcopy(model)
    net = DNI(model, λ=0.5, optim=lambda ps: RecordingSGD(ps))
    randomize_sgs(net)
    sg = copy.deepcopy(net.synthetic["0"])
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    F.mse_loss(net(x), y).backward()
    # by hand: true gradient from plain backprop, synthetic from SG(h)/B pushed through unit 0
    F.mse_loss(reference(x), y).backward()
    h = reference[0](x)
    g_hat = sg(h.detach())[0] / x.shape[0]
    synthetic = torch.autograd.grad(h, list(reference[0].parameters()), g_hat)
    applied = net.unit_optimizer("0").applied[-1]
    for got, true, synth in zip(applied, [p.grad for p in reference[0].parameters()], synthetic):
        torch.testing.assert_close(got, 0.5 * true + 0.5 * synth)
    # the output unit gets its true gradient only
    for got, p in zip(net.unit_optimizer("2").applied[-1], reference[2].parameters()):
        torch.testing.assert_close(got, p.grad)


def test_lambda_zero_updates_during_forward() -> None:
    model = mlp()
    net = DNI(model, λ=0.0)
    randomize_sgs(net)
    first_before = model[0].weight.detach().clone()
    output_before = model[5].weight.detach().clone()
    seen_by_next_unit = []
    model[1].register_forward_pre_hook(
        lambda m, inp: seen_by_next_unit.append(not torch.equal(model[0].weight, first_before)))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    out = net(x)
    # no loss exists yet, and unit 0 has already been updated, before unit 1 ran
    assert seen_by_next_unit == [True]
    assert not torch.equal(model[0].weight, first_before)
    assert torch.equal(model[5].weight, output_before), "the output unit waits for its true gradient"
    F.cross_entropy(out, y).backward()
    assert not torch.equal(model[5].weight, output_before)
    assert all(p.grad is None for p in model.parameters()), "unit optimizers clear what they applied"


def test_no_training_in_eval_or_no_grad() -> None:
    model = mlp()
    net = DNI(model, λ=0.0)
    randomize_sgs(net)
    before = copy.deepcopy(dict(model.named_parameters()))
    with torch.no_grad():
        net(torch.randn(4, 6))
    net.eval()
    net(torch.randn(4, 6))
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, before[k], msg=k)


def test_bootstrapped_target_hand_computed() -> None:
    """Unit 1's SG target is unit 2's synthetic gradient carried back through unit 2."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 3))
    lr = 0.1
    net = DNI(model, λ=0.0, grad_optim=lambda ps: torch.optim.SGD(ps, lr=lr),
              optim=lambda ps: torch.optim.SGD(ps, lr=0.05))
    with torch.no_grad():  # SG of unit 2 predicts a non-trivial gradient
        net.synthetic["1"].final.weight.normal_()
        net.synthetic["1"].final.bias.normal_()
    w1, b1, w2, b2, w3, b3 = (p.detach().clone() for p in model.parameters())
    sg2_w = net.synthetic["1"].final.weight.detach().clone()
    sg2_b = net.synthetic["1"].final.bias.detach().clone()
    x = torch.randn(8, 4)
    batch = x.shape[0]

    def expected_sg_step(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, target: torch.Tensor):
        # one SGD step on mse(h W^T + b, B * target), by hand
        d_pred = 2.0 * (h @ w.T + b - batch * target) / target.numel()
        return w - lr * d_pred.T @ h, b - lr * d_pred.sum(0)

    h1 = x @ w1.T + b1
    h2 = h1 @ w2.T + b2                       # unit 2 with its weights before its own update
    g2_hat = (h2 @ sg2_w.T + sg2_b) / batch   # unit 2's synthetic gradient (batch-scaled SG)
    target1 = g2_hat @ w2                     # ... carried back through unit 2
    exp_w, exp_b = expected_sg_step(h1, torch.zeros(5, 5), torch.zeros(5), target1)

    out = net(x)
    torch.testing.assert_close(net.synthetic["0"].final.weight, exp_w)
    torch.testing.assert_close(net.synthetic["0"].final.bias, exp_b)

    # unit 2's target comes from the real loss, through the output unit (its weights before the step)
    y = torch.randn(8, 3)
    F.mse_loss(out, y).backward()
    # (unit 2's activation h2 is the one computed in the forward, before any update)
    d_out = 2.0 * (h2 @ w3.T + b3 - y) / y.numel()
    exp_w2, exp_b2 = expected_sg_step(h2, sg2_w, sg2_b, d_out @ w3)
    torch.testing.assert_close(net.synthetic["1"].final.weight, exp_w2)
    torch.testing.assert_close(net.synthetic["1"].final.bias, exp_b2)
    assert not torch.equal(model[1].weight.detach(), w2), "unit 2 was updated by its synthetic gradient"


def test_cdni_context() -> None:
    model = mlp()
    net = DNI(model, λ=0.0, context_size=3)
    with pytest.raises(RuntimeError, match="set_context"):
        net(torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        net.set_context(torch.tensor([0, 5, 1, 2]))
    y = torch.randint(0, 3, (16,))
    for _ in range(5):  # targets of lower units become non-zero one step after the SG above them
        net.set_context(y)
        F.cross_entropy(net(torch.randn(16, 6)), y).backward()
    # the context columns of every SG received gradient: the labels reached the SGs
    for key, sg in net.synthetic.items():
        assert torch.count_nonzero(sg.final.weight[:, -3:]) > 0, key
    with pytest.raises(ValueError, match="context_size=0"):
        DNI(mlp()).set_context(y)


def test_softmax_sgs_in_the_wrapper_learn_to_predict_and_train_the_network() -> None:
    """cDNI with SoftmaxDNI for every unit (the head's classes = the labels): the update-unlocked network learns a
    teacher task (0.92-0.95 in seeds 0-2; with its hidden units frozen, only the output layer learning, 0.57-0.67)."""
    torch.manual_seed(0)
    teacher = torch.randn(6, 3)
    model = mlp()
    net = DNI(model, dni_network=SoftmaxDNI, hidden_size=3, context_size=3, λ=0.0, grad_lr=1e-2,
              optim=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert all(isinstance(sg, SoftmaxDNI) for sg in net.synthetic.values())
    for _ in range(150):
        x = torch.randn(64, 6)
        y = (x @ teacher).argmax(-1)
        net.set_context(y)
        F.cross_entropy(net(x), y).backward()
    x = torch.randn(1000, 6)
    model.eval()
    accuracy = float((model(x).argmax(-1) == (x @ teacher).argmax(-1)).float().mean())
    assert accuracy > 0.85, accuracy
    assert all(torch.count_nonzero(sg.head.weight) for sg in net.synthetic.values())


def test_output_unit_must_run_last() -> None:
    class Reordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)
            self.body = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.body(x)))

    with pytest.raises(RuntimeError, match="output_unit="):
        DNI(Reordered(), λ=0.0)(torch.randn(2, 3))
    net = DNI(Reordered(), λ=0.0, output_unit="head")
    F.mse_loss(net(torch.randn(2, 3)), torch.zeros(2, 2)).backward()
    with pytest.raises(ValueError, match="not a wrapped unit"):
        DNI(Reordered(), output_unit="tail")


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="λ"):
        DNI(mlp(), λ=1.5)
    with pytest.raises(TypeError, match="instance"):
        DNI(mlp(), optim=torch.optim.SGD(mlp().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="unknown optimizer"):
        DNI(mlp(), grad_optim="lbfgs-ish")
    with pytest.raises(ValueError, match="no module with trainable parameters"):
        DNI(nn.ReLU())
    assert DNI(mlp(), lambda_=0.25).lambda_ == 0.25


def test_state_dict_round_trip_and_stable_names() -> None:
    model = mlp()
    net = DNI(model, λ=0.0)
    for _ in range(2):
        F.cross_entropy(net(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    state = net.state_dict()
    assert "synthetic.0.final.weight" in state and "network.0.weight" in state
    assert not any(str(id(m)) in k for k in state for m in model.modules())
    other = DNI(mlp(), λ=0.0)
    other.load_state_dict(state)
    other.load_optimizer_state_dict(net.optimizer_state_dict())
    x = torch.randn(5, 6)
    net.eval(), other.eval()
    torch.testing.assert_close(other(x), net(x))
    h = torch.randn(5, 8)
    torch.testing.assert_close(other.synthetic["0"](h)[0], net.synthetic["0"](h)[0])
    # identical states train identically
    net.train(), other.train()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for n in (net, other):
        F.cross_entropy(n(x), y).backward()
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_to_moves_optimizer_state() -> None:
    net = DNI(mlp(), λ=0.0)
    F.cross_entropy(net(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    net.double()
    opt = net.unit_optimizer("0")
    assert all(s["exp_avg"].dtype == torch.float64 for s in opt.state.values())
    x = torch.randn(8, 6, dtype=torch.float64)
    F.cross_entropy(net(x), torch.randint(0, 3, (8,))).backward()


def test_lazy_sg_for_unknown_module() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    model = nn.Sequential(Scale(), nn.Linear(5, 2))
    net = DNI(model, λ=0.0)
    assert "0" not in net.synthetic
    F.mse_loss(net(torch.randn(3, 5)), torch.zeros(3, 2)).backward()
    assert net.synthetic["0"].input_size == 5


def test_inplace_op_after_unit() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    net = DNI(model, λ=0.0)
    randomize_sgs(net)
    F.mse_loss(net(torch.randn(3, 4)), torch.zeros(3, 2)).backward()
    assert set(net.sg_losses()) == {"0"}


def test_conv_and_rnn_units_get_matching_sgs() -> None:
    from dni_async import RNNDNI, Conv2dDNI

    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    net = DNI(conv, λ=0.0)
    assert isinstance(net.synthetic["0"], Conv2dDNI)
    F.cross_entropy(net(torch.randn(2, 1, 6, 6)), torch.tensor([0, 1])).backward()

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(3, 5, batch_first=True)
            self.out = nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.rnn(x)[0])

    rnn = DNI(Seq(), λ=0.0, dni_params={"batch_first": True})
    assert isinstance(rnn.synthetic["rnn"], RNNDNI)
    F.mse_loss(rnn(torch.randn(2, 4, 3)), torch.zeros(2, 4, 2)).backward()
    assert "rnn" in rnn.sg_losses()


def test_tied_and_unwrapped_parameters() -> None:
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared by units '0' and '2'"):
        DNI(tied)
    DNI(tied, recursive=False)  # one unit holds both: fine

    class WithOwnParam(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    with pytest.warns(UserWarning, match=r"\['scale'\]"):
        DNI(WithOwnParam())
