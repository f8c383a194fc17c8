"""The slot protocol of the ring transports: slot layout, the shared control block, and what a ring map may say."""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from typing import Any

from ..protocol import ProtocolError

__all__ = ["ALIGN", "MAX_SLOTS", "CONTROL_BYTES", "Control", "check_announce", "check_ref", "place", "ring_name",
           "shm_dir", "slot_bytes_for"]

# [Note: the ring transports]
#
#   stage i (sender)                                     stage i+1 (receiver)
#   ring of S slots, each slot_bytes   ── shared once ──> opened on the first message of a generation
#   control block: consumed, attached  <── receiver writes (one writer each field)
#
#   send: wait until produced - consumed < S      (backpressure: a full ring blocks the sender,
#         copy the tensors into slot produced % S  with --peer-timeout, abort and while_blocked as zmq)
#         send the header {.., "ring": {gen, slot, offsets[, new]}} over the zmq channel
#   recv: the I/O thread checks gen, slot (= the next one, in order), offsets; the stage's recv
#         copies the tensors out, and the slot is released (consumed += 1) once that copy is done
#
# The zmq channel carries every message in order (headers only for ring messages;
# stop, abort and messages to a neighbour on another host carry their tensors as
# raw frames, as plain zmq does), so ring and plain messages never overtake each
# other. A message larger than a slot waits until the ring is empty, then the
# sender makes a new ring (generation + 1) large enough and announces it in that
# message's ring map ("new"); the receiver opens it and drops the old one.
#
# The control block is a small file in /dev/shm that the sender creates; the
# receiver maps it and unlinks it at once (so nothing is left behind once both
# hold it; the sender unlinks it on close if no receiver came). Each field has
# one writer. Slot memory is the backend's: in the same file for host memory
# (``shm``), CUDA device memory shared by IPC handle for ``cuda-ipc``.
#
# Ordering: a slot's data is written before its header is sent (a system call),
# and read before the slot is released; the release is a plain 8-byte store,
# ordered after the reads by the GIL's atomics between them (on a GPU, after
# the copy-out's event has completed: ring_slots.py).

ALIGN = 256
"""Byte alignment of each tensor in a slot (CUDA's allocation alignment; enough for every dtype)."""
MAX_SLOTS = 64
CONTROL_BYTES = 4096
"""Size of the control block; host slots follow it in the same file."""
MIN_SLOT_BYTES = 1 << 20
_MAGIC = b"DNIRING1"
_CONSUMED, _ATTACHED = 8, 16  # byte offsets of the two counters (8-byte aligned: single loads and stores)
_NAME = re.compile(r"dni-ring-[0-9]{1,10}-[0-9a-f]{16}")
_REF_KEYS = frozenset({"gen", "slot", "offsets"})
_ANNOUNCE_KEYS = frozenset({"slots", "slot_bytes", "control", "memory"})


def shm_dir() -> str:
    """Where control blocks live: /dev/shm (memory), else the temporary folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def ring_name() -> str:
    """A fresh control block name: this process's pid and 64 random bits."""
    return f"dni-ring-{os.getpid()}-{secrets.token_hex(8)}"


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def place(nbytes: list[int]) -> tuple[list[int], int]:
    """Offsets of tensors of ``nbytes`` bytes in one slot, each aligned to :data:`ALIGN`, and the bytes they span."""
    offsets, end = [], 0
    for n in nbytes:
        offsets.append(end)
        end = _round_up(end + n, ALIGN)
    return offsets, end


def slot_bytes_for(need: int, previous: int = 0) -> int:
    """Slot size of a new ring for a message of ``need`` bytes: at least 1 MiB and twice the previous size,
    rounded up to whole MiB (eval batches and uneven last batches do not make a new ring each time)."""
    return _round_up(max(need, MIN_SLOT_BYTES, 2 * previous), MIN_SLOT_BYTES)


def _int(name: str, value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"ring {name} must be an int in [{low}, {high}], got {value!r:.40}")
    return value


@dataclass(frozen=True)
class Announce:
    """A new ring, as its first message announces it."""

    slots: int
    slot_bytes: int
    control: str
    """File name of the control block in :func:`shm_dir`."""
    memory: dict[str, Any]
    """The backend's handles of the slot memory (checked by the backend)."""


@dataclass(frozen=True)
class Ref:
    """Where one message's tensors are: a ring generation, a slot, an offset per tensor."""

    gen: int
    slot: int
    offsets: list[int]
    new: Announce | None = None


def check_announce(value: Any, max_bytes: int) -> Announce:
    """Validate the ``new`` map of a ring map.

    Raises:
        ProtocolError: for a value that is not a well-formed announcement within ``max_bytes`` per slot.
    """
    if not isinstance(value, dict) or set(value) != _ANNOUNCE_KEYS:
        raise ProtocolError(f"a new ring must be a map with keys {sorted(_ANNOUNCE_KEYS)}, got {value!r:.200}")
    slots = _int("slots", value["slots"], 1, MAX_SLOTS)
    slot_bytes = _int("slot_bytes", value["slot_bytes"], ALIGN, max(max_bytes, ALIGN))
    if slot_bytes % ALIGN:
        raise ProtocolError(f"ring slot_bytes {slot_bytes} is not a multiple of {ALIGN}")
    control = value["control"]
    if not isinstance(control, str) or not _NAME.fullmatch(control):
        raise ProtocolError(f"ring control block name {control!r:.80} is not one this library makes")
    if not isinstance(value["memory"], dict):
        raise ProtocolError("ring memory must be a map")
    return Announce(slots, slot_bytes, control, value["memory"])


