"""Synthetic-gradient (SG) modules: predict dLoss/dh from an activation h."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "synthetic_gradient",
    "DNINetwork",
    "LinearDNI",
    "LowRankDNI",
    "LinearSigmoidDNI",
    "LinearBatchNormDNI",
    "Conv2dDNI",
    "RNNDNI",
    "SoftmaxDNI",
]


def _zero_output_layer(module: nn.Module) -> None:
    """Zero the parameters of the last layer (in registration order) that has parameters of its own."""
    layers = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    if layers:
        with torch.no_grad():
            for param in layers[-1].parameters(recurse=False):
                param.zero_()


def _zeroing_init(init: Any) -> Any:
    """Wrap a ``DNINetwork`` subclass's ``__init__``: once the outermost ``__init__`` is done, zero the output layer
    (see :attr:`DNINetwork.zero_init_output`)."""
    @functools.wraps(init)
    def wrapped(self: DNINetwork, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self).__init__ is wrapped and type(self).zero_init_output:
            _zero_output_layer(self)

    return wrapped


def _check_sizes(input_size: int, hidden_size: int, output_size: int, context_size: int) -> None:
    for name, value, low in (
        ("input_size", input_size, 1),
        ("hidden_size", hidden_size, 1),
        ("output_size", output_size, 1),
        ("context_size", context_size, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class DNINetwork(nn.Module):
    """Base class of every SG module; subclass it to write your own.

    An SG module maps an activation ``h`` (the output of the unit it serves) to
    a prediction of ``dLoss/dh`` with exactly the shape of ``h``. Subclasses
    implement ``forward(input, hidden=None, context=None) -> (output, hidden)``;
    ``hidden`` is recurrent state for SG modules that keep one (``None``
    otherwise) and ``context`` is an optional conditioning tensor (cDNI), shape
    ``(batch, context_size)``, or one per position, ``(*input.shape[:-1], context_size)``
    (``LinearDNI`` also takes class ids there, shape ``input.shape[:-1]``). A
    subclass written for the seed project, whose ``forward(input, hidden)``
    takes no context, works as long as it is used without context.

    Args:
        input_size: features (or channels) of the activation.
        hidden_size: width of the SG's hidden layers.
        output_size: features (or channels) of the predicted gradient; equal
            to ``input_size`` for every built-in kind.
        **kwargs: kind-specific options; ``context_size`` (default 0) is
            understood by every built-in kind.
    """

    zero_init_output = True
    """After construction, zero the last layer that has parameters (weights and biases), so that the SG predicts
    exactly 0 until it has learned something: a randomly initialised output layer injects large, biased synthetic
    gradients from the first step. This holds for every subclass, a user's included (the base class wraps each
    subclass's ``__init__``); set it to False in a subclass to keep that subclass's own initialisation."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _zeroing_init(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(self, input_size: int, hidden_size: int, output_size: int, **kwargs: Any) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.context_size = int(kwargs.get("context_size", 0))

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hidden: Any = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def _with_context(self, input: torch.Tensor, context: torch.Tensor | None, dim: int) -> torch.Tensor:
        """Concatenate ``context`` (batch, C) to ``input`` along ``dim``, broadcast over the other dims."""
        if self.context_size == 0:
            if context is not None:
                raise ValueError(f"{type(self).__name__} was built with context_size=0 but got a context")
            return input
        if context is None:
            raise ValueError(f"{type(self).__name__} was built with context_size={self.context_size} "
                             "but got no context")
        dim = dim % input.dim()
        if dim == input.dim() - 1 and context.shape == (*input.shape[:-1], self.context_size):
            return torch.cat([input, context.to(input.dtype)], dim=-1)  # one context per position
        if context.shape != (input.shape[0], self.context_size):
            raise ValueError(f"context must have shape ({input.shape[0]}, {self.context_size}) or "
                             f"{(*input.shape[:-1], self.context_size)}, got {tuple(context.shape)}")
        view = [input.shape[0]] + [1] * (input.dim() - 1)
        view[dim] = self.context_size
        expand = list(input.shape)
        expand[dim] = self.context_size
        ctx = context.to(input.dtype).view(view).expand(expand)
        return torch.cat([input, ctx], dim=dim)


