"""Truncated BPTT for an LSTM layer, with an optional synthetic gradient from the future at each boundary."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .synthetic import LinearDNI

__all__ = ["TruncatedLSTM", "carried_states", "load_carried_states", "reset_states", "sg_fit"]

State = tuple[torch.Tensor, torch.Tensor]

# [Note: temporal synthetic gradients]
#
# The paper's RNN setting (Jaderberg et al. 2016, sec. 3.1): a sequence is cut
# into chunks of T steps and backprop stops at each chunk boundary. Without an
# SG the final state s_T of a chunk gets no gradient from the future; with one,
# s_T gets SG(s_T) as if the loss of the later chunks had been backpropagated
# into it. SG(s_0) of the chunk's first state is then trained toward the
# gradient that actually reaches s_0 in this chunk's backward pass, which holds
# the chunk's own losses plus SG(s_T) (bootstrapping), so the prediction can
# reach further ahead than T. At the end of a sequence the future is empty:
# the last state's SG is trained toward zero when the state is reset.
#
# The SG gradient enters the backward pass through `_InjectGradient`, an
# identity on the layer's output whose backward also hands SG(s_T) to s_T:
# callers run their usual `loss.backward()` (or `h.backward(g)` in a pipeline
# stage) and need to know nothing about it. The SG's own update runs at the
# next forward call (or reset), once that backward pass is known to be done.


class _InjectGradient(torch.autograd.Function):
    """Identity on ``output``; backward also sends ``grad_h``, ``grad_c`` into the final state ``h``, ``c``."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, h: torch.Tensor, c: torch.Tensor,  # type: ignore[override]
                grad_h: torch.Tensor, grad_c: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad_h, grad_c)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_c = ctx.saved_tensors
        return grad_output, grad_h, grad_c, None, None


