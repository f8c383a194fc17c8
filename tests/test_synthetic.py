"""SG modules: shapes, zero initialisation, context, custom subclasses, learning a gradient field."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni_async import RNNDNI, Conv2dDNI, DNINetwork, LinearBatchNormDNI, LinearDNI, LinearSigmoidDNI, SoftmaxDNI

# (kind, constructor kwargs, activation shape)
KINDS = [
    (LinearDNI, {}, (8, 16)),
    (LinearDNI, {"num_layers": 2}, (8, 5, 16)),
    (LinearSigmoidDNI, {"num_layers": 1}, (8, 16)),
    (LinearBatchNormDNI, {}, (8, 16)),
    (Conv2dDNI, {}, (4, 16, 7, 5)),
    (Conv2dDNI, {"num_layers": 2, "kernel_size": 5}, (4, 16, 9, 9)),
    (RNNDNI, {"kind": "lstm"}, (4, 6, 16)),
    (RNNDNI, {"kind": "gru", "batch_first": False}, (6, 4, 16)),
    (RNNDNI, {"kind": "rnn", "num_layers": 2}, (4, 6, 16)),
]


def _batch(kind: type, shape: tuple[int, ...]) -> int:
    return shape[1] if kind is RNNDNI and len(shape) == 3 and shape[0] == 6 else shape[0]


@pytest.mark.parametrize("kind,kwargs,shape", KINDS)
@pytest.mark.parametrize("context_size", [0, 3])
def test_shape_and_zero_init(kind: type, kwargs: dict, shape: tuple[int, ...], context_size: int) -> None:
    sg = kind(16, 12, 16, context_size=context_size, **kwargs)
    h = torch.randn(shape)
    ctx = F.one_hot(torch.arange(_batch(kind, shape)) % 3, 3).float() if context_size else None
    out, _ = sg(h, None, context=ctx)
    assert out.shape == h.shape
    assert torch.count_nonzero(out) == 0, "the zero-initialised last layer must give an exactly zero SG"
    # after a perturbation of the last layer the output depends on the input
    with torch.no_grad():
        for p in sg.final.parameters():
            p.normal_()
    out2, _ = sg(h, None, context=ctx)
    assert torch.count_nonzero(out2) > 0


def test_context_is_used() -> None:
    sg = LinearDNI(4, 8, 4, context_size=2)
    nn.init.normal_(sg.final.weight)
    h = torch.randn(3, 4)
    a, _ = sg(h, None, context=torch.tensor([[1.0, 0.0]] * 3))
    b, _ = sg(h, None, context=torch.tensor([[0.0, 1.0]] * 3))
    assert not torch.allclose(a, b)


def test_context_errors() -> None:
    with pytest.raises(ValueError, match="context_size=0"):
        LinearDNI(4, 8, 4)(torch.randn(2, 4), None, context=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="got no context"):
        LinearDNI(4, 8, 4, context_size=3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        LinearDNI(4, 8, 4, context_size=3)(torch.randn(2, 4), None, context=torch.zeros(2, 4))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="odd"):
        Conv2dDNI(4, 8, 4, kernel_size=4)
    with pytest.raises(ValueError, match="kind"):
        RNNDNI(4, 8, 4, kind="transformer")
    with pytest.raises(ValueError, match="input_size"):
        LinearDNI(0, 8, 4)
    with pytest.raises(ValueError, match="4-D|channels"):
        Conv2dDNI(4, 8, 4)(torch.randn(2, 4))


def test_custom_subclass() -> None:
    class Scaled(DNINetwork):
        zero_init_output = False  # opted out: its own initialisation stands

        def __init__(self, input_size: int, hidden_size: int, output_size: int, **kwargs: object) -> None:
            super().__init__(input_size, hidden_size, output_size)
            self.w = nn.Parameter(torch.full((output_size,), 2.0))

        def forward(self, input: torch.Tensor, hidden: object = None) -> tuple[torch.Tensor, object]:
            return input * self.w, hidden

    sg = Scaled(5, 3, 5)
    h = torch.randn(2, 5)
    out, hidden = sg(h)
    torch.testing.assert_close(out, 2 * h)
    assert hidden is None and sg.input_size == 5 and sg.output_size == 5


def test_a_users_subclass_starts_at_zero_and_only_its_output_layer_is_zeroed() -> None:
    """The seed README's MyCustomDNI shape: hidden layers registered first, the output layer last."""
    class Mine(DNINetwork):
        def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
            super().__init__(input_size, hidden_size, output_size)
            self.layer0 = nn.Linear(input_size, hidden_size)
            self.final = nn.Linear(hidden_size, output_size)

        def forward(self, input: torch.Tensor, hidden: object = None) -> tuple[torch.Tensor, object]:
            return self.final(F.relu(self.layer0(input))), hidden

    class Deeper(LinearDNI):  # a built-in kind with one more layer after its own output layer
        def __init__(self, input_size: int, hidden_size: int, output_size: int) -> None:
            super().__init__(input_size, hidden_size, output_size)
            self.post = nn.Linear(output_size, output_size)

    mine = Mine(6, 4, 6)
    assert torch.count_nonzero(mine(torch.randn(3, 6))[0]) == 0
    assert torch.count_nonzero(mine.layer0.weight) == 24, "hidden layers keep their initialisation"
    deeper = Deeper(6, 4, 6)
    assert torch.count_nonzero(deeper.post.weight) == 0 and torch.count_nonzero(deeper.final.weight) == 36


