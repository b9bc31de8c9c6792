"""Rebuilding runs from events: one handler per coordinator event name.

The coordinator's own events carry everything the timeline needs (agents'
durations travel inside `update_received`), so agent events are only used for
what agents announce about themselves. A coordinator restart (`run_started` or
`run_resumed` again, same run id) starts a new `Segment`: what was open when the
previous process stopped (rounds, leases) is closed at its last event.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from replay.errors import NotAnEventLog
from replay.events import Event, EventLog, SlotId, Warnings
from replay.model import (
    CATEGORY_OF_EVENT,
    AgentInfo,
    ClientRecord,
    CoordinatorSpan,
    Incident,
    JobTiming,
    Lease,
    LeaseViolation,
    RoundRecord,
    Run,
    Segment,
)
from replay.population import MERGED, POPULATION_EVENTS
from serialization import slot_events as se

# Fields every line carries; the rest of run_started is the run's configuration.
_COMMON_FIELDS = frozenset({"ts", "event", "level", "proc", "pid", "run_id"})
_OK_STATUSES = frozenset({"ok", "success", "succeeded", ""})


def rebuild_runs(log: EventLog) -> list[Run]:
    """Every run in the file (normally one), rebuilt from its events."""
    runs = []
    for run_id, events in _split_by_run_id(log):
        builder = _Builder(log.path, run_id)
        for event in events:
            builder.feed(event)
        run = builder.finish()
        run.warnings = log.warnings.messages + builder.warnings.messages
        runs.append(run)
    return runs


def _split_by_run_id(log: EventLog) -> list[tuple[str, list[Event]]]:
    run_ids = list(dict.fromkeys(ev.run_id for ev in log.events if ev.is_coordinator))
    if len(run_ids) > 1 and "" in run_ids:
        run_ids.remove("")  # events logged outside the run's context belong to it
    if not run_ids:
        raise NotAnEventLog(
            f"{log.path}: no coordinator events (an agent's own log?); replay reads the "
            "coordinator's log"
        )
    groups: dict[str, list[Event]] = {run_id: [] for run_id in run_ids}
    for event in log.events:
        groups.get(event.run_id, groups[run_ids[0]]).append(event)
    return list(groups.items())


class _Builder:
    """Feeds events into a `Run`, in time order."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.run = Run(path=path, run_id=run_id)
        self.warnings = Warnings()
        self._current: dict[tuple[SlotId, int], RoundRecord] = {}
        self._open_leases: dict[str, list[Lease]] = defaultdict(list)
        self._finished = False
        self._published_at: dict[str, float] = {}
        self._handlers: dict[str, Callable[[Event], None]] = {
            "run_started": self._on_run_started,
            "run_resumed": self._on_run_resumed,
            "run_finished": self._on_run_finished,
            "client_registered": self._on_client_registered,
            "client_lost": self._on_client_lost,
            "lease_taken": self._on_lease_taken,
            "lease_returned": self._on_lease_returned,
            se.RoundStarted.name: self._on_round_started,
            se.ModelPublished.name: self._on_model_published,
            se.JobPublished.name: self._on_job_published,
            "update_received": self._on_update_received,
            se.UpdateFolded.name: self._on_update_folded,
            "update_rejected": self._on_update_rejected,
            se.UpdateLate.name: self._on_update_late,
            se.JobFailed.name: self._on_job_failed,
            se.QuorumReached.name: self._on_quorum_reached,
            se.AggregationFinished.name: self._on_aggregation_finished,
            se.EvaluationFinished.name: self._on_evaluation_finished,
            se.ValidationFinished.name: self._on_validation_finished,
            "checkpoint_written": self._on_checkpoint_written,
            se.RoundClosed.name: self._on_round_closed,
            se.RoundFailed.name: self._on_round_failed,
            **dict.fromkeys(POPULATION_EVENTS, self._on_population),
        }

    # -- driving ---------------------------------------------------------------------------

    def feed(self, event: Event) -> None:
        if not event.is_coordinator:
            if event.name == "agent_started":
                self._on_agent_started(event)
            return
        if not self.run.segments and not event.run_id:
            return  # logged before the run was announced (embedded Redis, API token)
        if not self.run.segments and event.name not in ("run_started", "run_resumed"):
            self.warnings.warn("no-start", f"{self.run.path}: no run_started before line "
                               f"{event.line}; the run starts at its first event")
            self._open_segment(event.ts, resumed=False)
        handler = self._handlers.get(event.name)
        if handler is not None:
            handler(event)
        if not self._finished:
            self.run.segments[-1].end = max(self.run.segments[-1].end, event.ts)

    def finish(self) -> Run:
        self._close_segment()
        for client in self.run.clients.values():
            if client.present_since is not None:
                client.presence.append((client.present_since, self.run.end))
                client.present_since = None
        for points in (*self.run.evaluations.values(), *self.run.validations.values()):
            points.sort()
        return self.run

    # -- segments --------------------------------------------------------------------------

    def _open_segment(self, ts: float, *, resumed: bool) -> None:
        self.run.segments.append(Segment(start=ts, end=ts, resumed=resumed))
        self._finished = False

    def _close_segment(self) -> None:
        """What the stopped process left: rounds still open, and rounds aggregated whose
        evaluate-and-checkpoint link never finished (no `round_closed`: their model was
        never checkpointed, a resumed run does them again), are interrupted; leases end."""
        end = self.run.segments[-1].end
        for record in self._current.values():
            if record.status == "open" or (record.status == "closed"
                                           and record.closed_at is None):
                record.status, record.cut_at = "interrupted", end
        self._current.clear()  # a restarted coordinator starts its rounds afresh
        for leases in self._open_leases.values():
            for lease in leases:
                lease.end, lease.reason = end, "coordinator_stopped"
        self._open_leases.clear()

    def _on_run_started(self, event: Event) -> None:
        resumed = bool(self.run.segments)
        if resumed:
            self._close_segment()
        else:
            self.run.config = {k: v for k, v in event.fields.items() if k not in _COMMON_FIELDS}
        self._open_segment(event.ts, resumed=resumed)

    def _on_run_resumed(self, event: Event) -> None:
        """A coordinator restarted with --resume: always a new process, so a new segment."""
        if self.run.segments:
            self._close_segment()
        if not self.run.config:
            self.run.config = {k: v for k, v in event.fields.items() if k not in _COMMON_FIELDS}
        self._open_segment(event.ts, resumed=True)

    def _on_run_finished(self, event: Event) -> None:
        segment = self.run.segments[-1]
        segment.status = event.text("status", "finished")
        segment.end = event.ts
        self._finished = True

    # -- clients and leases ----------------------------------------------------------------

    def _client(self, client_id: str) -> ClientRecord:
        client = self.run.clients.get(client_id)
        if client is None:
            client = self.run.clients[client_id] = ClientRecord(client_id=client_id)
        return client

    def _mark_present(self, client: ClientRecord, ts: float) -> None:
        if client.present_since is None:
            client.present_since = ts

    def _on_agent_started(self, event: Event) -> None:
        agent_id = event.text("agent_id")
        self.run.agents[agent_id] = AgentInfo(
            agent_id=agent_id,
            client_ids=[str(c) for c in _as_list(event.fields.get("client_ids"))],
            devices=[str(d) for d in _as_list(event.fields.get("devices"))],
        )

    def _on_client_registered(self, event: Event) -> None:
        client = self._client(event.client_id)
        client.agent_id = event.text("agent_id", client.agent_id)
        self._mark_present(client, event.ts)

    def _on_client_lost(self, event: Event) -> None:
        client = self._client(event.client_id)
        self._incident(event, "reason")
        if client.present_since is not None:
            client.presence.append((client.present_since, event.ts))
            client.present_since = None

    def _on_lease_taken(self, event: Event) -> None:
        client = self._client(event.client_id)
        self._mark_present(client, event.ts)
        lease = Lease(event.client_id, event.slot_id, event.round, start=event.ts)
        for held in self._open_leases[event.client_id]:
            self.run.violations.append(
                LeaseViolation(event.client_id, event.ts, held.slot_id, held.round,
                               lease.slot_id, lease.round)
            )
        self._open_leases[event.client_id].append(lease)
        client.leases.append(lease)

    def _on_lease_returned(self, event: Event) -> None:
        open_leases = self._open_leases[event.client_id]
        match = _matching_lease(open_leases, event.slot_id, event.round)
        if match is None:
            self.warnings.warn(f"unmatched-return-{event.client_id}",
                               f"lease_returned without lease_taken (client {event.client_id}, "
                               f"line {event.line})")
            return
        open_leases.remove(match)
        match.end, match.reason = event.ts, event.text("reason")
        if match.reason == "lost":
            self._client(event.client_id).lost += 1

    def _on_update_received(self, event: Event) -> None:
        job = _job_timing(event, self._published_at.get(event.text("job_id")))
        self._client(event.client_id).jobs.append(job)
        self._round(event).bytes_up += job.nbytes

    def _on_update_rejected(self, event: Event) -> None:
        self.run.rejected[event.text("reason", "unknown")] += 1
        self._incident(event, "reason")
        if "client_id" in event.fields:  # a malformed message may name no client
            self._client(event.client_id).rejected += 1

    def _on_update_late(self, event: Event) -> None:
        self.run.late[event.text("action", "unknown")] += 1
        self._incident(event, "action")
        self._client(event.client_id).late += 1

    def _on_job_failed(self, event: Event) -> None:
        self._client(event.client_id).failures += 1
        self._incident(event, "error")

    def _incident(self, event: Event, detail_field: str) -> None:
        self.run.incidents.append(Incident(
            at=event.ts, event=event.name, client_id=event.client_id, slot_id=event.slot_id,
            round=event.round, detail=event.text(detail_field), job_id=event.text("job_id"),
        ))

    # -- rounds ----------------------------------------------------------------------------

    def _round(self, event: Event) -> RoundRecord:
        """The round an event belongs to; the coordinator publishes the model before it
        logs round_started, so a round may begin with its model_published."""
        key = (event.slot_id, event.round)
        record = self._current.get(key)
        if record is None:
            record = self._new_round(event.slot_id, event.round)
        return record

    def _new_round(self, slot_id: SlotId, round_no: int) -> RoundRecord:
        record = RoundRecord(slot_id=slot_id, round=round_no)
        self._current[(slot_id, round_no)] = record
        self.run.rounds.setdefault(slot_id, []).append(record)
        return record

    def _span(self, event: Event) -> None:
        start, end = event.interval()
        category = CATEGORY_OF_EVENT[event.name]
        self.run.coordinator_spans.append(CoordinatorSpan(
            start, end, category, event.slot_id, event.round, event.name, event.text("job_id")))

    def _on_round_started(self, event: Event) -> None:
        record = self._current.get((event.slot_id, event.round))
        if record is None or record.started_at is not None or record.status != "open":
            if record is not None and record.status == "open":
                record.status, record.cut_at = "interrupted", event.ts  # started again
            record = self._new_round(event.slot_id, event.round)
        record.started_at = event.ts
        record.lease_wait_s = event.opt_num("wait_s")
        record.clients = [str(c) for c in _as_list(event.fields.get("clients"))]
        quorum_count = event.opt_num("quorum_count")
        record.quorum_count = None if quorum_count is None else int(quorum_count)
        self.run.segments[-1].active = True

    def _on_model_published(self, event: Event) -> None:
        record = self._round(event)
        record.model_nbytes = int(event.num("nbytes"))
        record.publish_s += event.num("duration_s")
        self._span(event)

    def _on_job_published(self, event: Event) -> None:
        self._round(event).jobs_published += 1
        self._published_at[event.text("job_id")] = event.ts

    def _on_update_folded(self, event: Event) -> None:
        self._round(event).fold_s += event.num("duration_s")
        self._span(event)

    def _on_quorum_reached(self, event: Event) -> None:
        record = self._round(event)
        record.quorum_at = event.ts
        started = record.started_at
        fallback = None if started is None else event.ts - started
        wait_s = event.opt_num("wait_s")
        record.quorum_wait_s = fallback if wait_s is None else wait_s
        record.quorum_reason = event.text("reason")
        record.received = int(event.num("received"))
        record.failed = int(event.num("failed"))

    def _on_aggregation_finished(self, event: Event) -> None:
        """The round is done (aggregated); its evaluation and checkpoint (`round_closed`)
        may come rounds later."""
        record = self._round(event)
        record.aggregated_at = event.ts
        if record.status == "open":
            record.status = "closed"
        record.aggregation_s += event.num("duration_s")
        record.num_updates = int(event.num("num_updates", record.num_updates))
        self._span(event)

    def _on_population(self, event: Event) -> None:
        """PBT and merges: kept for the lineage; a merged model's test score is a point of
        the "merged" pseudo-slot's accuracy curve, a final candidate's validation score one
        of its validation curve."""
        self.run.population_events.append((event.ts, event.name, dict(event.fields)))
        accuracy = event.opt_num("accuracy")
        if event.name in ("merge_evaluated", "final_merge") and accuracy is not None:
            self.run.evaluations.setdefault(MERGED, []).append((event.ts, event.round, accuracy))
        if event.name == "final_candidate_validated" and accuracy is not None:
            self.run.validations.setdefault(MERGED, []).append((event.ts, event.round, accuracy))

    def _on_validation_finished(self, event: Event) -> None:
        """Federated evaluation of the slot's round-`round` model (0: the initial one) on the
        clients' validation splits, logged during a later round: a point of the slot's
        validation curve, and the figures of that round's record where it has one."""
        accuracy = event.opt_num("accuracy")
        if accuracy is None:
            return
        self.run.validations.setdefault(event.slot_id, []).append(
            (event.ts, event.round, accuracy))
        record = next((r for r in reversed(self.run.rounds.get(event.slot_id, []))
                       if r.round == event.round and r.status == "closed"), None)
        if record is not None:
            record.validation_accuracy = accuracy
            record.validation_loss = event.opt_num("loss")

    def _on_evaluation_finished(self, event: Event) -> None:
        record = self._round(event)
        record.evaluation_s += event.num("duration_s")
        record.loss = event.opt_num("loss")
        self._span(event)
        accuracy = event.opt_num("accuracy")
        if accuracy is not None:
            record.accuracy = accuracy
            self.run.evaluations.setdefault(event.slot_id, []).append(
                (event.ts, event.round, accuracy)
            )

    def _on_checkpoint_written(self, event: Event) -> None:
        self._round(event).checkpoint_s += event.num("duration_s")
        self._span(event)

    def _on_round_closed(self, event: Event) -> None:
        """The round's evaluate-and-checkpoint link finished (in a log from before
        `aggregation_finished` counted rounds, also the round's end)."""
        record = self._round(event)
        record.status, record.closed_at = "closed", event.ts
        record.duration_s = event.opt_num("duration_s")
        record.num_updates = int(event.num("num_updates", record.num_updates))
        accuracy = event.opt_num("accuracy")
        if record.accuracy is None and accuracy is not None:
            record.accuracy = accuracy
            self.run.evaluations.setdefault(event.slot_id, []).append(
                (event.ts, event.round, accuracy)
            )

    def _on_round_failed(self, event: Event) -> None:
        record = self._round(event)
        record.status, record.closed_at = "failed", event.ts
        record.received = int(event.num("received", record.received))
        record.failed = int(event.num("failed", record.failed))


