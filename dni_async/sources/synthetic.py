"""``dni`` / ``cdni``: the stage updates at once from its SG's prediction; the gradients that return train the SG."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

from ..config import SG_KINDS
from ..optim import fast_adam
from ..synthetic import (
    Conv2dDNI,
    DNINetwork,
    LinearBatchNormDNI,
    LinearDNI,
    LinearSigmoidDNI,
    LowRankDNI,
    SoftmaxDNI,
    synthetic_gradient,
)
from ..transport import Message
from .base import GradientSource, load_trained_state, trained_state
from .io import StageIO

__all__ = ["Synthetic", "build_sg"]


def build_sg(kind: str, shape: int | tuple[int, ...], hidden: int, context_size: int, classes: int = 0) -> DNINetwork:
    """The SG module of a stage whose output has ``shape`` (per example: ``features`` or ``(C, H, W)``).

    ``softmax`` builds a :class:`SoftmaxDNI` of ``classes`` classes over the flattened output, whatever its
    shape. Otherwise feature maps get a ``Conv2dDNI`` (``linear``: one 3x3 convolution; ``mlp``: one hidden
    convolution of ``hidden`` channels) and vectors the ``kind`` asked for.

    Raises:
        ValueError: for an unknown kind, or one that has no form for ``shape``.
    """
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if kind == "softmax":
        if classes < 1:
            raise ValueError("--sg softmax needs the number of classes")
        return SoftmaxDNI(math.prod(dims), classes, math.prod(dims), context_size=context_size)
    features = dims[0] if len(dims) == 3 else dims[-1]
    if len(dims) == 3:
        if kind not in ("linear", "mlp"):
            raise ValueError(f"--sg {kind} has no convolutional form; use linear, mlp or softmax for feature maps")
        return Conv2dDNI(features, hidden, features, num_layers=0 if kind == "linear" else 1,
                         context_size=context_size)
    kinds: dict[str, Any] = {"linear": (LinearDNI, {"num_layers": 0}), "mlp": (LinearDNI, {"num_layers": 1}),
                             "low-rank": (LowRankDNI, {}), "linear-bn": (LinearBatchNormDNI, {}),
                             "linear-sigmoid": (LinearSigmoidDNI, {})}
    if kind not in kinds:
        raise ValueError(f"unknown SG kind {kind!r}; choose one of {SG_KINDS}")
    cls, extra = kinds[kind]
    return cls(features, hidden, features, context_size=context_size, **extra)  # type: ignore[no-any-return]


class Synthetic(GradientSource):
    """The paper's update-unlocked stage (DESIGN.md, "The stage loop, mode dni").

    The SG regresses batch-scaled targets (``B * dL/dh``, O(1) for a mean
    loss) and its prediction is divided by ``B``. A stage runs at most
    ``--max-in-flight`` steps ahead of the gradients it has received (0: no
    bound); ``--stash-size`` activations wait for their gradient, older ones are
    dropped and counted. The SG's fit is the cosine between each prediction and
    the target it is then trained on.

    Args:
        io: the stage's shared parts.
        sg: the stage's SG module, on the stage's device.
    """

    absorbs = True

    def __init__(self, io: StageIO, sg: DNINetwork) -> None:
        super().__init__(io)
        self.sg = sg
        self.sg_opt = fast_adam(sg.parameters(), io.config.sg_lr)
        self.context = io.config.method.sg_context
        self.stash: OrderedDict[int, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._sg_loss: torch.Tensor | None = None
        self._fit = torch.zeros(2, device=io.device)  # since the last metrics line: sum of cosines, updates
        self._fit_run = torch.zeros(2)                  # the whole run (CPU, added to at log time)
        self._fit_last: float | None = None

    def before_forward(self, t: int) -> None:
        if self.io.config.max_in_flight:  # the lag this bounds destabilised 4-stage runs without it (README)
            self.wait_while_pending(t, self.io.config.max_in_flight)

    def update(self, t: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, meta: dict[str, Any]) -> None:
        ctx = self.io.task.context(y) if self.context else None
        with torch.no_grad():
            g = synthetic_gradient(self.sg, h.detach(), ctx) / h.shape[0]
        self.io.trace("P", t)
        h.backward(g)
        self.io.apply(t)
        self.io.send_grad(t, x)
        self.stash[t] = (h.detach(), ctx)
        while len(self.stash) > self.io.config.stash_size:
            self.stash.popitem(last=False)
            self.io.stats.dropped_targets += 1

    def pending(self) -> int:
        return len(self.stash)

    def on_gradient(self, msg: Message, t: int) -> None:
        entry = self.stash.pop(msg.step, None)
        if entry is None:
            self.io.stats.dropped_targets += 1
            return
        h, ctx = entry
        target = self.io.target(msg, h) * h.shape[0]
        prediction = synthetic_gradient(self.sg, h, ctx)
        loss = F.mse_loss(prediction, target)
        self.sg_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sg_opt.step()
        with torch.no_grad():
            cosine = F.cosine_similarity(prediction.flatten(), target.flatten(), dim=0)
            self._fit += torch.stack([cosine, torch.ones_like(cosine)])
        self._sg_loss = loss.detach()
        self.io.trace("T", msg.step)

    def state_dict(self) -> dict[str, Any]:
        return trained_state(self.sg, self.sg_opt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_trained_state(self.sg, self.sg_opt, state, self.io.config.sg_lr)

    def log_fields(self) -> dict[str, Any]:
        if self._sg_loss is not None:
            self.io.stats.sg_loss_last = float(self._sg_loss)
        fit = self._fit.cpu().clone()  # (a copy: on a CPU stage .cpu() is the tensor itself)
        self._fit.zero_()
        self._fit_run += fit
        window = round(float(fit[0] / fit[1]), 4) if fit[1] else None
        self._fit_last = window if window is not None else self._fit_last
        return {"sg_loss": self.io.stats.sg_loss_last, "sg_cosine": window, "stash": len(self.stash)}

    def summary_fields(self) -> dict[str, Any]:
        run = self._fit_run
        return {"sg_cosine_last": self._fit_last,
                "sg_cosine_mean": round(float(run[0] / run[1]), 4) if run[1] else None}
