"""Reading a JSON event log into `Event` records, forgiving what a crash leaves behind.

A log is JSON lines as `serialization.events` writes them (docs/events.md is the
catalogue). A crashed run may leave a truncated last line; a restarted
coordinator appends to the same file; a newer coordinator may log events this
tool does not know. Each of these is a warning, said once, and reading goes on.
A file whose first line is not a JSON event is not a log at all: `NotAnEventLog`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replay.errors import NotAnEventLog, ReplayError

SlotId = int | str

COORDINATOR_EVENTS = frozenset(
    {
        "run_started", "run_resumed", "client_registered", "client_lost", "slot_waiting",
        "lease_taken", "lease_returned", "round_started", "model_published", "job_published",
        "update_received", "update_folded", "update_rejected", "update_late", "job_failed",
        "quorum_reached", "aggregation_finished", "evaluation_finished", "evaluation_skipped",
        "validation_finished", "final_candidate_validated",
        "checkpoint_written",
        "round_closed", "round_failed", "slot_finished", "slot_failed", "run_finished",
        "api_token_generated", "http_unauthorized", "run_stop_requested",
        "pbt_exploit", "pbt_explore", "slots_merged", "merge_adopted", "merge_evaluated",
        "final_merge",
    }
)  # fmt: skip
AGENT_EVENTS = frozenset(
    {
        "agent_started", "trainer_started", "trainer_exited", "job_received", "model_fetched",
        "job_started", "job_finished", "update_uploaded", "agent_stopped",
    }
)  # fmt: skip
# Logged by PWFL's processes and catalogued, but nothing in the replay needs them (known,
# so a log holding them draws no warning; tests/test_replay_events.py keeps this complete).
OTHER_EVENTS = frozenset(
    {
        "local_agent_started", "local_agent_exited", "clients_missing", "state_write_failed",
        "agent_stopping", "job_error", "job_rejected", "job_reclaimed", "http_listening",
        "http_port_in_use", "embedded_redis_started", "embedded_redis_stopped",
        "model_downloaded", "metrics_listening",
        "redis_unreachable", "redis_reconnected", "heartbeat_failed", "unregister_failed",
        "registration_undecodable", "secret_file_permissive", "shm_orphans_removed",
        "stream_group_recreated", "stream_entries_deleted_while_pending",
        "stream_entries_dead_lettered", "stream_trim_failed", "trainer_bad_message",
        "trainer_job_failed", "trainer_reply_dropped", "device_emulated", "trainer_restart_failed",
        "strategy_bounds_unmet",
        "train_timeout", "job_refused", "redis_refused",
        "gradient_step", "gradient_client_dropped", "gradient_session_opened",
        "gradient_session_reopened",
        "gradient_session_failed", "gradient_downlink_failed", "handoff_unavailable",
        "handoff_fallback",
        "num_examples_capped", "examples_declaration_rejected", "examples_declared",
        "examples_undeclared", "trainer_describe_failed",
        "final_candidate_timeout", "final_merge_skipped", "validation_malformed",
    }
)  # fmt: skip
KNOWN_EVENTS = COORDINATOR_EVENTS | AGENT_EVENTS | OTHER_EVENTS

# structlog writes values it cannot serialise as repr(), e.g. "np.float64(0.85)".
_NUMBER_IN_TEXT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def as_float(value: Any) -> float | None:
    """A number from a JSON value, also out of a repr like ``np.float64(0.85)``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _NUMBER_IN_TEXT.search(value.rsplit("(", 1)[-1])
        return float(match.group()) if match else None
    return None


def as_slot_id(value: Any) -> SlotId:
    """Slot ids as logged: integers stay integers, anything else becomes text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value)
    return int(text) if text.isdigit() else text


def slot_sort_key(slot_id: SlotId) -> tuple[int, int, str]:
    """Integers first in numeric order, then names."""
    if isinstance(slot_id, int):
        return (0, slot_id, "")
    return (1, 0, slot_id)


@dataclass(frozen=True, slots=True)
class Event:
    """One log line: its time, name, emitting process and the remaining fields."""

    ts: float
    name: str
    proc: str
    run_id: str
    fields: Mapping[str, Any]
    line: int

    def num(self, key: str, default: float = 0.0) -> float:
        value = as_float(self.fields.get(key))
        return default if value is None else value

    def opt_num(self, key: str) -> float | None:
        return as_float(self.fields.get(key))

    def text(self, key: str, default: str = "") -> str:
        value = self.fields.get(key)
        return default if value is None else str(value)

    @property
    def slot_id(self) -> SlotId:
        return as_slot_id(self.fields.get("slot_id", "?"))

    @property
    def round(self) -> int:
        return int(self.num("round", -1))

    @property
    def client_id(self) -> str:
        return self.text("client_id", "?")

    @property
    def is_coordinator(self) -> bool:
        return self.proc in ("coordinator", "")

    def interval(self) -> tuple[float, float]:
        """The `[ts - duration_s, ts]` span of a `*_finished`-style event."""
        return (self.ts - max(self.num("duration_s"), 0.0), self.ts)


@dataclass
class Warnings:
    """Messages to show once each, in the order they first came."""

    messages: list[str] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def warn(self, key: str, message: str) -> None:
        if key not in self._seen:
            self._seen.add(key)
            self.messages.append(message)


@dataclass
class EventLog:
    """The readable events of one file, sorted by time, and what was odd about it."""

    path: Path
    events: list[Event]
    warnings: Warnings


def read_log(path: Path) -> EventLog:
    """Read and sort the events of one log file; raise `NotAnEventLog` if it is none."""
    text = _read_text(path)
    warnings = Warnings()
    events = list(_parse_lines(path, text, warnings))
    if not events:
        raise NotAnEventLog(f"{path}: not a PWFL event log (no JSON event lines)")
    events.sort(key=lambda ev: ev.ts)  # stable: one process's order is kept on ties
    return EventLog(path=path, events=events, warnings=warnings)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotAnEventLog(f"{path}: not a PWFL event log (not UTF-8 text)") from exc


def _parse_lines(path: Path, text: str, warnings: Warnings) -> Iterator[Event]:
    lines = text.split("\n")
    last_index = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    first = True
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        event = _parse_event(raw, index + 1)
        if event is None:
            _complain(path, index, last_index, first, warnings)
        else:
            _check_name(event, warnings)
            yield event
        first = False


def _complain(path: Path, index: int, last_index: int, first: bool, warnings: Warnings) -> None:
    if first:
        raise NotAnEventLog(
            f"{path}: not a PWFL event log (line {index + 1} is not a JSON object "
            "with 'ts' and 'event')"
        )
    if index == last_index:
        warnings.warn("truncated", f"{path}: last line {index + 1} is cut off (crashed run?)")
    else:
        warnings.warn(f"bad-line-{index}", f"{path}: line {index + 1} is not a JSON event")


def _check_name(event: Event, warnings: Warnings) -> None:
    if event.name not in KNOWN_EVENTS:
        warnings.warn(f"unknown-{event.name}", f"unknown event {event.name!r} ignored")


def _parse_event(raw: str, line: int) -> Event | None:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    ts = obj.get("ts")
    name = obj.get("event")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not isinstance(name, str):
        return None
    return Event(
        ts=float(ts),
        name=name,
        proc=str(obj.get("proc", "")),
        run_id=str(obj.get("run_id") or ""),
        fields=obj,
        line=line,
    )
