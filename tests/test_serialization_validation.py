"""decode() rejects every malformed or unexpected payload with PayloadError and a reason."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import msgpack
import pytest
import torch

from serialization import PayloadError, TensorSpec, decode, encode, read_header, schema_of
from serialization.tensors import ALIGN, MAX_HEADER_BYTES, MAX_NDIM
from tests.fuzz import repack, split_payload, with_header

STATE = {
    "conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 4),
    "bn.num_batches_tracked": torch.tensor(5),
    "mask": torch.tensor([True, False, True]),
    "half": torch.ones(3, dtype=torch.float16),
}
PAYLOAD = encode(STATE, {"round": 1})


def reason_of(buf: Any, **kwargs: Any) -> str:
    with pytest.raises(PayloadError) as info:
        decode(buf, **kwargs)
    return info.value.reason


def with_edited_header(edit: Any) -> bytes:
    """PAYLOAD with its decoded header passed through `edit`, repacked over the same data."""
    header, start, data = split_payload(PAYLOAD)
    edit(header)
    return repack(header, start, data)


def set_row(index: int, column: int, value: Any) -> bytes:
    def edit(header: dict[str, Any]) -> None:
        header["t"][index][column] = value

    return with_edited_header(edit)


def test_every_strict_prefix_is_rejected_with_payload_error() -> None:
    """Truncating a payload anywhere (0 .. len-1 bytes kept) raises PayloadError, never else."""
    reasons = set()
    for length in range(len(PAYLOAD)):
        for buf in (PAYLOAD[:length], bytearray(PAYLOAD[:length])):
            reasons.add(reason_of(buf))
    assert reasons == {"truncated"}


def test_the_untruncated_payload_is_accepted() -> None:
    """The control for the truncation test: the whole payload decodes."""
    state, meta = decode(PAYLOAD, schema=schema_of(STATE), finite=True)
    assert list(state) == list(STATE)
    assert meta == {"round": 1}


def test_bad_magic_is_rejected() -> None:
    """A payload that does not start with b'PWFL' is rejected as bad_magic."""
    assert reason_of(b"PWFX" + PAYLOAD[4:]) == "bad_magic"
    assert reason_of(bytes(len(PAYLOAD))) == "bad_magic"


@pytest.mark.parametrize("header_len", [2**32 - 1, MAX_HEADER_BYTES + 1, len(PAYLOAD)])
def test_a_header_length_past_the_end_is_rejected(header_len: int) -> None:
    """A header length that overruns the payload (or the header limit) is truncated."""
    buf = bytearray(PAYLOAD)
    struct.pack_into("<I", buf, 4, header_len)
    assert reason_of(buf) == "truncated"


@pytest.mark.parametrize(
    "garbage", [b"\xc1", b"\x91", b"\xdd\xff\xff\xff\xff", b"\x81\x01\x02"], ids=repr
)
def test_header_bytes_that_are_not_a_msgpack_map_are_rejected(garbage: bytes) -> None:
    """Corrupt header bytes (reserved byte, short array, huge array, int key) are bad_header."""
    buf = struct.pack("<4sI", b"PWFL", len(garbage)) + garbage + bytes(64)
    assert reason_of(buf) == "bad_header"


def test_corrupting_any_single_header_byte_raises_only_payload_error() -> None:
    """Every byte of the header set to each of a few values: accepted or PayloadError."""
    (header_len,) = struct.unpack_from("<I", PAYLOAD, 4)
    for pos in range(8, 8 + header_len):
        for value in (0x00, 0x7F, 0xC0, 0xC1, 0xFF):
            buf = bytearray(PAYLOAD)
            buf[pos] = value
            with contextlib.suppress(PayloadError):
                decode(buf, finite=True)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ([1, 2], "bad_header"),
        ({"t": [], "m": {}}, "bad_header"),
        ({"v": 2, "t": [], "m": {}}, "bad_header"),
        ({"v": True, "t": [], "m": {}}, "bad_header"),
        ({"v": 1.0, "t": [], "m": {}}, "bad_header"),
        ({"v": 1, "t": {}, "m": {}}, "bad_header"),
        ({"v": 1, "t": [], "m": []}, "bad_header"),
        ({"v": 1, "t": [["a", "float32", [1], 64]], "m": {}}, "bad_header"),
        ({"v": 1, "t": ["row"], "m": {}}, "bad_header"),
    ],
    ids=["list", "no-version", "version-2", "version-true", "version-float", "rows-map",
         "meta-list", "short-row", "row-string"],
)
def test_malformed_headers_are_rejected(header: Any, reason: str) -> None:
    """Headers of the wrong shape or format version are rejected."""
    assert reason_of(with_header(header, bytes(128))) == reason


@pytest.mark.parametrize(
    "dtype", ["float8", "complex64", "Float32", "", 7, None, ["float32"], {"a": 1}], ids=repr
)
def test_unknown_or_mistyped_dtypes_are_rejected(dtype: Any) -> None:
    """A dtype outside DTYPES, or not a string at all (even unhashable), is bad_dtype."""
    assert reason_of(set_row(0, 1, dtype)) == "bad_dtype"


def test_a_name_that_is_not_a_string_is_rejected() -> None:
    """Tensor names must be strings."""
    assert reason_of(set_row(0, 0, 3)) == "bad_header"


def test_a_duplicate_name_is_rejected() -> None:
    """Two tensors with one name would make the state dict ambiguous."""
    assert reason_of(set_row(1, 0, "conv.weight")) == "bad_header"


@pytest.mark.parametrize(
    "shape",
    [[2, 3, 5], [24], [2, 3, 4, 1, 0], [-2, -3, 4], [2.0, 3, 4], [True, 2, 3, 4], "234",
     [1] * (MAX_NDIM + 1)],
    ids=["product", "flat-wrong-count", "zero", "negative", "float", "bool", "string", "ndim"],
)
def test_shapes_that_do_not_match_the_length_or_are_not_sizes_are_rejected(shape: Any) -> None:
    """The shape's product times the item size must equal nbytes; dims are ints >= 0."""
    if shape == [24]:
        shape = [23]
    assert reason_of(set_row(0, 2, shape)) == "bad_shape"