def _as_list(value: object) -> list[object]:
    if isinstance(value, list | tuple):
        return list(value)
    return []


def _matching_lease(leases: list[Lease], slot_id: SlotId, round_no: int) -> Lease | None:
    """The lease a return refers to: same slot and round, else same slot, else the oldest
    (a lost client's return may not know its slot)."""
    same_slot = [lease for lease in leases if lease.slot_id == slot_id]
    exact = [lease for lease in same_slot if lease.round == round_no]
    candidates = exact or same_slot or leases
    return candidates[0] if candidates else None


def _job_timing(event: Event, published_at: float | None) -> JobTiming:
    timings = event.fields.get("timings")
    timing = timings if isinstance(timings, dict) else {}

    def part(key: str) -> float:
        value = timing.get(key)
        return float(value) if isinstance(value, int | float) else 0.0

    return JobTiming(
        slot_id=event.slot_id,
        round=event.round,
        received_at=event.ts,
        published_at=published_at,
        agent_id=event.text("agent_id"),
        ok=event.text("status", "ok").lower() in _OK_STATUSES,
        queue_s=part("queue_s"),
        fetch_s=part("fetch_s"),
        load_s=part("load_s"),
        train_s=part("train_s"),
        encode_s=part("encode_s"),
        upload_s=part("upload_s"),
        total_s=part("total_s"),
        nbytes=int(event.num("nbytes")),
        job_id=event.text("job_id"),
    )
