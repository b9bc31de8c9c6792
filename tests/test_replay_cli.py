"""`python -m replay`: tables, --json, comparisons, errors and --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from replay.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "replay"
THREE = str(FIXTURES / "synth_3slot.jsonl")
ONE = str(FIXTURES / "synth_1slot.jsonl")


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert main([*argv, "--json"]) == 0
    return dict(json.loads(capsys.readouterr().out))


def test_json_has_the_documented_headline_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """--json: one object with wall_s, busy fractions and per-slot rounds/accuracy/target."""
    doc = _json(capsys, THREE, "--target", "0.85")
    for key in ("wall_s", "coordinator_busy_fraction", "client_busy_fraction",
                "slot_rounds_per_hour", "lease_violations", "rejected_updates", "traffic"):
        assert key in doc
    slots = doc["slots"]
    assert isinstance(slots, list)
    assert len(slots) == 3
    for slot in slots:
        assert {"rounds", "final_accuracy", "time_to_target_s"} <= set(slot)
        assert slot["rounds"] == 8


def test_every_json_field_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/replay.md names every key the JSON summary can contain."""
    doc = _json(capsys, ONE, THREE, "--simulate", "slots=1,2")
    documented = (Path(__file__).parents[1] / "docs" / "replay.md").read_text()
    missing = sorted(k for k in _keys(doc) if f"`{k}`" not in documented)
    assert missing == []


def _keys(value: object) -> set[str]:
    if isinstance(value, dict):
        keys = {k for k in value if not k.isdigit() and k not in _FREE_FORM}
        for k, v in value.items():
            if k not in _FREE_FORM:
                keys |= _keys(v)
        return keys
    if isinstance(value, list):
        return set().union(*(_keys(v) for v in value)) if value else set()
    return set()


# Maps whose keys come from the log (run_started's fields, reasons, agent ids).
_FREE_FORM = {"config", "rejected_updates", "late_updates", "trainers"}


def test_several_logs_give_runs_and_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    """Two logs: both summaries and each metric's ratio against the first."""
    doc = _json(capsys, ONE, THREE)
    runs, comparison = doc["runs"], doc["comparison"]
    assert isinstance(runs, list)
    assert isinstance(comparison, dict)
    assert [r["slot_rounds"] for r in runs] == [8, 24]
    ratio = comparison["metrics"]["slot_rounds"]["ratios"][0]
    assert ratio == pytest.approx(3.0)


def test_tables_show_slots_clients_coordinator_and_comparison(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The terminal summary has every section and the comparison of two logs."""
    assert main([ONE, THREE]) == 0
    out = capsys.readouterr().out
    for heading in ("Slots", "Where a round's time goes", "Slot 2: rounds", "Clients",
                    "Coordinator", "waited with nothing to do", "lease violations",
                    "non_finite 1", "Side by side", "slot-rounds per hour"):
        assert heading in out


def test_not_an_event_log_exits_2_with_one_line(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A file that is not a log: exit code 2 and a single line on stderr."""
    bad = tmp_path / "notes.txt"
    bad.write_text("hello\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("replay: error:")
    assert "not a PWFL event log" in err[0]


def test_bad_simulate_key_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown what-if key is a usage error naming the valid keys."""
    assert main([ONE, "--simulate", "colour=red"]) == 2
    assert "slots, policy, client_choice, quorum" in capsys.readouterr().err


def test_warnings_go_to_stderr_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Warnings never pollute --json on stdout."""
    lines = (FIXTURES / "synth_1slot.jsonl").read_text().splitlines()
    lines.insert(4, json.dumps({"ts": 1_700_000_000.6, "event": "mystery", "run_id": "x",
                                "proc": "coordinator"}))
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(lines * 1) + "\n")
    assert main([str(path), "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert captured.err.count("unknown event 'mystery'") == 1


def test_help_explains_every_option() -> None:
    """--help (as a user runs it) lists every option with its explanation."""
    result = subprocess.run([sys.executable, "-m", "replay", "--help"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).parents[1])
    for option in ("--target", "--json", "--report", "--simulate", "--sim-rounds", "--seed",
                   "--no-rounds", "RUN.jsonl"):
        assert option in result.stdout
    assert "docs/replay.md" in result.stdout


def test_replay_needs_neither_torch_nor_redis() -> None:
    """The log is the only input: importing every replay module pulls in no torch or redis."""
    code = ("import sys, replay.cli, replay.report, replay.figures, replay.whatif; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'redis'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == "[]"
