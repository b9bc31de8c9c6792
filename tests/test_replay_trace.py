"""`python -m replay RUN.jsonl --trace OUT.json`: Chrome trace events from the rebuilt timeline."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from replay.cli import main
from replay.events import read_log
from replay.model import Run
from replay.timeline import rebuild_runs
from replay.trace import PHASES, SLACK_US

FIXTURES = Path(__file__).parent / "fixtures" / "replay"
# Real runs (one resumed after a coordinator restart) and a synthetic one with faults.
LOGS = ["real_3slot.jsonl", "real_resumed.jsonl", "synth_3slot.jsonl"]
METADATA = {"process_name": "name", "thread_name": "name", "process_sort_index": "sort_index",
            "thread_sort_index": "sort_index"}


def _trace(tmp_path: Path, *logs: str) -> dict[str, Any]:
    out = tmp_path / "trace" / "run.json"
    assert main([*(str(FIXTURES / log) for log in logs), "--trace", str(out), "--json"]) == 0
    document: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return document


def _run(log: str) -> Run:
    return rebuild_runs(read_log(FIXTURES / log))[0]


def _lines(log: str) -> list[str]:
    return (FIXTURES / log).read_text(encoding="utf-8").splitlines()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _thread_names(events: list[dict[str, Any]]) -> dict[tuple[int, int], str]:
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in events
            if e["ph"] == "M" and e["name"] == "thread_name"}


def _check_event(event: dict[str, Any]) -> None:
    assert event["ph"] in PHASES, event
    assert isinstance(event["name"], str)
    assert event["name"]
    assert _is_int(event["pid"])
    assert _is_int(event["tid"])
    assert isinstance(event["args"], dict)
    if event["ph"] == "M":
        assert event["name"] in METADATA
        value = event["args"][METADATA[event["name"]]]
        assert isinstance(value, str) if METADATA[event["name"]] == "name" else _is_int(value)
        return
    assert _is_int(event["ts"])  # microseconds since the run's start
    if event["ph"] == "X":
        assert _is_int(event["dur"])
        assert event["dur"] >= 0
        assert isinstance(event["cat"], str)
    elif event["ph"] == "i":
        assert event["s"] == "t"
        assert isinstance(event["cat"], str)
    else:
        assert all(isinstance(v, float) for v in event["args"].values())
    json.dumps(event["args"], allow_nan=False)


@pytest.mark.parametrize("log", LOGS)
def test_the_file_is_the_trace_event_format_field_by_field(tmp_path: Path, log: str) -> None:
    """A JSON object with traceEvents and ms display; every event has the keys and types of
    its phase (X, i, C, M), int pid/tid, and every track is named."""
    document = _trace(tmp_path, log)
    assert document["displayTimeUnit"] == "ms"
    assert set(document) == {"traceEvents", "displayTimeUnit", "otherData"}
    assert all(isinstance(v, str) for v in document["otherData"].values())
    events = document["traceEvents"]
    for event in events:
        _check_event(event)
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(processes.values()) == ["clients", "coordinator", "slots"]
    threads = _thread_names(events)
    used = {(e["pid"], e["tid"]) for e in events if e["ph"] != "M"}
    assert used <= set(threads)
    assert {pid for pid, _ in threads} <= set(processes)
    assert len(set(threads.values())) == len(threads)  # no two tracks share a name


def test_times_are_microseconds_since_the_run_start(tmp_path: Path) -> None:
    """The coordinator's life spans the run's wall time, and a fold lasts its duration_s."""
    run = _run("real_3slot.jsonl")
    events = _trace(tmp_path, "real_3slot.jsonl")["traceEvents"]
    life = next(e for e in events if e["ph"] == "X" and e["cat"] == "process")
    assert life["ts"] == 0
    assert life["dur"] == pytest.approx(run.wall_s * 1e6, abs=1)
    fold = next(e for e in events if e["ph"] == "X" and e["name"] == "fold update")
    line = next(json.loads(line) for line in _lines("real_3slot.jsonl")
                if f'"job_id":"{fold["args"]["job_id"]}"' in line and "update_folded" in line)
    assert fold["dur"] == pytest.approx(line["duration_s"] * 1e6, abs=SLACK_US)
    assert fold["ts"] + fold["dur"] == pytest.approx((line["ts"] - run.start) * 1e6, abs=1)


def _expected_intervals(run: Run) -> list[tuple[tuple[object, ...], float, float]]:
    """Every interval of the replay's timeline, keyed by what identifies it."""
    out: list[tuple[tuple[object, ...], float, float]] = [
        (("work", s.slot_id, s.round, s.event, s.job_id), s.start, s.end)
        for s in run.coordinator_spans]
    for records in run.rounds.values():
        for r in records:
            if r.started_at is None:
                continue
            end = r.quorum_at + r.aggregation_s if r.quorum_at is not None else (
                r.closed_at or r.cut_at or run.end)
            out.append((("round", r.slot_id, r.round), r.started_at, end))
            if r.quorum_at is not None:
                out.append((("quorum_wait", r.slot_id, r.round), r.started_at, r.quorum_at))
            if r.lease_wait_s:
                out.append((("lease_wait", r.slot_id, r.round), r.started_at - r.lease_wait_s,
                            r.started_at))
    for client in run.clients.values():
        out += [(("lease", client.client_id, lease.slot_id, lease.round), lease.start,
                 run.end if lease.end is None else lease.end) for lease in client.leases]
        out += [(("train", client.client_id, job.job_id),
                 job.received_at - job.upload_s - (job.trainer_s or job.train_s),
                 job.received_at - job.upload_s) for job in client.jobs]
    return out


