"""The coordinator's Prometheus metrics, kept up to date from its own events.

Each logged event (docs/events.md) updates counters and histograms as it
happens; what `RunStatus` already holds (rounds, clients alive, accuracy on the test set
and on the clients' validation splits, how far evaluation lags) is read when Prometheus
scrapes. A round counts once it is aggregated (`aggregation_finished`); its
evaluate-and-checkpoint link (`round_closed`) may finish rounds later. Every coordinator
has its own `CollectorRegistry`, so several in one process (tests) never mix. Labels are
bounded: slot ids, client ids, rejection reasons and kinds of work, never job ids.
docs/monitoring.md lists every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.status import RunStatus
from serialization import slot_events as se

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From a fold on a small model (ms) to a slow round on real silos (minutes).
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                      60.0, 120.0, 300.0, 600.0, float("inf"))
# The coordinator's kinds of work, as the replay counts its busy time.
BUSY_KIND_OF_EVENT = {se.ModelPublished.name: "publish", se.UpdateFolded.name: "fold",
                      se.AggregationFinished.name: "aggregate",
                      se.EvaluationFinished.name: "evaluate", "checkpoint_written": "checkpoint"}
JOB_OUTCOME_OF_RETURN = {"result": "done", "failed": "failed", "lost": "lost"}
RUN_INFO_FIELDS = ("strategy", "policy", "task", "late_policy")


def _slot(event: Mapping[str, Any]) -> str:
    return str(event.get("slot_id"))


def event_ts(event: Mapping[str, Any]) -> float:
    """The event's time stamp (now, where the logger adds none)."""
    value = event.get("ts")
    return float(value) if isinstance(value, int | float) else time.time()


def event_seconds(event: Mapping[str, Any], key: str = "duration_s") -> float | None:
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value >= 0 else None


Handler = Callable[[Any, Mapping[str, Any]], None]


class CoordinatorMetrics:
    """Metric objects on a private registry; `observe(event)` is the structlog observer."""

    def __init__(self, status: RunStatus) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._run_info: dict[str, str] = {}  # from run_started, shown in pwfl_run_info
        self.rounds = RoundMetrics(self.registry)
        self.traffic = TrafficMetrics(self.registry)
        self.busy_s = Counter("pwfl_coordinator_busy_seconds",
                              "Coordinator work by kind: the events' duration_s summed (kinds "
                              "overlap in time; several slots' work of one kind too, and an "
                              "evaluation's includes its wait for the evaluation thread)",
                              ("kind",), registry=self.registry)
        self.registry.register(_StatusCollector(status, self._run_info))

    def render(self) -> bytes:
        """The Prometheus text exposition of this coordinator's metrics."""
        return generate_latest(self.registry)

    def observe(self, event: Mapping[str, Any]) -> None:
        name = str(event.get("event"))
        if name in ("run_started", "run_resumed"):
            self._run_info.update({k: str(event.get(k, "")) for k in RUN_INFO_FIELDS})
        for part in (self.rounds, self.traffic):
            handler = part.handlers.get(name)
            if handler is not None:
                handler(part, event)
        kind = BUSY_KIND_OF_EVENT.get(name)
        seconds = event_seconds(event)
        if kind is not None and seconds is not None:
            self.busy_s.labels(kind).inc(seconds)


