"""In-process DNI wrapper: the seed project's ``DNI(network, ...)`` API with the paper's semantics."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Variable

from .optim import OptimSpec, make_optimizer
from .synthetic import DNINetwork, synthetic_gradient
from .units import default_kind, detach_all, output_features, split_output

__all__ = ["DNI"]

# [Note: how a wrapped unit is trained]
#
# Every wrapped unit k has a forward hook that sees its output h_k.
#
#   λ = 0, unit with an SG (update-unlocked, the paper's DNI):
#     ĝ = SG_k(h_k.detach(), ctx)            # synthetic gradient
#     h_k.backward(ĝ); opt_k.step()           # update NOW, inside the forward
#     return leaf.clone(), leaf = h_k.detach().requires_grad_()
#   The graph is cut at the unit's output because opt_k changed the weights in
#   place: autograd would refuse to backpropagate through them again. The
#   gradient that later reaches ``leaf`` is SG_k's target. For stacked units it
#   arrives during unit k+1's own ``h.backward(ĝ)``: it is ĝ_{k+1} carried back
#   through unit k+1 (bootstrapping); for the unit before the output unit it
#   arrives in ``loss.backward()``. The clone keeps in-place ops downstream
#   (``ReLU(inplace=True)``) off the tensor that autograd and the SG stash hold.
#
#   0 < λ <= 1: h_k stays connected; the unit's parameter gradient is
#     λ·true + (1-λ)·synthetic,  synthetic = dh/dθ^T ĝ (computed in the forward),
#   applied once ``loss.backward()`` has delivered the true part.
#
#   The output unit (the last unit to run when recursive=True) has no SG: it
#   stays connected and is stepped with its true gradient.
#
# Work that must follow a backward pass (training SGs on the targets that
# arrived, mixing and stepping λ>0 units) is queued with the autograd engine's
# ``queue_callback``, the hook DDP uses for the same purpose: it runs once the
# current backward call has finished, whichever backward that is. Autograd runs
# callbacks with grad mode off, hence ``torch.enable_grad()`` there.


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


@dataclass(eq=False)
class _Unit:
    """One wrapped module: its optimizer and the synthetic gradient that waits for mixing."""

    name: str
    key: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    is_output: bool
    synthetic_grads: list[torch.Tensor | None] | None = None
    awaiting_step: bool = False
    params: list[nn.Parameter] = field(default_factory=list)

    def clear_grads(self) -> None:
        for p in self.params:
            p.grad = None


class DNI(nn.Module):
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
        self._sg_optimizers: dict[str, torch.optim.Optimizer] = {}
        self._context: torch.Tensor | None = None
        self._active = False
        self._last_unit: _Unit | None = None
        self._flush_queued = False
        self._pending_targets: list[tuple[_Unit, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []
        self._sg_losses: dict[str, torch.Tensor] = {}

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
        self._units: list[_Unit] = []
        for name, module in candidates:
            params = [p for p in module.parameters() if p.requires_grad]
            unit = _Unit(name=name, key=(name.replace(".", "-") or "network"), module=module,
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

    def _unit(self, name: str) -> _Unit:
        for unit in self._units:
            if unit.name == name:
                return unit
        raise KeyError(f"no wrapped unit named {name!r}; units: {self.units}")

    def _build_sg(self, unit: _Unit, features: int, kind: type[DNINetwork]) -> None:
        cls = self._dni_network or kind
        params = dict(self._dni_params)
        if self.context_size:
            params["context_size"] = self.context_size
        sg = cls(features, self._hidden_size, features, **params)
        device = next(iter(unit.params)).device
        self.synthetic[unit.key] = sg.to(device)
        self._sg_optimizers[unit.name] = make_optimizer(
            self._grad_optim, list(sg.parameters()), lr=self._grad_lr, default="adam")

    def _predict(self, unit: _Unit, h: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        """SG_k's synthetic gradient for the (detached) activation h."""
        sg = self.synthetic[unit.key]
        with torch.no_grad():
            pred = synthetic_gradient(sg, h, ctx)
        if pred.shape != h.shape:
            raise RuntimeError(f"SG of unit {unit.name!r} returned shape {tuple(pred.shape)} "
                               f"for an activation of shape {tuple(h.shape)}")
        return pred / h.shape[0] if self.batch_scaled else pred

    def _after_unit(self, unit: _Unit, module: nn.Module, inputs: Any, output: Any) -> Any:
        """Forward hook of a wrapped unit: see [Note: how a wrapped unit is trained]."""
        if not (self._active and self.training and torch.is_grad_enabled()):
            return None
        self._last_unit = unit
        h, rest = split_output(output)
        if h is None or not h.requires_grad:
            return None
        if unit.is_output:
            h.register_hook(partial(self._on_true_grad, unit, None))
            return None
        if unit.key not in self.synthetic:
            self._build_sg(unit, int(h.shape[1] if h.dim() == 4 else h.shape[-1]), default_kind(module, h))
        ctx = self._current_context(h)
        h_d = h.detach()
        if self.lambda_ == 0.0:
            g_hat = self._predict(unit, h_d, ctx)
            unit.clear_grads()
            h.backward(g_hat)
            unit.optimizer.step()
            unit.clear_grads()
            leaf = h_d.requires_grad_()
            leaf.register_hook(partial(self._on_target, unit, h.detach(), ctx))
            out = leaf.clone()
            return out if not rest else (out, *detach_all(rest))
        if self.lambda_ < 1.0:
            g_hat = self._predict(unit, h_d, ctx)
            grads = torch.autograd.grad(h, unit.params, g_hat, retain_graph=True, allow_unused=True)
            if unit.synthetic_grads is None:
                unit.synthetic_grads = list(grads)
            else:
                unit.synthetic_grads = [a if b is None else b if a is None else a + b
                                        for a, b in zip(unit.synthetic_grads, grads)]
        h.register_hook(partial(self._on_true_grad, unit, (h_d.clone(), ctx)))
        return None

    def _current_context(self, h: torch.Tensor) -> torch.Tensor | None:
        if not self.context_size:
            return None
        if self._context is None:
            raise RuntimeError("this DNI has context_size > 0: call set_context(labels) before forward")
        return self._context.to(h.device)

    def _on_target(self, unit: _Unit, h: torch.Tensor, ctx: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Tensor hook: the gradient w.r.t. a unit's output has arrived; queue SG training."""
        self._pending_targets.append((unit, h, ctx, grad.detach()))
        self._queue_flush()

    def _on_true_grad(self, unit: _Unit, stash: tuple[torch.Tensor, torch.Tensor | None] | None,
                      grad: torch.Tensor) -> None:
        """Tensor hook on a connected unit's output: step it once the backward has finished."""
        unit.awaiting_step = True
        if stash is not None:
            self._pending_targets.append((unit, stash[0], stash[1], grad.detach()))
        self._queue_flush()

    def _queue_flush(self) -> None:
        if not self._flush_queued:
            self._flush_queued = True
            Variable._execution_engine.queue_callback(self._flush)

    def _flush(self) -> None:
        """End of a backward call: train SGs on the targets that arrived, step connected units."""
        self._flush_queued = False
        targets, self._pending_targets = self._pending_targets, []
        with torch.enable_grad():
            for unit, h, ctx, grad in targets:
                self._train_sg(unit, h, ctx, grad)
        for unit in self._units:
            if not unit.awaiting_step:
                continue
            unit.awaiting_step = False
            if unit.synthetic_grads is not None:
                lam = self.lambda_
                for p, g in zip(unit.params, unit.synthetic_grads):
                    if p.grad is not None and g is not None:
                        p.grad.mul_(lam).add_(g, alpha=1.0 - lam)
                    elif g is not None:
                        p.grad = g.mul(1.0 - lam)
                unit.synthetic_grads = None
            unit.optimizer.step()
            unit.clear_grads()

    def _train_sg(self, unit: _Unit, h: torch.Tensor, ctx: torch.Tensor | None, target: torch.Tensor) -> None:
        pred = synthetic_gradient(self.synthetic[unit.key], h, ctx)
        if self.batch_scaled:
            target = target * h.shape[0]
        loss = F.mse_loss(pred, target)
        opt = self._sg_optimizers[unit.name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self._sg_losses[unit.name] = loss.detach()

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
