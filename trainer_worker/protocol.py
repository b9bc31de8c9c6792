"""Messages between an agent and its trainer processes: dataclasses both sides import.

Each is a `serialization.messages.Message` (a versioned msgpack map with its kind
under ``"k"``, fields type-checked on decode), sent with `send_bytes` over the
agent's Pipe, never pickled. Agent -> trainer:

    TrainJob     train a client on the model in shared memory   -> TrainDone
    GradOpen     open a gradient session (batch-gradient mode)  -> GradOpened
    GradStep     one session step: the next batch's gradient    -> GradDone
    GradClose    close a session                                -> GradClosed
    Describe     each client's partition size (the agent's        -> Described
                 declaration when it registers its clients)
    Stop         leave

Trainer -> agent: `Ready` once at start, then one reply per request. A task
failure is a reply with ``status="failed"`` and an ``error``; bytes that are no
message, or a message of a kind this side does not take, raise `PayloadError`
(reason ``malformed`` or ``unknown_message``) from `unpack`.

The model segment belongs to the agent (one per model digest, shared by all
its trainers); the update segment is created by the trainer and handed over:
the agent unlinks it after uploading. A gradient session's segment is named
after its trainer; the agent unlinks it at close.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from serialization.errors import PayloadError
from serialization.messages import Message, unpack_map


@dataclass(frozen=True)
class TrainJob(Message):
    """Train `client_id` with `task` from the model in segment `model_shm`."""

    kind: ClassVar[str] = "train"
    job_id: str
    client_id: str
    task: str
    model_shm: str
    model_nbytes: int
    model_digest: str = ""
    task_options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainDone(Message):
    """A "train"'s answer: the update in segment `update_shm`, or why it failed."""

    kind: ClassVar[str] = "done"
    job_id: str
    status: str  # "ok" or "failed"
    update_shm: str = ""
    update_nbytes: int = 0
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class GradOpen(Message):
    """Open `job_id`'s gradient session on the weights in `weights_shm`; `skip_batches`:
    batches the session took already on a trainer that was replaced (they are skipped)."""

    kind: ClassVar[str] = "grad_open"
    job_id: str
    client_id: str
    task: str
    weights_shm: str
    weights_nbytes: int = 0
    task_options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    skip_batches: int = 0


@dataclass(frozen=True)
class GradOpened(Message):
    """A session open: its gradient segment, size and parameter layout, or why not.
    `metrics`: with ``validate`` in the session's config, the weights it opened on scored
    on the client's validation split (``val_accuracy``, ``val_loss``, ``val_examples``;
    empty without a split, or on a reopen); `timings` then has ``validate_s``."""

    kind: ClassVar[str] = "grad_opened"
    job_id: str
    status: str
    grad_shm: str = ""
    grad_nbytes: int = 0
    layout: int = 0
    error: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GradStep(Message):
    """Take step `step`'s gradient for session `job_id` (weights already in the segment)."""

    kind: ClassVar[str] = "grad_step"
    job_id: str
    step: int


@dataclass(frozen=True)
class GradDone(Message):
    """A step's answer: examples and loss of the batch (its gradient is in the segment)."""

    kind: ClassVar[str] = "grad_done"
    job_id: str
    status: str
    step: int = 0
    num_examples: int = 0
    loss: float = 0.0
    timings: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class GradClose(Message):
    """Close session `job_id` (unknown ones are closed already)."""

    kind: ClassVar[str] = "grad_close"
    job_id: str


@dataclass(frozen=True)
class GradClosed(Message):
    """A close's answer."""

    kind: ClassVar[str] = "grad_closed"
    job_id: str
    status: str = "ok"
    error: str = ""


@dataclass(frozen=True)
class Describe(Message):
    """Load `task` (kept for the jobs to come) and report each client's partition size.
    `job_id` names the request where a timeout reports it."""

    kind: ClassVar[str] = "describe"
    task: str
    client_ids: list[str]
    task_options: dict[str, Any] = field(default_factory=dict)
    job_id: str = "describe"


@dataclass(frozen=True)
class Described(Message):
    """A describe's answer: the sizes the task reports (clients it says nothing of are left
    out), or why it failed."""

    kind: ClassVar[str] = "described"
    status: str
    num_examples: dict[str, int] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Ready(Message):
    """A trainer has started on `device` and takes requests."""

    kind: ClassVar[str] = "ready"
    device: str
    pid: int


@dataclass(frozen=True)
class Stop(Message):
    """Leave once the current request is answered."""

    kind: ClassVar[str] = "stop"


GradRequest = GradOpen | GradStep | GradClose
GradReply = GradOpened | GradDone | GradClosed
KINDS: dict[str, type[Message]] = {cls.kind: cls for cls in (
    TrainJob, TrainDone, GradOpen, GradOpened, GradStep, GradDone, GradClose, GradClosed,
    Describe, Described, Ready, Stop)}
M = TypeVar("M", bound=Message)


def pack(message: Message) -> bytes:
    """The bytes to send over the pipe."""
    return message.to_bytes()


def unpack(raw: bytes) -> Message:
    """The message in `raw`, of whichever kind it says; PayloadError if it is none."""
    body = unpack_map(raw, "trainer")
    kind = body.get("k")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise PayloadError("unknown_message", f"no trainer message of kind {body.get('k')!r}")
    return cls.from_dict(body)


def expect(message: Message, kind: type[M]) -> M:
    """`message` as a `kind`; PayloadError (unexpected_message) if it is another kind."""
    if not isinstance(message, kind):
        raise PayloadError("unexpected_message",
                           f"expected a {kind.kind} message, got {message.kind}")
    return message
