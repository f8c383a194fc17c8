"""What the runtime needs from a task: the model as blocks, a loss, data, and how to score outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Batch", "Item", "EvalData", "Sum", "PipelineTask", "unpack", "add_sums", "class_counts", "accuracy"]

Batch = tuple[torch.Tensor, torch.Tensor]
Item = Union[Batch, tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]
"""``(inputs, labels)`` or ``(inputs, labels, meta)``; see :class:`PipelineTask` for what ``meta`` may hold."""
EvalData = Union[list[Item], Callable[[bool], list[Item]]]
Sum = Union[float, torch.Tensor]
"""One metric sum of a batch: a float, or a 0-d tensor (summed where it is, read once per group)."""


def unpack(item: Item) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``(x, y, meta)`` of an item with or without meta."""
    if len(item) == 3:
        return item[0], item[1], dict(item[2])  # type: ignore[misc]
    return item[0], item[1], {}


def class_counts(output: torch.Tensor, labels: torch.Tensor) -> dict[str, Sum]:
    """Correct argmax predictions and examples of a batch of class scores."""
    return {"correct": (output.argmax(-1) == labels).sum(), "examples": float(labels.numel())}


def add_sums(sums: dict[str, Sum], batch: dict[str, Sum]) -> None:
    """Add one batch's sums to a group's running totals ``sums`` (tensors stay where they are: no wait)."""
    for key, value in batch.items():
        sums[key] = sums[key] + value if key in sums else value


def accuracy(sums: dict[str, float]) -> dict[str, float]:
    """``accuracy`` and ``examples`` from summed :func:`class_counts`."""
    return {"accuracy": sums["correct"] / max(1.0, sums["examples"]), "examples": int(sums["examples"])}


@dataclass(kw_only=True)
class PipelineTask:
    """A task for :func:`dni_async.run_pipeline`; the defaults fit classification.

    Items of the data may carry a ``meta`` dict that travels with them through
    the stages: ``reset: True`` starts new sequences (every
    :class:`~dni_async.recurrent.TruncatedLSTM` forgets its state first);
    ``last: True`` ends a group: on eval items, an evaluation pass (an eval
    list without it ends at its last item); on training items of a task with
    ``train_metrics``, a scored group such as a batch of sequences. Other keys
    (``split``, ``length``, ...) are copied into the group's summary.
    """

    name: str
    """Task name, recorded in summary.json."""
    blocks: list[nn.Module]
    """The model as a sequence of blocks; the runtime splits them into balanced stages."""
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """``(output, labels) -> mean loss`` on the last stage."""
    input_shape: tuple[int, ...]
    """Shape of one input example (checked through the stages before training)."""
    num_classes: int
    """Size of the cDNI context: label count, or the feature count ``context_fn`` returns."""
    data: Callable[[], tuple[Iterator[Item], int, EvalData, str]]
    """Called on stage 0 only: ``(train items, steps, eval items or eval(final) -> items, dataset name)``."""
    classification: bool = True
    """The loss is one softmax cross-entropy over ``num_classes`` per example (what ``--sg softmax`` models)."""
    input_dtype: torch.dtype = torch.float32
    """Dtype of the inputs (``torch.long`` for token ids)."""
    context_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    """``labels -> cDNI context`` (float features, or class ids for a ``LinearDNI``); None: one-hot labels."""
    metric_fn: Callable[[torch.Tensor, torch.Tensor], dict[str, Sum]] = class_counts
    """``(output, labels) -> sums`` of one batch on the last stage, added up over a group. Return 0-d tensors
    rather than ``float(...)`` of them: a GPU stage then reads them back once per group, not once per batch."""
    summarize: Callable[[dict[str, float]], dict[str, float]] = accuracy
    """Group sums -> the reported figures (e.g. ``accuracy``)."""
    train_metrics: bool = False
    """Score training groups too (their summary is relayed back to stage 0 as ``train_<name>``)."""
    latest: dict[str, Any] = field(default_factory=dict)
    """On stage 0: figures relayed back from the last stage (``loss``, ``eval_*``, ``train_*``); the data may
    read them (the copy task's curriculum does)."""
    result: Callable[[], dict[str, Any]] | None = None
    """Called on stage 0 after training: task figures for summary.json (``task_result``)."""
    check_data: Callable[[], None] | None = None
    """Called once, in the launcher, before any process starts: raise ``FileNotFoundError`` / ``ValueError`` for
    data that ``data()`` could not read (a ``--data-dir`` without the files). None: nothing to check."""
    data_state: Callable[[], dict[str, Any]] | None = None
    """Stage 0, for checkpoints: where the training items stand (what the next one will be). None: the items
    are a fixed sequence, and a resumed run skips as many as were read."""
    resume_data: Callable[[dict[str, Any]], None] | None = None
    """Stage 0: make the items of the ``data()`` already called (not yet read) continue from a ``data_state``."""

    def add_metrics(self, sums: dict[str, Sum], output: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch's :attr:`metric_fn` sums to ``sums`` (a group's running totals; tensors stay on the
        device, so that adding never waits for it)."""
        add_sums(sums, self.metric_fn(output, labels))

    def summary(self, sums: dict[str, Sum]) -> dict[str, Any]:
        """:attr:`summarize` of a group's totals, read back as floats (a wait for the device: call it in a
        ``host_sync("scored group")``)."""
        return self.summarize({key: float(value) for key, value in sums.items()})

    def context(self, labels: torch.Tensor) -> torch.Tensor:
        """The cDNI context of ``labels``."""
        if self.context_fn is not None:
            return self.context_fn(labels)
        return F.one_hot(labels, self.num_classes).float()