@pytest.mark.parametrize("dims", [[2**63, 0], [2**62, 4, 0], [2**40, 2**40, 0], [2**64 - 1, 0]])
def test_huge_dimensions_of_an_empty_tensor_are_rejected(dims: list[int]) -> None:
    """An empty tensor cannot carry dimensions that overflow torch's size arithmetic."""
    payload = with_header({"v": 1, "t": [["e", "float32", dims, ALIGN, 0]], "m": {}})
    assert reason_of(payload) == "bad_shape"
    state, _ = decode(with_header({"v": 1, "t": [["e", "float32", [9, 0], ALIGN, 0]], "m": {}}))
    assert state["e"].shape == (9, 0)


def test_an_empty_tensor_with_large_but_sane_dimensions_decodes() -> None:
    """Zero elements are fine with big other dimensions, as torch.empty((0, 2**20)) is."""
    state = {"e": torch.empty(0, 2**20), "f": torch.empty(2**16, 0, 2**10, dtype=torch.int8)}
    decoded, _ = decode(encode(state))
    assert decoded["e"].shape == (0, 2**20)
    assert decoded["f"].shape == (2**16, 0, 2**10)


@pytest.mark.parametrize("nbytes", [95, 97, 0, -96, True, 96.0], ids=repr)
def test_a_length_that_does_not_match_the_shape_is_rejected(nbytes: Any) -> None:
    """nbytes must be exactly shape product x item size (96 for 2x3x4 float32), an int."""
    assert reason_of(set_row(0, 4, nbytes)) in {"bad_shape", "bad_header"}


def _offsets() -> list[int]:
    return [e.offset for e in read_header(PAYLOAD)[0]]


