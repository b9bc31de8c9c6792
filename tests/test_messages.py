"""Stream messages: versioned msgpack maps, lenient to new fields, strict on required ones."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serialization import (
    SCHEMA_VERSION,
    GradientJob,
    Job,
    Message,
    PayloadError,
    Registration,
    Result,
    job_from_bytes,
)
from serialization.messages import MAX_MESSAGE_BYTES
from tests.fuzz import jobs, registrations, results

JOB = Job(
    job_id="j1", run_id="r1", slot_id=2, round=7, client_id="c3", model_digest="ab" * 32,
    model_nbytes=46_803_232, deadline_ts=1_700_000_000.5, task="cnn",
    task_options={"lr": 0.01}, config={"epochs": 1},
)
RESULT = Result(
    job_id="j1", run_id="r1", slot_id=2, round=7, client_id="c3", status="ok",
    agent_id="a1", update_digest="cd" * 32, update_nbytes=10, num_examples=600,
    metrics={"loss": 0.5}, signature=b"\x00\x01",
)
REGISTRATION = Registration(agent_id="a1", client_ids=["c1", "c2"], devices=["cpu"], pid=42)
EXAMPLES: list[Message] = [JOB, RESULT, REGISTRATION]


def body_of(message: Message) -> dict[str, Any]:
    body: dict[str, Any] = msgpack.unpackb(message.to_bytes(), raw=False)
    return body


def pack(body: Any) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def reason_of(cls: type[Message], raw: bytes | memoryview) -> str:
    with pytest.raises(PayloadError) as info:
        cls.from_bytes(raw)
    return info.value.reason


def required_fields(cls: type[Message]) -> list[str]:
    return [
        f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


@settings(max_examples=100, deadline=None)
@given(jobs | results | registrations)
def test_round_trip_returns_an_equal_message(message: Message) -> None:
    """from_bytes(to_bytes(m)) equals m for every message kind and field value."""
    raw = message.to_bytes()
    decoded = type(message).from_bytes(raw)
    assert type(decoded) is type(message)
    assert decoded.to_bytes() == raw  # NaN in a metrics map is equal only as bytes


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.kind)
def test_the_wire_map_carries_version_and_kind(message: Message) -> None:
    """Each message is a msgpack map with "v" (schema version) and "k" (its kind)."""
    body = body_of(message)
    assert body["v"] == SCHEMA_VERSION
    assert body["k"] == message.kind


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.kind)
def test_from_bytes_takes_a_memoryview(message: Message) -> None:
    """Stream readers may hand over memoryviews; they decode like bytes."""
    assert type(message).from_bytes(memoryview(message.to_bytes())) == message


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.kind)
def test_unknown_fields_are_ignored(message: Message) -> None:
    """Fields a newer sender adds are dropped, not rejected."""
    body = body_of(message) | {"new_field": [1, 2], "x": {"nested": True}}
    assert type(message).from_bytes(pack(body)) == message


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.kind)
def test_optional_fields_take_their_defaults_when_missing(message: Message) -> None:
    """A message with only its required fields decodes, the rest at their defaults."""
    cls = type(message)
    body = {k: v for k, v in body_of(message).items() if k in {*required_fields(cls), "v", "k"}}
    decoded = cls.from_bytes(pack(body))
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in body:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(decoded, f.name) == default


@pytest.mark.parametrize(
    ("message", "name"),
    [(m, name) for m in EXAMPLES for name in required_fields(type(m))],
    ids=lambda v: v if isinstance(v, str) else v.kind,
)
def test_a_missing_required_field_is_rejected(message: Message, name: str) -> None:
    """Leaving out any required field is rejected with reason missing_field."""
    body = body_of(message)
    del body[name]
    assert reason_of(type(message), pack(body)) == "missing_field"


@pytest.mark.parametrize(
    ("message", "name", "value"),
    [
        (JOB, "job_id", 5),
        (JOB, "job_id", None),
        (JOB, "job_id", b"j1"),
        (JOB, "slot_id", "2"),
        (JOB, "slot_id", 2.0),
        (JOB, "model_nbytes", [1]),
        (JOB, "deadline_ts", "soon"),
        (JOB, "deadline_ts", None),
        (JOB, "task_options", [1, 2]),
        (JOB, "config", "epochs=1"),
        (JOB, "task_options", {b"lr": 0.1}),
        (RESULT, "signature", "00"),
        (RESULT, "metrics", "loss=1"),
        (RESULT, "num_examples", 1.5),
        (REGISTRATION, "client_ids", "c1"),
        (REGISTRATION, "client_ids", ["c1", 2]),
        (REGISTRATION, "client_ids", {"c1": 1}),
        (REGISTRATION, "devices", [None]),
        (REGISTRATION, "pid", "42"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, Message) else v.kind,
)
def test_a_field_of_the_wrong_type_is_rejected(message: Message, name: str, value: Any) -> None:
    """A value whose type does not fit the field's annotation is rejected as bad_field."""
    assert reason_of(type(message), pack(body_of(message) | {name: value})) == "bad_field"


@pytest.mark.parametrize(
    ("message", "name"),
    [(JOB, "slot_id"), (JOB, "round"), (JOB, "model_nbytes"), (RESULT, "num_examples"),
     (RESULT, "update_nbytes"), (REGISTRATION, "pid"), (JOB, "deadline_ts"),
     (JOB, "published_ts")],
    ids=lambda v: v if isinstance(v, str) else v.kind,
)
@pytest.mark.parametrize("flag", [True, False])
def test_a_bool_is_not_accepted_as_a_number(message: Message, name: str, flag: bool) -> None:
    """True / False where an int or float is expected is rejected (bool subclasses int)."""
    body = body_of(message) | {name: flag}
    assert reason_of(type(message), pack(body)) == "bad_field"


