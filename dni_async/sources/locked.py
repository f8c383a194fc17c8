"""``backprop``: locked backpropagation, the baseline. A stage waits for the true gradient of step t."""

from __future__ import annotations

from typing import Any

import torch

from .base import GradientSource

__all__ = ["Locked"]


class Locked(GradientSource):
    """Wait for grad(t) from the next stage (gradients of other steps are rejected and counted), backward,
    update, send the input's gradient back. No gradient can be in flight between steps."""

    def update(self, t: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, meta: dict[str, Any]) -> None:
        while True:
            msg = self.io.gradient(t, wait=True)
            assert msg is not None
            if msg.step == t:
                break
            self.io.reject(msg, f"waiting for the gradient of step {t}")
        h.backward(self.io.target(msg, h))
        self.io.apply(t)
        self.io.send_grad(t, x)
