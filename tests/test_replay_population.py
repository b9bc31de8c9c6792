"""Replay of slots that differ and cooperate: labels, ranking, lineage, the report's figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from replay import figures
from replay.events import read_log
from replay.population import slot_labels
from replay.summary import summarise
from replay.timeline import rebuild_runs
from tests.fixtures.replay.synth import event_line, synth_run, write_jsonl

CONFIGS = [{"lr": 0.01, "strategy": "fedavg", "seed": 0},
           {"lr": 0.03, "strategy": "fedadam", "seed": 1},
           {"lr": 0.01, "strategy": "fedadam", "seed": 2}]


def test_labels_name_what_differs_and_the_seed_only_when_nothing_else_does() -> None:
    """Keys equal in every slot are left out; seeds differ by default and are not named."""
    assert slot_labels(CONFIGS) == {"0": "lr=0.01 strategy=fedavg",
                                    "1": "lr=0.03 strategy=fedadam",
                                    "2": "lr=0.01 strategy=fedadam"}
    assert slot_labels([{"lr": 0.1, "seed": 0}, {"lr": 0.1, "seed": 1}]) == {
        "0": "seed=0", "1": "seed=1"}
    assert slot_labels([{"lr": 0.1}, {"lr": 0.1}]) == {"0": "slot 0", "1": "slot 1"}


def _population_log(tmp_path: Path) -> Path:
    lines: list[dict[str, Any]] = synth_run(3, rounds=4, seed=2, run_id="pop")
    lines[0]["slot_configs"] = CONFIGS
    lines += [
        event_line(30.0, "pbt_exploit", run_id="pop", slot_id=2, round=2, donor_slot_id=1,
                   donor_round=2, donor_evaluated_round=2, donor_accuracy=0.8, accuracy=0.6,
                   before=CONFIGS[2], copied={**CONFIGS[1], "seed": 2}),
        event_line(30.0, "pbt_explore", run_id="pop", slot_id=2, round=2,
                   config={**CONFIGS[1], "seed": 2, "lr": 0.036},
                   changed={"lr": [0.03, 0.036]}),
        event_line(31.0, "merge_evaluated", run_id="pop", slot_id="merged", epoch=1, round=2,
                   accuracy=0.7, loss=0.5),
    ]
    return write_jsonl(sorted(lines, key=lambda line: line["ts"]), tmp_path / "pop.jsonl")


def test_summary_ranks_labels_and_follows_the_lineage(tmp_path: Path) -> None:
    """Ranking orders every evaluated slot; the lineage and trajectories follow the events."""
    summary = summarise(rebuild_runs(read_log(_population_log(tmp_path)))[0], 0.99)
    assert summary.slot_labels["1"] == "lr=0.03 strategy=fedadam"
    finals = [r.final_accuracy or 0.0 for r in summary.ranking]
    assert finals == sorted(finals, reverse=True)  # nobody reached 0.99: by final accuracy
    assert {r.slot_id for r in summary.ranking} == {0, 1, 2, "merged"}
    assert [s.event for s in summary.lineage] == ["pbt_exploit", "pbt_explore",
                                                  "merge_evaluated"]
    assert "slot 2 (acc 60.00%) <- copies slot 1 round 2 (acc 80.00%)" in summary.lineage[0].text
    assert "lr 0.03->0.036" in summary.lineage[1].text
    assert [cfg["lr"] for _t, _r, cfg in summary.hyperparameters["2"]] == [0.01, 0.036]
    png = figures.accuracy(summary)
    assert png.startswith(b"\x89PNG")
