"""`--trace OUT.json`: runs as Chrome trace events, for Perfetto's UI or chrome://tracing.

The file is the JSON Object Format of the Trace Event Format: `{"traceEvents": [...],
"displayTimeUnit": "ms", "otherData": {...}}` with complete events (`ph` "X", `ts` and
`dur` in integer microseconds since the run's start), instant events ("i"), counters
("C") and metadata ("M") naming each process and thread. Per run, three processes:

  coordinator  a thread per slot with the coordinator's work for it (publish model, fold
               update, aggregate, evaluate, checkpoint), and a `process lifetimes` thread
               with one slice per coordinator process (a gap between two is downtime)
  slots        a thread per slot: its rounds, from start until the aggregate is ready,
               with the quorum wait inside and the lease wait before; its test-set
               accuracy, and its validation accuracy (the clients' splits), as counters
  clients      a thread per client: its leases with the training inside; updates
               rejected or late, jobs failed, clients lost and lease violations as
               instant events

Every interval comes from the rebuilt `Run` through the methods the report's timeline
figure draws with (`RoundRecord.span`, `Lease.span`, `JobTiming.training_span`), so the
trace and the figure cannot disagree. A viewer draws only nested slices on one thread, so
intervals that overlap without nesting (a late update trained outside its lease, a
round's evaluation during the next round's folds) go to an extra thread of the same
track, named with a number: `client 3 (2)`; one that overlaps its neighbour by no more
than the log's rounding (2 us) is trimmed to fit instead. Slot, round and job id travel in
`args`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from replay.events import SlotId, slot_sort_key
from replay.model import ClientRecord, CoordinatorSpan, Incident, RoundRecord, Run

PHASES = frozenset({"X", "i", "C", "M"})  # every `ph` this module writes
SLACK_US = 2  # how far a slice may be trimmed to nest: the log's rounding of ts - duration_s
_PROCESSES = ("coordinator", "slots", "clients")
_WORK_NAMES = {
    "model_published": "publish model",
    "update_folded": "fold update",
    "aggregation_finished": "aggregate",
    "evaluation_finished": "evaluate",
    "checkpoint_written": "checkpoint",
}


@dataclass(frozen=True)
class _Slice:
    """One complete event before it has a thread: `[start_us, end_us]` and its args."""

    name: str
    cat: str
    start_us: int
    end_us: int
    args: dict[str, Any]


@dataclass(frozen=True)
class _Instant:
    name: str
    cat: str
    at_us: int
    args: dict[str, Any]


@dataclass
class _Track:
    """A named row of the viewer; becomes one thread, or more when slices overlap."""

    name: str
    slices: list[_Slice] = field(default_factory=list)
    instants: list[_Instant] = field(default_factory=list)
    counters: list[tuple[str, int, dict[str, float]]] = field(default_factory=list)


def write_trace(path: Path, runs: Sequence[Run]) -> int:
    """Write the runs' trace to `path` (compact JSON); returns the number of events."""
    document = trace_document(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")
    return len(document["traceEvents"])


def trace_document(runs: Sequence[Run]) -> dict[str, Any]:
    """The JSON object a trace viewer opens: every run's events, each with its own pids."""
    events: list[dict[str, Any]] = []
    other: dict[str, str] = {"generator": "python -m replay --trace",
                             "time_zero": "each run's first run_started (coordinator clock)"}
    for index, run in enumerate(runs):
        suffix = f" · {run.label}" if len(runs) > 1 else ""
        events += _RunTrace(run, pid_base=len(_PROCESSES) * index, suffix=suffix).events()
        started = datetime.fromtimestamp(run.start, UTC).isoformat(timespec="milliseconds")
        other[f"run {index + 1}"] = f"{run.run_id} from {run.path}, started {started}"
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


class _RunTrace:
    """The events of one run."""

    def __init__(self, run: Run, pid_base: int, suffix: str) -> None:
        self.run = run
        self.pid = {name: pid_base + i + 1 for i, name in enumerate(_PROCESSES)}
        self.suffix = suffix
        self._events: list[dict[str, Any]] = []
        self._next_tid = dict.fromkeys(self.pid.values(), 1)

    def us(self, ts: float) -> int:
        """Integer microseconds since the run's start."""
        return round((ts - self.run.start) * 1e6)

    def events(self) -> list[dict[str, Any]]:
        for name, pid in self.pid.items():
            self._meta(pid, 0, "process_name", {"name": name + self.suffix})
            self._meta(pid, 0, "process_sort_index", {"sort_index": pid})
        self._emit(self.pid["coordinator"], self._lifetimes_track())
        slots = self._slot_ids()
        for slot in slots:
            self._emit(self.pid["coordinator"], self._work_track(slot))
        for slot in slots:
            self._emit(self.pid["slots"], self._slot_track(slot))
        for client_id in sorted(self.run.clients, key=lambda c: (len(c), c)):
            self._emit(self.pid["clients"], self._client_track(self.run.clients[client_id]))
        meta = [e for e in self._events if e["ph"] == "M"]
        # A slice before the slices it holds: viewers that keep file order on equal times
        # then nest them right.
        rest = sorted((e for e in self._events if e["ph"] != "M"),
                      key=lambda e: (e["ts"], -e.get("dur", 0)))
        return meta + rest

    def _slot_ids(self) -> list[SlotId]:
        slots = set(self.run.slot_ids()) | {s.slot_id for s in self.run.coordinator_spans}
        return sorted(slots, key=slot_sort_key)

    # -- tracks ----------------------------------------------------------------------------

    def _lifetimes_track(self) -> _Track:
        track = _Track("process lifetimes")
        for number, segment in enumerate(self.run.segments, start=1):
            track.slices.append(_Slice(
                f"coordinator process {number}", "process", self.us(segment.start),
                self.us(segment.end), {"resumed": segment.resumed, "status": segment.status}))
        track.instants += [self._incident(i) for i in self.run.incidents
                           if i.client_id not in self.run.clients]
        return track

    def _work_track(self, slot: SlotId) -> _Track:
        spans = [s for s in self.run.coordinator_spans if s.slot_id == slot]
        return _Track(f"slot {slot} work", slices=[self._work(s) for s in spans])

    def _work(self, span: CoordinatorSpan) -> _Slice:
        args: dict[str, Any] = {"slot": span.slot_id, "round": span.round, "event": span.event}
        if span.job_id:
            args["job_id"] = span.job_id
        name = _WORK_NAMES.get(span.event, span.category)
        return _Slice(name, span.category, self.us(span.start), self.us(span.end), args)

    def _slot_track(self, slot: SlotId) -> _Track:
        track = _Track(f"slot {slot}")
        for record in self.run.rounds.get(slot, []):
            track.slices += self._round_slices(record)
        # test set (central evaluation) and, apart, the clients' validation splits
        track.counters = [(f"slot {slot} accuracy", self.us(at), {"accuracy": accuracy})
                          for at, _round, accuracy in self.run.evaluations.get(slot, [])]
        track.counters += [(f"slot {slot} validation accuracy", self.us(at),
                            {"validation_accuracy": accuracy})
                           for at, _round, accuracy in self.run.validations.get(slot, [])]
        return track

    def _round_slices(self, record: RoundRecord) -> list[_Slice]:
        span = record.span(self.run.end)
        if span is None or record.started_at is None:
            return []
        ids = {"slot": record.slot_id, "round": record.round}
        start = self.us(span[0])
        out = [_Slice(f"round {record.round}", "round", start, self.us(span[1]), {
            **ids, "status": record.status, "clients": record.clients,
            "updates": record.num_updates, "accuracy": record.accuracy})]
        if record.quorum_at is not None:
            out.append(_Slice("quorum wait", "quorum_wait", start, self.us(record.quorum_at), {
                **ids, "reason": record.quorum_reason, "received": record.received,
                "failed": record.failed, "quorum_count": record.quorum_count}))
        if record.lease_wait_s:
            out.append(_Slice("lease wait", "lease_wait",
                              self.us(record.started_at - record.lease_wait_s), start, ids))
        return out

    def _client_track(self, client: ClientRecord) -> _Track:
        track = _Track(f"client {client.client_id}")
        for lease in client.leases:
            start, end = lease.span(self.run.end)
            track.slices.append(_Slice(
                f"slot {lease.slot_id} round {lease.round}", "lease", self.us(start),
                self.us(end), {"client": client.client_id, "slot": lease.slot_id,
                               "round": lease.round, "returned": lease.reason}))
        for job in client.jobs:
            start, end = job.training_span
            track.slices.append(_Slice(
                "train" if job.ok else "train (failed)", "train", self.us(start), self.us(end),
                {"client": client.client_id, "slot": job.slot_id, "round": job.round,
                 "job_id": job.job_id, "agent": job.agent_id, "ok": job.ok,
                 "fetch_s": job.fetch_s, "upload_s": job.upload_s, "queue_s": job.queue_s,
                 "nbytes_up": job.nbytes}))
        track.instants += [self._incident(i) for i in self.run.incidents
                           if i.client_id == client.client_id]
        track.instants += [
            _Instant("lease_violation", "lease_violation", self.us(v.at), {
                "client": v.client_id, "held_slot": v.held_slot, "held_round": v.held_round,
                "slot": v.new_slot, "round": v.new_round})
            for v in self.run.violations if v.client_id == client.client_id]
        return track

    def _incident(self, incident: Incident) -> _Instant:
        return _Instant(incident.event, "incident", self.us(incident.at), {
            "client": incident.client_id, "slot": incident.slot_id, "round": incident.round,
            "job_id": incident.job_id, "detail": incident.detail})

    # -- events ----------------------------------------------------------------------------

    def _emit(self, pid: int, track: _Track) -> None:
        lanes = _lanes(track.slices) or [[]]
        tids = []
        for number, lane in enumerate(lanes, start=1):
            tid = self._next_tid[pid]
            self._next_tid[pid] += 1
            tids.append(tid)
            name = track.name if number == 1 else f"{track.name} ({number})"
            self._meta(pid, tid, "thread_name", {"name": name})
            self._meta(pid, tid, "thread_sort_index", {"sort_index": tid})
            self._events += [_complete(s, pid, tid) for s in lane]
        self._events += [{"name": i.name, "cat": i.cat, "ph": "i", "s": "t", "ts": i.at_us,
                          "pid": pid, "tid": tids[0], "args": i.args} for i in track.instants]
        self._events += [{"name": name, "ph": "C", "ts": at, "pid": pid, "tid": tids[0],
                          "args": values} for name, at, values in track.counters]

    def _meta(self, pid: int, tid: int, name: str, args: dict[str, Any]) -> None:
        self._events.append({"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args})


def _complete(piece: _Slice, pid: int, tid: int) -> dict[str, Any]:
    return {"name": piece.name, "cat": piece.cat, "ph": "X", "ts": piece.start_us,
            "dur": piece.end_us - piece.start_us, "pid": pid, "tid": tid,
            "args": piece.args}


def _lanes(slices: Iterable[_Slice]) -> list[list[_Slice]]:
    """Slices spread over as few lanes as possible such that on each lane any two slices
    are disjoint or one holds the other (first fit, in start order, longest first).

    The log has microsecond precision, so an interval computed as `ts - duration_s` may
    overlap the one before it by a microsecond or two; such a slice is trimmed by at most
    `SLACK_US` to fit instead of taking a lane of its own."""
    lanes: list[_Lane] = []
    for piece in sorted(slices, key=lambda s: (s.start_us, -s.end_us)):
        for lane in lanes:
            if lane.take(piece):
                break
        else:
            lanes.append(_Lane())
            lanes[-1].take(piece)
    return [lane.slices for lane in lanes]


@dataclass
class _Lane:
    slices: list[_Slice] = field(default_factory=list)
    open_ends: list[int] = field(default_factory=list)  # ends of the slices still open
    closed_until: int = -(2**62)  # the latest end of a slice no longer open

    def take(self, piece: _Slice) -> bool:
        """Add the slice if it fits (trimmed by at most SLACK_US); False if it does not."""
        while self.open_ends and self.open_ends[-1] <= piece.start_us + SLACK_US:
            self.closed_until = max(self.closed_until, self.open_ends.pop())
        start = max(piece.start_us, self.closed_until)
        end = max(piece.end_us, start)
        if self.open_ends:
            if end > self.open_ends[-1] + SLACK_US:
                return False
            end = min(end, self.open_ends[-1])
        if (start, end) != (piece.start_us, piece.end_us):
            piece = replace(piece, start_us=start, end_us=end)
        self.slices.append(piece)
        self.open_ends.append(end)
        return True
