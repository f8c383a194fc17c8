"""``--tensorboard``: each stage's metrics lines also as TensorBoard scalars, in ``RUN_DIR/tensorboard/stage-<i>``."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any

from .config import PipelineConfig

__all__ = ["INSTALL_HINT", "require_tensorboard", "scalars", "StageBoard", "stage_board"]

INSTALL_HINT = "--tensorboard needs the tensorboard package: pip install 'dni_async[tensorboard]'"
FLUSH_S = 10
"""Seconds between flushes of the event files (what a TensorBoard watching a live run lags by at most)."""

# [Note: TensorBoard]
#
# A board takes every line a stage writes to metrics.jsonl: both runners (the
# stage loop's MetricsEvery and StageEval, the gpipe/1f1b loop's loss lines)
# write through `tee(run.metrics, board)`, so what TensorBoard shows is what
# metrics.jsonl holds, under the same names. Without --tensorboard the board is
# None and `tee` hands back metrics.jsonl's writer itself: no extra work.
#
# Each runner opens its board in the same `with` as `stage_run`, after it: the
# board closes (flushing its event files) on every exit path, before
# `stage_run` reports a failure. The SummaryWriter opens at the first line, so
# a stage that logs nothing (gpipe's first stage) leaves no event file; a
# resumed run opens it with `purge_step` at its first line's step, so TensorBoard
# hides what the interrupted run logged from there on. A fresh run removes its
# stage's folder first (rank 0 also those of stages this run does not have).


def require_tensorboard() -> None:
    """Check that the tensorboard package is installed (call it before any process starts).

    Raises:
        ValueError: it is not.
    """
    try:
        import tensorboard  # noqa: F401
    except ImportError as err:
        raise ValueError(INSTALL_HINT) from err


def scalars(line: dict[str, Any]) -> dict[str, float]:
    """The figures of a metrics line as TensorBoard tags: the line's keys, nested ones joined by ``/``
    (``queue_depth/forward``); ``stage``, ``step``, ``time`` and what is not a number (None, text) left out."""
    out: dict[str, float] = {}
    for key, value in line.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in scalars(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("stage", "step", "time"):
            out[key] = float(value)
    return out


class StageBoard:
    """One stage's TensorBoard event files: each metrics line written to it becomes a scalar per figure at the
    line's ``step`` (and wall time ``time``).

    Args:
        root: the run's TensorBoard folder (``RUN_DIR/tensorboard``).
        stage: this stage's index (its folder: ``stage-<stage>``).
        stages: the run's number of stages.
        resumed: the run continues an earlier one (keep its event files; see [Note: TensorBoard]).

    Raises:
        ValueError: the tensorboard package is missing.
    """

    def __init__(self, root: Path, stage: int, stages: int, resumed: bool = False) -> None:
        require_tensorboard()
        self.log_dir, self.resumed = root / f"stage-{stage}", resumed
        if not resumed:
            for old in root.glob("stage-*"):
                index = old.name.split("-")[-1]
                if index == str(stage) or (stage == 0 and index.isdigit() and int(index) >= stages):
                    shutil.rmtree(old, ignore_errors=True)
        self._writer: Any = None

    def write(self, line: dict[str, Any]) -> None:
        """Add the line's figures (:func:`scalars`)."""
        figures = scalars(line)
        if not figures:
            return
        step = int(line["step"])
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=FLUSH_S,
                                         purge_step=step if self.resumed else None)
        for tag, value in figures.items():
            self._writer.add_scalar(tag, value, global_step=step, walltime=line.get("time"))

    def close(self) -> None:
        """Flush and close the event files (again: nothing)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> StageBoard:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def stage_board(config: PipelineConfig, stage: int) -> contextlib.AbstractContextManager[StageBoard | None]:
    """This stage's board under ``config.tensorboard`` (closed on leaving the ``with``), else None.

    Raises:
        ValueError: ``--tensorboard`` without the tensorboard package.
    """
    if not config.tensorboard:
        return contextlib.nullcontext()
    return StageBoard(Path(config.run_dir) / "tensorboard", stage, config.stages, resumed=config.resume is not None)
