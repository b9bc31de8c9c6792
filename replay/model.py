"""The rebuilt run: slots and their rounds, clients and their leases, coordinator work.

Plain records filled by `replay.timeline` from the events alone; every time is
the coordinator's clock in unix seconds (durations measured on agents arrive as
numbers, so clock skew between hosts does not matter).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replay.events import SlotId, slot_sort_key
from replay.intervals import Span
from serialization import slot_events as se

# Coordinator work categories, and the events whose intervals make them up.
CATEGORY_OF_EVENT = {
    se.UpdateFolded.name: "aggregation",
    se.AggregationFinished.name: "aggregation",
    se.EvaluationFinished.name: "evaluation",
    "checkpoint_written": "checkpoint",
    se.ModelPublished.name: "io",
}
CATEGORIES = ("aggregation", "evaluation", "checkpoint", "io")


@dataclass
class RoundRecord:
    """One attempt at one round of one slot."""

    slot_id: SlotId
    round: int
    started_at: float | None = None
    lease_wait_s: float | None = None
    clients: list[str] = field(default_factory=list)
    quorum_count: int | None = None
    quorum_at: float | None = None
    quorum_wait_s: float | None = None
    quorum_reason: str = ""
    received: int = 0
    failed: int = 0
    publish_s: float = 0.0
    fold_s: float = 0.0
    aggregation_s: float = 0.0
    evaluation_s: float = 0.0
    checkpoint_s: float = 0.0
    aggregated_at: float | None = None  # aggregation_finished: the round is done
    closed_at: float | None = None  # round_closed: its evaluate-and-checkpoint link finished
    duration_s: float | None = None
    accuracy: float | None = None  # the test set's (central evaluation)
    loss: float | None = None
    # this round's model on the clients' validation splits (`validation_finished`, logged
    # during a later round)
    validation_accuracy: float | None = None
    validation_loss: float | None = None
    num_updates: int = 0
    # closed (aggregated: aggregation_finished, or round_closed in a log without it), failed,
    # interrupted (the coordinator stopped before it closed, or before its checkpoint), open
    status: str = "open"
    cut_at: float | None = None  # when the coordinator stopped, for an interrupted round
    model_nbytes: int = 0
    jobs_published: int = 0
    bytes_up: int = 0

    @property
    def bytes_down(self) -> int:
        """The model went to each leased client once."""
        return self.model_nbytes * max(len(self.clients), self.jobs_published)

    @property
    def aggregated_s(self) -> float | None:
        """From the round's start until its aggregate was ready (`aggregation_finished`)."""
        if self.started_at is None or self.aggregated_at is None:
            return None
        return max(self.aggregated_at - self.started_at, 0.0)

    @property
    def server_s(self) -> float:
        """Coordinator time after the quorum: aggregate, evaluate, checkpoint."""
        return self.aggregation_s + self.evaluation_s + self.checkpoint_s

    def span(self, run_end: float) -> Span | None:
        """The round on the timeline: from its start until its aggregate is ready (evaluation
        and checkpoint overlap the slot's next round); a round cut short ends where it was
        cut. None for a round that never started."""
        if self.started_at is None:
            return None
        if self.quorum_at is not None:
            return (self.started_at, self.quorum_at + self.aggregation_s)
        end = self.closed_at or self.cut_at
        return (self.started_at, end if end is not None else run_end)


@dataclass
class Lease:
    """A client held by one slot for one round, `[start, end]`."""

    client_id: str
    slot_id: SlotId
    round: int
    start: float
    end: float | None = None
    reason: str = ""

    def span(self, run_end: float) -> Span:
        """Leased from `start` until returned, or until the run's end if never returned."""
        return (self.start, self.end if self.end is not None else run_end)


