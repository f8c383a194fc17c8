"""The wire format: round trips, zero-copy encoding, and every rejection of a malformed message."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dni_async import protocol
from dni_async.protocol import DTYPES, ProtocolError, decode, encode
from dni_async.transport import KINDS, Message

MAX = 1 << 30


def _header(**overrides: Any) -> dict[str, Any]:
    """A valid header with one float32 tensor of shape [2, 3], with fields overridden."""
    header: dict[str, Any] = {"v": 1, "kind": "act", "step": 3, "src": 0,
                              "tensors": [{"dtype": "float32", "shape": [2, 3]}], "meta": {}}
    header.update(overrides)
    return header


def _frames(header: dict[str, Any], *raws: bytes) -> list[bytes]:
    return [msgpack.packb(header, use_bin_type=True), *raws]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random values of any allowed dtype."""
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)


def _roundtrip(msg: Message) -> Message:
    return decode(encode(msg), MAX)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (4, 5), (2, 3, 4)])
def test_roundtrip_every_dtype_and_shape(name: str, shape: tuple[int, ...]) -> None:
    tensor = _sample(DTYPES[name], shape)
    out = _roundtrip(Message("act", 5, 2, [tensor]))
    assert (out.kind, out.step, out.src, out.meta) == ("act", 5, 2, {})
    assert out.tensors[0].dtype == tensor.dtype and out.tensors[0].shape == tensor.shape
    torch.testing.assert_close(out.tensors[0], tensor, rtol=0, atol=0)


def test_roundtrip_non_contiguous_and_several_tensors() -> None:
    base = torch.randn(6, 8)
    views = [base.t(), base[:, ::3], base[1:4, 2:5], torch.randn(2, 3).expand(4, 2, 3), torch.tensor(7.0)]
    assert not any(v.is_contiguous() for v in views[:4])
    out = _roundtrip(Message("grad", 0, 1, views))
    assert len(out.tensors) == len(views)
    for got, want in zip(out.tensors, views):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_roundtrip_meta_and_every_kind() -> None:
    meta = {"reason": "x" * 300, "n": -5, "big": 2**63, "f": 1.5, "none": None, "flag": True, "raw": b"\x00\xff",
            "nested": {"list": [1, [2, {"deep": "yes"}]], "bytes_key_ok": {b"k": 1}}}
    for kind in KINDS:
        out = _roundtrip(Message(kind, 2**40, 7, [], meta))
        assert (out.kind, out.step, out.src, out.tensors, out.meta) == (kind, 2**40, 7, [], meta)
    assert _roundtrip(Message("stop", 0, 0, [], {"t": (1, 2)})).meta == {"t": [1, 2]}  # tuples come back as lists


def test_tensors_that_need_care_on_encode() -> None:
    leaf = torch.randn(3, requires_grad=True)
    out = _roundtrip(Message("act", 0, 0, [leaf * 2, torch.randn(2, dtype=torch.cfloat).real]))
    assert not out.tensors[0].requires_grad
    torch.testing.assert_close(out.tensors[0], leaf.detach() * 2)
    neg = torch.randn(4)._neg_view()
    torch.testing.assert_close(_roundtrip(Message("act", 0, 0, [neg])).tensors[0], neg.clone())


def test_encode_is_zero_copy_and_decode_owns_its_memory() -> None:
    tensor = torch.arange(12, dtype=torch.float32)
    header, raw = encode(Message("act", 0, 0, [tensor]))
    assert isinstance(raw, memoryview) and raw.nbytes == tensor.nbytes
    tensor[0] = 100.0  # the frame aliases the tensor: this is why sent tensors must not be mutated
    assert torch.frombuffer(bytearray(raw), dtype=torch.float32)[0] == 100.0
    del tensor
    assert torch.frombuffer(bytearray(raw), dtype=torch.float32)[11] == 11.0  # the frame keeps the memory alive

    payload = bytearray(raw)
    out = decode([header, payload], MAX).tensors[0]
    payload[:] = bytes(len(payload))
    assert out[11] == 11.0  # decode copied: the receive buffer may be reused
    out += 1  # and the tensor is writable


def test_decode_accepts_zmq_frames_and_memoryviews() -> None:
    tensor = torch.randn(5, 7)
    frames = encode(Message("eval", 1, 0, [tensor], {"k": 1}))
    as_zmq = [zmq.Frame(bytes(f)) for f in frames]
    torch.testing.assert_close(decode(as_zmq, MAX).tensors[0], tensor)
    torch.testing.assert_close(decode([memoryview(bytes(f)) for f in frames], MAX).tensors[0], tensor)


