"""Cut a model into balanced contiguous stages and check that their shapes fit together."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["balanced_split", "partition", "check_stage_shapes"]


def balanced_split(costs: Sequence[int], parts: int) -> list[int]:
    """Contiguous split of ``costs`` into ``parts`` groups minimising the largest group's sum.

    Returns:
        The start index of each group (``[0, ...]``, length ``parts``).
    """
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} layers into {parts} stages: need 1 <= stages <= layers")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: the smallest possible max-sum of the first j items in k groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], prefix[j] - prefix[i])
                if value < best[k][j]:
                    best[k][j], cut[k][j] = value, i
    starts, j = [], n
    for k in range(parts, 0, -1):
        j = cut[k][j]
        starts.append(j)
    return starts[::-1]


def partition(blocks: nn.Sequential | Sequence[nn.Module], stages: int) -> list[nn.Sequential]:
    """Split a sequence of blocks into ``stages`` contiguous stages balanced by parameter count.

    Raises:
        ValueError: with more stages than blocks.
    """
    items = list(blocks.children()) if isinstance(blocks, nn.Sequential) else list(blocks)
    if stages > len(items):
        raise ValueError(f"--stages {stages} is more than the model's {len(items)} layers")
    costs = [1 + sum(p.numel() for p in block.parameters()) for block in items]
    starts = balanced_split(costs, stages) + [len(items)]
    return [nn.Sequential(*items[starts[k]:starts[k + 1]]) for k in range(stages)]


def _expected_input(stage: nn.Module) -> str:
    for module in stage.modules():
        if isinstance(module, nn.Linear):
            return f"(*, {module.in_features}) for its first layer {module}"
        if isinstance(module, nn.modules.conv._ConvNd):
            return f"(N, {module.in_channels}, ...) for its first layer {module}"
    return "another shape"


@torch.no_grad()
def check_stage_shapes(stages: Sequence[nn.Module], sample: torch.Tensor) -> list[torch.Size]:
    """Run ``sample`` through the stages in order (eval mode, no grad) and return each output shape.

    Raises:
        ValueError: naming both stages and both shapes when one stage's output does not fit the next.
    """
    shapes = []
    x = sample
    for i, stage in enumerate(stages):
        was_training = stage.training
        stage.eval()
        try:
            x = stage(x)
        except RuntimeError as err:
            if i == 0:
                raise ValueError(f"stage 0 cannot take the task's input of shape {tuple(sample.shape)}: {err}") from err
            raise ValueError(
                f"stage {i - 1} outputs shape {tuple(x.shape)} but stage {i} expects "
                f"{_expected_input(stage)}: {err}") from err
        finally:
            stage.train(was_training)
        shapes.append(x.shape)
    return shapes
