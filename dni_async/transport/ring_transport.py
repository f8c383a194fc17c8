"""The ring transports, ``shm`` and ``cuda-ipc``: tensors through shared slots, headers over the zmq channel."""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .. import protocol
from .base import DIRECTIONS, Message, SendDeadline, TransportOptions
from .ring import MAX_SLOTS, Control, Ref, check_ref, place, ring_name, slot_bytes_for
from .ring_slots import CudaSlots, HostSlots
from .zmq import ZmqTransport, parse_endpoint
from .zmq_receiver import Inbound

__all__ = ["RingTransport", "ShmTransport", "CudaIpcTransport", "host_identity"]

logger = logging.getLogger("dni_async.transport")

_POLL_MIN_S, _POLL_MAX_S = 2e-5, 1e-3  # a sender waiting for a free slot polls the receiver's counter this often
CLOSE_WAIT_S = 5.0
"""How long ``close`` waits for a neighbour to copy out the messages still in its ring (the zmq channel's
linger is 1 s: a ring message's data lives in the slot, which closing frees)."""


@functools.lru_cache(maxsize=1)
def host_identity() -> str:
    """Who can share memory with this process: the boot, the shared-memory file system and the IPC namespace
    (two containers on one machine with their own /dev/shm differ; two network namespaces do not)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        shm, ipc = os.stat("/dev/shm"), os.stat("/proc/self/ns/ipc")
        return f"{boot}.{shm.st_dev}.{shm.st_ino}.{ipc.st_ino}"
    except OSError:
        return f"host-{socket.gethostname()}"


@dataclass
class _Sending:
    """The ring this stage writes for one neighbour."""

    memory: Any
    """The slots (ring_slots.py), which hold the ring's control block."""
    gen: int
    announce: dict[str, Any]
    produced: int = 0

    @classmethod
    def create(cls, slots_cls: Any, device: torch.device, slots: int, slot_bytes: int, gen: int) -> _Sending:
        control = Control(ring_name(), slots_cls.file_bytes(slots, slot_bytes), create=True)
        try:
            memory, handles = slots_cls.create(control, slots, slot_bytes, device)
        except BaseException:
            control.close()
            raise
        announce = {"slots": slots, "slot_bytes": slot_bytes, "control": control.name, "memory": handles}
        return cls(memory, gen, announce)

    @property
    def slots(self) -> int:
        return int(self.announce["slots"])

    @property
    def slot_bytes(self) -> int:
        return int(self.announce["slot_bytes"])

    def in_flight(self) -> int:
        """Slots written and not yet released by the receiver."""
        return self.produced - int(self.memory.control.consumed.value)

    def put(self, offsets: list[int], tensors: list[torch.Tensor]) -> dict[str, Any]:
        """Write ``tensors`` at ``offsets`` (`ring.place`) into the next slot (the caller has waited for it to be
        free); their ring map."""
        slot = self.produced % self.slots
        self.memory.write(slot, offsets, tensors)
        ring: dict[str, Any] = {"gen": self.gen, "slot": slot, "offsets": offsets}
        if self.produced == 0:
            ring["new"] = self.announce
        self.produced += 1
        return ring


class _Receiving:
    """The ring one neighbour writes for this stage, as the I/O thread has accepted its messages."""

    def __init__(self, slots_cls: Any, device: torch.device, max_bytes: int) -> None:
        self.slots_cls, self.device, self.max_bytes = slots_cls, device, max_bytes
        self.memory: Any = None
        self.gen = self.slots = self.slot_bytes = self.accepted = 0

    def accept(self, header: protocol.Header) -> tuple[Any, Ref]:
        """Check a message's ring map (opening a new ring it announces); the slots and where its tensors are.

        Raises:
            protocol.ProtocolError: for a map out of order or malformed, or a ring that cannot be opened.
        """
        expected = None if self.memory is None else (self.gen, self.accepted % self.slots)
        ref = check_ref(header.ring, [n for _, _, n in header.specs], expected, self.slot_bytes, self.max_bytes)
        if ref.new is not None:
            new = ref.new
            try:
                control = Control(new.control, self.slots_cls.file_bytes(new.slots, new.slot_bytes), create=False)
            except OSError as err:
                raise protocol.ProtocolError(f"cannot open ring control block {new.control}: {err}") from err
            try:
                memory = self.slots_cls.open(control, new, self.device)
            except protocol.ProtocolError:
                control.close()
                raise
            except Exception as err:  # CUDA's own errors on opening a handle
                control.close()
                raise protocol.ProtocolError(f"cannot open the announced ring: {err}") from err
            self.close()  # the sender made a new ring only once every slot of the old one was released
            self.memory, self.gen, self.slots, self.slot_bytes, self.accepted = (
                memory, ref.gen, new.slots, new.slot_bytes, 0)
        self.accepted += 1
        return self.memory, ref

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None