# ---------------------------------------------------------------- rejections

GOOD_RAW = bytes(24)


@pytest.mark.parametrize(
    "frames, reason",
    [
        ([], "no frames"),
        ([b"\xc1"], "not valid msgpack"),
        ([b""], "not valid msgpack"),
        ([msgpack.packb(_header()) + b"\x00", GOOD_RAW], "not valid msgpack"),  # trailing bytes
        ([msgpack.packb([1, 2, 3])], "must be a map"),
        ([msgpack.packb({1: 2})], "not valid msgpack"),  # strict_map_key: int keys refused
        (_frames(_header(v=2), GOOD_RAW), "version"),
        (_frames(_header(v=True), GOOD_RAW), "version"),
        (_frames({k: v for k, v in _header().items() if k != "meta"}, GOOD_RAW), "header keys"),
        (_frames(_header(extra=1), GOOD_RAW), "header keys"),
        (_frames(_header(kind="pickle"), GOOD_RAW), "unknown message kind"),
        (_frames(_header(kind=b"act"), GOOD_RAW), "unknown message kind"),
        (_frames(_header(step=-1), GOOD_RAW), "step"),
        (_frames(_header(step=1.0), GOOD_RAW), "step"),
        (_frames(_header(step=True), GOOD_RAW), "step"),
        (_frames(_header(src="0"), GOOD_RAW), "src"),
        (_frames(_header(src=None), GOOD_RAW), "src"),
        (_frames(_header(tensors={"dtype": "float32"}), GOOD_RAW), "tensors must be a list"),
        (_frames(_header(tensors=[[1]]), GOOD_RAW), "expected a map"),
        (_frames(_header(tensors=[{"dtype": "float32"}]), GOOD_RAW), "expected a map"),
        (_frames(_header(tensors=[{"dtype": "object", "shape": [6]}]), GOOD_RAW), "dtype"),
        (_frames(_header(tensors=[{"dtype": "complex64", "shape": [3]}]), GOOD_RAW), "dtype"),
        (_frames(_header(tensors=[{"dtype": 7, "shape": [6]}]), GOOD_RAW), "dtype"),
        (_frames(_header(tensors=[{"dtype": "float32", "shape": [-1, 6]}]), GOOD_RAW), "shape"),
        (_frames(_header(tensors=[{"dtype": "float32", "shape": [1.5]}]), GOOD_RAW), "shape"),
        (_frames(_header(tensors=[{"dtype": "float32", "shape": [True]}]), GOOD_RAW), "shape"),
        (_frames(_header(tensors=[{"dtype": "float32", "shape": "6"}]), GOOD_RAW), "shape"),
        (_frames(_header(tensors=[{"dtype": "float32", "shape": [1] * 65}]), GOOD_RAW), "shape"),
        (_frames(_header()), "1 tensors declared but 0 raw frames"),
        (_frames(_header(), GOOD_RAW, GOOD_RAW), "1 tensors declared but 2 raw frames"),
        (_frames(_header(tensors=[])), None),  # valid: no tensors
        (_frames(_header(), bytes(23)), "needs 24 bytes"),
        (_frames(_header(), bytes(25)), "needs 24 bytes"),
        (_frames(_header(tensors=[{"dtype": "bool", "shape": [2]}]), b"\x00"), "needs 2 bytes"),
        (_frames(_header(meta=[1]), GOOD_RAW), "meta must be a map"),
        (_frames(_header(meta=None), GOOD_RAW), "meta must be a map"),
        (_frames(_header(meta={b"k": 1}), GOOD_RAW), "meta keys must be str"),
        ([msgpack.packb(_header(meta={"t": msgpack.ExtType(5, b"xx")})), GOOD_RAW], "ext"),
        ([msgpack.packb(_header(meta={"t": msgpack.Timestamp(1)})), GOOD_RAW], "ext"),
        ([b"\xa5" + b"x" * (protocol.MAX_HEADER_BYTES + 1)], "exceeds"),
    ],
)
def test_decode_rejects(frames: list[bytes], reason: str | None) -> None:
    if reason is None:
        assert decode(frames, MAX).tensors == []
        return
    with pytest.raises(ProtocolError, match=reason):
        decode(frames, MAX)


def test_decode_rejects_over_max_bytes() -> None:
    frames = encode(Message("act", 0, 0, [torch.zeros(10), torch.zeros(10)]))
    assert len(decode(frames, 80).tensors) == 2
    with pytest.raises(ProtocolError, match="above the limit of 79"):
        decode(frames, 79)


