"""Reading event logs: what a crash, a restart or a newer coordinator leaves in them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from replay.errors import NotAnEventLog, ReplayError
from replay.events import as_float, read_log
from replay.timeline import rebuild_runs
from tests.fixtures.replay.synth import event_line, synth_run, write_jsonl

FIXTURES = Path(__file__).parent / "fixtures" / "replay"


def _write(tmp_path: Path, lines: list[dict[str, object]], name: str = "run.jsonl") -> Path:
    return write_jsonl(lines, tmp_path / name)


def test_reads_every_line_of_a_complete_log() -> None:
    """A clean log gives one event per line and no warning."""
    path = FIXTURES / "synth_3slot.jsonl"
    log = read_log(path)
    assert len(log.events) == len(path.read_text().splitlines())
    assert log.warnings.messages == []


def test_truncated_last_line_is_a_warning(tmp_path: Path) -> None:
    """A crash mid-write cuts the last line: warn that the run may have crashed, keep the rest."""
    text = (FIXTURES / "synth_1slot.jsonl").read_text()
    path = tmp_path / "crashed.jsonl"
    path.write_text(text[: len(text) // 2 - 7])
    log = read_log(path)
    assert any("cut off" in m for m in log.warnings.messages)
    assert len(log.events) == len(path.read_text().splitlines()) - 1


def test_unknown_events_warn_once_per_name(tmp_path: Path) -> None:
    """A newer coordinator's events are skipped with one warning per name."""
    lines = synth_run(1, rounds=2)
    lines[5:5] = [event_line(3.0 + i / 10, "shiny_new_event", slot_id=0) for i in range(4)]
    lines.insert(7, event_line(3.5, "another_one"))
    log = read_log(_write(tmp_path, lines))
    unknown = [m for m in log.warnings.messages if "unknown event" in m]
    assert unknown == ["unknown event 'shiny_new_event' ignored",
                       "unknown event 'another_one' ignored"]


def test_a_csv_file_is_not_an_event_log(tmp_path: Path) -> None:
    """Text that is not JSON events is refused with a one-line reason."""
    path = tmp_path / "data.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(NotAnEventLog, match="line 1 is not a JSON object"):
        read_log(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\n\n", b"\x89PNG\r\n\x1a\n\x00\x00", b'{"no": "event"}\n', b"[1, 2]\n",
     b'{"ts": "yesterday", "event": "run_started"}\n'],
)
def test_files_without_events_are_refused(tmp_path: Path, content: bytes) -> None:
    """Empty, binary, or JSON without `ts` and `event`: not an event log."""
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(NotAnEventLog):
        read_log(path)


def test_a_missing_file_is_a_replay_error(tmp_path: Path) -> None:
    """A path that does not exist is a clear error, not a traceback."""
    with pytest.raises(ReplayError, match="cannot read"):
        read_log(tmp_path / "nope.jsonl")


def test_an_agents_own_log_is_refused(tmp_path: Path) -> None:
    """An agent's file has no coordinator events: say which log is needed."""
    lines = [event_line(0.0, "agent_started", proc="agent", agent_id="a", client_ids=["0"],
                        devices=["cpu"], hostname="h")]
    with pytest.raises(NotAnEventLog, match="coordinator's log"):
        rebuild_runs(read_log(_write(tmp_path, lines)))


def test_bad_line_in_the_middle_is_skipped(tmp_path: Path) -> None:
    """Interleaved writes may garble a line: skipped with a warning naming it."""
    lines = [json.dumps(line) for line in synth_run(1, rounds=1)]
    lines.insert(3, '{"ts": 1700000000.5, "event": "client_regis')
    path = tmp_path / "garbled.jsonl"
    path.write_text("\n".join(lines) + "\n")
    log = read_log(path)
    assert any("line 4 is not a JSON event" in m for m in log.warnings.messages)


def test_numbers_are_read_from_repr_strings() -> None:
    """structlog writes unknown number types as repr(); the number is still read."""
    assert as_float("np.float64(0.8512)") == pytest.approx(0.8512)
    assert as_float(3) == 3.0
    assert as_float(True) is None
    assert as_float("n/a") is None


def test_events_are_sorted_by_time(tmp_path: Path) -> None:
    """Processes that share a file may write slightly out of order; replay sorts."""
    lines = synth_run(1, rounds=1)
    lines[2], lines[3] = lines[3], lines[2]
    events = read_log(_write(tmp_path, lines)).events
    assert [e.ts for e in events] == sorted(e.ts for e in events)
