"""The training methods behind ``--mode``: the one place a mode's name is read; everything else asks its ``Method``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Method", "METHODS", "MODES", "SOURCES"]

SOURCES = ("locked", "synthetic", "delayed", "local")
"""Where a non-last stage's dL/dh comes from (:mod:`dni_async.sources`)."""


@dataclass(frozen=True)
class Method:
    """What a ``--mode`` means to every part of the runtime."""

    name: str
    """The ``--mode`` value."""
    source: str | None
    """The gradient source of the non-last stages (``SOURCES``); None: run by ``torch.distributed.pipelining``."""
    sg_context: bool = False
    """The SG sees the labels (cDNI)."""
    sends_gradients: bool = True
    """Stages send the gradient of their input back (every source but ``local``: there nobody needs it)."""
    temporal_sg: bool = False
    """Recurrent tasks: every truncated LSTM also gets a synthetic gradient at its chunk boundaries."""
    microbatches_per_stage: bool = False
    """Pipelining: the schedule needs at least one microbatch per stage (1F1B)."""
    schedule: str | None = None
    """Pipelining: the ``torch.distributed.pipelining`` schedule class."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Values of config fields this method sets when they are left None (measured: see the README)."""

    def __post_init__(self) -> None:
        if self.source not in (*SOURCES, None):
            raise ValueError(f"unknown gradient source {self.source!r}; choose one of {SOURCES}")

    @property
    def has_sg(self) -> bool:
        """Non-last stages own an SG module (``--sg``, ``--sg-lr``, ``--sg-hidden`` apply)."""
        return self.source == "synthetic"

    @property
    def pipelining(self) -> bool:
        """A ``torch.distributed.pipelining`` schedule, not the stage loop."""
        return self.source is None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("dni", "synthetic", temporal_sg=True, defaults={"sg": "linear", "max_in_flight": 2}),
    Method("cdni", "synthetic", sg_context=True, temporal_sg=True, defaults={"sg": "softmax", "max_in_flight": 2}),
    Method("delayed", "delayed", defaults={"max_in_flight": 2}),
    Method("local", "local", sends_gradients=False),
    Method("backprop", "locked"),
    Method("gpipe", None, schedule="ScheduleGPipe"),
    Method("1f1b", None, schedule="Schedule1F1B", microbatches_per_stage=True),
)}
MODES = tuple(METHODS)
