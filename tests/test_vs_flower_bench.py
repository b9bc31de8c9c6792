"""bench.vs_flower's pure parts: partitions, parsing and the per-round arithmetic."""

from __future__ import annotations

import argparse

import pytest

from bench import vs_flower
from trainer_worker import data


def test_seeds_parse_and_reject_repeats() -> None:
    """'0,1,2' is three seeds; empty or repeated lists are refused."""
    assert vs_flower.parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("", "1,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            vs_flower.parse_seeds(bad)


def test_candidate_parses_to_a_labelled_setting() -> None:
    """EPOCHS,BATCH,LR,MAX_STEPS becomes a Setting; three fields are refused."""
    got = vs_flower.parse_candidate("1,32,0.05,80")
    assert (got.epochs, got.batch_size, got.lr, got.max_steps) == (1, 32, 0.05, 80)
    assert got.label.startswith("pwfl-candidate")
    with pytest.raises(argparse.ArgumentTypeError):
        vs_flower.parse_candidate("1,32,0.05")


@pytest.mark.skipif(data.find_data_dir(environ={}) is None,
                    reason="needs the Fashion-MNIST IDX files")
def test_flower_clients_get_pwfl_partitions() -> None:
    """Flower's client p trains on exactly PWFL's Dirichlet partition p, for each seed."""
    for seed in (0, 1):
        parts = vs_flower.partition_indices(seed)
        labels = data.load_split("train").labels.numpy()
        expected = data.dirichlet_partition(labels, vs_flower.CLIENTS, vs_flower.ALPHA, seed)
        assert [p for p in parts] == [e.tolist() for e in expected]
    assert vs_flower.partition_indices(0) != vs_flower.partition_indices(1)


def test_pwfl_rounds_charge_the_busiest_agent() -> None:
    """Overhead is round wall minus the busiest agent's summed training; times from round 1."""
    events = []
    for r, t0 in ((1, 100.0), (2, 110.0)):
        events.append({"event": "model_published", "round": r, "ts": t0 + 0.1, "duration_s": 0.1})
        for agent, train in (("a", 2.0), ("a", 3.0), ("b", 4.0)):
            events.append({"event": "update_received", "round": r, "agent_id": agent,
                           "timings": {"train_s": train}})
        events.append({"event": "aggregation_finished", "round": r, "ts": t0 + 5.5})
        events.append({"event": "evaluation_finished", "round": r, "ts": t0 + 7.0,
                       "accuracy": 0.8 + r * 0.03})
    out = vs_flower.pwfl_outcome(events, "x", 0)
    assert out.slowest_train_s == [5.0, 5.0]
    assert out.overhead_s() == pytest.approx(0.5)
    assert out.time_to(0.85) == pytest.approx(17.0)
    assert out.time_to(0.88) is None
    assert out.seconds_per_round() == pytest.approx(8.5)


def test_report_ratios_are_pwfl_over_flower() -> None:
    """The JSON's ratios divide PWFL's default job by Flower's default-like settings."""
    flower = f"flower-sim:{vs_flower.FLOWER_DEFAULTS.label}"
    rows: dict[str, dict[str, float | None]] = {
        flower: {"time_to_85_s": 100.0, "round_overhead_s": 0.2},
        "pwfl:mine": {"time_to_85_s": 40.0, "round_overhead_s": 0.05}}
    for row in rows.values():
        row.update({"time_to_80_s": None, "time_to_88_s": None, "seconds_per_round": 1.0,
                    "final_accuracy": 0.9})
    summary = vs_flower.report(rows, "mine")
    assert summary["time_to_85_vs_flower_sim"] == 0.4
    assert summary["round_overhead_vs_flower_sim"] == 0.25


def test_skips_with_install_hint_without_flower(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With flwr absent the bench prints how to install it and exits 0."""
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert vs_flower.main(["--quick"]) == 0
    assert "pip install 'pwfl[peer]'" in capsys.readouterr().out
