"""Build optimizers from a name, a class or a factory, as the DNI arguments allow."""

from __future__ import annotations

from typing import Callable, Iterable, Union, cast

import torch
from torch import nn

__all__ = ["OptimSpec", "OPTIMIZERS", "make_optimizer", "fast_adam"]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}

OptimSpec = Union[str, type[torch.optim.Optimizer], Callable[[list[nn.Parameter]], torch.optim.Optimizer]]


def make_optimizer(spec: OptimSpec | None, params: Iterable[nn.Parameter], lr: float,
                   default: str = "adam") -> torch.optim.Optimizer:
    """Build an optimizer over ``params``.

    Args:
        spec: a name from ``OPTIMIZERS`` (built with ``lr``), an optimizer class
            (built with ``lr``), a factory ``params -> Optimizer``, or None for
            ``default``.
        params: the parameters to optimize.
        lr: learning rate for a name or a class.
        default: the name used when ``spec`` is None.

    Returns:
        The optimizer.

    Raises:
        ValueError: for an unknown name.
        TypeError: for an optimizer instance, or a factory that returns no optimizer.
    """
    params = list(params)
    if spec is None:
        spec = default
    if isinstance(spec, torch.optim.Optimizer):
        raise TypeError("pass an optimizer class, a name or a factory `params -> Optimizer`, not an "
                        "optimizer instance: each wrapped unit needs its own optimizer over its own parameters")
    if isinstance(spec, str):
        try:
            cls = OPTIMIZERS[spec.lower()]
        except KeyError:
            raise ValueError(f"unknown optimizer {spec!r}; choose one of {sorted(OPTIMIZERS)}") from None
        return cls(params, lr=lr)
    if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        build: Callable[..., torch.optim.Optimizer] = spec
        return build(params, lr=lr)
    if callable(spec):
        factory = cast(Callable[[list[nn.Parameter]], object], spec)
        opt = factory(params)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer factory returned {type(opt).__name__}, not a torch.optim.Optimizer")
        return opt
    raise TypeError(f"cannot build an optimizer from {spec!r}")


def fast_adam(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel where this torch supports it for the parameters' device, else the default.

    The same update; on CPU the fused step is far cheaper than the default
    for-each one (2.1M parameters, 1 thread: 2.7 ms against 21 ms), which is
    a large part of a pipeline stage's step.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # fused Adam is not there for this device / torch version
        return torch.optim.Adam(params, lr=lr)