def synthetic_gradient(sg: nn.Module, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """``sg``'s prediction for activation ``h`` (conditioned on ``context`` when given).

    The context is passed only when there is one, so SG modules written for the
    seed project, whose ``forward(input, hidden)`` takes no context, still work.
    """
    out, _ = sg(h, None) if context is None else sg(h, None, context=context)
    return out  # type: ignore[no-any-return]


class LinearDNI(DNINetwork):
    """``Linear -> ReLU`` x ``num_layers`` -> ``Linear`` over the last dimension.

    ``num_layers=0`` (the default) is a purely linear SG, W x W: on the MNIST
    MLP it reached 0.918 test accuracy after one epoch where one hidden layer
    of 10 (W -> 10 -> W) reached 0.808 and one of 256 reached 0.828 (README,
    Results). With ``num_layers >= 1`` a narrow ``hidden_size`` makes a cheap
    low-rank SG.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 0,
                 context_size: int = 0, bias: bool = True, **kwargs: Any) -> None:
        super().__init__(input_size, hidden_size, output_size, context_size=context_size)
        _check_sizes(input_size, hidden_size, output_size, context_size)
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.num_layers = num_layers
        width = input_size + context_size
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += self._block(width, hidden_size, bias)
            width = hidden_size
        self.hidden = nn.Sequential(*layers)
        self.final = nn.Linear(width, output_size, bias=bias)

    def _block(self, width: int, hidden_size: int, bias: bool) -> list[nn.Module]:
        return [nn.Linear(width, hidden_size, bias=bias), nn.ReLU()]

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hidden: Any = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        if context is not None and self.context_size and not context.is_floating_point():
            return self._forward_class_context(input, context), hidden
        x = self._with_context(input, context, dim=-1)
        return self.final(self.hidden(x)), hidden

    def _forward_class_context(self, input: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Context given as class ids (shape ``input.shape[:-1]``): exactly the one-hot context, computed by
        indexing the first layer's context columns instead of multiplying by a (possibly huge) one-hot."""
        if classes.shape != input.shape[:-1]:
            raise ValueError(f"class-id context must have shape {tuple(input.shape[:-1])}, got {tuple(classes.shape)}")
        layers = [*self.hidden, self.final]
        first = layers[0]
        assert isinstance(first, nn.Linear)
        w_in, w_ctx = first.weight[:, :self.input_size], first.weight[:, self.input_size:]
        x = F.linear(input, w_in, first.bias) + F.embedding(classes, w_ctx.t())
        for layer in layers[1:]:
            x = layer(x)
        return x


class LowRankDNI(LinearDNI):
    """A linear SG of rank ``hidden_size``: ``Linear(W -> r)`` then ``Linear(r -> W)``, no nonlinearity.

    It costs ``2 W r`` multiply-adds per example instead of the full linear
    SG's ``W^2`` (``r = 64`` of ``W = 1024``: 1/8), which is what the SG adds
    to a DNI stage's step.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(input_size, hidden_size, output_size, num_layers, **kwargs)

    def _block(self, width: int, hidden_size: int, bias: bool) -> list[nn.Module]:
        return [nn.Linear(width, hidden_size, bias=False)]


class LinearSigmoidDNI(LinearDNI):
    """A linear SG followed by a pointwise sigmoid, for log-loss (the paper's suggestion).

    A sigmoid lies in (0, 1) but a gradient may have either sign, so the
    output is ``scale * (2 * sigmoid(z) - 1)``: zero when ``z`` is zero (the
    zero-initialised last layer keeps the first prediction exactly 0) and
    bounded by ``scale`` in magnitude. ``scale`` (default 1.0) must cover the
    targets' range: with a mean-reduced loss the raw gradient is O(1/batch),
    so either lower it or let the wrapper regress batch-scaled targets.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 0,
                 context_size: int = 0, bias: bool = True, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(input_size, hidden_size, output_size, num_layers, context_size, bias)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = scale

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hidden: Any = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        z, hidden = super().forward(input, hidden, context)
        return self.scale * (2.0 * torch.sigmoid(z) - 1.0), hidden


class LinearBatchNormDNI(LinearDNI):
    """``Linear -> BatchNorm1d -> ReLU`` x ``num_layers`` (default 1) -> ``Linear``; (batch, features) input."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(input_size, hidden_size, output_size, num_layers, **kwargs)

    def _block(self, width: int, hidden_size: int, bias: bool) -> list[nn.Module]:
        return [nn.Linear(width, hidden_size, bias=bias), nn.BatchNorm1d(hidden_size), nn.ReLU()]

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hidden: Any = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        if input.dim() != 2:
            raise ValueError(f"LinearBatchNormDNI takes (batch, features) input, got {tuple(input.shape)}")
        return super().forward(input, hidden, context)


class Conv2dDNI(DNINetwork):
    """Resolution-preserving ``Conv2d -> BatchNorm2d -> ReLU`` x ``num_layers`` -> ``Conv2d``.

    Every convolution is stride 1 with ``padding = kernel_size // 2`` (odd
    kernels only), so the output has exactly the shape of the feature map
    ``(batch, input_size, H, W)`` it is given. Context is broadcast over H, W
    and concatenated as extra input channels.
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1,
                 kernel_size: int = 3, context_size: int = 0, **kwargs: Any) -> None:
        super().__init__(input_size, hidden_size, output_size, context_size=context_size)
        _check_sizes(input_size, hidden_size, output_size, context_size)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 to preserve resolution, got {kernel_size}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.num_layers = num_layers
        pad = kernel_size // 2
        width = input_size + context_size
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.Conv2d(width, hidden_size, kernel_size, padding=pad),
                       nn.BatchNorm2d(hidden_size), nn.ReLU()]
            width = hidden_size
        self.hidden = nn.Sequential(*layers)
        self.final = nn.Conv2d(width, output_size, kernel_size, padding=pad)

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hidden: Any = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        if input.dim() != 4:
            raise ValueError(f"Conv2dDNI takes (batch, channels, H, W) input, got {tuple(input.shape)}")
        x = self._with_context(input, context, dim=1)
        return self.final(self.hidden(x)), hidden


