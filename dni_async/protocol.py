"""The data-plane wire format: one msgpack header frame plus one raw frame per tensor, never pickle."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any, Sequence, Union

import msgpack
import torch

from .transport.base import DIRECTION_KINDS, KINDS, Message

__all__ = ["VERSION", "DTYPES", "MAX_HEADER_BYTES", "ProtocolError", "Frame", "Spec", "Header", "encode", "decode",
           "decode_header", "decode_payload", "check_channel", "frame_nbytes"]

# [Note: the wire format]
#
#   frame 0      msgpack map {"v": 1, "kind": str, "step": int, "src": int,
#                             "tensors": [{"dtype": str, "shape": [int, ...]}, ...],
#                             "meta": {str: msgpack-native value}}
#   frame 1..n   the raw bytes of tensor k, C order, native (little-endian) byte order
#
# A message of the ring transports (transport/ring.py) carries its tensors in a
# shared slot instead of raw frames: its header has one more key, "ring" (a map
# that ring.py validates: generation, slot, offsets, and the ring's handles when
# it is new), and no frame follows the header.
#
# A frame is only ever read as msgpack (with strict size limits, no ext types)
# or as the raw numbers of an allowlisted dtype and declared shape: nothing on
# the wire can make the receiver run code or allocate more than it declared,
# and the declared sizes are checked against ``max_bytes`` before any tensor is
# allocated. Both ends are assumed to share the byte order (every platform
# PyTorch runs training on is little-endian).
#
# encode() is zero-copy for contiguous CPU tensors: the raw frames are views of
# the tensors' own memory. decode() copies each payload exactly once, into a
# fresh buffer the returned tensor owns, so the receive buffers (e.g. zmq
# frames) can be released at once and the tensors are writable.

VERSION = 1
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
"""Wire name -> dtype; nothing outside this allowlist is encoded or decoded."""
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 1 << 20
"""Largest header frame accepted (meta included); tensors travel in their own frames."""
_MAX_TENSORS = 4096
_MAX_NDIM = 64
_HEADER_KEYS = frozenset({"v", "kind", "step", "src", "tensors", "meta"})
_RING_KEYS = _HEADER_KEYS | {"ring"}
_UNPACK_LIMITS = dict(
    max_str_len=MAX_HEADER_BYTES,
    max_bin_len=MAX_HEADER_BYTES,
    max_array_len=1 << 16,
    max_map_len=1 << 12,
    max_ext_len=0,
)

Frame = Union[bytes, bytearray, memoryview]
"""A frame as encode() returns it; decode() also takes anything with a ``buffer`` attribute (zmq.Frame)."""


class ProtocolError(ValueError):
    """A message that is not well-formed; ``str(err)`` says why."""


def _ext_hook(code: int, data: bytes) -> Any:
    """Refuse msgpack extension types: the wire carries native types only."""
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _check_index(name: str, value: Any) -> int:
    """Return ``value`` if it is a non-negative int (not a bool)."""
    if type(value) is not int or value < 0:
        raise ProtocolError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _check_meta(meta: Any) -> dict[str, Any]:
    """Check that ``meta`` is a str-keyed map of msgpack-native values (iteratively: nesting may be deep)."""
    if not isinstance(meta, dict):
        raise ProtocolError(f"meta must be a map, got {type(meta).__name__}")
    stack: list[Any] = [meta]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if value is meta and not isinstance(key, str):
                    raise ProtocolError(f"meta keys must be str, got {key!r}")
                stack.append(key)
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
        elif value is not None and not isinstance(value, (bool, int, float, str, bytes)):
            raise ProtocolError(f"meta holds a {type(value).__name__}; only msgpack-native values are allowed")
    return meta


def _raw_frame(tensor: torch.Tensor) -> memoryview:
    """A byte view of a contiguous CPU tensor's memory that keeps the tensor alive."""
    if tensor.numel() == 0:
        return memoryview(b"")
    # A ctypes array over the tensor's memory, holding a reference to the tensor
    # (the memoryview holds the array, the array holds the tensor): the view stays
    # valid as long as anyone (e.g. a zmq.Frame of a zero-copy send) holds it.
    # torch.Tensor.numpy() would do the same but needs numpy and has no bfloat16.
    array = (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())
    array._tensor = tensor  # type: ignore[attr-defined]
    return memoryview(array).cast("B")