class RoundMetrics:
    """Per slot: rounds aggregated and failed, and how long their parts took."""

    def __init__(self, r: CollectorRegistry) -> None:
        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, ("slot",), buckets=DURATION_BUCKETS_S, registry=r)

        self._started: dict[tuple[str, str], float] = {}  # (slot, round) -> round_started ts
        self.rounds = Counter("pwfl_slot_rounds_completed",
                              "Rounds aggregated (aggregation_finished); their evaluation "
                              "and checkpoint may finish rounds later", ("slot",), registry=r)
        self.rounds_failed = Counter("pwfl_slot_rounds_failed",
                                     "Round attempts that missed their quorum", ("slot",),
                                     registry=r)
        self.round_s = histogram("pwfl_round_duration_seconds",
                                 "From round_started until the round was aggregated "
                                 "(aggregation_finished): the time it held its slot; its "
                                 "evaluation and checkpoint, behind the next rounds, excluded")
        self.quorum_wait_s = histogram("pwfl_quorum_wait_seconds",
                                       "From round_started until its quorum closed it")
        self.aggregation_s = histogram("pwfl_aggregation_duration_seconds",
                                       "Finalising a round's aggregate")
        self.evaluation_s = histogram("pwfl_evaluation_duration_seconds",
                                      "Evaluating a new global model on the test set, on the "
                                      "coordinator (its wait for the evaluation thread "
                                      "included)")

    def _run_started(self, event: Mapping[str, Any]) -> None:
        slots = event.get("slots")
        for slot in range(slots if isinstance(slots, int) else 0):  # series exist from 0
            for metric in (self.rounds, self.rounds_failed, self.round_s, self.quorum_wait_s,
                           self.aggregation_s, self.evaluation_s):
                metric.labels(str(slot))

    def _round_started(self, event: Mapping[str, Any]) -> None:
        slot = _slot(event)
        for key in [k for k in self._started if k[0] == slot]:  # one open round per slot
            del self._started[key]
        self._started[(slot, str(event.get("round")))] = event_ts(event)

    def _round_failed(self, event: Mapping[str, Any]) -> None:
        self.rounds_failed.labels(_slot(event)).inc()
        self._started.pop((_slot(event), str(event.get("round"))), None)

    def _quorum_reached(self, event: Mapping[str, Any]) -> None:
        if (seconds := event_seconds(event, "wait_s")) is not None:
            self.quorum_wait_s.labels(_slot(event)).observe(seconds)

    def _aggregation_finished(self, event: Mapping[str, Any]) -> None:
        slot = _slot(event)
        self.rounds.labels(slot).inc()
        if (seconds := event_seconds(event)) is not None:
            self.aggregation_s.labels(slot).observe(seconds)
        started = self._started.pop((slot, str(event.get("round"))), None)
        if started is not None:
            self.round_s.labels(slot).observe(max(0.0, event_ts(event) - started))

    def _evaluation_finished(self, event: Mapping[str, Any]) -> None:
        if (seconds := event_seconds(event)) is not None:
            self.evaluation_s.labels(_slot(event)).observe(seconds)

    handlers: dict[str, Handler] = {
        "run_started": _run_started, "run_resumed": _run_started,
        se.RoundStarted.name: _round_started, se.RoundFailed.name: _round_failed,
        se.QuorumReached.name: _quorum_reached, se.AggregationFinished.name: _aggregation_finished,
        se.EvaluationFinished.name: _evaluation_finished,
    }


class TrafficMetrics:
    """Jobs, leases, updates and bytes; rejections; reconnections and refused requests."""

    def __init__(self, r: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=r)

        self._model_nbytes: dict[str, int] = {}  # slot -> size of its latest published model
        self._lease_started: dict[tuple[str, str], float] = {}  # (client, slot) -> ts
        self.jobs = counter("pwfl_client_jobs", "Jobs answered per client, by outcome "
                            "(done, failed, lost: the client vanished)", ("client", "outcome"))
        self.jobs_published = counter("pwfl_jobs_published", "Jobs published", ("slot",))
        self.client_busy_s = counter("pwfl_client_busy_seconds",
                                     "Seconds a client was leased to a slot (closed leases)",
                                     ("client",))
        self.folded = counter("pwfl_updates_folded", "Updates folded into an aggregate",
                              ("slot",))
        self.rejected = counter("pwfl_updates_rejected", "Updates and messages rejected, by "
                                "reason (docs/events.md lists them)", ("reason",))
        self.late = counter("pwfl_updates_late", "Updates for a closed round, by outcome",
                            ("slot", "outcome"))
        self.transfer = counter("pwfl_transfer_bytes", "Bytes moved: down = model bytes times "
                                "jobs, up = update bytes received", ("direction",))
        self.reconnections = counter("pwfl_redis_reconnections",
                                     "Redis outages survived (a command succeeded again)")
        self.unauthorized = counter("pwfl_http_unauthorized",
                                    "HTTP requests refused for a missing or wrong token",
                                    ("route",))

    def _run_started(self, event: Mapping[str, Any]) -> None:
        slots = event.get("slots")
        for slot in range(slots if isinstance(slots, int) else 0):  # series exist from 0
            for metric in (self.jobs_published, self.folded):
                metric.labels(str(slot))

    def _model_published(self, event: Mapping[str, Any]) -> None:
        self._model_nbytes[_slot(event)] = int(event.get("nbytes") or 0)

    def _job_published(self, event: Mapping[str, Any]) -> None:
        self.jobs_published.labels(_slot(event)).inc()
        self.transfer.labels("down").inc(self._model_nbytes.get(_slot(event), 0))

    def _lease_taken(self, event: Mapping[str, Any]) -> None:
        self._lease_started[(str(event.get("client_id")), _slot(event))] = event_ts(event)

    def _lease_returned(self, event: Mapping[str, Any]) -> None:
        client = str(event.get("client_id"))
        outcome = JOB_OUTCOME_OF_RETURN.get(str(event.get("reason")))
        if outcome is not None:
            self.jobs.labels(client, outcome).inc()
        keys = [k for k in self._lease_started if k[0] == client
                and (event.get("slot_id") is None or k[1] == _slot(event))]
        for key in keys:
            started = self._lease_started.pop(key)
            self.client_busy_s.labels(client).inc(max(0.0, event_ts(event) - started))

    def _update_received(self, event: Mapping[str, Any]) -> None:
        self.transfer.labels("up").inc(int(event.get("nbytes") or 0))

    def _update_folded(self, event: Mapping[str, Any]) -> None:
        self.folded.labels(_slot(event)).inc()

    def _update_rejected(self, event: Mapping[str, Any]) -> None:
        self.rejected.labels(str(event.get("reason"))).inc()

    def _registration_undecodable(self, _event: Mapping[str, Any]) -> None:
        self.rejected.labels("bad_registration").inc()

    def _update_late(self, event: Mapping[str, Any]) -> None:
        self.late.labels(_slot(event), str(event.get("action"))).inc()

    def _redis_reconnected(self, _event: Mapping[str, Any]) -> None:
        self.reconnections.inc()

    def _http_unauthorized(self, event: Mapping[str, Any]) -> None:
        self.unauthorized.labels(str(event.get("route"))).inc()

    handlers: dict[str, Handler] = {
        "run_started": _run_started, "run_resumed": _run_started,
        se.ModelPublished.name: _model_published, se.JobPublished.name: _job_published,
        "lease_taken": _lease_taken, "lease_returned": _lease_returned,
        "update_received": _update_received, se.UpdateFolded.name: _update_folded,
        "update_rejected": _update_rejected,
        "registration_undecodable": _registration_undecodable, se.UpdateLate.name: _update_late,
        "redis_reconnected": _redis_reconnected, "http_unauthorized": _http_unauthorized,
    }


