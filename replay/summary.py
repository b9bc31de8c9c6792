"""From a rebuilt `Run` to the numbers a researcher asks for (docs/replay.md lists them).

Times in a summary are seconds since the run's first `run_started`. Fractions
are of the time the coordinator was up (its restarts' gaps left out), and a
second set of them starts at the first `round_started`, so that start-up
(registration, loading data) does not count as idle.

Accuracy comes in two kinds, kept apart: `accuracy` (final, best, time to target, the
curve) is the test set's, from the coordinator's central evaluation; `validation_*` is the
clients' held-out validation splits', from federated evaluation (`validation_finished`;
absent, None or empty, in logs from before it). A round counts once aggregated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import fmean
from typing import Any

from replay import intervals, population
from replay.events import SlotId, as_float, as_slot_id
from replay.intervals import Span
from replay.model import CATEGORIES, ClientRecord, RoundRecord, Run
from replay.population import LineageStep


@dataclass(frozen=True)
class RoundSummary:
    round: int
    status: str
    start_s: float | None
    lease_wait_s: float | None
    quorum_wait_s: float | None
    quorum_reason: str
    publish_s: float
    fold_s: float
    aggregation_s: float
    evaluation_s: float
    checkpoint_s: float
    duration_s: float | None
    closed_s: float | None
    accuracy: float | None
    loss: float | None
    clients: int
    num_updates: int
    bytes_down: int
    bytes_up: int
    aggregated_s: float | None = None  # round start to aggregation_finished
    validation_accuracy: float | None = None  # this round's model on the validation splits
    validation_loss: float | None = None


@dataclass(frozen=True)
class SlotSummary:
    slot_id: SlotId
    rounds: int
    rounds_failed: int
    rounds_interrupted: int
    final_accuracy: float | None
    best_accuracy: float | None
    time_to_target_s: float | None
    rounds_to_target: int | None
    mean_round_s: float | None
    mean_lease_wait_s: float | None
    mean_quorum_wait_s: float | None
    mean_aggregation_s: float | None
    mean_evaluation_s: float | None
    mean_checkpoint_s: float | None
    accuracy_over_time: list[tuple[float, float]]
    round_details: list[RoundSummary]
    mean_aggregated_s: float | None = None  # round start to aggregated, closed rounds
    final_validation_accuracy: float | None = None
    best_validation_accuracy: float | None = None
    validation_time_to_target_s: float | None = None
    validation_over_time: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class ClientSummary:
    client_id: str
    agent_id: str
    jobs_done: int
    failures: int
    lost: int
    rejected: int
    late: int
    available_s: float
    busy_s: float
    idle_s: float
    idle_fraction: float
    idle_fraction_after_first_round: float
    train_s: float
    mean_train_s: float | None
    transfer_s: float
    queue_s: float


@dataclass(frozen=True)
class CategoryBusy:
    busy_s: float
    fraction: float


@dataclass(frozen=True)
class CoordinatorSummary:
    busy_s: float
    busy_fraction: float
    idle_s: float
    busy_fraction_after_first_round: float
    idle_s_after_first_round: float
    categories: dict[str, CategoryBusy]


@dataclass(frozen=True)
class TrafficSummary:
    bytes_down: int
    bytes_up: int
    bytes_total: int
    rounds: int
    mean_bytes_per_round: float


@dataclass(frozen=True)
class ViolationDetail:
    client_id: str
    at_s: float
    held_slot: SlotId
    held_round: int
    new_slot: SlotId
    new_round: int


@dataclass(frozen=True)
class RunSummary:
    file: str
    label: str
    run_id: str
    status: str
    restarts: int
    config: dict[str, Any]
    wall_s: float
    up_s: float
    downtime_s: float
    first_round_s: float | None
    target_accuracy: float
    time_to_target_s: float | None
    final_accuracy: float | None
    slot_rounds: int
    slot_rounds_per_hour: float
    coordinator_busy_fraction: float
    coordinator_busy_fraction_after_first_round: float
    client_busy_fraction: float
    client_idle_fraction: float
    client_idle_fraction_after_first_round: float
    coordinator: CoordinatorSummary
    slots: list[SlotSummary]
    clients: list[ClientSummary]
    traffic: TrafficSummary
    rejected_updates: dict[str, int]
    late_updates: dict[str, int]
    lease_violations: int
    lease_violation_details: list[ViolationDetail]
    warnings: list[str] = field(default_factory=list)
    # Slots that differ and cooperate (replay.population): each slot's label (what differs
    # between the configurations), slots ranked by time to target then final accuracy,
    # PBT and merge events in time order, and each slot's hyperparameter trajectory.
    slot_labels: dict[str, str] = field(default_factory=dict)
    ranking: list[RankedSlot] = field(default_factory=list)
    lineage: list[LineageStep] = field(default_factory=list)
    hyperparameters: dict[str, list[tuple[float, int, dict[str, Any]]]] = field(
        default_factory=dict)
    # The same on the clients' validation splits (None without validation_finished events).
    final_validation_accuracy: float | None = None
    validation_time_to_target_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarise(run: Run, target: float) -> RunSummary:
    """All the numbers of one run; `target` is the accuracy whose arrival time is wanted."""
    window = _after_first_round(run)
    slots = [_slot_summary(run, slot_id, target) for slot_id in run.slot_ids()]
    clients = [_client_summary(c, run.up_spans, window) for c in _sorted_clients(run)]
    coordinator = _coordinator_summary(run, window)
    closed = sum(s.rounds for s in slots)
    return RunSummary(
        file=str(run.path),
        label=run.label,
        run_id=run.run_id,
        status=run.status,
        restarts=len(run.segments) - 1,
        config=run.config,
        wall_s=run.wall_s,
        up_s=intervals.length(run.up_spans),
        downtime_s=run.wall_s - intervals.length(run.up_spans),
        first_round_s=_rel(run, run.first_round_at()),
        target_accuracy=target,
        time_to_target_s=min((s.time_to_target_s for s in slots if s.time_to_target_s is not None),
                             default=None),
        final_accuracy=max((s.final_accuracy for s in slots if s.final_accuracy is not None),
                           default=None),
        slot_rounds=closed,
        slot_rounds_per_hour=intervals.fraction(closed, run.wall_s / 3600.0),
        coordinator_busy_fraction=coordinator.busy_fraction,
        coordinator_busy_fraction_after_first_round=coordinator.busy_fraction_after_first_round,
        client_busy_fraction=1.0 - _pooled_idle(clients, after_first_round=False),
        client_idle_fraction=_pooled_idle(clients, after_first_round=False),
        client_idle_fraction_after_first_round=_pooled_idle(clients, after_first_round=True),
        coordinator=coordinator,
        slots=slots,
        clients=clients,
        traffic=_traffic(run),
        rejected_updates=dict(run.rejected.most_common()),
        late_updates=dict(run.late.most_common()),
        lease_violations=len(run.violations),
        lease_violation_details=[
            ViolationDetail(v.client_id, v.at - run.start, v.held_slot, v.held_round,
                            v.new_slot, v.new_round)
            for v in run.violations
        ],
        warnings=list(run.warnings),
        **_population(run, slots),
        final_validation_accuracy=max((s.final_validation_accuracy for s in slots
                                       if s.final_validation_accuracy is not None),
                                      default=None),
        validation_time_to_target_s=min((s.validation_time_to_target_s for s in slots
                                          if s.validation_time_to_target_s is not None),
                                         default=None),
    )


@dataclass(frozen=True)
class RankedSlot:
    rank: int
    slot_id: SlotId
    label: str
    time_to_target_s: float | None
    final_accuracy: float | None
    best_accuracy: float | None
    final_validation_accuracy: float | None = None


def _population(run: Run, slots: list[SlotSummary]) -> dict[str, Any]:
    configs = run.config.get("slot_configs")
    configs = configs if isinstance(configs, list) else []
    labels = population.slot_labels(configs)
    ordered = sorted(slots, key=lambda s: (s.time_to_target_s is None, s.time_to_target_s or 0.0,
                                           -(s.final_accuracy or 0.0)))
    ranking = [RankedSlot(i + 1, s.slot_id, labels.get(str(s.slot_id), f"slot {s.slot_id}"),
                          s.time_to_target_s, s.final_accuracy, s.best_accuracy,
                          s.final_validation_accuracy)
               for i, s in enumerate(ordered) if s.accuracy_over_time]
    steps = [population.LineageStep(ts - run.start, name, as_slot_id(f.get("slot_id", "?")),
                                    int(as_float(f.get("round")) or 0),
                                    population.describe(name, f), f)
             for ts, name, f in run.population_events]
    return {"slot_labels": labels, "ranking": ranking, "lineage": steps,
            "hyperparameters": population.trajectories(configs, steps) if steps else {}}


def _rel(run: Run, ts: float | None) -> float | None:
    return None if ts is None else ts - run.start


def _after_first_round(run: Run) -> list[Span]:
    first = run.first_round_at()
    if first is None:
        return []
    return intervals.clip(run.up_spans, first, run.end)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


# -- slots ---------------------------------------------------------------------------------


def _slot_summary(run: Run, slot_id: SlotId, target: float) -> SlotSummary:
    records = run.rounds.get(slot_id, [])
    closed = [r for r in records if r.status == "closed"]
    curve = [(ts - run.start, acc) for ts, _round, acc in run.evaluations.get(slot_id, [])]
    hit = next(((t, rnd, acc) for t, rnd, acc in _curve_rounds(run, slot_id) if acc >= target),
               None)
    validation = [(ts - run.start, acc) for ts, _round, acc in run.validations.get(slot_id, [])]
    return SlotSummary(
        slot_id=slot_id,
        rounds=len(closed),
        rounds_failed=sum(1 for r in records if r.status == "failed"),
        rounds_interrupted=sum(1 for r in records if r.status in ("interrupted", "open")),
        final_accuracy=curve[-1][1] if curve else None,
        best_accuracy=max((acc for _t, acc in curve), default=None),
        time_to_target_s=None if hit is None else hit[0],
        rounds_to_target=None if hit is None else _rounds_up_to(closed, hit[1]),
        mean_round_s=_mean([r.duration_s for r in closed]),
        mean_lease_wait_s=_mean([r.lease_wait_s for r in closed]),
        mean_quorum_wait_s=_mean([r.quorum_wait_s for r in closed]),
        mean_aggregation_s=_mean([r.aggregation_s for r in closed]),
        mean_evaluation_s=_mean([r.evaluation_s for r in closed]),
        mean_checkpoint_s=_mean([r.checkpoint_s for r in closed]),
        accuracy_over_time=curve,
        round_details=[_round_summary(run, r) for r in records],
        mean_aggregated_s=_mean([r.aggregated_s for r in closed]),
        final_validation_accuracy=validation[-1][1] if validation else None,
        best_validation_accuracy=max((acc for _t, acc in validation), default=None),
        validation_time_to_target_s=next((t for t, acc in validation if acc >= target), None),
        validation_over_time=validation,
    )


def _curve_rounds(run: Run, slot_id: SlotId) -> list[tuple[float, int, float]]:
    return [(ts - run.start, rnd, acc) for ts, rnd, acc in run.evaluations.get(slot_id, [])]


def _rounds_up_to(closed: list[RoundRecord], round_no: int) -> int:
    return sum(1 for r in closed if r.round <= round_no)


def _round_summary(run: Run, record: RoundRecord) -> RoundSummary:
    return RoundSummary(
        round=record.round,
        status=record.status,
        start_s=_rel(run, record.started_at),
        lease_wait_s=record.lease_wait_s,
        quorum_wait_s=record.quorum_wait_s,
        quorum_reason=record.quorum_reason,
        publish_s=record.publish_s,
        fold_s=record.fold_s,
        aggregation_s=record.aggregation_s,
        evaluation_s=record.evaluation_s,
        checkpoint_s=record.checkpoint_s,
        duration_s=record.duration_s,
        closed_s=_rel(run, record.closed_at),
        accuracy=record.accuracy,
        loss=record.loss,
        clients=max(len(record.clients), record.jobs_published),
        num_updates=record.num_updates,
        bytes_down=record.bytes_down,
        bytes_up=record.bytes_up,
        aggregated_s=record.aggregated_s,
        validation_accuracy=record.validation_accuracy,
        validation_loss=record.validation_loss,
    )


# -- clients -------------------------------------------------------------------------------


def _sorted_clients(run: Run) -> list[ClientRecord]:
    return sorted(run.clients.values(), key=lambda c: (len(c.client_id), c.client_id))


def _available(client: ClientRecord, up_spans: list[Span]) -> list[Span]:
    presence = client.presence or up_spans
    return intervals.intersect(presence, up_spans)


def _client_summary(client: ClientRecord, up_spans: list[Span], window: list[Span]
                    ) -> ClientSummary:
    available = _available(client, up_spans)
    leased = [(lease.start, lease.end) for lease in client.leases if lease.end is not None]
    busy = intervals.intersect(leased, available)
    available_s, busy_s = intervals.length(available), intervals.length(busy)
    late_available = intervals.length(intervals.intersect(available, window))
    late_busy = intervals.length(intervals.intersect(busy, window))
    train = [job.train_s for job in client.jobs]
    return ClientSummary(
        client_id=client.client_id,
        agent_id=client.agent_id,
        jobs_done=client.jobs_done,
        failures=client.failures,
        lost=client.lost,
        rejected=client.rejected,
        late=client.late,
        available_s=available_s,
        busy_s=busy_s,
        idle_s=available_s - busy_s,
        idle_fraction=1.0 - intervals.fraction(busy_s, available_s),
        idle_fraction_after_first_round=1.0 - intervals.fraction(late_busy, late_available),
        train_s=sum(train),
        mean_train_s=fmean(train) if train else None,
        transfer_s=sum(job.transfer_s for job in client.jobs),
        queue_s=sum(job.queue_s for job in client.jobs),
    )


def _pooled_idle(clients: list[ClientSummary], *, after_first_round: bool) -> float:
    """Idle time of all clients over their available time, pooled (not a mean of means)."""
    if after_first_round:
        idle = sum(c.idle_fraction_after_first_round * c.available_s for c in clients)
    else:
        idle = sum(c.idle_s for c in clients)
    total = sum(c.available_s for c in clients)
    return intervals.fraction(idle, total) if total > 0 else 1.0


# -- coordinator and traffic ---------------------------------------------------------------


def _coordinator_summary(run: Run, window: list[Span]) -> CoordinatorSummary:
    up_s = intervals.length(run.up_spans)
    all_spans = [(s.start, s.end) for s in run.coordinator_spans]
    busy = intervals.intersect(all_spans, run.up_spans)
    busy_s = intervals.length(busy)
    window_s = intervals.length(window)
    busy_window_s = intervals.length(intervals.intersect(busy, window))
    categories = {}
    for category in CATEGORIES:
        spans = [(s.start, s.end) for s in run.coordinator_spans if s.category == category]
        cat_s = intervals.length(intervals.intersect(spans, run.up_spans))
        categories[category] = CategoryBusy(cat_s, intervals.fraction(cat_s, up_s))
    return CoordinatorSummary(
        busy_s=busy_s,
        busy_fraction=intervals.fraction(busy_s, up_s),
        idle_s=up_s - busy_s,
        busy_fraction_after_first_round=intervals.fraction(busy_window_s, window_s),
        idle_s_after_first_round=window_s - busy_window_s,
        categories=categories,
    )


def _traffic(run: Run) -> TrafficSummary:
    records = [r for rs in run.rounds.values() for r in rs]
    down = sum(r.bytes_down for r in records)
    up = sum(r.bytes_up for r in records)
    started = sum(1 for r in records if r.started_at is not None) or len(records)
    return TrafficSummary(
        bytes_down=down,
        bytes_up=up,
        bytes_total=down + up,
        rounds=started,
        mean_bytes_per_round=intervals.fraction(down + up, started),
    )
