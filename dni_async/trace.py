"""What a stage did, as compact actions (``0F3 0S3 0U3``): asserted whole in tests, written with times as events.

An action is ``<stage><kind><step>``. A stage process does one thing at a
time, so each action spans from the end of the stage's previous action to its
own time: a ``G`` that ended a blocking wait spans the wait, a polled one
nearly nothing. The kinds:

====  ==========================================================  ===============
kind  the stage has just ...                                       event name
====  ==========================================================  ===============
X     got the input of step t (stage 0: read it; others: received)  ``input``
F     run the forward pass of step t                                ``forward``
S     sent act(t) to the next stage                                 ``act_sent``
P     predicted step t's synthetic gradient (SG forward)            ``sg_predicted``
G     received grad(s) from the next stage                          ``grad_arrived``
U     updated its block with the gradient of step s                 ``update``
T     trained its SG on step s's target                             ``sg_update``
B     sent grad(s), its input's gradient, to the previous stage     ``grad_sent``
E     evaluated one batch (forward only)                            ``eval``
====  ==========================================================  ===============

For example dni's stage 0 at step 3, with the gradient of step 1 back:
``0X3 0F3 0S3 0P3 0U3 0G1 0T1``; delayed's: ``0X3 0F3 0S3 0G1 0U1``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ACTIONS", "Action", "EventSink", "Trace", "format_trace", "parse_trace"]

ACTIONS = {"X": "input", "F": "forward", "S": "act_sent", "P": "sg_predicted", "G": "grad_arrived",
           "U": "update", "T": "sg_update", "B": "grad_sent", "E": "eval"}
_PATTERN = re.compile(rf"^(\d+)([{''.join(ACTIONS)}])(-?\d+)$")


class EventSink(Protocol):
    """Where events go (a :class:`~dni_async.metrics.JsonLines`)."""

    def write(self, obj: dict) -> None: ...


@dataclass(frozen=True)
class Action:
    """One thing a stage did: ``stage``, ``kind`` (a key of ``ACTIONS``), ``step``."""

    stage: int
    kind: str
    step: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.step}"

    @staticmethod
    def from_str(text: str) -> Action:
        """Parse ``"0F3"``.

        Raises:
            ValueError: for text that is not an action.
        """
        match = _PATTERN.match(text)
        if match is None:
            raise ValueError(f"not an action: {text!r} (expected <stage><kind><step>, kind one of {''.join(ACTIONS)})")
        return Action(int(match[1]), match[2], int(match[3]))


def format_trace(actions: list[Action]) -> str:
    """``"0F3 0S3 ..."``."""
    return " ".join(map(str, actions))


def parse_trace(text: str) -> list[Action]:
    """The actions of a :func:`format_trace` string."""
    return [Action.from_str(part) for part in text.split()]


class Trace:
    """A stage's actions: buffered as timed events for ``events/stage-<i>.jsonl``, and kept whole on request.

    Args:
        stage: the stage.
        sink: where :meth:`flush` writes the events (None: nowhere).
        keep: keep every action in :attr:`actions` (tests; a run would grow it without bound).
    """

    def __init__(self, stage: int, sink: EventSink | None = None, keep: bool = False) -> None:
        self.stage, self.sink, self.keep = stage, sink, keep
        self.actions: list[Action] = []
        self._buffer: list[tuple[float, str, int]] = []

    def __call__(self, kind: str, step: int) -> None:
        """Record that this stage has just done ``kind`` for ``step``."""
        if self.sink is not None:
            self._buffer.append((time.time(), kind, step))
        if self.keep:
            self.actions.append(Action(self.stage, kind, step))

    def __str__(self) -> str:
        return format_trace(self.actions)

    def take(self) -> str:
        """The kept actions so far, formatted, and forget them."""
        text, self.actions = str(self), []
        return text

    def flush(self) -> None:
        """Write the buffered events (at log time and at the end: not on the hot path)."""
        if self.sink is not None:
            for when, kind, step in self._buffer:
                self.sink.write({"t": when, "stage": self.stage, "event": ACTIONS[kind], "step": step})
        self._buffer.clear()
