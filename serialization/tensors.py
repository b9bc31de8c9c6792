"""State dict <-> bytes: a small msgpack header, then the raw tensor bytes.

Layout (all integers little endian)::

    b"PWFL" | u32 header_len | msgpack header | zero padding | tensor bytes ...

The header is ``{"v": 1, "t": [[name, dtype, shape, offset, nbytes], ...],
"m": {meta}}``; offsets are from the start of the payload and each tensor starts
on a 64-byte boundary, so views over an aligned buffer are aligned too.

Encoding copies every tensor's bytes exactly once (into the joined output, a
fresh huge-page buffer, or a caller's buffer such as shared memory). Decoding
copies nothing: the returned tensors are views over the given buffer (they keep
it alive), read-only unless the buffer is writable. Views of one dtype share a
storage spanning the whole buffer, so `torch.save` a `clone()` of any subset.
"""

from __future__ import annotations

import functools
import math
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch

from serialization.errors import PayloadError

# Decoded tensors are read-only views over received bytes by contract (zero-copy
# decode); torch can only warn that it cannot mark them read-only.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

MAGIC = b"PWFL"
FORMAT_VERSION = 1
ALIGN = 64
_PREFIX = struct.Struct("<4sI")
MAX_HEADER_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BYTES = 4 * 1024**3
MAX_NDIM = 64
# Bounds the product of an empty tensor's non-zero dimensions, which nothing
# else limits, so that torch's int64 size arithmetic cannot overflow.
_MAX_ELEMENTS = 2**48

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ITEMSIZES: dict[str, int] = {k: v.itemsize for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})

StateDict = Mapping[str, torch.Tensor]
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor must be: its dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]


Schema = Mapping[str, TensorSpec]


