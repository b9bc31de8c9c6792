"""The events of a slot's rounds, as typed constructors.

The coordinator's slots log these (`emit`), and the replay (`replay.timeline`), the
metrics and the live dashboard (`coordinator.observability`) read them by the same
names (`RoundClosed.name`, ...): a field renamed here is renamed for every reader,
and a reader cannot wait for an event name nobody logs. docs/events.md describes
each field. Here in `serialization` because the coordinator and the replay both
import it and neither imports the other's internals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol


class Logger(Protocol):
    def info(self, event: str, **fields: Any) -> Any: ...
    def warning(self, event: str, **fields: Any) -> Any: ...
    def error(self, event: str, **fields: Any) -> Any: ...


@dataclass(frozen=True)
class SlotEvent:
    """One event of a slot: its name, level and fields (`more`: kind-specific extras)."""

    name: ClassVar[str]
    level: ClassVar[str] = "info"
    slot_id: int
    more: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def fields(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, **values.pop("more")}


def emit(logger: Logger, event: SlotEvent) -> None:
    """Log `event` at its level under its name."""
    getattr(logger, event.level)(event.name, **event.fields())


@dataclass(frozen=True)
class RoundStarted(SlotEvent):
    name: ClassVar[str] = "round_started"
    round: int
    clients: list[str]
    quorum_count: int
    deadline_s: float
    wait_s: float


@dataclass(frozen=True)
class JobPublished(SlotEvent):
    name: ClassVar[str] = "job_published"
    round: int
    client_id: str
    job_id: str
    seed: int


@dataclass(frozen=True)
class ModelPublished(SlotEvent):
    name: ClassVar[str] = "model_published"
    round: int
    digest: str
    nbytes: int
    encode_s: float
    put_s: float
    shm_s: float
    blob: bool
    duration_s: float


@dataclass(frozen=True)
class UpdateFolded(SlotEvent):
    """`more`: what the fold measured (nbytes, get_s, decode_s, fold_s, duration_s, weight)."""

    name: ClassVar[str] = "update_folded"
    round: int
    client_id: str
    job_id: str
    via: str  # "shm" or "redis"


@dataclass(frozen=True)
class UpdateLate(SlotEvent):
    name: ClassVar[str] = "update_late"
    round: int  # the update's
    current_round: int | None
    client_id: str
    job_id: str
    action: str  # "folded" or "dropped"
    staleness: int


@dataclass(frozen=True)
class JobFailed(SlotEvent):
    name: ClassVar[str] = "job_failed"
    level: ClassVar[str] = "warning"
    round: int
    client_id: str
    job_id: str
    error: str


@dataclass(frozen=True)
class QuorumReached(SlotEvent):
    name: ClassVar[str] = "quorum_reached"
    round: int
    reason: str
    received: int
    failed: int
    expected: int
    wait_s: float


@dataclass(frozen=True)
class AggregationFinished(SlotEvent):
    name: ClassVar[str] = "aggregation_finished"
    round: int
    num_updates: int
    num_examples: int
    duration_s: float


@dataclass(frozen=True)
class RoundFailed(SlotEvent):
    """`more`: the protocol's account (a weight round's `received` and `failed`)."""

    name: ClassVar[str] = "round_failed"
    level: ClassVar[str] = "warning"
    round: int
    reason: str


@dataclass(frozen=True)
class RoundClosed(SlotEvent):
    """A round's evaluate-and-checkpoint link finished (the round was aggregated earlier:
    `aggregation_finished` counts rounds; this one may lag behind it). `accuracy`: the
    central (test-set) evaluation, None when not due. `more`: a gradient slot's `steps`
    and `num_examples`."""

    name: ClassVar[str] = "round_closed"
    round: int
    duration_s: float
    accuracy: float | None
    num_updates: int


@dataclass(frozen=True)
class EvaluationFinished(SlotEvent):
    name: ClassVar[str] = "evaluation_finished"
    round: int
    accuracy: float | None
    loss: float | None
    num_examples: float | None
    duration_s: float


@dataclass(frozen=True)
class ValidationFinished(SlotEvent):
    """Federated evaluation: the clients of round `during_round` evaluated the model they
    received (the slot's round-`round` model, 0 the initial one) on their held-out
    validation splits before training; `accuracy` and `loss` are the example-weighted means
    over the `clients` that reported, `num_examples` their validation examples. What PBT,
    merges and the final selection decide on; the test set is never read for it."""

    name: ClassVar[str] = "validation_finished"
    round: int
    during_round: int
    accuracy: float
    loss: float | None
    num_examples: int
    clients: int


@dataclass(frozen=True)
class EvaluationSkipped(SlotEvent):
    name: ClassVar[str] = "evaluation_skipped"
    round: int
    newer_round: int


@dataclass(frozen=True)
class SlotFinished(SlotEvent):
    name: ClassVar[str] = "slot_finished"
    rounds: int
    accuracy: float | None


@dataclass(frozen=True)
class SlotFailed(SlotEvent):
    name: ClassVar[str] = "slot_failed"
    level: ClassVar[str] = "error"
    round: int
    reason: str
    rounds: int
    accuracy: float | None