@pytest.mark.parametrize("num_layers", [0, 1])
def test_learns_a_linear_gradient_field(num_layers: int) -> None:
    """Targets g = h A + b: the SG's regression loss must fall by orders of magnitude."""
    a, b = torch.randn(8, 8) * 0.5, torch.randn(8) * 0.1
    sg = LinearDNI(8, 32, 8, num_layers=num_layers)
    opt = torch.optim.Adam(sg.parameters(), lr=0.01)

    def loss_on(h: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(sg(h)[0], h @ a + b)

    probe = torch.randn(256, 8)
    with torch.no_grad():
        before = loss_on(probe).item()
    for _ in range(600):
        opt.zero_grad()
        loss_on(torch.randn(64, 8)).backward()
        opt.step()
    with torch.no_grad():
        after = loss_on(probe).item()
    assert after < 0.01 * before, (before, after)


def test_sigmoid_bounded_by_scale() -> None:
    sg = LinearSigmoidDNI(4, 8, 4, scale=0.5)
    nn.init.constant_(sg.final.weight, 100.0)
    out, _ = sg(torch.randn(16, 4) * 10)
    assert out.abs().max() <= 0.5


def test_softmax_sg_is_the_gradient_of_a_linear_softmax_head() -> None:
    """ĝ = (softmax(W h + b) - onehot(y)) W, per example: B times the gradient of the head's mean loss."""
    sg = SoftmaxDNI(6, 4, 6, context_size=4)
    assert torch.count_nonzero(sg(torch.randn(5, 6), None, context=torch.zeros(5, dtype=torch.long))[0]) == 0
    with torch.no_grad():
        for p in sg.parameters():
            p.normal_()
    w, b = sg.head.weight, sg.head.bias
    h, y = torch.randn(5, 6), torch.tensor([0, 3, 1, 1, 2])
    by_hand = (torch.softmax(h @ w.T + b, -1) - F.one_hot(y, 4)) @ w
    torch.testing.assert_close(sg(h, None, context=y)[0], by_hand)
    torch.testing.assert_close(sg(h, None, context=F.one_hot(y, 4).float())[0], by_hand)
    leaf = h.clone().requires_grad_()
    F.cross_entropy(F.linear(leaf, w, b), y).backward()
    torch.testing.assert_close(sg(h, None, context=y)[0], leaf.grad * 5)
    # without labels (DNI) the head's own prediction stands in for them
    plain = SoftmaxDNI(6, 4, 6)
    plain.load_state_dict(sg.state_dict())
    own = (h @ w.T + b).argmax(-1)
    torch.testing.assert_close(plain(h)[0], (torch.softmax(h @ w.T + b, -1) - F.one_hot(own, 4)) @ w)
    maps = SoftmaxDNI(2 * 3 * 3, 4, 2 * 3 * 3, context_size=4)
    assert maps(torch.randn(5, 2, 3, 3), None, context=y)[0].shape == (5, 2, 3, 3)


def test_softmax_sg_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="output_size must be input_size"):
        SoftmaxDNI(6, 4, 5)
    with pytest.raises(ValueError, match="context_size must be 0 or hidden_size"):
        SoftmaxDNI(6, 4, 6, context_size=3)
    with pytest.raises(ValueError, match="built for 6 features"):
        SoftmaxDNI(6, 4, 6)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="got no context"):
        SoftmaxDNI(6, 4, 6, context_size=4)(torch.randn(2, 6))
