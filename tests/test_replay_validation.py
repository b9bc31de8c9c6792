"""Federated evaluation in the replay: rounds count when aggregated, validation curves beside
the test set's, both labelled in the tables, figures, report, lineage and trace; logs from
before validation (or with odd validation lines) read as before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from replay import figures
from replay.cli import main
from replay.events import read_log
from replay.population import MERGED
from replay.report import write_report
from replay.summary import RunSummary, summarise
from replay.terminal import render_run
from replay.timeline import rebuild_runs
from tests.fixtures.replay.synth import event_line, write_jsonl

ACCURACY = {1: 0.62, 2: 0.74, 3: 0.77}  # the test set's (a crash leaves round 3 without)
VALIDATION = {0: 0.55, 1: 0.66, 2: 0.78}  # the clients' splits, model rounds 0..2


def lagging_run(*, validation: bool = True, finished: bool = False) -> list[dict[str, Any]]:
    """One slot, three rounds of 6 s; each round's evaluation and checkpoint finish after the
    next round was aggregated (round_closed lags); unless `finished`, the coordinator stopped
    before the third's did. Round r's clients validate model r - 1 before training."""
    ev = event_line
    lines = [ev(0.0, "run_started", slots=1, rounds=3, expected_clients=1, policy="partition",
                quorum=1.0, strategy="fedavg", task="synthetic"),
             ev(0.5, "client_registered", client_id="x", agent_id="a")]
    for r in (1, 2, 3):
        t, ids = 1.0 + 6 * (r - 1), dict[str, Any](slot_id=0, round=r)
        lines += [
            ev(t, "lease_taken", client_id="x", **ids),
            ev(t, "round_started", clients=["x"], quorum_count=1, wait_s=0.0, **ids),
            ev(t, "job_published", client_id="x", job_id=f"j{r}", **ids),
            ev(t + 4, "lease_returned", client_id="x", reason="result", **ids),
            ev(t + 4, "update_received", client_id="x", job_id=f"j{r}", status="ok",
               nbytes=10, timings={"train_s": 3.0}, **ids),
            ev(t + 5, "quorum_reached", reason="all", received=1, failed=0, expected=1,
               wait_s=5.0, **ids),
            ev(t + 5.5, "aggregation_finished", num_updates=1, num_examples=50,
               duration_s=0.5, **ids),
        ]
        if validation:
            lines.append(ev(t + 4.5, "validation_finished", slot_id=0, round=r - 1,
                            during_round=r, accuracy=VALIDATION[r - 1], loss=1.0,
                            num_examples=100, clients=1))
    for r, accuracy in ACCURACY.items():
        if r == 3 and not finished:
            break
        ids, t = dict[str, Any](slot_id=0, round=r), 6.0 * r + 7
        lines += [ev(t, "evaluation_finished", accuracy=accuracy, loss=0.9, num_examples=1000,
                     duration_s=1.0, **ids),
                  ev(t + 0.5, "checkpoint_written", duration_s=0.5, **ids),
                  ev(t + 0.6, "round_closed", duration_s=t + 0.6 - (1.0 + 6 * (r - 1)),
                     accuracy=accuracy, num_updates=1, **ids)]
    if finished:
        lines.append(ev(26.0, "run_finished", wall_s=26.0, status="finished"))
    return sorted(lines, key=lambda line: line["ts"])


def _summary(tmp_path: Path, lines: list[dict[str, Any]], target: float = 0.7
             ) -> RunSummary:
    runs = rebuild_runs(read_log(write_jsonl(lines, tmp_path / "run.jsonl")))
    assert len(runs) == 1
    return summarise(runs[0], target)


def test_rounds_count_when_aggregated_though_evaluation_lags(tmp_path: Path) -> None:
    """Each round is done once aggregated, its round_closed a round later: three rounds, and
    the round's time to its aggregate kept apart from the time to its lagging round_closed."""
    s = _summary(tmp_path, lagging_run(finished=True))
    slot = s.slots[0]
    assert (slot.rounds, slot.rounds_interrupted, s.slot_rounds) == (3, 0, 3)
    assert [r.status for r in slot.round_details] == ["closed"] * 3
    assert [r.aggregated_s for r in slot.round_details] == [5.5, 5.5, 5.5]
    assert slot.mean_aggregated_s == pytest.approx(5.5)
    assert slot.mean_round_s == pytest.approx(12.6)  # round start to round_closed
    assert s.warnings == []


def test_a_round_aggregated_but_never_checkpointed_is_cut(tmp_path: Path) -> None:
    """The coordinator stopped between round 3's aggregate and its round_closed: its model
    was never checkpointed (a resumed run does the round again), so it counts as cut."""
    s = _summary(tmp_path, lagging_run())
    slot = s.slots[0]
    assert (slot.rounds, slot.rounds_interrupted) == (2, 1)
    assert [r.status for r in slot.round_details] == ["closed", "closed", "interrupted"]
    assert slot.round_details[2].aggregated_s == 5.5


def test_validation_curves_sit_beside_the_test_curve(tmp_path: Path) -> None:
    """validation_finished gives the slot's validation curve (at the time it was logged) and
    the figures of the round whose model it is; the test curve is unchanged."""
    s = _summary(tmp_path, lagging_run(), target=0.7)
    slot = s.slots[0]
    assert slot.validation_over_time == [(5.5, 0.55), (11.5, 0.66), (17.5, 0.78)]
    assert slot.accuracy_over_time == [(13.0, 0.62), (19.0, 0.74)]
    assert [r.validation_accuracy for r in slot.round_details] == [0.66, 0.78, None]
    assert [r.accuracy for r in slot.round_details] == [0.62, 0.74, None]
    assert (slot.final_validation_accuracy, slot.best_validation_accuracy) == (0.78, 0.78)
    assert (slot.final_accuracy, slot.time_to_target_s) == (0.74, 19.0)
    assert slot.validation_time_to_target_s == 17.5
    assert (s.final_validation_accuracy, s.validation_time_to_target_s) == (0.78, 17.5)
    assert s.ranking[0].final_validation_accuracy == 0.78


