"""Versioned msgpack schemas for the small messages on the streams.

Each message is a frozen dataclass. On the wire it is a msgpack map with the
schema version under ``"v"`` and the message kind under ``"k"``; decoding
ignores unknown fields (newer senders may add some) and rejects missing or
mistyped required ones, and values a message's own `problem` check refuses, with
`PayloadError`.

A client's job stream carries two kinds of job: `Job` (train from a model blob,
send the update) and `GradientJob` (serve a batch-gradient session);
`job_from_bytes` decodes either by its kind.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar

import msgpack

from serialization.errors import PayloadError

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024

_SCALARS: dict[type, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (float, int),
    bool: (bool,),
    bytes: (bytes,),
    dict: (dict,),
    list: (list, tuple),
}


class Message:
    """Base of the stream messages: `to_bytes` / `from_bytes` with validation."""

    kind: ClassVar[str]

    def to_bytes(self) -> bytes:
        body = dataclasses.asdict(self)  # type: ignore[call-overload]
        body["v"], body["k"] = SCHEMA_VERSION, self.kind
        packed: bytes = msgpack.packb(body, use_bin_type=True)
        return packed

    @classmethod
    def from_bytes(cls, raw: bytes | memoryview) -> Self:
        return cls.from_dict(unpack_map(raw, cls.kind))

    @classmethod
    def from_dict(cls, body: Any) -> Self:
        if not isinstance(body, dict):
            raise PayloadError("malformed", f"{cls.kind} message is not a map")
        if body.get("k", cls.kind) != cls.kind:
            raise PayloadError("malformed", f"expected a {cls.kind} message, got {body.get('k')!r}")
        version = body.get("v")
        if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
            raise PayloadError(
                "bad_version", f"{cls.kind} schema version {version!r} is unsupported"
            )
        message = cls(**_fields(cls, body))
        problem = message.problem()
        if problem is not None:
            raise PayloadError("bad_field", f"{cls.kind} message: {problem}")
        return message

    def problem(self) -> str | None:
        """What makes this message unusable beyond its fields' types (None: nothing)."""
        return None


def unpack_map(raw: bytes | memoryview, what: str) -> dict[Any, Any]:
    """The msgpack map in `raw` (at most MAX_MESSAGE_BYTES); PayloadError otherwise."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise PayloadError("too_large", f"{what} message of {len(raw)} bytes")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types on bad input
        raise PayloadError("malformed", f"{what} message is not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise PayloadError("malformed", f"{what} message is not a map")
    return body


def _fields(cls: type, body: dict[str, Any]) -> dict[str, Any]:
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PayloadError("missing_field", f"{cls.kind} message lacks {f.name!r}")  # type: ignore[attr-defined]
            continue
        values[f.name] = _checked(cls, f.name, hints[f.name], body[f.name])
    return values


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints evaluates the string annotations: tens of microseconds a call.
    return typing.get_type_hints(cls)


def _checked(cls: type, name: str, hint: Any, value: Any) -> Any:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if _matches(option, value):
            return float(value) if option is float else value
    kind = cls.kind  # type: ignore[attr-defined]
    raise PayloadError("bad_field", f"{kind} field {name!r} has type {type(value).__name__}")


def _matches(option: Any, value: Any) -> bool:
    """Whether `value` (as msgpack decoded it) is acceptable for the type `option`."""
    if option is type(None):
        return value is None
    base = typing.get_origin(option) or option
    accepted = _SCALARS.get(base)
    if accepted is None or not isinstance(value, accepted):
        return False
    if isinstance(value, bool) and base is not bool:
        return False  # bool subclasses int, but True is no count, id or timestamp
    args = typing.get_args(option)
    if args and args[0] in _SCALARS and isinstance(value, list | tuple | dict):
        # list[str]: every item; dict[str, Any]: every key.
        return all(_matches(args[0], item) for item in value)
    return True


M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Job(Message):
    """Train client `client_id` for slot `slot_id`, round `round`, from the model blob."""

    kind: ClassVar[str] = "job"
    job_id: str
    run_id: str
    slot_id: int
    round: int
    client_id: str
    model_digest: str
    model_nbytes: int
    deadline_ts: float
    task: str
    task_options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    published_ts: float = 0.0
    signature: bytes = b""  # the coordinator's HMAC with the client's key (signing on)
    # Local handoff (`bus.handoff`): the coordinator's token segment and its sha256, and
    # the segment holding this model; empty when the coordinator does not offer it.
    handoff: str = ""
    handoff_digest: str = ""
    model_shm: str = ""


@dataclass(frozen=True)
class GradientJob(Message):
    """Serve client `client_id` in gradient session `session` of slot `slot_id`, round
    `round`: `steps` steps, each answered within `step_deadline_s` (bus.gradient streams
    carry the weights and gradients; `config` is the training config, batch size and seed)."""

    kind: ClassVar[str] = "gradient_job"
    job_id: str
    run_id: str
    slot_id: int
    round: int
    client_id: str
    session: str
    steps: int
    step_deadline_s: float
    deadline_ts: float
    task: str
    task_options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    published_ts: float = 0.0
    signature: bytes = b""  # the coordinator's HMAC with the client's key (signing on)

    def problem(self) -> str | None:
        if not self.session:
            return "no session name"
        if self.steps < 1:
            return f"{self.steps} steps"
        if not 0 < self.step_deadline_s < float("inf"):
            return f"step deadline of {self.step_deadline_s} s"
        return None


AnyJob = Job | GradientJob
JOB_KINDS: dict[str, type[Job] | type[GradientJob]] = {Job.kind: Job,
                                                        GradientJob.kind: GradientJob}


def job_from_bytes(raw: bytes | memoryview) -> AnyJob:
    """The job in a job stream entry, of either kind (no kind: a weight job);
    PayloadError when it is neither or does not validate."""
    body = unpack_map(raw, "job")
    kind = body.get("k", Job.kind)
    cls = JOB_KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise PayloadError("malformed", f"no job of kind {body.get('k')!r}")
    return cls.from_dict(body)


@dataclass(frozen=True)
class Result(Message):
    """What a client sends back: an update blob reference or a failure reason."""

    kind: ClassVar[str] = "result"
    job_id: str
    run_id: str
    slot_id: int
    round: int
    client_id: str
    status: str  # "ok" or "failed"
    agent_id: str = ""
    update_digest: str = ""
    update_nbytes: int = 0
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    signature: bytes = b""
    # Local handoff: the update lies in this shared-memory segment, not in a blob.
    update_shm: str = ""


@dataclass(frozen=True)
class Registration(Message):
    """An agent announces the clients it hosts."""

    kind: ClassVar[str] = "registration"
    agent_id: str
    client_ids: list[str]
    devices: list[str] = field(default_factory=list)
    hostname: str = ""
    pid: int = 0
    event: str = "register"  # or "unregister" on a clean shutdown
    # The coordinator's handoff token (`bus.handoff`) this agent found on its host: it
    # takes models from shared memory, so a round of such clients only needs no blob.
    handoff: str = ""
    # Each client's partition size (examples), declared once per run: the coordinator caps
    # the client's claimed counts at it. With client keys each is signed with its client's
    # key (`serialization.signing.declaration_signature`). Values are checked by the reader.
    num_examples: dict[str, int] = field(default_factory=dict)
    examples_signatures: dict[str, bytes] = field(default_factory=dict)