class TruncatedLSTM(nn.Module):
    """One batch-first LSTM layer whose state carries over from one call to the next (truncated BPTT).

    Each call is one chunk: the state it ends in starts the next call, cut off
    from the graph. Call :meth:`reset_state` at the start of new sequences.
    Training and eval keep separate states, so evaluation in between does not
    disturb training. With ``temporal_sg`` the final state of every training
    chunk receives a synthetic gradient (see [Note: temporal synthetic
    gradients]); the SG is a linear map ``[h, c] -> [dL/dh, dL/dc]``
    (zero-initialised) with its own Adam optimizer, trained on batch-scaled
    targets like the pipeline's SGs.

    Args:
        input_size: features of each time step.
        hidden_size: LSTM width.
        temporal_sg: give each chunk's final state a synthetic gradient.
        sg_lr: Adam learning rate of the SG.
        sg_scale: factor on the synthetic gradient injected into the backward pass (the SG's own
            training is unchanged).
    """

    def __init__(self, input_size: int, hidden_size: int, temporal_sg: bool = False, sg_lr: float = 3e-3,
                 sg_scale: float = 1.0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.sg = LinearDNI(2 * hidden_size, 2 * hidden_size, 2 * hidden_size) if temporal_sg else None
        self.sg_lr, self.sg_scale = sg_lr, sg_scale
        self._sg_opt: torch.optim.Optimizer | None = None
        self._states: dict[bool, State] = {}
        self._pending: State | None = None   # first state of the last training chunk (leaves with .grad)
        self.sg_loss: torch.Tensor | None = None
        self.sg_fit = torch.zeros(3)  # sums over SG updates with a nonzero target: cosine, mse / mean(target^2), count

    def reset_state(self, training: bool = True) -> None:
        """Start new sequences: forget the state of training (or eval) chunks.

        In training with a temporal SG, the SG is first updated on what the
        finished sequence taught it: its last boundary's target, and zero for
        the final state (no future after a sequence ends).
        """
        if training and self.sg is not None:
            self._update_sg()
            final = self._states.get(True)
            if final is not None:
                self._sg_step(torch.cat(final, dim=-1), torch.zeros_like(torch.cat(final, dim=-1)))
        self._states.pop(training, None)

    def carried_state(self) -> dict[str, Any]:
        """What training carries from one chunk to the next (for checkpoints): the training state, the temporal
        SG's pending update (the last chunk's first state and the gradient that reached it) and its optimizer."""
        state, pending = self._states.get(True), self._pending
        ready = pending is not None and pending[0].grad is not None and pending[1].grad is not None
        return {
            "state": [t.clone() for t in state] if state is not None else None,
            "pending": [pending[0].detach(), pending[1].detach(), pending[0].grad, pending[1].grad]
            if ready and pending is not None else None,
            "sg_opt": self._sg_opt.state_dict() if self._sg_opt is not None else None,
        }

    def load_carried_state(self, carried: dict[str, Any]) -> None:
        """Continue from a :meth:`carried_state` (the eval state starts afresh)."""
        device = next(self.lstm.parameters()).device
        self._states.pop(True, None)
        if carried["state"] is not None:
            h, c = (t.to(device) for t in carried["state"])
            self._states[True] = (h, c)
        self._pending = None
        if carried["pending"] is not None:
            h, c, grad_h, grad_c = (t.to(device) for t in carried["pending"])
            h.requires_grad_(True)
            c.requires_grad_(True)
            h.grad, c.grad = grad_h, grad_c
            self._pending = (h, c)
        if carried["sg_opt"] is not None and self.sg is not None:
            self._sg_opt = torch.optim.Adam(self.sg.parameters(), lr=self.sg_lr)
            self._sg_opt.load_state_dict(carried["sg_opt"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (batch, time, input_size) -> outputs (batch, time, hidden_size)."""
        batch = x.shape[0]
        state = self._states.get(self.training)
        carried = state is not None and state[0].shape[1] == batch
        if not carried:
            zeros = x.new_zeros(1, batch, self.hidden_size)
            state = (zeros, zeros)
        assert state is not None
        inject = self.sg is not None and self.training and torch.is_grad_enabled()
        if inject:
            self._update_sg()
            if carried:
                state = (state[0].detach().requires_grad_(), state[1].detach().requires_grad_())
                self._pending = state
        out, (h, c) = self.lstm(x, state)
        if inject:
            assert self.sg is not None
            with torch.no_grad():
                synthetic = self.sg(torch.cat([h, c], dim=-1))[0] * (self.sg_scale / batch)
            grad_h, grad_c = synthetic.split(self.hidden_size, dim=-1)
            out = _InjectGradient.apply(out, h, c, grad_h.contiguous(), grad_c.contiguous())
        self._states[self.training] = (h.detach(), c.detach())
        return out

    def _update_sg(self) -> None:
        """Train the SG on the previous chunk's first state toward the gradient that reached it."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0].grad is None or pending[1].grad is None:
            return
        state = torch.cat([pending[0].detach(), pending[1].detach()], dim=-1)
        target = torch.cat([pending[0].grad, pending[1].grad], dim=-1) * state.shape[1]
        self._sg_step(state, target)

    def _sg_step(self, state: torch.Tensor, target: torch.Tensor) -> None:
        assert self.sg is not None
        if self._sg_opt is None:
            self._sg_opt = torch.optim.Adam(self.sg.parameters(), lr=self.sg_lr)
        with torch.enable_grad():
            prediction = self.sg(state)[0]
            loss = F.mse_loss(prediction, target)
            self._sg_opt.zero_grad(set_to_none=True)
            loss.backward()
        with torch.no_grad():
            power = target.pow(2).mean()
            if power > 0:  # how well the SG predicted this target before learning from it
                cosine = F.cosine_similarity(prediction.flatten(), target.flatten(), dim=0)
                self.sg_fit += torch.stack([cosine, loss.detach() / power, torch.ones(())]).to(self.sg_fit)
        self._sg_opt.step()
        self._sg_opt.zero_grad(set_to_none=True)  # the model's own optimizer must never step the SG
        self.sg_loss = loss.detach()


def sg_fit(module: nn.Module) -> dict[str, float] | None:
    """Mean fit of the temporal SGs in ``module`` since the last call (then restarted), None without one.

    ``cosine``: between each prediction and the target it was then trained on;
    ``relative_mse``: the SG's mean squared error over the target's mean square
    (1 is no better than predicting zero); ``updates``: SG steps counted.
    """
    sums = torch.zeros(3)
    for sub in module.modules():
        if isinstance(sub, TruncatedLSTM) and sub.sg is not None:
            sums += sub.sg_fit.cpu()
            sub.sg_fit.zero_()
    if sums[2] == 0:
        return None
    return {"cosine": round(float(sums[0] / sums[2]), 4), "relative_mse": round(float(sums[1] / sums[2]), 4),
            "updates": int(sums[2])}


def reset_states(module: nn.Module, training: bool = True) -> None:
    """:meth:`TruncatedLSTM.reset_state` on every truncated LSTM inside ``module``."""
    for sub in module.modules():
        if isinstance(sub, TruncatedLSTM):
            sub.reset_state(training)


def carried_states(module: nn.Module) -> dict[str, dict[str, Any]]:
    """:meth:`TruncatedLSTM.carried_state` of every truncated LSTM inside ``module``, by module name."""
    return {name: sub.carried_state() for name, sub in module.named_modules() if isinstance(sub, TruncatedLSTM)}


def load_carried_states(module: nn.Module, states: dict[str, dict[str, Any]]) -> None:
    """Restore :func:`carried_states` into the same model.

    Raises:
        ValueError: if the truncated LSTMs of ``module`` are not the ones saved.
    """
    lstms = {name: sub for name, sub in module.named_modules() if isinstance(sub, TruncatedLSTM)}
    if set(lstms) != set(states):
        raise ValueError(f"saved recurrent state for {sorted(states)}, the model has {sorted(lstms)}")
    for name, sub in lstms.items():
        sub.load_carried_state(states[name])