class _Entry(NamedTuple):
    # A NamedTuple, not a frozen dataclass: decode builds one per tensor and a
    # frozen dataclass's __init__ costs ~4x more.
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def schema_of(state: StateDict) -> dict[str, TensorSpec]:
    """The schema a payload must match to be loaded into a model with this state."""
    return {k: TensorSpec(_dtype_name(t.dtype), tuple(t.shape)) for k, t in state.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise PayloadError("bad_dtype", f"dtype {dtype} is not supported") from None


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _byte_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy array, without a copy when it is on CPU.

    Called once per tensor (122 for ResNet-18), so it avoids torch calls: each
    costs a microsecond or more, a numpy call a fraction of that.
    """
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:
        t = t.cpu()
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16; the bytes are what matter
        t = t.view(torch.int16)
    array = t.numpy()
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return array.reshape(-1).view(np.uint8)


def _plan(state: StateDict, meta: Mapping[str, Any] | None) -> tuple[bytes, list[np.ndarray], int]:
    """Header bytes (prefix included, padded), tensor byte views, total size."""
    views = [_byte_view(t) for t in state.values()]
    rows: list[list[Any]] = []
    # Offsets depend on the header's length, which depends on the offsets:
    # encode once with offsets relative to the data start, then shift.
    data_offset = 0
    for (name, t), view in zip(state.items(), views, strict=True):
        rows.append([name, _dtype_name(t.dtype), list(t.shape), data_offset, view.nbytes])
        data_offset = _align(data_offset + view.nbytes)
    header = {"v": FORMAT_VERSION, "t": rows, "m": dict(meta or {})}
    shift = 0
    while True:  # shifting the offsets can lengthen their varints: settle in a step or two
        start = _align(_PREFIX.size + len(msgpack.packb(header)))
        for row in rows:
            row[3] += start - shift
        shift = start
        packed = msgpack.packb(header)
        if _PREFIX.size + len(packed) <= start:
            break
    head = _PREFIX.pack(MAGIC, len(packed)) + packed
    head += bytes(start - len(head))
    total = rows[-1][3] + rows[-1][4] if rows else start
    return head, views, total


def encoded_size(state: StateDict, meta: Mapping[str, Any] | None = None) -> int:
    """Bytes that `encode` / `encode_buffer` / `encode_into` produce for this state dict."""
    return _plan(state, meta)[2]


def encode(state: StateDict, meta: Mapping[str, Any] | None = None) -> bytes:
    """The payload as one bytes object: the tensors' bytes are copied once.

    A fresh bytes object of tens of MB costs a page fault per 4 KiB page, which
    is most of the time here; `encode_buffer` (huge pages) or `encode_into` (a
    reused buffer) avoid that.
    """
    head, views, total = _plan(state, meta)
    parts: list[Any] = [head]
    pos = len(head)
    for view in views:
        pad = _align(pos) - pos
        if pad:
            parts.append(bytes(pad))
        parts.append(view)
        pos += pad + view.nbytes
    out = b"".join(parts)
    assert len(out) == total
    return out


def encode_into(state: StateDict, buf: memoryview | bytearray,
                meta: Mapping[str, Any] | None = None) -> int:
    """Write the payload into `buf` (for example shared memory); returns its size."""
    head, views, total = _plan(state, meta)
    if len(buf) < total:
        raise ValueError(f"buffer of {len(buf)} bytes is smaller than the payload ({total})")
    _fill(np.frombuffer(buf, dtype=np.uint8, count=total), head, views)
    return total


def encode_buffer(state: StateDict, meta: Mapping[str, Any] | None = None) -> memoryview:
    """The payload in a fresh writable buffer: `encode` without its page-fault cost.

    numpy allocates large arrays on transparent huge pages where the kernel
    allows it (madvise), so filling 45 MB takes ~700 faults instead of ~11,000.
    The memoryview keeps the buffer alive; Redis, hashlib and `decode` take it.
    """
    head, views, total = _plan(state, meta)
    out = np.empty(total, dtype=np.uint8)
    _fill(out, head, views)
    return out.data


def _fill(out: np.ndarray, head: bytes, views: list[np.ndarray]) -> None:
    out[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    pos = len(head)
    for view in views:
        start = _align(pos)
        if start > pos:  # a reused buffer holds old bytes where the padding goes
            out[pos:start] = 0
        out[start : start + view.nbytes] = view
        pos = start + view.nbytes


def read_header(
    buf: Buffer, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[list[_Entry], dict[str, Any]]:
    """Parse and validate the header: entries and meta. Raises PayloadError."""
    size = len(buf)
    if size > max_bytes:
        raise PayloadError("too_large", f"payload is {size} bytes, limit {max_bytes}")
    if size < _PREFIX.size:
        raise PayloadError("truncated", f"payload is {size} bytes, shorter than the prefix")
    magic, header_len = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise PayloadError("bad_magic", "payload does not start with b'PWFL'")
    if header_len > MAX_HEADER_BYTES or _PREFIX.size + header_len > size:
        raise PayloadError("truncated", f"header of {header_len} bytes does not fit the payload")
    raw = memoryview(buf)[_PREFIX.size : _PREFIX.size + header_len]
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on bad input
        raise PayloadError("bad_header", f"header is not valid msgpack: {exc}") from None
    return _entries(header, size, _PREFIX.size + header_len)


def _entries(header: Any, size: int, data_start: int) -> tuple[list[_Entry], dict[str, Any]]:
    if not isinstance(header, dict) or type(header.get("v")) is not int:
        raise PayloadError("bad_header", "header is not a map with an integer format version")
    if header["v"] != FORMAT_VERSION:
        raise PayloadError("bad_header", f"unsupported header (format version {FORMAT_VERSION})")
    rows, meta = header.get("t"), header.get("m", {})
    if not isinstance(rows, list) or not isinstance(meta, dict):
        raise PayloadError("bad_header", "header fields 't' and 'm' have the wrong types")
    entries, seen, end = [], set(), data_start
    for row in rows:
        entry = _entry(row)
        if entry.name in seen:
            raise PayloadError("bad_header", f"tensor {entry.name!r} appears twice")
        if entry.offset < end or entry.offset + entry.nbytes > size:
            # Also rejects overlapping tensors: each must start after the last ends.
            raise PayloadError("truncated", f"tensor {entry.name!r} lies outside the payload")
        seen.add(entry.name)
        end = entry.offset + entry.nbytes
        entries.append(entry)
    return entries, meta


def _entry(row: Any) -> _Entry:
    if not (isinstance(row, list) and len(row) == 5):
        raise PayloadError("bad_header", "a tensor row is not [name, dtype, shape, offset, nbytes]")
    name, dtype, shape, offset, nbytes = row
    if not isinstance(name, str):
        raise PayloadError("bad_header", f"tensor name {name!r} is not a string")
    itemsize = _ITEMSIZES.get(dtype) if isinstance(dtype, str) else None
    if itemsize is None:
        raise PayloadError("bad_dtype", f"tensor {name!r}: dtype {dtype!r} is not supported")
    numel = _numel(name, shape)
    if type(offset) is not int or type(nbytes) is not int or offset < 0 or offset % ALIGN:
        raise PayloadError("bad_header", f"tensor {name!r}: bad offset or length")
    if numel * itemsize != nbytes:
        raise PayloadError(
            "bad_shape", f"tensor {name!r}: shape {shape} x {itemsize} B != {nbytes} B"
        )
    return _Entry(name, dtype, tuple(shape), offset, nbytes)


def _numel(name: str, shape: Any) -> int:
    """Element count of a valid shape: a list of at most MAX_NDIM ints >= 0 (bools excluded)."""
    if isinstance(shape, list) and len(shape) <= MAX_NDIM:
        numel = nonzero = 1
        for d in shape:
            if type(d) is not int or d < 0:
                break
            numel *= d
            nonzero *= d or 1
        else:
            if nonzero <= _MAX_ELEMENTS:
                return numel
    raise PayloadError("bad_shape", f"tensor {name!r}: shape {shape!r} is not a list of sizes")


def check_schema(entries: list[_Entry], schema: Schema) -> None:
    """Names, dtypes and shapes must equal the expected model's."""
    names = [e.name for e in entries]
    if set(names) != set(schema):
        missing = sorted(set(schema) - set(names))[:3]
        extra = sorted(set(names) - set(schema))[:3]
        raise PayloadError("wrong_names", f"missing {missing}, unexpected {extra}")
    for e in entries:
        spec = schema[e.name]
        if e.dtype != spec.dtype or e.shape != tuple(spec.shape):
            got, want = f"{e.dtype}{list(e.shape)}", f"{spec.dtype}{list(spec.shape)}"
            raise PayloadError("wrong_schema", f"tensor {e.name!r} is {got}, expected {want}")


def _views(buf: Buffer, entries: list[_Entry]) -> dict[str, torch.Tensor]:
    """A tensor per entry over `buf`: one frombuffer per dtype, then as_strided."""
    # as_strided on a whole-buffer tensor costs half of a frombuffer per tensor;
    # torch still checks each view against the buffer's bounds.
    bases: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for e in entries:
        dtype = DTYPES[e.dtype]
        if e.nbytes == 0:
            state[e.name] = torch.empty(e.shape, dtype=dtype)
            continue
        base = bases.get(e.dtype)
        if base is None:
            count = len(buf) // dtype.itemsize
            base = bases[e.dtype] = torch.frombuffer(buf, dtype=dtype, count=count)
        t = base.as_strided(e.shape, _strides(e.shape), e.offset // dtype.itemsize)
        if dtype == torch.bool and int(t.view(torch.uint8).max()) > 1:
            # Any other byte is undefined behaviour for torch's bool kernels.
            raise PayloadError("bad_value", f"tensor {e.name!r}: a bool byte is neither 0 nor 1")
        state[e.name] = t
    return state


@functools.lru_cache(maxsize=4096)
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    # Cached: a model's shapes repeat in every payload, and in it (ResNet-18: 122 -> 30).
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def check_finite(state: StateDict) -> None:
    """Reject NaN or Inf in any float tensor (one read pass, no temporaries)."""
    for name, t in state.items():
        if t.is_floating_point() and t.numel() and not _all_finite(t):
            raise PayloadError("not_finite", f"tensor {name!r} holds NaN or Inf")


def _all_finite(t: torch.Tensor) -> bool:
    # A sum is finite iff every element is (IEEE addition never turns NaN or
    # Inf into a finite value), unless huge finite values overflow the sum's
    # dtype (often so in float16); min and max, which propagate NaN, settle
    # that case exactly. The native-dtype sum is the fastest reduction torch
    # has here: ~10x a float64 sum, ~1.3x aminmax, ~15x isfinite().all().
    if math.isfinite(float(t.sum())):
        return True
    low, high = torch.aminmax(t.reshape(-1))
    return math.isfinite(float(low)) and math.isfinite(float(high))


def decode(
    buf: Buffer,
    *,
    schema: Schema | None = None,
    finite: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Validate and decode: (state dict of views over `buf`, meta). Raises PayloadError."""
    entries, meta = read_header(buf, max_bytes=max_bytes)
    if schema is not None:
        check_schema(entries, schema)
    state = _views(buf, entries)
    if finite:
        check_finite(state)
    return state, meta
