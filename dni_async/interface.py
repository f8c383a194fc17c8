"""In-process DNI wrapper: the seed project's ``DNI(network, ...)`` API with the paper's semantics."""

from __future__ import annotations

import copy
import warnings
from functools import partial
from typing import Any, Callable, Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn

from .optim import OptimSpec, make_optimizer
from .synthetic import DNINetwork
from .unit_training import UnitTraining, WrappedUnit
from .units import default_kind, output_features

__all__ = ["DNI"]


def _check_coverage(network: nn.Module, units: list[tuple[str, nn.Module]]) -> None:
    """Refuse a parameter shared by two units (it would be stepped twice); warn of unwrapped ones."""
    owner: dict[nn.Parameter, str] = {}
    for name, module in units:
        for p in module.parameters():
            if p in owner:
                raise ValueError(f"a parameter is shared by units {owner[p]!r} and {name!r} (tied weights); "
                                 "wrap a module that contains both, or pass recursive=False")
            owner[p] = name
    loose = [n for n, p in network.named_parameters() if p.requires_grad and p not in owner]
    if loose:
        warnings.warn(f"DNI wraps leaf modules only; these parameters belong to no unit and are trained "
                      f"only by an optimizer of your own: {loose}", stacklevel=3)


class DNI(UnitTraining):
    """Wrap a network so that its units train from synthetic gradients.

    Args:
        network: the model to train.
        dni_network: SG module class (a ``DNINetwork`` subclass) built for every
            unit as ``dni_network(features, hidden_size, features, **dni_params)``;
            ``None`` picks by unit: ``RNNDNI`` for recurrent modules,
            ``Conv2dDNI`` for 2-D feature maps, ``LinearDNI`` otherwise.
        dni_params: extra keyword arguments for the SG constructor.
        optim: optimizer of each unit's parameters: a class or a name
            (``'adam'``, ``'sgd'``, ...), built with lr 0.001, or a factory
            ``params -> Optimizer``. Default: Adam, lr 0.001. Wrapped units are
            stepped by these optimizers and their ``.grad`` is cleared after each
            step, so a user's optimizer over the whole network may still call
            ``step()``: it then moves only parameters outside wrapped units.
        grad_optim: optimizer of the SG modules, same forms as ``optim``.
        grad_lr: learning rate for ``grad_optim`` when it is a name or a class.
        hidden_size: width of the SG modules' hidden layers.
        λ: mixing of true and synthetic parameter gradients: 0 = synthetic only
            (update-unlocked), 1 = plain backprop. ``lambda_`` is an alias.
        recursive: True wraps every leaf module that has parameters, and the
            last of them (the output unit) trains from the true gradient with no
            SG; False treats ``network`` as one unit with an SG, to be placed
            inside a larger model.
        gpu_id: CUDA device index, -1 for CPU (the seed's argument).
        lambda_: alias of ``λ``.
        device: a device for the network and SGs; overrides ``gpu_id``.
        context_size: size of the SG context (cDNI); set it with
            :meth:`set_context` before each forward.
        output_unit: name (as in ``network.named_modules()``) of the unit trained
            by the true gradient; ``"auto"`` = the last leaf with parameters when
            ``recursive`` (none otherwise); ``None`` gives every unit an SG.
        batch_scaled: regress batch-scaled targets ``B·∂L/∂h`` (O(1) for a
            mean-reduced loss) and divide predictions by ``B``, the
            activation's first dimension (the batch for batch-first
            activations); False regresses the raw gradient.

    Raises:
        ValueError: for a bad argument or a network with no trainable unit.
        TypeError: for an optimizer instance where a class or factory is needed.

    SG modules are built at construction for units whose type gives their
    output size (Linear, Conv, BatchNorm, LayerNorm, Embedding, RNN, ...);
    other units get theirs at their first training forward, which is when
    they appear in ``state_dict()``.
    """

    def __init__(
        self,
        network: nn.Module,
        dni_network: type[DNINetwork] | None = None,
        dni_params: dict[str, Any] | None = None,
        optim: OptimSpec | None = None,
        grad_optim: OptimSpec = "adam",
        grad_lr: float = 0.001,
        hidden_size: int = 10,
        λ: float = 0.5,  # noqa: PLC2401 - the seed's argument name
        recursive: bool = True,
        gpu_id: int = -1,
        *,
        lambda_: float | None = None,
        device: Union[str, torch.device, None] = None,
        context_size: int = 0,
        output_unit: str | None = "auto",
        batch_scaled: bool = True,
    ) -> None:
        super().__init__()
        lam = float(λ if lambda_ is None else lambda_)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"λ (lambda_) must lie in [0, 1], got {lam}")
        if context_size < 0:
            raise ValueError(f"context_size must be >= 0, got {context_size}")
        if hidden_size < 1:
            raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
        if dni_network is not None and not (isinstance(dni_network, type) and issubclass(dni_network, nn.Module)):
            raise TypeError(f"dni_network must be a DNINetwork subclass, got {dni_network!r}")
        self.network = network
        self.synthetic = nn.ModuleDict()
        self.lambda_ = lam
        self.context_size = context_size
        self.batch_scaled = batch_scaled
        self._dni_network = dni_network
        self._dni_params = dict(dni_params or {})
        self._hidden_size = hidden_size
        self._grad_optim = grad_optim
        self._grad_lr = grad_lr
        self._sg_optimizers = {}
        self._context = None
        self._active = False
        self._last_unit = None
        self._flush_queued = False
        self._pending_targets = []
        self._sg_losses = {}

        named = list(network.named_modules()) if recursive else [("", network)]
        candidates = [
            (name, m) for name, m in named
            if (not recursive or not any(True for _ in m.children()))
            and any(p.requires_grad for p in m.parameters())
        ]
        if not candidates:
            raise ValueError("network has no module with trainable parameters to wrap")
        if output_unit == "auto":
            output_unit = candidates[-1][0] if recursive else None
        if output_unit is not None and output_unit not in {n for n, _ in candidates}:
            raise ValueError(f"output_unit {output_unit!r} is not a wrapped unit; "
                             f"units: {[n for n, _ in candidates]}")
        _check_coverage(network, candidates)
        self._units = []
        for name, module in candidates:
            params = [p for p in module.parameters() if p.requires_grad]
            unit = WrappedUnit(name=name, key=(name.replace(".", "-") or "network"), module=module,
                         optimizer=make_optimizer(optim, params, lr=0.001, default="adam"),
                         is_output=(name == output_unit), params=params)
            self._units.append(unit)
            features = output_features(module)
            if not unit.is_output and features is not None:
                self._build_sg(unit, features, default_kind(module, None))
            module.register_forward_hook(partial(self._after_unit, unit))

        if device is None and gpu_id >= 0:
            device = torch.device("cuda", gpu_id)
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ public

    @property
    def units(self) -> list[str]:
        """Names of the wrapped units, in the network's module order."""
        return [u.name for u in self._units]

    @property
    def output_unit(self) -> str | None:
        """Name of the unit trained by the true gradient, or None."""
        return next((u.name for u in self._units if u.is_output), None)

    def unit_optimizer(self, name: str) -> torch.optim.Optimizer:
        """The optimizer of the unit called ``name``."""
        return self._unit(name).optimizer

    def sg_losses(self) -> dict[str, float]:
        """The last SG regression loss of each unit, by unit name."""
        return {name: float(loss) for name, loss in self._sg_losses.items()}

    def set_context(self, context: torch.Tensor | None) -> None:
        """Set the SG context (cDNI) for the following forward calls.

        Args:
            context: integer labels of shape (batch,), one-hot encoded to
                ``context_size``, or a float tensor (batch, context_size); None
                clears it.

        Raises:
            ValueError: if the DNI has no context or the shape is wrong.
        """
        if context is None:
            self._context = None
            return
        if self.context_size == 0:
            raise ValueError("this DNI was built with context_size=0; pass context_size= to use cDNI")
        if not context.is_floating_point():
            if context.dim() != 1:
                raise ValueError(f"integer labels must have shape (batch,), got {tuple(context.shape)}")
            if context.numel() and (int(context.min()) < 0 or int(context.max()) >= self.context_size):
                raise ValueError(f"labels must lie in [0, {self.context_size}), got "
                                 f"[{int(context.min())}, {int(context.max())}]")
            context = F.one_hot(context.long(), self.context_size).float()
        elif context.dim() != 2 or context.shape[1] != self.context_size:
            raise ValueError(f"context must have shape (batch, {self.context_size}), got {tuple(context.shape)}")
        self._context = context

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the network; in training mode every wrapped unit is trained as it runs."""
        self._active = True
        self._last_unit = None
        try:
            output = self.network(*args, **kwargs)
        finally:
            self._active = False
        last = self._last_unit
        if last is not None and self.output_unit is not None and not last.is_output:
            raise RuntimeError(
                f"unit {last.name!r} ran after the output unit {self.output_unit!r}, so the output unit "
                "is not the last to run; pass output_unit= with the name of the unit that produces the "
                f"network's output (units: {self.units})")
        return output

    def optimizer_state_dict(self) -> dict[str, Any]:
        """State of every unit and SG optimizer, keyed by unit name."""
        return {
            "units": {u.name: u.optimizer.state_dict() for u in self._units},
            "synthetic": {name: opt.state_dict() for name, opt in self._sg_optimizers.items()},
        }

    def load_optimizer_state_dict(self, state: dict[str, Any]) -> None:
        """Load what :meth:`optimizer_state_dict` returned (copied: the caller's tensors are not aliased)."""
        state = copy.deepcopy(state)
        for name, unit_state in state["units"].items():
            self._unit(name).optimizer.load_state_dict(unit_state)
        for name, sg_state in state["synthetic"].items():
            if name not in self._sg_optimizers:
                raise KeyError(f"no SG for unit {name!r} (built lazily? run one forward first)")
            self._sg_optimizers[name].load_state_dict(sg_state)

    # ---------------------------------------------------------------- internals

    def _unit(self, name: str) -> WrappedUnit:
        """The wrapped unit called ``name``, or KeyError."""
        for unit in self._units:
            if unit.name == name:
                return unit
        raise KeyError(f"no wrapped unit named {name!r}; units: {self.units}")

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DNI:
        """Move optimizer state along with the parameters (``.to()``, ``.cuda()``, ...)."""
        super()._apply(fn, recurse)
        optimizers: Iterable[torch.optim.Optimizer] = [u.optimizer for u in self._units] + list(
            self._sg_optimizers.values())
        for opt in optimizers:
            for p, state in opt.state.items():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                        state[k] = v.to(device=p.device, dtype=p.dtype)
        return self
