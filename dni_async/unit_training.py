"""How DNI trains its wrapped units: the forward hook, synthetic-gradient targets and the end-of-backward flush."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Variable

from .optim import OptimSpec, make_optimizer
from .synthetic import DNINetwork, synthetic_gradient
from .units import default_kind, detach_all, split_output

__all__ = ["UnitTraining", "WrappedUnit"]

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


@dataclass(eq=False)
class WrappedUnit:
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
        """Drop the gradients of the unit's parameters."""
        for p in self.params:
            p.grad = None


class UnitTraining(nn.Module):
    """The training half of `DNI`: its SG modules and the hooks that train each wrapped unit as it runs.

    Holds no state of its own making: `DNI.__init__` sets up the attributes declared here.
    """

    synthetic: nn.ModuleDict
    lambda_: float
    context_size: int
    batch_scaled: bool
    _dni_network: type[DNINetwork] | None
    _dni_params: dict[str, Any]
    _hidden_size: int
    _grad_optim: OptimSpec
    _grad_lr: float
    _sg_optimizers: dict[str, torch.optim.Optimizer]
    _context: torch.Tensor | None
    _active: bool
    _last_unit: WrappedUnit | None
    _flush_queued: bool
    _pending_targets: list[tuple[WrappedUnit, torch.Tensor, torch.Tensor | None, torch.Tensor]]
    _sg_losses: dict[str, torch.Tensor]
    _units: list[WrappedUnit]

    def _build_sg(self, unit: WrappedUnit, features: int, kind: type[DNINetwork]) -> None:
        """Build a unit's SG module (``dni_network``, else ``kind``) and its optimizer."""
        cls = self._dni_network or kind
        params = dict(self._dni_params)
        if self.context_size:
            params["context_size"] = self.context_size
        sg = cls(features, self._hidden_size, features, **params)
        device = next(iter(unit.params)).device
        self.synthetic[unit.key] = sg.to(device)
        self._sg_optimizers[unit.name] = make_optimizer(
            self._grad_optim, list(sg.parameters()), lr=self._grad_lr, default="adam")

    def _predict(self, unit: WrappedUnit, h: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        """SG_k's synthetic gradient for the (detached) activation h."""
        sg = self.synthetic[unit.key]
        with torch.no_grad():
            pred = synthetic_gradient(sg, h, ctx)
        if pred.shape != h.shape:
            raise RuntimeError(f"SG of unit {unit.name!r} returned shape {tuple(pred.shape)} "
                               f"for an activation of shape {tuple(h.shape)}")
        return pred / h.shape[0] if self.batch_scaled else pred

    def _after_unit(self, unit: WrappedUnit, module: nn.Module, inputs: Any, output: Any) -> Any:
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
        """The SG context on h's device; None without cDNI."""
        if not self.context_size:
            return None
        if self._context is None:
            raise RuntimeError("this DNI has context_size > 0: call set_context(labels) before forward")
        return self._context.to(h.device)

    def _on_target(self, unit: WrappedUnit, h: torch.Tensor, ctx: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Tensor hook: the gradient w.r.t. a unit's output has arrived; queue SG training."""
        self._pending_targets.append((unit, h, ctx, grad.detach()))
        self._queue_flush()

    def _on_true_grad(self, unit: WrappedUnit, stash: tuple[torch.Tensor, torch.Tensor | None] | None,
                      grad: torch.Tensor) -> None:
        """Tensor hook on a connected unit's output: step it once the backward has finished."""
        unit.awaiting_step = True
        if stash is not None:
            self._pending_targets.append((unit, stash[0], stash[1], grad.detach()))
        self._queue_flush()

    def _queue_flush(self) -> None:
        """Have `_flush` run once the current backward call has finished (once per call)."""
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

    def _train_sg(self, unit: WrappedUnit, h: torch.Tensor, ctx: torch.Tensor | None, target: torch.Tensor) -> None:
        """One SG regression step of a unit towards the gradient that arrived for h."""
        pred = synthetic_gradient(self.synthetic[unit.key], h, ctx)
        if self.batch_scaled:
            target = target * h.shape[0]
        loss = F.mse_loss(pred, target)
        opt = self._sg_optimizers[unit.name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        self._sg_losses[unit.name] = loss.detach()
