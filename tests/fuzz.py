"""Fuzzing the decoders: whatever bytes arrive, only `PayloadError` may escape.

The strategies and targets live here once and serve twice: the tests
(``tests/test_serialization_*.py``, ``tests/test_messages.py``) draw a couple of
thousand cases from them in CI, and ``python -m tests.fuzz --cases 100000``
runs every fuzzer for the big count and prints how many cases each ran.

Fuzzers (a strategy of inputs and a target that must not crash on them):

- ``decode_random``: random bytes, some behind a valid prefix, into `decode`.
- ``decode_mutated``: valid payloads with bit flips, byte writes, truncations,
  splices and header-length rewrites, into `decode` (with and without schema).
- ``decode_headers``: well-formed msgpack headers with random rows, into `decode`.
- ``message_random`` / ``message_mutated`` / ``message_maps``: random bytes,
  mutated valid messages (both kinds of job among them) and random msgpack maps,
  into every `Message.from_bytes` and into `job_from_bytes`, which decodes by kind.
- ``protocol_random`` / ``protocol_mutated`` / ``protocol_maps``: random bytes,
  mutated valid agent <-> trainer pipe messages and random maps of their fields,
  into `trainer_worker.protocol.unpack` (PayloadError, which both ends of the pipe
  catch, or a message of a known kind).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import multiprocessing
import struct
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import msgpack
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from serialization import (
    DTYPES,
    GradientJob,
    Job,
    Message,
    PayloadError,
    Registration,
    Result,
    decode,
    encode,
    job_from_bytes,
)
from serialization.gradient import StepGradient, StepWeights
from serialization.tensors import ALIGN, MAGIC, TensorSpec, schema_of
from trainer_worker import protocol

MESSAGE_TYPES: tuple[type[Message], ...] = (Job, GradientJob, Result, Registration,
                                             StepWeights, StepGradient)
FUZZ_MAX_BYTES = 1 << 20  # decode's size limit in the fuzzers: inputs stay far below it

# --- state dicts -------------------------------------------------------------

dtype_names = st.sampled_from(sorted(DTYPES))
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def tensors(draw: st.DrawFn, dtype: str | None = None, shape: tuple[int, ...] | None = None,
            ) -> torch.Tensor:
    """A contiguous tensor of any supported dtype and small shape (0-d and empty included).

    Float bytes are random, so NaN, Inf and subnormals turn up; bools are 0 or 1.
    """
    name = draw(dtype_names) if dtype is None else dtype
    dims = draw(shapes) if shape is None else shape
    torch_dtype = DTYPES[name]
    count = 1
    for d in dims:
        count *= d
    if torch_dtype == torch.bool:
        bits = draw(st.lists(st.booleans(), min_size=count, max_size=count))
        return torch.tensor(bits, dtype=torch.bool).reshape(dims)
    size = count * torch_dtype.itemsize
    raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if not raw:
        return torch.empty(dims, dtype=torch_dtype)
    return torch.frombuffer(raw, dtype=torch_dtype).reshape(dims).clone()


def _strided(t: torch.Tensor, how: str) -> torch.Tensor:
    """A view of `t` that is not contiguous (where its shape allows one)."""
    if how == "transpose" and t.dim() >= 2:
        return t.transpose(0, -1)
    if how == "step" and t.dim() >= 1:
        return t[..., ::2]
    if how == "expand":
        return t.unsqueeze(0).expand(2, *t.shape)
    return t


@st.composite
def maybe_strided_tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor that is, as often as not, a non-contiguous view."""
    how = draw(st.sampled_from(["none", "transpose", "step", "expand"]))
    return _strided(draw(tensors()), how)


tensor_names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=0, max_size=12
)
state_dicts = st.dictionaries(tensor_names, maybe_strided_tensors(), max_size=5)

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
metas = st.dictionaries(st.text(max_size=8), msgpack_values, max_size=3)


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, dict[str, TensorSpec]]:
    """A valid encoded state dict and its schema."""
    state = draw(state_dicts)
    return encode(state, draw(metas)), schema_of(state)