def encode(msg: Message, ring: dict[str, Any] | None = None) -> list[Frame]:
    """Turn a message into frames, without copying contiguous CPU tensors.

    Non-contiguous tensors are made contiguous and CUDA tensors are copied to the
    host first (a wait for the device: GPU stages hand ``encode`` host tensors,
    see transport/device_sender.py). The raw frames alias the tensors' memory: the
    tensors must not be modified in place until the frames have been sent (see
    ``ZmqTransport.send``). Tuples in ``meta`` are encoded as lists.

    Args:
        msg: the message; ``msg.kind`` must be one of ``KINDS``.
        ring: where a ring transport put the tensors (ring.py): the header declares them and carries this map;
            no raw frame is made and the tensors' data is not read.

    Returns:
        ``[header, raw_0, ..., raw_n-1]``: the header as bytes, each tensor as a memoryview.

    Raises:
        ProtocolError: for an unknown kind, a negative step or src, a dtype outside
            ``DTYPES``, a sparse or otherwise non-strided tensor, or a meta value msgpack cannot encode.
    """
    if msg.kind not in KINDS:
        raise ProtocolError(f"unknown message kind {msg.kind!r}; expected one of {KINDS}")
    _check_index("step", msg.step)
    _check_index("src", msg.src)
    if not isinstance(msg.meta, dict) or not all(isinstance(k, str) for k in msg.meta):
        raise ProtocolError("meta must be a dict with str keys")
    specs = []
    raws: list[Frame] = []
    for k, tensor in enumerate(msg.tensors):
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ProtocolError(f"tensor {k} must be a dense torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _NAMES:
            raise ProtocolError(f"tensor {k} has dtype {tensor.dtype}, not one of {sorted(DTYPES)}")
        specs.append({"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape)})
        if ring is not None:
            continue
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        raws.append(_raw_frame(tensor.resolve_conj().resolve_neg().contiguous()))
    header = {"v": VERSION, "kind": msg.kind, "step": msg.step, "src": msg.src, "tensors": specs, "meta": msg.meta}
    if ring is not None:
        header["ring"] = ring
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as err:
        raise ProtocolError(f"meta cannot be encoded as msgpack: {err}") from err
    if len(packed) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(packed)} bytes exceeds {MAX_HEADER_BYTES}; send large data as tensors")
    return [packed, *raws]


def _as_buffer(frame: Any) -> memoryview:
    """A flat byte view of one frame (bytes, bytearray, memoryview or zmq.Frame)."""
    try:
        view = memoryview(frame.buffer if hasattr(frame, "buffer") else frame)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"a frame is not a contiguous byte buffer: {err}") from err


def frame_nbytes(frame: Any) -> int:
    """Size in bytes of one frame."""
    return _as_buffer(frame).nbytes


Spec = tuple[torch.dtype, list[int], int]
"""A declared tensor, as the header's checks return it: (dtype, shape, nbytes)."""


def _check_specs(specs: Any, max_bytes: int) -> list[Spec]:
    """Validate the declared tensors; return (dtype, shape, nbytes) of each, before allocating anything."""
    if not isinstance(specs, list):
        raise ProtocolError(f"tensors must be a list, got {type(specs).__name__}")
    if len(specs) > _MAX_TENSORS:
        raise ProtocolError(f"{len(specs)} tensors declared, at most {_MAX_TENSORS} allowed")
    out = []
    total = 0
    for k, spec in enumerate(specs):
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"}:
            raise ProtocolError(f"tensor {k}: expected a map with keys 'dtype' and 'shape', got {spec!r:.200}")
        dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
        if dtype is None:
            raise ProtocolError(f"tensor {k}: dtype {spec['dtype']!r:.80} is not one of {sorted(DTYPES)}")
        shape = spec["shape"]
        if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
            raise ProtocolError(f"tensor {k}: shape must be a list of at most {_MAX_NDIM} ints, got {shape!r:.200}")
        if not all(type(d) is int and d >= 0 for d in shape):
            raise ProtocolError(f"tensor {k}: shape must hold non-negative ints, got {shape!r:.200}")
        # Python ints do not overflow: a declared 10**12 elements is refused here, cheaply.
        nbytes = math.prod(shape) * dtype.itemsize
        total += nbytes
        if total > max_bytes:
            raise ProtocolError(f"tensors declare {total} bytes or more, above the limit of {max_bytes}")
        out.append((dtype, shape, nbytes))
    return out


@dataclass
class Header:
    """A validated header frame: the message without its tensors' data."""

    kind: str
    step: int
    src: int
    specs: list[Spec]
    """Each tensor's (dtype, shape, nbytes), checked against the byte limit."""
    meta: dict[str, Any]
    ring: Any = None
    """The ``ring`` map of a ring transport's message (not yet validated: ring.py does that); None otherwise."""


def decode_header(frame: Any, max_bytes: int) -> Header:
    """Parse and validate a header frame (``ring`` is only checked to be there or not).

    Raises:
        ProtocolError: for anything malformed; the message says what.
    """
    head = _as_buffer(frame)
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, ext_hook=_ext_hook, **_UNPACK_LIMITS)
    except ProtocolError:
        raise
    except Exception as err:  # msgpack raises a variety: ExtraData, StackError, UnicodeDecodeError, ValueError...
        raise ProtocolError(f"header is not valid msgpack: {type(err).__name__}: {err}") from err
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    if header.get("v") != VERSION or type(header.get("v")) is not int:
        raise ProtocolError(f"unsupported protocol version {header.get('v')!r:.40}; this side speaks {VERSION}")
    if set(header) not in (_HEADER_KEYS, _RING_KEYS):
        raise ProtocolError(f"header keys must be {sorted(_HEADER_KEYS)} (and 'ring' from a ring transport), "
                            f"got {sorted(map(str, header))!r:.200}")
    kind = header["kind"]
    if kind not in KINDS:
        raise ProtocolError(f"unknown message kind {kind!r:.40}; expected one of {KINDS}")
    return Header(kind, _check_index("step", header["step"]), _check_index("src", header["src"]),
                  _check_specs(header["tensors"], max_bytes), _check_meta(header["meta"]), header.get("ring"))