class _StatusCollector(Collector):
    """What RunStatus holds, read at scrape time (nothing to keep in step)."""

    def __init__(self, status: RunStatus, run_info: Mapping[str, str]) -> None:
        self._status = status
        self._run_info = run_info

    def collect(self) -> Iterator[Metric]:
        status = self._status
        info = InfoMetricFamily("pwfl_run", "The run this coordinator serves")
        info.add_metric([], {**self._run_info, "run_id": status.run_id, "state": status.state})
        yield info
        yield GaugeMetricFamily("pwfl_run_elapsed_seconds", "Seconds since the run started",
                                value=status.elapsed_s)
        yield GaugeMetricFamily("pwfl_clients_alive", "Clients whose heartbeat is current",
                                value=sum(1 for c in status.clients.values() if c.get("alive")))
        yield from self._slots(status)

    @staticmethod
    def _slots(status: RunStatus) -> Iterator[Metric]:
        families = {
            "round": GaugeMetricFamily("pwfl_slot_round", "The round in progress (or the "
                                       "last one, once finished)", labels=["slot"]),
            "last": GaugeMetricFamily("pwfl_slot_accuracy_ratio", "Test-set accuracy of the "
                                      "latest centrally evaluated global model (on the "
                                      "coordinator)", labels=["slot"]),
            "best": GaugeMetricFamily("pwfl_slot_best_accuracy_ratio", "Best test-set "
                                      "accuracy so far (central evaluation)", labels=["slot"]),
            "val": GaugeMetricFamily("pwfl_slot_validation_accuracy_ratio", "Validation "
                                     "accuracy of the latest federated evaluation: the "
                                     "clients' held-out validation splits, example-weighted "
                                     "(validation_finished; not the test set)",
                                     labels=["slot"]),
            "best_val": GaugeMetricFamily("pwfl_slot_best_validation_accuracy_ratio", "Best "
                                          "validation accuracy so far (federated evaluation "
                                          "on the clients' validation splits)",
                                          labels=["slot"]),
            "lag": GaugeMetricFamily("pwfl_slot_evaluation_lag_rounds", "Rounds aggregated "
                                     "whose evaluate-and-checkpoint link has not finished "
                                     "(rounds aggregated minus the newest evaluated round)",
                                     labels=["slot"]),
        }
        for slot in status.slots.values():
            label = [str(slot.slot_id)]
            families["round"].add_metric(label, slot.round)
            families["lag"].add_metric(label, slot.evaluation_lag_rounds)
            for key, value in (("last", slot.last_accuracy), ("best", slot.best_accuracy),
                               ("val", slot.last_validation),
                               ("best_val", slot.best_validation)):
                if value is not None:
                    families[key].add_metric(label, value)
        yield from families.values()
