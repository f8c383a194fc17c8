"""Tasks: the models and data of the paper's experiments, in-process and for the pipeline runtime."""

from __future__ import annotations

from typing import Callable

from dni_async.config import PipelineConfig
from dni_async.pipeline import PipelineTask

__all__ = ["PIPELINE_TASKS", "get_pipeline_task"]


def _mnist(config: PipelineConfig) -> PipelineTask:
    from .mnist import pipeline_task

    return pipeline_task(config)


def _copy(config: PipelineConfig) -> PipelineTask:
    from .copy import pipeline_task

    return pipeline_task(config)


def _lm(config: PipelineConfig) -> PipelineTask:
    from .lm import pipeline_task

    return pipeline_task(config)


PIPELINE_TASKS: dict[str, Callable[[PipelineConfig], PipelineTask]] = {
    "mnist-fcn": _mnist, "mnist-cnn": _mnist, "copy": _copy, "repeat-copy": _copy, "lm": _lm}


def get_pipeline_task(config: PipelineConfig) -> PipelineTask:
    """The task named by ``config.task``.

    Raises:
        ValueError: for an unknown task.
    """
    if config.task not in PIPELINE_TASKS:
        raise ValueError(f"unknown --task {config.task!r}; choose one of {sorted(PIPELINE_TASKS)}")
    return PIPELINE_TASKS[config.task](config)
