"""Divergence: a stage whose loss, SG loss or weights are no longer finite stops the run, saying where.

Checked at each stage's logging interval (``--log-every``), where the figures are on the host anyway: one
synchronisation per interval for the weights, none per step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["Diverged", "check_finite"]


class Diverged(RuntimeError):
    """Training produced a non-finite loss or weight: the run ends with status ``diverged``."""


def check_finite(step: int, stage: int, figures: dict[str, Any], module: nn.Module | None = None) -> None:
    """Raise :class:`Diverged` if a float figure (loss, sg_loss, ...) or ``module``'s weights are not finite.

    Raises:
        Diverged: ``diverged at step N (stage i: loss nan)``.
    """
    for name, value in figures.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise Diverged(f"diverged at step {step} (stage {stage}: {name} {value})")
    if module is not None:
        params = [p.detach().float().norm() for p in module.parameters()]
        norm = float(torch.stack(params).norm()) if params else 0.0
        if not math.isfinite(norm):
            raise Diverged(f"diverged at step {step} (stage {stage}: weight norm {norm})")