def _key(event: dict[str, Any]) -> tuple[object, ...] | None:
    args, cat = event["args"], event["cat"]
    if cat in ("aggregation", "evaluation", "checkpoint", "io"):
        return ("work", args["slot"], args["round"], args["event"], args.get("job_id", ""))
    if cat in ("round", "quorum_wait", "lease_wait"):
        return (cat, args["slot"], args["round"])
    if cat == "lease":
        return ("lease", args["client"], args["slot"], args["round"])
    if cat == "train":
        return ("train", args["client"], args["job_id"])
    return None


@pytest.mark.parametrize("log", LOGS)
def test_every_timeline_interval_appears_exactly_once(tmp_path: Path, log: str) -> None:
    """Coordinator work, rounds, quorum and lease waits, leases and training: each interval
    the replay rebuilt is one complete event, at its time (to the log's rounding)."""
    run = _run(log)
    events = [e for e in _trace(tmp_path, log)["traceEvents"] if e["ph"] == "X"]
    expected: dict[tuple[object, ...], list[tuple[float, float]]] = defaultdict(list)
    for key, start, end in _expected_intervals(run):
        expected[key].append(((start - run.start) * 1e6, (end - run.start) * 1e6))
    found: dict[tuple[object, ...], list[tuple[int, int]]] = defaultdict(list)
    for event in events:
        key = _key(event)
        if key is not None:
            found[key].append((event["ts"], event["ts"] + event["dur"]))
    assert Counter({k: len(v) for k, v in found.items()}) == Counter(
        {k: len(v) for k, v in expected.items()})
    for key, spans in expected.items():
        for (want_start, want_end), (start, end) in zip(sorted(spans), sorted(found[key]),
                                                         strict=True):
            assert start == pytest.approx(want_start, abs=SLACK_US + 0.5), key
            assert end == pytest.approx(want_end, abs=SLACK_US + 0.5), key
    others = Counter(e["cat"] for e in events if _key(e) is None)
    assert others == Counter({"process": len(run.segments)})


@pytest.mark.parametrize("log", LOGS)
def test_slices_on_one_thread_nest(tmp_path: Path, log: str) -> None:
    """On every thread two slices are disjoint or one holds the other, as viewers need, and
    the file lists a slice before those it holds."""
    by_thread: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    order = []
    for e in _trace(tmp_path, log)["traceEvents"]:
        if e["ph"] == "X":
            by_thread[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
            order.append((e["ts"], -e["dur"]))
    assert order == sorted(order)
    for thread, spans in by_thread.items():
        stack: list[int] = []
        for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1], (thread, start, end, stack)
            stack.append(end)


def test_tracks_per_slot_client_and_coordinator_work(tmp_path: Path) -> None:
    """A thread per slot, per client and per slot's coordinator work; rounds on the slot's
    thread with their quorum wait; training on its client's thread with its job id."""
    events = _trace(tmp_path, "real_3slot.jsonl")["traceEvents"]
    names = _thread_names(events)
    run = _run("real_3slot.jsonl")
    for slot in run.slot_ids():
        assert f"slot {slot}" in names.values()
        assert f"slot {slot} work" in names.values()
    for client_id in run.clients:
        assert f"client {client_id}" in names.values()
    for e in events:
        if e["ph"] == "X":
            track = names[(e["pid"], e["tid"])]
            if e["cat"] in ("round", "quorum_wait"):
                assert track == f"slot {e['args']['slot']}"
            if e["cat"] == "train":
                assert track.startswith(f"client {e['args']['client']}")
                assert e["args"]["job_id"].startswith(f"s{e['args']['slot']}-r")
            if e["cat"] == "evaluation":
                assert track.startswith(f"slot {e['args']['slot']} work")
    accuracy = [e for e in events if e["ph"] == "C"]
    assert len(accuracy) == sum(len(v) for v in run.evaluations.values())


def test_rejected_updates_and_failed_jobs_are_instants_on_the_client(tmp_path: Path) -> None:
    """Each update_rejected, update_late, job_failed and client_lost is an instant event on
    its client's thread, with slot, round, job id and the reason."""
    events = _trace(tmp_path, "synth_3slot.jsonl")["traceEvents"]
    names = _thread_names(events)
    instants = [e for e in events if e["ph"] == "i"]
    log = [json.loads(line) for line in _lines("synth_3slot.jsonl")]
    marked = {"update_rejected", "update_late", "job_failed", "client_lost"}
    assert len(instants) == sum(1 for line in log if line["event"] in marked) > 0
    rejected = next(e for e in instants if e["name"] == "update_rejected")
    assert names[(rejected["pid"], rejected["tid"])] == f"client {rejected['args']['client']}"
    assert rejected["args"]["detail"] == "non_finite"
    assert {"slot", "round", "job_id"} <= set(rejected["args"])


def test_several_logs_get_their_own_processes(tmp_path: Path) -> None:
    """Two logs: six processes, each name ending in its run's label, no pid shared."""
    events = _trace(tmp_path, "real_3slot.jsonl", "synth_1slot.jsonl")["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert len(processes) == 6
    assert sum(name.endswith("real_3slot") for name in processes.values()) == 3
    assert sum(name.endswith("synth_1slot") for name in processes.values()) == 3


def test_help_says_what_the_trace_is_and_how_to_open_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--help names the format and the two viewers that open it."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trace OUT.json" in text
    for words in ("Chrome trace events", "Perfetto", "chrome://tracing", "default: none"):
        assert words in text


def test_an_unwritable_trace_path_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """A trace that cannot be written: exit 2 and one line on stderr naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    target = blocker / "trace.json"
    assert main([str(FIXTURES / "real_1slot.jsonl"), "--trace", str(target), "--json"]) == 2
    err = capsys.readouterr().err
    assert f"replay: error: {target}: cannot write the trace" in err