# --- mutations ---------------------------------------------------------------


def _position(draw: st.DrawFn, data: bytearray) -> int:
    # Most writes land past the magic and in the first 256 bytes (the header).
    limit = len(data) - 1
    near = st.integers(min(4, limit), min(limit, 255))
    return draw(near | near | st.integers(0, limit))


def _flip_bit(draw: st.DrawFn, data: bytearray) -> bytearray:
    if data:
        data[_position(draw, data)] ^= 1 << draw(st.integers(0, 7))
    return data


def _write_byte(draw: st.DrawFn, data: bytearray) -> bytearray:
    if data:
        special = st.sampled_from([0, 1, 0x7F, 0x80, 0xC0, 0xFF])
        data[_position(draw, data)] = draw(special | st.integers(0, 255))
    return data


def _truncate(draw: st.DrawFn, data: bytearray) -> bytearray:
    return data[: draw(st.integers(0, len(data)))]


def _splice(draw: st.DrawFn, data: bytearray) -> bytearray:
    """Insert random bytes, or a copy of another part, or delete a range."""
    at = draw(st.integers(0, len(data)))
    end = draw(st.integers(at, min(len(data), at + 64)))
    kind = draw(st.sampled_from(["insert", "copy", "delete"]))
    if kind == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
    if kind == "copy":
        src = draw(st.integers(0, len(data)))
        return data[:at] + data[src : src + end - at] + data[end:]
    return data[:at] + data[end:]


def _rewrite_u32(draw: st.DrawFn, data: bytearray) -> bytearray:
    """Overwrite a little-endian u32 (the header length sits at byte 4)."""
    if len(data) >= 8:
        at = draw(st.just(4) | st.integers(0, len(data) - 4))
        value = draw(st.integers(0, 2**32 - 1) | st.integers(0, 512))
        data[at : at + 4] = struct.pack("<I", value)
    return data


MUTATIONS: list[Callable[[st.DrawFn, bytearray], bytearray]] = [
    _flip_bit, _write_byte, _truncate, _splice, _rewrite_u32,
]


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid input with one to four mutations applied."""
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 4))):
        data = draw(st.sampled_from(MUTATIONS))(draw, data)
    return bytes(data)


def with_header(header: Any, tail: bytes = b"", header_len: int | None = None) -> bytes:
    """A payload with any header: prefix, msgpack header, zero padding to ALIGN, tail."""
    packed = msgpack.packb(header)
    head = struct.pack("<4sI", MAGIC, len(packed) if header_len is None else header_len) + packed
    return head + bytes(-len(head) % ALIGN) + tail


# --- decode fuzzers ------------------------------------------------------------

random_payloads = st.binary(max_size=600) | st.binary(max_size=600).map(
    lambda b: MAGIC + struct.pack("<I", len(b) // 2) + b
)
mutated_payloads = st.tuples(
    mutated(payloads().map(lambda p: p[0])), st.none()
) | payloads().flatmap(lambda p: st.tuples(mutated(st.just(p[0])), st.just(p[1])))

def split_payload(payload: bytes) -> tuple[Any, int, bytes]:
    """A valid payload's header (decoded), where its data starts, and the data."""
    (header_len,) = struct.unpack_from("<I", payload, 4)
    header = msgpack.unpackb(payload[8 : 8 + header_len], raw=False)
    rows = header["t"]
    start = rows[0][3] if rows else len(payload)
    return header, start, payload[start:]


def repack(header: Any, data_start: int, data: bytes) -> bytes:
    """`header` over `data`, the data kept at `data_start` when the header still fits."""
    head = with_header(header)
    if len(head) < data_start:
        head += bytes(data_start - len(head))
    return head + data


def _packable(value: int) -> int:
    """`value` clamped to what msgpack can carry (an earlier edit may sit at a limit)."""
    return min(max(value, -(2**63)), 2**64 - 1)


