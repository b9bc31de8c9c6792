"""The state-dict wire format: round trips, zero-copy decoding, layout."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from serialization import (
    DTYPES,
    decode,
    encode,
    encode_into,
    encoded_size,
    read_header,
    schema_of,
)
from serialization.tensors import ALIGN, encode_buffer
from tests.fuzz import metas, state_dicts, tensors

ROUND_TRIPS = settings(max_examples=150, deadline=None)


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's values as bytes in row-major order (NaN payloads included)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16
    return np.ascontiguousarray(t.numpy()).tobytes()


def address_range(buf: Any) -> tuple[int, int]:
    start = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    return start, start + len(buf)


def aligned_buffer(size: int) -> memoryview:
    """A writable buffer whose first byte sits on an ALIGN boundary."""
    block = np.zeros(size + ALIGN, dtype=np.uint8)
    skip = -block.ctypes.data % ALIGN
    return memoryview(block[skip : skip + size])


def assert_same_state(decoded: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    assert list(decoded) == list(state)
    for name, t in state.items():
        assert decoded[name].dtype == t.dtype
        assert decoded[name].shape == t.shape
        assert raw_bytes(decoded[name]) == raw_bytes(t)


@ROUND_TRIPS
@given(state_dicts, metas)
def test_round_trip_keeps_names_order_dtypes_shapes_bytes_and_meta(
    state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """decode(encode(s, meta)) gives back every tensor bit for bit, in order, and the meta."""
    decoded, decoded_meta = decode(encode(state, meta))
    assert_same_state(decoded, state)
    assert msgpack.packb(decoded_meta) == msgpack.packb(meta)  # NaN-safe comparison


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_dtype_round_trips(dtype: str, data: st.DataObject) -> None:
    """Each supported dtype, in any small shape (0-d and empty ones too), round trips."""
    state = {"a": data.draw(tensors(dtype=dtype)), "b": data.draw(tensors(dtype=dtype))}
    assert_same_state(decode(encode(state))[0], state)


@pytest.mark.parametrize(
    "shape", [(), (0,), (3, 0), (0, 4, 5), (1,), (1, 1, 1, 1), (7, 3)], ids=str
)
def test_zero_dim_and_empty_tensors_round_trip(shape: tuple[int, ...]) -> None:
    """0-d and zero-element tensors keep their exact shape through a round trip."""
    state = {"x": torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)}
    assert_same_state(decode(encode(state))[0], state)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(12.0).reshape(3, 4).t(),
        lambda: torch.arange(20, dtype=torch.int64)[::3],
        lambda: torch.tensor([1.5], dtype=torch.bfloat16).expand(4, 3),
        lambda: torch.arange(24, dtype=torch.int16).reshape(2, 3, 4).permute(2, 0, 1),
        lambda: torch.ones(3, 3, dtype=torch.bool).triu()[:, 1:],
    ],
    ids=["transpose", "step", "expand", "permute", "bool-slice"],
)
def test_non_contiguous_tensors_encode_their_values(make: Any) -> None:
    """A strided view encodes as its values in row-major order, like .contiguous()."""
    t = make()
    assert not t.is_contiguous()
    decoded = decode(encode({"t": t}))[0]["t"]
    assert torch.equal(decoded, t.contiguous())


def test_parameters_that_require_grad_encode() -> None:
    """Tensors that require grad (parameters, not a state_dict) encode like their data."""
    model = torch.nn.Linear(3, 2)
    state = dict(model.named_parameters())
    assert_same_state(decode(encode(state))[0], {k: v.detach() for k, v in state.items()})


def test_empty_state_dict_round_trips() -> None:
    """A state dict with no tensors is a header only and decodes to {}."""
    payload = encode({}, {"round": 3})
    assert decode(payload) == ({}, {"round": 3})
    assert len(payload) == encoded_size({}, {"round": 3})


@ROUND_TRIPS
@given(state_dicts, metas, st.integers(0, 100))
def test_encode_encode_into_and_encode_buffer_write_the_same_bytes(
    state: dict[str, torch.Tensor], meta: dict[str, Any], slack: int
) -> None:
    """encode, encode_into (into a larger buffer) and encode_buffer agree byte for byte."""
    payload = encode(state, meta)
    assert encoded_size(state, meta) == len(payload)
    buf = bytearray(b"\xaa" * (len(payload) + slack))
    assert encode_into(state, buf, meta) == len(payload)
    assert bytes(buf[: len(payload)]) == payload
    assert buf[len(payload) :] == b"\xaa" * slack  # nothing written past the payload
    assert bytes(encode_buffer(state, meta)) == payload


def test_encode_into_a_short_buffer_raises() -> None:
    """encode_into refuses a buffer smaller than the payload and writes nothing."""
    state = {"w": torch.ones(100)}
    buf = bytearray(encoded_size(state) - 1)
    with pytest.raises(ValueError, match="smaller than the payload"):
        encode_into(state, buf)
    assert not any(buf)


@ROUND_TRIPS
@given(state_dicts)
def test_decoded_tensors_are_views_inside_a_writable_buffer(
    state: dict[str, torch.Tensor],
) -> None:
    """Decoding a bytearray copies nothing: each tensor's data is its slice of the buffer."""
    buf = bytearray(encode(state))
    low, high = address_range(buf)
    decoded, _ = decode(buf)
    for entry in read_header(buf)[0]:
        t = decoded[entry.name]
        if t.numel():
            assert t.data_ptr() == low + entry.offset
            assert t.data_ptr() + t.numel() * t.element_size() <= high


def test_writes_through_the_buffer_show_in_the_tensors() -> None:
    """A decoded tensor reads the buffer itself: changing the bytes changes the values."""
    buf = bytearray(encode({"a": torch.zeros(4, dtype=torch.int32), "b": torch.zeros(3)}))
    decoded, _ = decode(buf)
    entries, _ = read_header(buf)
    b_offset = entries[1].offset
    buf[b_offset : b_offset + 4] = np.float32(2.5).tobytes()
    assert decoded["b"].tolist() == [2.5, 0.0, 0.0]
    decoded["a"][3] = 7  # and the other way round
    a_end = entries[0].offset + 16
    assert bytes(buf[a_end - 4 : a_end]) == (7).to_bytes(4, "little")


@ROUND_TRIPS
@given(state_dicts, metas)
def test_every_tensor_starts_on_a_64_byte_boundary(
    state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Offsets are multiples of 64, so over an aligned buffer every view is 64-byte aligned."""
    payload = encode(state, meta)
    entries, _ = read_header(payload)
    assert all(e.offset % ALIGN == 0 for e in entries)
    buf = aligned_buffer(len(payload))
    buf[:] = payload
    for t in decode(buf)[0].values():
        if t.numel():
            assert t.data_ptr() % ALIGN == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_takes_bytes_bytearray_and_memoryview(kind: type) -> None:
    """Any of the buffer types the bus hands over decodes to the same state."""
    state = {"w": torch.randn(5, 3), "n": torch.tensor(7)}
    decoded, _ = decode(kind(encode(state)), schema=schema_of(state), finite=True)
    assert_same_state(decoded, state)


def test_resnet_sized_state_dict_round_trips_through_encode_buffer() -> None:
    """A realistic state dict (conv, batch norm, int64 counters) round trips via encode_buffer."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.Linear(8, 2)
    )
    state = model.state_dict()
    decoded, _ = decode(encode_buffer(state), schema=schema_of(state), finite=True)
    assert_same_state(decoded, state)
    model.load_state_dict(decoded)