class RNNDNI(DNINetwork):
    """A recurrent SG over a sequence activation: ``LSTM``/``GRU``/``RNN`` then a per-step ``Linear``.

    Input is ``(batch, time, input_size)`` (``batch_first=True``, default) or
    ``(time, batch, input_size)``; the output has the same shape. ``hidden`` is
    the recurrent state, returned so that a caller can carry it across chunks.
    """

    _CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

    def __init__(self, input_size: int, hidden_size: int, output_size: int, num_layers: int = 1,
                 kind: str = "lstm", batch_first: bool = True, context_size: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(input_size, hidden_size, output_size, context_size=context_size)
        _check_sizes(input_size, hidden_size, output_size, context_size)
        if kind not in self._CELLS:
            raise ValueError(f"kind must be one of {sorted(self._CELLS)}, got {kind!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1 for RNNDNI, got {num_layers}")
        self.batch_first = batch_first
        self.rnn = self._CELLS[kind](input_size + context_size, hidden_size, num_layers,
                                     batch_first=batch_first)
        self.final = nn.Linear(hidden_size, output_size)

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hidden: Any = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        if input.dim() != 3:
            raise ValueError(f"RNNDNI takes a (batch, time, features) sequence, got {tuple(input.shape)}")
        if self.context_size and context is not None and not self.batch_first:
            # context is (batch, C): align it with the time-major layout.
            x = self._with_context(input.transpose(0, 1), context, dim=-1).transpose(0, 1)
        else:
            x = self._with_context(input, context, dim=-1)
        out, hidden = self.rnn(x, hidden)
        return self.final(out), hidden


class SoftmaxDNI(DNINetwork):
    """The gradient of a linear softmax classifier's loss on ``h``: ``(softmax(W h + b) - onehot(y)) W``.

    An SG shaped like the gradient it predicts: where the network ends in a
    softmax classifier, dL/dh at a hidden layer is largely of this form, and
    ``W``, ``b`` (``hidden_size`` classes x the flattened features) are learned
    by regression on the returned gradients like any SG. The output is the
    batch-scaled prediction ``B * dL/dh`` of a mean loss over ``B`` examples
    (divide by ``B`` for the gradient itself). ``y``: the labels as context
    (cDNI; one-hot ``(batch, classes)`` floats or class ids ``(batch,)``), or,
    without context (DNI), the head's own prediction ``argmax(W h + b)``. ``W``
    and ``b`` start at zero, so the first prediction is exactly 0.

    Args:
        input_size: features of the activation, flattened after the batch dimension (``C * H * W`` for feature
            maps).
        hidden_size: number of classes of the head.
        output_size: must equal ``input_size``.
        context_size: 0 (labels from the head's own prediction) or ``hidden_size`` (labels as context).
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, context_size: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(input_size, hidden_size, output_size, context_size=context_size)
        _check_sizes(input_size, hidden_size, output_size, context_size)
        if output_size != input_size:
            raise ValueError(f"SoftmaxDNI predicts a gradient of its input's shape: output_size must be input_size "
                             f"({input_size}), got {output_size}")
        if context_size not in (0, hidden_size):
            raise ValueError(f"SoftmaxDNI's context is the one-hot label: context_size must be 0 or hidden_size "
                             f"({hidden_size} classes), got {context_size}")
        self.head = nn.Linear(input_size, hidden_size)

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, hidden: Any = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        flat = input.flatten(1)
        if flat.shape[1] != self.input_size:
            raise ValueError(f"SoftmaxDNI was built for {self.input_size} features, got an activation of shape "
                             f"{tuple(input.shape)}")
        logits = self.head(flat)
        return ((logits.softmax(-1) - self._labels(logits, context)) @ self.head.weight).view_as(input), hidden

    def _labels(self, logits: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """One-hot labels: the context's, or the head's argmax without one."""
        classes = self.hidden_size
        if context is None:
            if self.context_size:
                raise ValueError(f"SoftmaxDNI was built with context_size={self.context_size} but got no context")
            return F.one_hot(logits.argmax(-1), classes).to(logits.dtype)
        if not self.context_size:
            raise ValueError("SoftmaxDNI was built with context_size=0 but got a context")
        if not context.is_floating_point() and context.shape == logits.shape[:1]:
            return F.one_hot(context.long(), classes).to(logits.dtype)
        if context.shape != logits.shape:
            raise ValueError(f"context must be class ids of shape ({logits.shape[0]},) or one-hot of shape "
                             f"{tuple(logits.shape)}, got {tuple(context.shape)}")
        return context.to(logits.dtype)