def test_huge_declared_tensor_is_rejected_before_any_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("decode allocated memory for a message it should have refused")

    monkeypatch.setattr(torch, "frombuffer", refuse)
    monkeypatch.setattr(torch, "empty", refuse)
    monkeypatch.setattr(protocol, "bytearray", refuse, raising=False)
    for shape in ([10**12], [10**6, 10**6], [2**64 - 1] * 64):
        frames = _frames(_header(tensors=[{"dtype": "float64", "shape": shape}]), b"\x00" * 8)
        start = time.perf_counter()
        with pytest.raises(ProtocolError, match="above the limit"):
            decode(frames, MAX)
        assert time.perf_counter() - start < 0.5


def test_deeply_nested_meta_is_rejected_not_crashing() -> None:
    deep = b"\x81\xa1k" * 5000 + b"\xc0"  # {"k": {"k": ... nil}}, deeper than msgpack's stack
    header = msgpack.packb(_header(tensors=[]))[:-1]  # drop the empty meta map...
    assert header.endswith(b"\xa4meta")
    with pytest.raises(ProtocolError):
        decode([header + deep], MAX)


@pytest.mark.parametrize(
    "msg, reason",
    [
        (Message("pickle", 0, 0), "unknown message kind"),
        (Message("act", -1, 0), "step"),
        (Message("act", 0, -2), "src"),
        (Message("act", 0, 0, [torch.zeros(2, dtype=torch.complex64)]), "dtype"),
        (Message("act", 0, 0, [torch.zeros(2, 2).to_sparse()]), "dense"),
        (Message("act", 0, 0, [[1.0, 2.0]]), "dense"),  # type: ignore[list-item]
        (Message("act", 0, 0, [], {"obj": object()}), "cannot be encoded"),
        (Message("act", 0, 0, [], {1: "int key"}), "str keys"),  # type: ignore[dict-item]
        (Message("act", 0, 0, [], {"big": "x" * (protocol.MAX_HEADER_BYTES + 1)}), "exceeds"),
    ],
)
def test_encode_rejects(msg: Message, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        encode(msg)


# ------------------------------------------------------------------ property

_native = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)
_spec = st.fixed_dictionaries({"dtype": st.sampled_from([*DTYPES, "int128"]) | _native,
                               "shape": st.lists(st.integers(-2, 4), max_size=4) | _native})
_near_valid_header = st.fixed_dictionaries({
    "v": st.sampled_from([1, 1, 2]) | _native,
    "kind": st.sampled_from([*KINDS, "x"]) | _native,
    "step": st.integers(-2, 2**64 - 1) | _native,
    "src": st.integers(-2, 5) | _native,
    "tensors": st.lists(_spec, max_size=3) | _native,
    "meta": st.dictionaries(st.text(max_size=4), _native, max_size=3) | _native,
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.binary(max_size=64), max_size=4))
def test_decode_of_arbitrary_bytes_never_raises_anything_but_protocol_error(frames: list[bytes]) -> None:
    try:
        assert isinstance(decode(frames, 1 << 16), Message)
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_near_valid_header, raws=st.lists(st.binary(max_size=96), max_size=4), cut=st.integers(0, 3))
def test_decode_of_near_valid_messages_never_raises_anything_but_protocol_error(
    header: dict[str, Any], raws: list[bytes], cut: int
) -> None:
    packed = msgpack.packb(header, use_bin_type=True)
    for head in (packed, packed[: len(packed) - cut]):
        try:
            msg = decode([head, *raws], 1 << 16)
        except ProtocolError:
            continue
        assert isinstance(msg, Message) and msg.kind in KINDS and len(msg.tensors) == len(raws)
        assert all(t.dtype in DTYPES.values() for t in msg.tensors)


@settings(max_examples=100, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), max_size=3),
    names=st.lists(st.sampled_from(sorted(DTYPES)), min_size=3, max_size=3),
    kind=st.sampled_from(KINDS),
    step=st.integers(0, 2**64 - 1),
    meta=st.dictionaries(st.text(max_size=4), _native, max_size=3),
)
def test_valid_messages_round_trip(
    shapes: list[list[int]], names: list[str], kind: str, step: int, meta: dict[str, Any]
) -> None:
    tensors = [_sample(DTYPES[name], tuple(shape)) for shape, name in zip(shapes, names)]
    out = _roundtrip(Message(kind, step, 3, tensors, meta))
    assert (out.kind, out.step, out.src) == (kind, step, 3)
    assert msgpack.packb(out.meta) == msgpack.packb(meta)  # NaN-safe equality
    for got, want in zip(out.tensors, tensors, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