@dataclass
class _Pending(Message):
    """A ring message accepted by the I/O thread; ``recv`` copies its tensors out of the slot."""

    memory: Any = None
    ref: Ref | None = None
    specs: list[Any] | None = None


class RingTransport(ZmqTransport):
    """Tensors through a ring of shared slots per neighbour on this host (see [Note: the ring transports] in
    ring.py); headers, and whole messages to a neighbour elsewhere, over the zmq channel of `ZmqTransport`.

    Args:
        stage, num_stages, options: as `ZmqTransport`; ``options.queue_size`` is also the number of slots
            of each ring (at most ``ring.MAX_SLOTS``), ``options.device`` must be of the slots' kind.

    Raises:
        ValueError: for a device the slots cannot hold.
    """

    slots_cls: Any
    """The slot memory (ring_slots.py): its ``kind`` names the transport."""

    def __init__(self, stage: int, num_stages: int, options: TransportOptions) -> None:
        device = torch.device(options.device)
        kind = self.slots_cls.kind
        if device.type != self.slots_cls.device_type:
            raise ValueError(f"--transport {kind} carries {self.slots_cls.device_type} tensors; stage {stage} is on "
                             f"{device} (use {'cuda-ipc' if device.type == 'cuda' else 'shm or zmq'})")
        super().__init__(stage, num_stages, options)
        self.device = device
        self._sending: dict[int, _Sending] = {}
        self._ring_peers: set[int] = set()
        self._receiving = {d: _Receiving(self.slots_cls, device, options.max_message_bytes) for d in DIRECTIONS}

    def bind(self) -> str:
        """As `ZmqTransport.bind`, the endpoint naming this transport's slots and this host's identity."""
        return f"{super().bind()};ring={self.slots_cls.kind}@{host_identity()}"

    def connect(self, endpoints: Mapping[int, str]) -> None:
        """As `ZmqTransport.connect`; a neighbour whose endpoint names the same slots on this host gets a ring."""
        super().connect(endpoints)
        mine = f"{self.slots_cls.kind}@{host_identity()}"
        self._ring_peers = {p for p in self._outbound if parse_endpoint(endpoints[p]).get("ring") == mine}

    def carries_device_tensors(self, dst: int) -> bool:
        return self.device.type == "cuda" and dst in self._ring_peers

    def send(self, dst: int, msg: Message, while_blocked: Callable[[], None] | None = None) -> None:
        """Send ``msg`` to ``dst``: through a ring slot where ``dst`` has one and the tensors are on this
        transport's kind of device, else as `ZmqTransport.send`. Blocks while the ring is full, with the same
        timeout, abort and ``while_blocked`` rules as zmq (see `Transport.send`)."""
        self.check_route(dst, msg)
        if self._closed or dst not in self._outbound:
            raise RuntimeError(f"stage {self.stage}: send() before connect() or after close()")
        wait = SendDeadline(self, dst, msg)
        kind = self.slots_cls.device_type
        ring = None
        if dst in self._ring_peers and msg.tensors and all(t.device.type == kind for t in msg.tensors):
            offsets, need = place([t.nbytes for t in msg.tensors])
            ring = self._ring_with_room(dst, need, wait, while_blocked)
        if ring is None:  # a whole message over zmq, as ZmqTransport.send (whose checks were made above)
            self._send_frames(dst, protocol.encode(msg), wait, while_blocked)
            return
        self._send_frames(dst, protocol.encode(msg, ring=ring.put(offsets, msg.tensors)), wait, while_blocked)
        self.stats.bytes_sent += sum(t.nbytes for t in msg.tensors)

    def _ring_with_room(self, dst: int, need: int, wait: SendDeadline,
                        while_blocked: Callable[[], None] | None) -> _Sending | None:
        """The ring to ``dst`` once a slot of at least ``need`` bytes is free in it: this one, or a new, larger
        one once every slot of this one is released; None where no ring can be made (``dst`` then gets whole
        messages over zmq from now on)."""
        ring = self._sending.get(dst)
        if ring is not None and need <= ring.slot_bytes:
            self._wait_for_room(ring, ring.slots - 1, wait, while_blocked)
            return ring
        previous = gen = 0
        if ring is not None:
            self._wait_for_room(ring, 0, wait, while_blocked)
            previous, gen = ring.slot_bytes, ring.gen + 1
            del self._sending[dst]
            ring.memory.close()
        slots = min(self.options.queue_size, MAX_SLOTS)
        try:
            self._sending[dst] = _Sending.create(self.slots_cls, self.device, slots, slot_bytes_for(need, previous),
                                                 gen)
        except OSError as err:  # e.g. a small /dev/shm
            logger.warning("stage %d: no ring for stage %d (%s); sending it whole messages over zmq",
                           self.stage, dst, err)
            self._ring_peers.discard(dst)
            return None
        return self._sending[dst]

    def _wait_for_room(self, ring: _Sending, most: int, wait: SendDeadline,
                       while_blocked: Callable[[], None] | None) -> None:
        """Wait until at most ``most`` of the ring's slots are in flight (PeerLost, Aborted as `SendDeadline`)."""
        pause = _POLL_MIN_S
        while ring.in_flight() > most:
            remaining = wait.remaining(self._abort)
            assert remaining is not None  # only an abort is best effort, and it never takes a slot
            if while_blocked is not None:
                while_blocked()
            time.sleep(min(pause, remaining))
            pause = min(2 * pause, _POLL_MAX_S)

    def _decode(self, inb: Inbound, header: protocol.Header, frames: list[Any]) -> Message:
        """A plain message as zmq decodes it; a ring message (its channel checked before it touches the ring) as
        a `_Pending` that ``recv`` completes."""
        if header.ring is None:
            return super()._decode(inb, header, frames)
        if len(frames) != 1:
            raise protocol.ProtocolError(f"a ring message has {len(frames) - 1} raw frames; its tensors are in a slot")
        memory, ref = self._receiving[inb.direction].accept(header)
        self.stats.bytes_received += sum(n for _, _, n in header.specs)
        return _Pending(header.kind, header.step, header.src, [], header.meta, memory, ref, header.specs)

    def recv(self, direction: str, timeout: float | None = None) -> Message | None:
        """As `ZmqTransport.recv`; a ring message's tensors are copied out of their slot here (on a GPU: queued on
        the current stream, after the sender's copy), and the slot released."""
        msg = super().recv(direction, timeout)
        if not isinstance(msg, _Pending):
            return msg
        assert msg.ref is not None and msg.specs is not None
        tensors = msg.memory.read(msg.ref.slot, msg.ref.offsets, msg.specs)
        return Message(msg.kind, msg.step, msg.src, tensors, msg.meta)

    def close(self) -> None:
        """As `ZmqTransport.close`, then the rings: this stage's files and memory (once the neighbours have
        copied out what was sent, up to ``CLOSE_WAIT_S``), its mappings of the others'."""
        if self._closed:
            return
        deadline = time.monotonic() + min(CLOSE_WAIT_S, self.options.peer_timeout)
        for dst, ring in self._sending.items():  # a message sent just before close is still in its slot
            while ring.in_flight() and time.monotonic() < deadline and self._abort is None:
                time.sleep(_POLL_MAX_S)
            if ring.in_flight():
                logger.warning("stage %d: closing with %d message(s) to stage %d not yet taken", self.stage,
                               ring.in_flight(), dst)
        super().close()
        for ring in self._sending.values():
            ring.memory.close()
        self._sending.clear()
        for receiving in self._receiving.values():
            receiving.close()


class ShmTransport(RingTransport):
    """``shm``: CPU stages on one host; slots in shared host memory."""

    slots_cls = HostSlots


class CudaIpcTransport(RingTransport):
    """``cuda-ipc``: GPU stages on one host; slots in the sender's GPU memory, shared by CUDA IPC handle."""

    slots_cls = CudaSlots
