"""How a module maps to a DNI unit: the size of its output, its SG kind, the activation it hands on."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .synthetic import RNNDNI, Conv2dDNI, DNINetwork, LinearDNI

__all__ = ["output_features", "default_kind", "split_output", "detach_all"]

_SEQUENCE_MODULES = (nn.RNNBase,)
_MAP_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)


# Modules whose output has the features of their input: skipped when a
# Sequential's last child with a known size is looked for.
_SHAPE_PRESERVING = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                     nn.Dropout, nn.Identity, nn.Softmax, nn.LogSoftmax)


def _last_sized(module: nn.Module) -> nn.Module | None:
    """The module that fixes the output size: the module itself, or a Sequential's last sized child."""
    if not isinstance(module, nn.Sequential):
        return module
    for child in reversed(list(module.children())):
        if not isinstance(child, _SHAPE_PRESERVING):
            return _last_sized(child)
    return None


def output_features(module: nn.Module) -> int | None:
    """Features (channels) of a module's output where its type tells them, else None."""
    sized = _last_sized(module)
    if sized is None:
        return None
    if isinstance(sized, nn.RNNBase):
        size = sized.proj_size if getattr(sized, "proj_size", 0) else sized.hidden_size
        return size * (2 if sized.bidirectional else 1)
    for attr in ("out_features", "out_channels", "num_features", "embedding_dim", "num_channels"):
        value = getattr(sized, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(sized, "normalized_shape", None)
    if shape:
        return int(shape[-1])
    return None


def default_kind(module: nn.Module, activation: torch.Tensor | None) -> type[DNINetwork]:
    """Pick the built-in SG kind for a unit from its type, or from its first activation."""
    sized = _last_sized(module)
    if isinstance(sized, _SEQUENCE_MODULES):
        return RNNDNI
    if isinstance(sized, _MAP_MODULES) or (activation is not None and activation.dim() == 4):
        return Conv2dDNI
    return LinearDNI


def split_output(output: Any) -> tuple[torch.Tensor | None, tuple[Any, ...]]:
    """The activation that gets the SG (a tensor output, or a tuple's first item) and the rest."""
    if isinstance(output, torch.Tensor):
        return output, ()
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0], output[1:]
    return None, ()


def detach_all(items: tuple[Any, ...]) -> tuple[Any, ...]:
    """Detach every tensor in a (nested) tuple."""
    return tuple(
        x.detach() if isinstance(x, torch.Tensor) else detach_all(x) if isinstance(x, tuple) else x
        for x in items
    )