def _near(value: Any) -> st.SearchStrategy[Any]:
    """Values next to a header field's: off by one, by ALIGN, negative, huge, or a bool."""
    if isinstance(value, int):
        deltas = st.sampled_from(
            [-ALIGN, -1, 1, ALIGN, 2**62, 2**63, 2**64 - 1 - value, -2 * value]
        )
        return deltas.map(lambda d: _packable(value + d)) | st.sampled_from([True, False, 0])
    if isinstance(value, list):  # a shape: insert or replace one dimension, or a new list
        dims = st.sampled_from([0, 1, True, -1, 2**31, 2**62, 2**63, 2**64 - 1])
        at = st.integers(0, len(value))
        return (
            st.tuples(at, dims).map(lambda p: [*value[: p[0]], p[1], *value[p[0] :]])
            | st.tuples(at, dims).map(lambda p: [*value[: p[0]], p[1], *value[p[0] + 1 :]])
            | st.lists(st.integers(-1, 5) | dims, max_size=70)
        )
    return dtype_names | tensor_names


@st.composite
def _edited_header(draw: st.DrawFn, header: dict[str, Any]) -> dict[str, Any]:
    """The header with one structural edit: a row field, a row, or a top-level key."""
    rows = header.get("t")
    kind = draw(st.sampled_from(["field", "field", "field", "row", "top"]))
    if not (isinstance(rows, list) and rows and all(isinstance(r, list) for r in rows)):
        kind = "top"  # an earlier edit replaced the rows
    if kind == "field":
        row = draw(st.sampled_from(rows))
        column = draw(st.integers(0, 4))
        if column < len(row):
            row[column] = draw(_near(row[column]) | msgpack_values)
    elif kind == "row":
        i, j = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, len(rows) - 1))
        edit = draw(st.sampled_from(["delete", "duplicate", "swap", "shorten", "replace"]))
        if edit == "delete":
            del rows[i]
        elif edit == "duplicate":
            rows.insert(j, list(rows[i]))
        elif edit == "swap":
            rows[i], rows[j] = rows[j], rows[i]
        elif edit == "shorten":
            rows[i] = rows[i][: draw(st.integers(0, 4))]
        else:
            rows[i] = draw(msgpack_values)
    else:
        key = draw(st.sampled_from(["v", "t", "m"]) | st.text(max_size=2))
        header[key] = draw(msgpack_values)
    return header


@st.composite
def edited_headers(draw: st.DrawFn) -> bytes:
    """A valid payload with one or two edits to its decoded header, repacked."""
    header, start, data = split_payload(draw(payloads())[0])
    for _ in range(draw(st.integers(1, 2))):
        header = draw(_edited_header(header))
    return repack(header, start, data)


random_headers = edited_headers() | st.builds(with_header, msgpack_values, st.binary(max_size=64))


def check_decode(data: bytes, schema: dict[str, TensorSpec] | None = None) -> None:
    """decode() accepts `data` or raises PayloadError; accepted tensors are readable."""
    for buf in (data, bytearray(data)):
        try:
            state, _ = decode(buf, schema=schema, finite=True, max_bytes=FUZZ_MAX_BYTES)
        except PayloadError:
            continue
        for t in state.values():
            t.clone()  # reads every byte of the view: out-of-range views would fault here


def check_decode_pair(pair: tuple[bytes, dict[str, TensorSpec] | None]) -> None:
    check_decode(*pair)


# --- message fuzzers -----------------------------------------------------------

