"""The stage loop's deliberate waits for the device, each named: anything else that waits on the hot path is a bug."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

__all__ = ["REASONS", "host_sync", "inside", "sync_check"]

# [Note: host syncs]
#
# A GPU stage queues its kernels and goes on; reading a value back (.item(),
# float(t), .cpu(), a copy to pageable memory) makes the host wait until every
# kernel queued so far has run, and the stage cannot queue its next step
# meanwhile. The stage loop reads values back only here, each under a name:
#
#   "metrics line"   every --log-every steps: losses, SG fit, the divergence check
#   "scored group"   where a scored group ends (eval; tasks that score training batches): its metric totals
#   "checkpoint"     every --checkpoint-every steps: the state written to disk
#   "saved gradients" --save-grads-step: the gradients written to disk
#   "summary"        once, after training: the figures of summary.json
#
# Messages never read back on the training thread (transport/device_sender.py).
# ``--sync-check`` runs the stages under torch.cuda.set_sync_debug_mode("error"),
# lifted while the training thread is inside one of these blocks (the mode is the
# process's: the I/O threads, which never sync, are unchecked meanwhile): any
# other sync fails the run where it happens.

REASONS = ("metrics line", "scored group", "checkpoint", "saved gradients", "summary")
_state = threading.local()


@contextlib.contextmanager
def host_sync(reason: str) -> Iterator[None]:
    """A deliberate wait for the device (one of :data:`REASONS`): allowed by the sync check inside the block.

    Raises:
        ValueError: for a reason that is not one of :data:`REASONS`.
    """
    if reason not in REASONS:
        raise ValueError(f"unknown host sync {reason!r}; the stage loop's are {REASONS}")
    # Only where CUDA is started: asking for the mode starts it, and a CPU stage on a machine with a GPU never does.
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_initialized() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def inside() -> bool:
    """Whether this thread is in a :func:`host_sync` block (for checks of the hot path)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def sync_check(on: bool) -> Iterator[None]:
    """With ``on``: every host-device sync outside :func:`host_sync` raises (``--sync-check``, CUDA stages).

    Raises:
        ValueError: with ``on`` where CUDA is not available.
    """
    if not on:
        yield
        return
    if not torch.cuda.is_available():
        raise ValueError("--sync-check checks GPU stages: CUDA is not available here")
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