def test_an_int_where_a_float_is_expected_becomes_a_float() -> None:
    """msgpack sends 5.0 as an int from some senders: a float field takes it, as a float."""
    decoded = Job.from_bytes(pack(body_of(JOB) | {"deadline_ts": 5}))
    assert decoded.deadline_ts == 5.0
    assert type(decoded.deadline_ts) is float


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 99, 0, -1, True, 1.0, "1", None])
def test_an_unsupported_schema_version_is_rejected(version: Any) -> None:
    """Versions newer than ours, below 1, or not an int are rejected as bad_version."""
    assert reason_of(Job, pack(body_of(JOB) | {"v": version})) == "bad_version"


def test_a_missing_schema_version_is_rejected() -> None:
    """A map without "v" is rejected as bad_version."""
    body = body_of(JOB)
    del body["v"]
    assert reason_of(Job, pack(body)) == "bad_version"


@pytest.mark.parametrize(
    ("cls", "message"),
    [(Job, RESULT), (Result, JOB), (Registration, JOB), (Job, REGISTRATION)],
    ids=lambda v: v.kind if isinstance(v, Message) else v.__name__,
)
def test_a_message_of_another_kind_is_rejected(cls: type[Message], message: Message) -> None:
    """A result read where a job is expected (and so on) is rejected, not half-parsed."""
    assert reason_of(cls, message.to_bytes()) == "malformed"


def test_a_map_without_kind_is_read_as_the_expected_kind() -> None:
    """"k" is optional on the wire: its absence means the kind the reader expects."""
    body = body_of(JOB)
    del body["k"]
    assert Job.from_bytes(pack(body)) == JOB


@pytest.mark.parametrize(
    "raw", [b"", b"\xc1", b"\x92\x01\x02", b"\x81\x01\x02", pack("job"), pack(None), b"\x80\x80"],
    ids=["empty", "reserved", "array", "int-key", "string", "nil", "extra-data"],
)
def test_bytes_that_are_not_a_msgpack_map_are_rejected(raw: bytes) -> None:
    """Anything but exactly one msgpack map with string keys is malformed."""
    assert reason_of(Job, raw) == "malformed"


def test_an_oversized_message_is_rejected_before_parsing() -> None:
    """Messages over MAX_MESSAGE_BYTES are rejected as too_large without unpacking."""
    raw = pack(body_of(JOB) | {"pad": "x" * MAX_MESSAGE_BYTES})
    assert reason_of(Job, raw) == "too_large"


@settings(max_examples=100, deadline=None)
@given(
    jobs,
    st.sampled_from(required_fields(Job)),
    st.integers(-(2**63), 2**64 - 1) | st.none() | st.booleans() | st.binary(max_size=4),
)
def test_any_job_with_a_bad_required_field_is_rejected_cleanly(
    job: Job, name: str, value: Any
) -> None:
    """Whatever required field is replaced by a mistyped value, the error is PayloadError."""
    if type(value) is int and name in {"slot_id", "round", "model_nbytes", "deadline_ts"}:
        return  # an int is a valid value there
    with pytest.raises(PayloadError):
        Job.from_bytes(pack(body_of(job) | {name: value}))


GRADIENT_JOB = GradientJob(
    job_id="j2", run_id="r1", slot_id=0, round=3, client_id="c3", session="s0-r3-abc",
    steps=50, step_deadline_s=120.0, deadline_ts=1_700_000_000.5, task="synthetic",
    config={"batch_size": 32, "seed": 7},
)


@pytest.mark.parametrize("job", [JOB, GRADIENT_JOB], ids=["weights", "gradient"])
def test_a_job_stream_entry_decodes_by_its_kind(job: Job | GradientJob) -> None:
    """job_from_bytes gives a weight job or a gradient session, whichever was sent."""
    decoded = job_from_bytes(job.to_bytes())
    assert type(decoded) is type(job)
    assert decoded == job


def test_a_job_of_no_known_kind_is_rejected() -> None:
    """A map of another kind on a job stream is malformed, whatever its fields."""
    with pytest.raises(PayloadError) as info:
        job_from_bytes(REGISTRATION.to_bytes())
    assert info.value.reason == "malformed"
    with pytest.raises(PayloadError):
        job_from_bytes(pack(body_of(GRADIENT_JOB) | {"k": ["gradient_job"]}))


def test_the_two_kinds_of_job_do_not_pass_for_each_other() -> None:
    """A gradient session read as a weight job (or back) is rejected, not half-read."""
    assert reason_of(Job, GRADIENT_JOB.to_bytes()) == "malformed"
    assert reason_of(GradientJob, JOB.to_bytes()) == "malformed"


@pytest.mark.parametrize(("name", "value"), [
    ("steps", 0), ("step_deadline_s", 0.0), ("step_deadline_s", float("inf")),
    ("step_deadline_s", float("nan")), ("session", ""),
])
def test_a_gradient_session_that_cannot_run_is_rejected(name: str, value: Any) -> None:
    """No steps, no usable step deadline or no session name: bad_field."""
    assert reason_of(GradientJob, pack(body_of(GRADIENT_JOB) | {name: value})) == "bad_field"