def check_channel(kind: str, src: int, peer: int, direction: str) -> None:
    """Check that a message of ``kind`` from ``src`` may arrive on the ``direction`` channel from stage ``peer``.

    Raises:
        ProtocolError: where it may not; the message says what came on which channel.
    """
    if src != peer or kind not in DIRECTION_KINDS[direction]:
        raise ProtocolError(f"{kind} from src={src} on the channel of stage {peer}")


def decode(frames: Sequence[Any], max_bytes: int, pin_memory: bool = False) -> Message:
    """Turn frames back into a message, validating everything; copies each payload once.

    Args:
        frames: the header frame, then one raw frame per tensor (bytes, bytearray,
            memoryview or zmq.Frame); the frames may be released once this returns.
        max_bytes: largest total tensor payload accepted, in bytes.
        pin_memory: copy the payloads into page-locked memory (a GPU stage's receiver: the stage's copy to
            the device can then be ``non_blocking``).

    Returns:
        The message. Its CPU tensors own their memory and are writable.

    Raises:
        ProtocolError: for anything malformed, or a ring transport's header; the message says what.
    """
    if len(frames) == 0:
        raise ProtocolError("no frames")
    return decode_payload(decode_header(frames[0], max_bytes), frames[1:], pin_memory)


def decode_payload(header: Header, raws: Sequence[Any], pin_memory: bool = False) -> Message:
    """The message of a validated header and the raw frames that followed it; as `decode` from there on.

    Raises:
        ProtocolError: for frames that do not match the header, or a ring transport's header.
    """
    if header.ring is not None:
        raise ProtocolError("a ring transport's message (its tensors are in a shared slot) on a plain channel")
    specs = header.specs
    if len(raws) != len(specs):
        raise ProtocolError(f"{len(specs)} tensors declared but {len(raws)} raw frames received")
    buffers = [_as_buffer(f) for f in raws]
    for k, ((_, shape, nbytes), buf) in enumerate(zip(specs, buffers)):
        if buf.nbytes != nbytes:
            raise ProtocolError(f"tensor {k}: shape {shape} needs {nbytes} bytes, its frame has {buf.nbytes}")
    tensors = []
    for (dtype, shape, nbytes), buf in zip(specs, buffers):
        if nbytes == 0:
            tensors.append(torch.empty(shape, dtype=dtype, pin_memory=pin_memory))
        elif pin_memory:
            out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # the one copy, into page-locked memory
            _raw_frame(out)[:] = buf
            tensors.append(out.view(dtype).reshape(shape))
        else:
            # bytearray(): the one copy; the tensor keeps the bytearray alive.
            tensors.append(torch.frombuffer(bytearray(buf), dtype=dtype).reshape(shape))
    return Message(kind=header.kind, step=header.step, src=header.src, tensors=tensors, meta=header.meta)