@pytest.mark.parametrize(
    ("row", "offset", "reason"),
    [
        (1, lambda: _offsets()[0], "truncated"),  # overlaps conv.weight
        (1, lambda: _offsets()[2], "truncated"),  # out of order: overlaps mask
        (0, lambda: 0, "truncated"),  # inside the prefix and header
        (3, lambda: (len(PAYLOAD) + ALIGN) // ALIGN * ALIGN, "truncated"),  # past the end
        (3, lambda: 2**40, "truncated"),
        (0, lambda: _offsets()[0] + 4, "bad_header"),  # not on a 64-byte boundary
        (0, lambda: -ALIGN, "bad_header"),
        (0, lambda: True, "bad_header"),
        (0, lambda: "64", "bad_header"),
    ],
    ids=["overlap", "out-of-order", "in-header", "past-end", "far", "unaligned", "negative",
         "bool", "string"],
)
def test_overlapping_out_of_range_or_unaligned_offsets_are_rejected(
    row: int, offset: Any, reason: str
) -> None:
    """Each tensor starts 64-byte aligned, after the header and the previous tensor, and fits."""
    assert reason_of(set_row(row, 3, offset())) == reason


def test_a_payload_over_max_bytes_is_rejected_before_parsing() -> None:
    """max_bytes caps the payload size (too_large), checked before anything else."""
    assert reason_of(PAYLOAD, max_bytes=len(PAYLOAD) - 1) == "too_large"
    assert reason_of(b"garbage" * 100, max_bytes=10) == "too_large"
    decode(PAYLOAD, max_bytes=len(PAYLOAD))


def test_a_bool_tensor_with_bytes_other_than_0_and_1_is_rejected() -> None:
    """Bool bytes other than 0 / 1 are undefined behaviour for torch: bad_value."""
    buf = bytearray(PAYLOAD)
    mask = next(e for e in read_header(PAYLOAD)[0] if e.name == "mask")
    buf[mask.offset + 1] = 2
    assert reason_of(buf) == "bad_value"


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda s: s.pop("mask"), "wrong_names"),
        (lambda s: s.update(extra=TensorSpec("float32", (1,))), "wrong_names"),
        (lambda s: s.update(mask=TensorSpec("bool", (4,))), "wrong_schema"),
        (lambda s: s.update(half=TensorSpec("float16", (1, 3))), "wrong_schema"),
        (lambda s: s.update(half=TensorSpec("float32", (3,))), "wrong_schema"),
        (lambda s: s.update({"conv.weight": TensorSpec("float32", [2, 3, 4])}), None),
    ],
    ids=["missing", "extra", "wrong-shape", "wrong-rank", "wrong-dtype", "list-shape-ok"],
)
def test_a_schema_mismatch_is_rejected(edit: Any, reason: str | None) -> None:
    """Names must equal the schema's; each tensor's dtype and shape must equal its spec."""
    schema = schema_of(STATE)
    edit(schema)
    if reason is None:
        decode(PAYLOAD, schema=schema)
    else:
        assert reason_of(PAYLOAD, schema=schema) == reason


def test_the_error_carries_reason_and_detail() -> None:
    """PayloadError is a ValueError whose message starts with its reason."""
    with pytest.raises(ValueError, match=r"^bad_magic: ") as info:
        decode(b"XXXX" + PAYLOAD[4:])
    assert isinstance(info.value, PayloadError)
    assert info.value.detail


def test_extra_bytes_after_the_last_tensor_are_tolerated() -> None:
    """Trailing bytes (for example a reused, larger shared-memory buffer) are ignored."""
    state, _ = decode(PAYLOAD + b"\xff" * 100, schema=schema_of(STATE))
    assert torch.equal(state["conv.weight"], STATE["conv.weight"])


def test_meta_with_any_msgpack_values_is_returned() -> None:
    """Meta may hold any msgpack values; the header stays parseable."""
    meta = {"a": [1, 2.5, None, b"x"], "b": {"c": "d"}}
    assert decode(encode(STATE, meta))[1] == meta
    assert msgpack.unpackb(PAYLOAD[8 : 8 + struct.unpack_from("<I", PAYLOAD, 4)[0]])["v"] == 1