@dataclass
class JobTiming:
    """What an agent measured for one job (`update_received.timings`)."""

    slot_id: SlotId
    round: int
    received_at: float
    published_at: float | None  # the job_published time, when it is in the log
    agent_id: str
    ok: bool
    queue_s: float
    fetch_s: float
    load_s: float
    train_s: float
    encode_s: float
    upload_s: float
    total_s: float  # as the agent reported it; 0 when it did not
    nbytes: int
    job_id: str = ""

    @property
    def transfer_s(self) -> float:
        return self.fetch_s + self.upload_s

    @property
    def trainer_s(self) -> float:
        """Time a trainer process was busy with the job: load, train, encode."""
        return self.load_s + self.train_s + self.encode_s

    @property
    def training_span(self) -> Span:
        """When a trainer held the job, on the coordinator's clock: the agent's trainer time
        (its train time if it reported no other part), ending where its upload began."""
        end = self.received_at - self.upload_s
        return (end - (self.trainer_s or self.train_s), end)

    @property
    def turnaround_s(self) -> float:
        """From job_published to update_received on the coordinator's clock (else the
        agent's total, else the sum of its parts)."""
        if self.published_at is not None:
            return max(self.received_at - self.published_at, 0.0)
        return self.total_s or (self.fetch_s + self.trainer_s + self.upload_s)


@dataclass
class ClientRecord:
    """Everything the coordinator saw of one client."""

    client_id: str
    agent_id: str = ""
    presence: list[Span] = field(default_factory=list)
    present_since: float | None = None
    leases: list[Lease] = field(default_factory=list)
    jobs: list[JobTiming] = field(default_factory=list)
    failures: int = 0
    lost: int = 0
    rejected: int = 0
    late: int = 0

    @property
    def jobs_done(self) -> int:
        return sum(1 for job in self.jobs if job.ok)


@dataclass
class CoordinatorSpan:
    """An interval of coordinator work, from a `*_finished`-style event."""

    start: float
    end: float
    category: str
    slot_id: SlotId
    round: int = -1
    event: str = ""  # the event that reported it, e.g. update_folded
    job_id: str = ""  # the folded update's job, for update_folded


@dataclass
class Incident:
    """A moment worth marking: an update rejected or late, a job failed, a client lost."""

    at: float
    event: str
    client_id: str
    slot_id: SlotId
    round: int
    detail: str  # the reason, action or error the event gave
    job_id: str = ""


@dataclass
class LeaseViolation:
    """A client leased while it already held a lease: the pool's invariant broke."""

    client_id: str
    at: float
    held_slot: SlotId
    held_round: int
    new_slot: SlotId
    new_round: int


@dataclass
class Segment:
    """One life of the coordinator process: from its start to its last event."""

    start: float
    end: float
    resumed: bool = False
    status: str = "crashed"  # the run_finished status, or crashed when there is none
    active: bool = False


@dataclass
class AgentInfo:
    """An agent as it announced itself (only present when agents log to this file)."""

    agent_id: str
    client_ids: list[str]
    devices: list[str]


@dataclass
class Run:
    """A run rebuilt from its event log."""

    path: Path
    run_id: str
    config: dict[str, Any] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)
    rounds: dict[SlotId, list[RoundRecord]] = field(default_factory=dict)
    # (ts, round of the model, accuracy): the test set's (central evaluations) ...
    evaluations: dict[SlotId, list[tuple[float, int, float]]] = field(default_factory=dict)
    # ... and the clients' validation splits' (`validation_finished`: federated evaluation;
    # a merged model's candidates under the "merged" pseudo-slot)
    validations: dict[SlotId, list[tuple[float, int, float]]] = field(default_factory=dict)
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    agents: dict[str, AgentInfo] = field(default_factory=dict)
    coordinator_spans: list[CoordinatorSpan] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    late: Counter[str] = field(default_factory=Counter)
    incidents: list[Incident] = field(default_factory=list)
    violations: list[LeaseViolation] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # PBT and merge events (replay.population.POPULATION_EVENTS): (ts, name, fields)
    population_events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.segments[0].start

    @property
    def end(self) -> float:
        return self.segments[-1].end

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def status(self) -> str:
        return self.segments[-1].status

    @property
    def up_spans(self) -> list[Span]:
        return [(seg.start, seg.end) for seg in self.segments]

    @property
    def label(self) -> str:
        """A short name: the run directory for runs/RUN_ID/events.jsonl, else the file stem."""
        if self.path.name == "events.jsonl" and self.path.parent.name:
            return self.path.parent.name
        return self.path.stem

    def slot_ids(self) -> list[SlotId]:
        return sorted(set(self.rounds) | set(self.evaluations) | set(self.validations),
                      key=slot_sort_key)

    def first_round_at(self) -> float | None:
        starts = [r.started_at for rs in self.rounds.values() for r in rs if r.started_at]
        return min(starts, default=None)
