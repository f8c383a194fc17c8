"""Copy and repeat-copy sequences (the NTM tasks the DNI paper trains RNNs on), generated from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CopyBatch", "copy_batch"]


@dataclass
class CopyBatch:
    """One batch, time-major: ``inputs`` (T, B, bits + 2), ``targets`` (T, B, bits + 1), ``mask`` (T, B)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def copy_batch(batch_size: int, length: int, bits: int = 8, repeats: int = 1, max_repeats: int = 10,
               generator: torch.Generator | None = None) -> CopyBatch:
    """Random binary vectors to reproduce ``repeats`` times after a delimiter.

    Input channels: ``bits`` data channels, a start/end delimiter channel and a
    repeat-count channel (``repeats / max_repeats`` at the delimiter step; 0
    for plain copy). The input is ``length`` data steps, one delimiter step,
    then ``length * repeats + 1`` blank steps while the target holds the data
    ``repeats`` times and then an end marker (the extra target channel).
    ``mask`` is 1 where the output is scored.

    Raises:
        ValueError: for non-positive sizes or ``repeats`` above ``max_repeats``.
    """
    if min(batch_size, length, bits, repeats, max_repeats) < 1:
        raise ValueError("batch_size, length, bits, repeats and max_repeats must all be >= 1")
    if repeats > max_repeats:
        raise ValueError(f"repeats {repeats} exceeds max_repeats {max_repeats}")
    data = torch.randint(0, 2, (length, batch_size, bits), generator=generator).float()
    out_len = length * repeats + 1
    total = length + 1 + out_len
    inputs = torch.zeros(total, batch_size, bits + 2)
    inputs[:length, :, :bits] = data
    inputs[length, :, bits] = 1.0
    inputs[length, :, bits + 1] = repeats / max_repeats
    targets = torch.zeros(total, batch_size, bits + 1)
    targets[length + 1:length + out_len, :, :bits] = data.repeat(repeats, 1, 1)
    targets[-1, :, bits] = 1.0
    mask = torch.zeros(total, batch_size)
    mask[length + 1:] = 1.0
    return CopyBatch(inputs, targets, mask)