_text = st.text(max_size=12)
_ints = st.integers(0, 2**40)
_floats = st.floats(allow_nan=False, allow_infinity=False)
jobs = st.builds(
    Job, job_id=_text, run_id=_text, slot_id=_ints, round=_ints, client_id=_text,
    model_digest=_text, model_nbytes=_ints, deadline_ts=_floats, task=_text,
    task_options=metas, config=metas, published_ts=_floats,
)
results = st.builds(
    Result, job_id=_text, run_id=_text, slot_id=_ints, round=_ints, client_id=_text,
    status=st.sampled_from(["ok", "failed"]), agent_id=_text, update_digest=_text,
    update_nbytes=_ints, num_examples=_ints, metrics=metas, timings=metas, error=_text,
    signature=st.binary(max_size=32),
)
registrations = st.builds(
    Registration, agent_id=_text, client_ids=st.lists(_text, max_size=4),
    devices=st.lists(_text, max_size=3), hostname=_text, pid=_ints,
    event=st.sampled_from(["register", "unregister"]),
)
gradient_jobs = st.builds(
    GradientJob, job_id=_text, run_id=_text, slot_id=_ints, round=_ints, client_id=_text,
    session=_text, steps=_ints, step_deadline_s=_floats, deadline_ts=_floats, task=_text,
    task_options=metas, config=metas, published_ts=_floats, signature=st.binary(max_size=32),
)
step_gradients = st.builds(
    StepGradient, session=_text, step=_ints, job_id=_text, client_id=_text,
    num_examples=_ints, numel=_ints, loss=_floats, agent_id=_text, timings=metas,
)
messages: st.SearchStrategy[Message] = (jobs | gradient_jobs | results | registrations
                                        | step_gradients)

def _mutated_body(message: Message) -> st.SearchStrategy[dict[str, Any]]:
    """A valid message's map with one field replaced, removed, or a new one added."""
    body = msgpack.unpackb(message.to_bytes(), raw=False)
    key = st.sampled_from(sorted(body)) | st.text(max_size=4)
    return st.tuples(key, msgpack_values, st.booleans()).map(
        lambda kv: _edit(body, *kv)
    )


def _edit(body: dict[str, Any], key: str, value: Any, remove: bool) -> dict[str, Any]:
    edited = dict(body)
    if remove:
        edited.pop(key, None)
    else:
        edited[key] = value
    return edited


_field_names = sorted(
    {"v", "k"} | {f.name for cls in MESSAGE_TYPES for f in dataclasses.fields(cls)}
)
random_messages = st.binary(max_size=300)
message_maps = st.builds(
    lambda body: msgpack.packb(body, use_bin_type=True),
    st.dictionaries(st.sampled_from(_field_names) | st.text(max_size=4), msgpack_values,
                    max_size=12)
    | messages.flatmap(_mutated_body),
)
mutated_messages = mutated(messages.map(lambda m: m.to_bytes()))


def check_messages(data: bytes) -> None:
    """Every Message.from_bytes accepts `data` or raises PayloadError."""
    for cls in MESSAGE_TYPES:
        with contextlib.suppress(PayloadError):
            cls.from_bytes(data)
    with contextlib.suppress(PayloadError):
        job = job_from_bytes(data)
        if not isinstance(job, Job | GradientJob):
            raise AssertionError(f"job_from_bytes returned {job!r}")


# --- trainer protocol fuzzers ----------------------------------------------------

