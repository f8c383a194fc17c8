"""``delayed``: true gradients, applied when they arrive, through the graph and the weights of the step they are for."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from ..transport import Message
from .base import GradientSource
from .io import StageIO

__all__ = ["Delayed", "WeightStash"]

# [Note: weight stashing]
#
# Step t's forward runs with the weights w_t; its true gradient comes back d
# steps later, after the optimizer has updated the weights in place d times.
# Backpropagating through step t's graph must use w_t (PipeDream's weight
# stashing), both for the input's gradient sent back and for the parameters'
# own gradient. Autograd saves for the backward pass the tensors each op needs:
# for a Linear, its input (for dL/dW) and its weight (for dL/dx). During the
# forward, a saved-tensor hook copies every saved tensor that lives in a
# parameter's storage (the weight, or a view of it such as weight.t()), so the
# graph keeps w_t while the live parameter moves on; everything else (inputs,
# intermediate activations) is saved as usual. Parameter gradients still
# accumulate into the live parameters (AccumulateGrad), which is what the
# optimizer steps. Cost: one copy of the weights per step in flight, plus the
# activations of the graphs in flight (counted: `stash_mb`). A recompute
# instead would cost one more forward per step; the copy costs a memcpy.


class WeightStash:
    """A saved-tensor hook that keeps a private copy of every parameter tensor a forward pass saves.

    Args:
        params: the parameters whose saved copies must not change when the optimizer updates them.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.storages = {p.untyped_storage().data_ptr() for p in params}
        self.nbytes = 0
        self._seen: set[int] = set()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy a parameter's tensor; pass others through (their bytes counted once)."""
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in self.storages:
            tensor = tensor.clone()
            self.nbytes += tensor.nbytes
        elif ptr not in self._seen:
            self._seen.add(ptr)
            self.nbytes += tensor.untyped_storage().nbytes()
        return tensor

    @staticmethod
    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class Delayed(GradientSource):
    """Forward step t now; apply the true gradient of each earlier step s when it arrives, through step s's graph
    with step s's weights (see [Note: weight stashing]); send s's input gradient back then.

    At most ``--max-in-flight`` steps await their gradient (at least 1: with 1 it is locked backprop, with the
    update of step t made just before step t+1's forward). Before an evaluation or a checkpoint, every gradient in
    flight is waited for and applied.
    """

    absorbs = True

    def __init__(self, io: StageIO) -> None:
        super().__init__(io)
        self.limit = max(1, io.config.max_in_flight)
        self.graphs: OrderedDict[int, tuple[torch.Tensor, torch.Tensor, int]] = OrderedDict()  # step -> x, h, bytes
        self.params = [p for p in io.block.parameters() if p.requires_grad]
        self.max_bytes = 0
        self._stash_bytes = 0  # of the last forward

    def before_forward(self, t: int) -> None:
        self.wait_while_pending(t, self.limit)

    def forward(self, t: int, x: torch.Tensor) -> torch.Tensor:
        stash = WeightStash(self.params)
        with torch.autograd.graph.saved_tensors_hooks(stash.pack, stash.unpack):
            h = self.io.block(x)
        self._stash_bytes = stash.nbytes
        return h  # type: ignore[no-any-return]

    def update(self, t: int, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, meta: dict[str, Any]) -> None:
        self.graphs[t] = (x, h, self._stash_bytes)
        self.max_bytes = max(self.max_bytes, self.stash_bytes())

    def pending(self) -> int:
        return len(self.graphs)

    def stash_bytes(self) -> int:
        """Bytes the graphs in flight hold (stashed weights and saved activations)."""
        return sum(entry[2] for entry in self.graphs.values())

    def on_gradient(self, msg: Message, t: int) -> None:
        entry = self.graphs.pop(msg.step, None)
        if entry is None:
            self.io.reject(msg, "no step in flight awaits it")
            return
        x, h, _ = entry
        h.backward(self.io.target(msg, h))
        self.io.apply(msg.step)
        self.io.send_grad(msg.step, x)

    def flush(self, t: int) -> None:
        self.wait_while_pending(t, 1)

    def log_fields(self) -> dict[str, Any]:
        return {"in_flight": len(self.graphs), "stash_mb": round(self.stash_bytes() / 2**20, 2)}

    def summary_fields(self) -> dict[str, Any]:
        return {"max_stash_mb": round(self.max_bytes / 2**20, 2)}