def test_a_log_without_validation_reads_as_before(tmp_path: Path) -> None:
    """No validation_finished (an older log, or --eval central): no validation figures, and
    the terminal leaves their columns out."""
    s = _summary(tmp_path, lagging_run(validation=False, finished=True))
    slot = s.slots[0]
    assert (slot.validation_over_time, slot.final_validation_accuracy) == ([], None)
    assert (s.final_validation_accuracy, s.validation_time_to_target_s) == (None, None)
    assert all(r.validation_accuracy is None for r in slot.round_details)
    console = Console(width=220, record=True)
    render_run(console, s, show_rounds=True)
    text = console.export_text()
    assert "validation" not in text.split("Slots", 1)[1].split("Where a round", 1)[0]


def test_odd_validation_lines_are_skipped_quietly(tmp_path: Path) -> None:
    """A validation_finished without an accuracy, with a repr'd number, with fields this
    reader does not know, or for a round the log never showed: read as far as it goes."""
    lines = lagging_run(validation=False, finished=True)
    lines += [event_line(2.0, "validation_finished", slot_id=0, round=0),
              event_line(3.0, "validation_finished", slot_id=0, round=0,
                         accuracy="np.float64(0.5)", shiny_new_field=[1, 2]),
              event_line(4.0, "validation_finished", slot_id=0, round=42, accuracy=0.6),
              event_line(4.5, "validation_finished", slot_id=7, accuracy=0.4)]
    s = _summary(tmp_path, sorted(lines, key=lambda line: line["ts"]))
    slot0 = next(x for x in s.slots if x.slot_id == 0)
    assert slot0.validation_over_time == [(3.0, 0.5), (4.0, 0.6)]
    assert slot0.rounds == 3  # no round record made up for rounds 0 or 42
    assert s.warnings == []


def test_tables_report_and_figures_label_test_and_validation(tmp_path: Path) -> None:
    """The terminal names both kinds; the report's tables too; the accuracy figure draws
    them (PNG)."""
    lines = lagging_run(finished=True)
    s = _summary(tmp_path, lines)
    console = Console(width=240, record=True)
    render_run(console, s, show_rounds=True)
    text = console.export_text()
    assert "the coordinator's test set" in text
    assert "the clients' held-out splits" in text
    assert "validation accuracy 0.7 reached at 17.5s" in text
    assert "test accuracy 0.7 reached at 19.0s" in text
    assert figures.accuracy(s).startswith(b"\x89PNG")
    run = rebuild_runs(read_log(tmp_path / "run.jsonl"))[0]
    page = write_report(tmp_path / "report", [run], [s], []).read_text()
    for heading in ("final validation", "final test", "validation accuracy", "test accuracy",
                    "validation (dashed"):
        assert heading in page


def test_json_and_trace_carry_validation(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--json has the validation fields; --trace a validation counter beside the test one."""
    log = write_jsonl(lagging_run(finished=True), tmp_path / "run.jsonl")
    trace = tmp_path / "trace.json"
    assert main([str(log), "--json", "--trace", str(trace), "--target", "0.7"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["final_validation_accuracy"] == 0.78
    assert doc["slots"][0]["round_details"][0]["validation_accuracy"] == 0.66
    counters = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "C"]
    assert sorted({e["name"] for e in counters}) == ["slot 0 accuracy",
                                                     "slot 0 validation accuracy"]
    assert len(counters) == len(ACCURACY) + len(VALIDATION)


def test_population_decisions_say_they_used_validation(tmp_path: Path) -> None:
    """pbt_exploit with selected_on validation reads "val" with the validated rounds; the final
    merge's candidates are validation points of the merged pseudo-slot and lines of the
    lineage; final_merge says it chose on validation and names its one test evaluation."""
    lines = lagging_run(finished=True)
    lines += [
        event_line(14.0, "pbt_exploit", slot_id=0, round=2, accuracy=0.6, validated_round=1,
                   donor_slot_id=1, donor_round=2, donor_evaluated_round=1,
                   donor_validated_round=1, donor_accuracy=0.8, selected_on="validation"),
        event_line(19.5, "final_candidate_validated", slot_id=MERGED, candidate="average",
                   accuracy=0.81, loss=0.7, num_examples=300, clients=3),
        event_line(19.75, "final_candidate_validated", slot_id=MERGED, candidate="slot 0",
                   accuracy=0.79, loss=0.8, num_examples=300, clients=3),
        event_line(19.875, "final_merge", slot_id=MERGED, kept="average", accuracy=0.8,
                   validation_accuracy=0.81, selected_on="validation"),
    ]
    s = _summary(tmp_path, sorted(lines, key=lambda line: line["ts"]))
    texts = {step.event: step.text for step in s.lineage}
    assert texts["pbt_exploit"] == ("slot 0 (val 60.00% of round 1) <- copies slot 1 round 2 "
                                    "(val 80.00% of round 1)")
    assert "final candidate slot 0 validated: val 79.00% over 3 client(s)" in [
        step.text for step in s.lineage]
    assert texts["final_merge"] == ("final merge keeps average, chosen on validation (val "
                                    "81.00%; its one test-set evaluation 80.00%)")
    merged = next(x for x in s.slots if x.slot_id == MERGED)
    assert merged.validation_over_time == [(19.5, 0.81), (19.75, 0.79)]
    assert merged.accuracy_over_time == [(19.875, 0.8)]
    assert s.warnings == []