_pipe_fields = sorted({f.name for cls in protocol.KINDS.values()
                       for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
_kinds = st.sampled_from(sorted(protocol.KINDS)) | msgpack_values
pipe_maps = st.builds(
    lambda kind, body: msgpack.packb({"v": 1, **body, "k": kind}, use_bin_type=True),
    _kinds,
    st.dictionaries(st.sampled_from(_pipe_fields) | st.text(max_size=4), msgpack_values,
                    max_size=10),
)
pipe_messages = st.sampled_from(sorted(protocol.KINDS)).flatmap(
    lambda kind: st.builds(protocol.KINDS[kind], **_pipe_values(protocol.KINDS[kind]))
).map(protocol.pack)
random_pipe_bytes = st.binary(max_size=300)
mutated_pipe_messages = mutated(pipe_messages)


def _pipe_values(cls: type[Message]) -> dict[str, st.SearchStrategy[Any]]:
    """A strategy per field of a pipe message, by the field's declared type."""
    by_type: dict[str, st.SearchStrategy[Any]] = {
        "str": _text, "int": _ints, "float": _floats, "dict[str, Any]": metas,
        "list[str]": st.lists(_text, max_size=4),
        "dict[str, int]": st.dictionaries(_text, _ints, max_size=4)}
    return {f.name: by_type[str(f.type)] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def check_protocol(data: bytes) -> None:
    """`protocol.unpack` returns a message of a known kind or raises PayloadError, nothing
    else."""
    try:
        message = protocol.unpack(data)
    except PayloadError:
        return
    if type(message) not in protocol.KINDS.values():
        raise AssertionError(f"unpack returned {message!r}")


# --- the runner ----------------------------------------------------------------

FUZZERS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
    "decode_random": (random_payloads, check_decode),
    "decode_mutated": (mutated_payloads, check_decode_pair),
    "decode_headers": (random_headers, check_decode),
    "message_random": (random_messages, check_messages),
    "message_mutated": (mutated_messages, check_messages),
    "message_maps": (message_maps, check_messages),
    "protocol_random": (random_pipe_bytes, check_protocol),
    "protocol_mutated": (mutated_pipe_messages, check_protocol),
    "protocol_maps": (pipe_maps, check_protocol),
}
BATCH = 2_000  # examples per hypothesis run: keeps its example tree small and fast


def fuzz_settings(cases: int) -> settings:
    """Generate only (no database, no shrinking of passing runs), no deadline."""
    return settings(
        max_examples=cases,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )


def run_batch(name: str, cases: int, batch_seed: int | None = None) -> int:
    """Run up to `cases` examples of one fuzzer; returns the calls made.

    A crash (any exception but PayloadError) propagates after hypothesis has
    shrunk it and printed the falsifying example.
    """
    strategy, target = FUZZERS[name]
    calls = 0

    @fuzz_settings(cases)
    @given(strategy)
    def fuzz(value: Any) -> None:
        nonlocal calls
        calls += 1
        target(value)

    (fuzz if batch_seed is None else seed(batch_seed)(fuzz))()
    return calls


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core instead
    # decode() over bytes: torch warns (once per process) that they are read-only.
    warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)


def _worker(task: tuple[str, int, int]) -> tuple[int, str | None]:
    try:
        return run_batch(*task), None
    except Exception as exc:  # noqa: BLE001 - a crash is the result this runner reports
        return 0, f"{task[0]} seed {task[2]}: {type(exc).__name__}: {exc}"


def _run_fuzzer(pool: Any, name: str, cases: int, first_seed: int) -> tuple[int, list[str]]:
    sizes = [min(BATCH, cases - done) for done in range(0, cases, BATCH)]
    outcomes = pool.imap_unordered(
        _worker, [(name, n, first_seed + i) for i, n in enumerate(sizes)]
    )
    calls, crashes = 0, []
    for batch_calls, crash in outcomes:
        calls += batch_calls
        if crash is not None:
            crashes.append(crash)
    return calls, crashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cases", type=int, default=100_000, help="cases per fuzzer")
    parser.add_argument("--seed", type=int, default=0, help="first batch's seed")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes")
    parser.add_argument("--only", choices=sorted(FUZZERS), action="append", help="fuzzers to run")
    args = parser.parse_args(argv)
    total_calls, all_crashes, start = 0, [], time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(args.jobs, initializer=_init_worker) as pool:
        for name in args.only or FUZZERS:
            t0 = time.perf_counter()
            calls, crashes = _run_fuzzer(pool, name, args.cases, args.seed)
            total_calls += calls
            all_crashes += crashes
            elapsed = time.perf_counter() - t0
            print(f"{name:16} {calls:>9,} cases {len(crashes):>3} crashes {elapsed:7.1f} s")
    elapsed = time.perf_counter() - start
    print(f"{'total':16} {total_calls:>9,} cases {len(all_crashes):>3} crashes {elapsed:7.1f} s")
    for crash in all_crashes:
        print("CRASH", crash)
    return 1 if all_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