def check_ref(value: Any, nbytes: list[int], expected: tuple[int, int] | None, slot_bytes: int, max_bytes: int) -> Ref:
    """Validate a message's ring map against the tensors it declares and the receiver's ring.

    Args:
        value: the header's ``ring`` map.
        nbytes: bytes of each declared tensor.
        expected: (generation, slot) the receiver expects next; None before any ring.
        slot_bytes: the slot size of the receiver's current ring (ignored when the map announces a new one).
        max_bytes: the largest message accepted.

    Raises:
        ProtocolError: for a malformed map, a generation or slot out of order, offsets that are not aligned,
            overlap, or leave the slot.
    """
    keys = set(value) if isinstance(value, dict) else set()
    if not isinstance(value, dict) or keys not in (_REF_KEYS, _REF_KEYS | {"new"}):
        raise ProtocolError(f"ring map must have keys {sorted(_REF_KEYS)} (and 'new'), got {value!r:.200}")
    gen = _int("gen", value["gen"], 0, 1 << 62)
    slot = _int("slot", value["slot"], 0, MAX_SLOTS - 1)
    new = check_announce(value["new"], max_bytes) if "new" in value else None
    if new is not None:
        slot_bytes = new.slot_bytes
        want = (0 if expected is None else expected[0] + 1, 0)
    elif expected is None:
        raise ProtocolError("a ring message before its ring was announced")
    else:
        want = expected
    if (gen, slot) != want:  # the receiver expects only slots of its ring
        raise ProtocolError(f"ring generation {gen} slot {slot} out of order: expected generation {want[0]} "
                            f"slot {want[1]}")
    offsets = value["offsets"]
    if not isinstance(offsets, list) or len(offsets) != len(nbytes):
        raise ProtocolError(f"ring offsets must be a list of {len(nbytes)} ints, got {offsets!r:.200}")
    end = 0
    for k, (offset, n) in enumerate(zip(offsets, nbytes)):
        if type(offset) is not int or offset < end or offset % ALIGN or offset + n > slot_bytes:
            raise ProtocolError(f"tensor {k}: ring offset {offset!r:.40} is not aligned, overlaps tensor {k - 1} or "
                                f"leaves the slot of {slot_bytes} bytes ({n} bytes)")
        end = offset + n
    return Ref(gen, slot, offsets, new)


class Control:
    """The control block of one ring: a mapped file with the receiver's ``consumed`` and ``attached`` counters.

    Args:
        name: file name in :func:`shm_dir`.
        size: bytes of the whole file (control block and host slots).
        create: make the file (the sender); else map an existing one of exactly ``size`` bytes (the receiver)
            and unlink it.

    Raises:
        OSError: where the file cannot be made (/dev/shm full, say) or opened; a file made is removed again.
        ProtocolError: (receiver) for a file of another size or without the ring's magic bytes.
    """

    def __init__(self, name: str, size: int, create: bool) -> None:
        self.name, self.path = name, os.path.join(shm_dir(), name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0) | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.path, flags, 0o600)
        self.unlinked = False
        try:
            if create:  # allocated now: a full /dev/shm is an OSError here, not a SIGBUS on a later write
                os.posix_fallocate(fd, 0, size)
            elif os.fstat(fd).st_size != size:
                raise ProtocolError(f"ring control block {name} has {os.fstat(fd).st_size} bytes, expected {size}")
            self.map = mmap.mmap(fd, size)
        except BaseException:
            if create:
                self.unlink()
            raise
        finally:
            os.close(fd)
        if create:
            self.map[:len(_MAGIC)] = _MAGIC
        else:
            if self.map[:len(_MAGIC)] != _MAGIC:
                self.map.close()
                raise ProtocolError(f"ring control block {name} is not a ring's")
            self.unlink()
            self._counter(_ATTACHED).value = 1
        self.consumed = self._counter(_CONSUMED)

    def _counter(self, offset: int) -> ctypes.c_uint64:
        return ctypes.c_uint64.from_buffer(self.map, offset)

    @property
    def attached(self) -> bool:
        """Whether the receiver has mapped the block (and unlinked the file)."""
        return bool(self._counter(_ATTACHED).value)

    def release(self) -> None:
        """The receiver is done with one more slot."""
        self.consumed.value += 1

    def unlink(self) -> None:
        """Remove the file (mappings stay valid); idempotent."""
        if not self.unlinked:
            self.unlinked = True
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Unmap (and unlink, if still there)."""
        self.unlink()
        del self.consumed
        try:
            self.map.close()
        except BufferError:  # a view of the host slots is still alive somewhere: the GC unmaps it later
            pass
