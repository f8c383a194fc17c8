"""Slot memory of the ring transports: host memory in the control block's file (``shm``), CUDA memory (``cuda-ipc``)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Sequence

import torch

from ..protocol import ProtocolError, Spec
from .ring import CONTROL_BYTES, Announce, Control

__all__ = ["HostSlots", "CudaSlots", "wait_for_event"]

logger = logging.getLogger("dni_async.transport")

_HANDLE_BYTES = 256  # upper bound on the bytes of one CUDA IPC handle or ref-counter file name


def _view(data: torch.Tensor, start: int, dtype: torch.dtype, shape: Sequence[int], nbytes: int) -> torch.Tensor:
    """The tensor of ``dtype`` and ``shape`` at byte ``start`` of the flat uint8 ``data``."""
    return data[start:start + nbytes].view(dtype).view(list(shape))


def wait_for_event(event: Any, stop: threading.Event | None = None) -> bool:
    """Wait until a CUDA event has completed, by polling (never a host-device sync call: a sync debug mode set to
    "error" stays quiet on the I/O threads too). Returns False if ``stop`` was set first."""
    pause = 2e-5
    while not event.query():
        if stop is not None and stop.is_set():
            return False
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
    return True


class HostSlots:
    """Slots in host memory, after the control block in the same file: for CPU stages on one host.

    Copies are plain CPU copies: a slot is released as soon as the receiver has copied it out.
    """

    kind = "shm"
    device_type = "cpu"

    def __init__(self, control: Control, slots: int, slot_bytes: int) -> None:
        self.control, self.slot_bytes = control, slot_bytes
        self.data = torch.frombuffer(control.map, dtype=torch.uint8, offset=CONTROL_BYTES, count=slots * slot_bytes)

    @staticmethod
    def file_bytes(slots: int, slot_bytes: int) -> int:
        return CONTROL_BYTES + slots * slot_bytes

    @classmethod
    def create(cls, control: Control, slots: int, slot_bytes: int, device: torch.device) -> tuple[HostSlots, dict]:
        """The sender's slots, and the ``memory`` map of their announcement (empty: the file is the memory)."""
        return cls(control, slots, slot_bytes), {}

    @classmethod
    def open(cls, control: Control, new: Announce, device: torch.device) -> HostSlots:
        """The receiver's view of a sender's slots.

        Raises:
            ProtocolError: for a ``memory`` map that is not empty.
        """
        if new.memory:
            raise ProtocolError(f"shm ring memory must be an empty map, got {new.memory!r:.200}")
        return cls(control, new.slots, new.slot_bytes)

    def write(self, slot: int, offsets: list[int], tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` into ``slot``."""
        base = slot * self.slot_bytes
        for offset, tensor in zip(offsets, tensors):
            _view(self.data, base + offset, tensor.dtype, tensor.shape, tensor.nbytes).copy_(tensor)

    def read(self, slot: int, offsets: list[int], specs: Sequence[Spec]) -> list[torch.Tensor]:
        """Copies of the tensors in ``slot``; the slot is released."""
        base = slot * self.slot_bytes
        out = [_view(self.data, base + offset, dtype, shape, nbytes).clone()
               for offset, (dtype, shape, nbytes) in zip(offsets, specs)]
        self.control.release()
        return out

    def close(self) -> None:
        """Drop the slots, then their control block."""
        del self.data
        self.control.close()


class CudaSlots:
    """Slots in the sender's CUDA memory, shared once by CUDA IPC handle; one interprocess event per slot.

    The sender's copy into a slot runs on its current stream and records the slot's event; the receiver's stream
    waits for that event (on the device, not the host), copies out device to device, and records an event of its
    own, which a releaser thread polls before it releases the slot: the sender only ever writes a slot whose
    previous contents have been copied out. Nothing here makes the host wait for the device.
    """

    kind = "cuda-ipc"
    device_type = "cuda"

    def __init__(self, control: Control, slots: int, slot_bytes: int, data: torch.Tensor, events: list[Any],
                 device: torch.device) -> None:
        self.control, self.slot_bytes, self.data, self.events = control, slot_bytes, data, events
        self.device = device
        """Where the receiver's copies go (the sender: the slots' own device)."""
        self._released: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._releaser: threading.Thread | None = None

    @staticmethod
    def file_bytes(slots: int, slot_bytes: int) -> int:
        return CONTROL_BYTES

    @classmethod
    def create(cls, control: Control, slots: int, slot_bytes: int, device: torch.device) -> tuple[CudaSlots, dict]:
        """The sender's slots on ``device``, and the handles its announcement carries."""
        with torch.cuda.device(device):
            data = torch.empty(slots * slot_bytes, dtype=torch.uint8, device=device)
            events = [torch.cuda.Event(interprocess=True) for _ in range(slots)]
            handles = [bytes(event.ipc_handle()) for event in events]
            storage = list(data.untyped_storage()._share_cuda_())
        storage[0] = int(storage[0])
        memory = {"uuid": str(torch.cuda.get_device_properties(device).uuid), "storage": storage, "events": handles}
        return cls(control, slots, slot_bytes, data, events, device), memory

    @classmethod
    def open(cls, control: Control, new: Announce, device: torch.device) -> CudaSlots:
        """Map a sender's slots and events (on the GPU with the sender's UUID).

        Raises:
            ProtocolError: for a malformed ``memory`` map, a GPU this process does not see, or slot memory
                smaller than the announcement says.
        """
        memory = new.memory
        if set(memory) != {"uuid", "storage", "events"} or not isinstance(memory["uuid"], str):
            raise ProtocolError(f"cuda-ipc ring memory must have keys uuid, storage, events; got {memory!r:.200}")
        storage, events = memory["storage"], memory["events"]
        types = (int, bytes, int, int, bytes, int, bytes, bool)
        if not isinstance(storage, list) or len(storage) != len(types) \
                or not all(type(v) is t for v, t in zip(storage, types)):
            raise ProtocolError(f"cuda-ipc storage handle must be {[t.__name__ for t in types]}, got {storage!r:.200}")
        if any(isinstance(v, bytes) and len(v) > _HANDLE_BYTES for v in storage) or min(
                v for v in storage if type(v) is int) < 0:
            raise ProtocolError("cuda-ipc storage handle has an oversized or negative field")
        if storage[2] < new.slots * new.slot_bytes:
            raise ProtocolError(f"cuda-ipc slot memory of {storage[2]} bytes is smaller than "
                                f"{new.slots} slots of {new.slot_bytes}")
        if not isinstance(events, list) or len(events) != new.slots or \
                not all(type(h) is bytes and 0 < len(h) <= _HANDLE_BYTES for h in events):
            raise ProtocolError(f"cuda-ipc ring needs {new.slots} event handles")
        index = next((i for i in range(torch.cuda.device_count())
                      if str(torch.cuda.get_device_properties(i).uuid) == memory["uuid"]), None)
        if index is None:
            raise ProtocolError(f"the sender's GPU {memory['uuid']} is not visible to this process")
        storage[0] = index
        ring_device = torch.device("cuda", index)
        shared = torch.UntypedStorage._new_shared_cuda(*storage)
        data = torch.empty(0, dtype=torch.uint8, device=ring_device).set_(shared)[:new.slots * new.slot_bytes]
        opened = [torch.cuda.Event.from_ipc_handle(ring_device, h) for h in events]
        return cls(control, new.slots, new.slot_bytes, data, opened, device)

    def write(self, slot: int, offsets: list[int], tensors: Sequence[torch.Tensor]) -> None:
        """Queue the copies of ``tensors`` into ``slot`` on the current stream and record the slot's event.
        The caller keeps the tensors alive until then (``record_stream``: transport/device_sender.py)."""
        base = slot * self.slot_bytes
        for offset, tensor in zip(offsets, tensors):
            _view(self.data, base + offset, tensor.dtype, tensor.shape, tensor.nbytes).copy_(tensor, non_blocking=True)
        self.events[slot].record(torch.cuda.current_stream(self.data.device))

    def read(self, slot: int, offsets: list[int], specs: Sequence[Spec]) -> list[torch.Tensor]:
        """Copies of the tensors in ``slot`` on this stage's device, queued on its current stream after the
        sender's copy; the slot is released (by the releaser thread) once they are done."""
        device = self.device
        streams = {torch.cuda.current_stream(device), torch.cuda.current_stream(self.data.device)}
        for stream in streams:  # a copy between two GPUs may run on either device's stream
            stream.wait_event(self.events[slot])
        base = slot * self.slot_bytes
        out = []
        for offset, (dtype, shape, nbytes) in zip(offsets, specs):
            tensor = torch.empty(shape, dtype=dtype, device=device)
            out.append(tensor.copy_(_view(self.data, base + offset, dtype, shape, nbytes), non_blocking=True))
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(device))
        if self._releaser is None:
            self._releaser = threading.Thread(target=self._release_loop, name="dni-ring-release", daemon=True)
            self._releaser.start()
        self._released.put(done)
        return out

    def _release_loop(self) -> None:
        """Release slots in order, each once the copy out of it has completed on the device."""
        while (done := self._released.get()) is not None:
            if not wait_for_event(done, self._stop):
                return
            self.control.release()

    def close(self) -> None:
        """Stop releasing, drop the slots and events, then their control block."""
        self._stop.set()
        if self._releaser is not None:
            self._released.put(None)
            self._releaser.join(5.0)
        del self.data, self.events
        self.control.close()
