"""bench.robust's verdict on made-up outcomes, and the options it gives each rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.robust import Outcome, Settings, cells, coordinator_argv, rule_options, summarise

SETTINGS = Settings("fashion_mnist", 8, 2, 8, 30, 0.5, 10.0, 1.0)


def _outcomes(accuracy: dict[tuple[str, str], list[float]]) -> list[Outcome]:
    return [Outcome(rule, attack, seed, acc, False, 0, 1.0, SETTINGS)
            for (rule, attack), values in accuracy.items() for seed, acc in enumerate(values)]


def test_best_rule_has_the_smallest_worst_gap() -> None:
    """best_rule minimises the largest shortfall to clean FedAvg over the attacks."""
    table = cells(_outcomes({
        ("fedavg", "none"): [0.80, 0.82], ("fedavg", "sign_flip"): [0.10, 0.10],
        ("fedavg", "alie"): [0.78, 0.80],
        ("median", "none"): [0.76, 0.78], ("median", "sign_flip"): [0.77, 0.79],
        ("median", "alie"): [0.70, 0.72],
        ("krum", "none"): [0.70, 0.70], ("krum", "sign_flip"): [0.75, 0.75],
        ("krum", "alie"): [0.74, 0.76],
    }))
    out = summarise(table, ["fedavg", "median", "krum"], ["none", "sign_flip", "alie"])
    assert out["clean_fedavg_accuracy"] == pytest.approx(81.0)
    assert out["worst_gap_points_by_rule"] == {"fedavg": 71.0, "median": 10.0, "krum": 6.0}
    assert (out["best_rule"], out["worst_gap_points"]) == ("krum", 6.0)
    assert table[("median", "alie")].low == pytest.approx(70.0)


def test_rules_are_told_the_number_of_attackers() -> None:
    """Krum gets num_byzantine=f, trimmed mean trims f/n, FedAvg takes nothing."""
    assert rule_options("krum", 8, 2) == {"num_byzantine": 2}
    assert rule_options("fedavg", 8, 2) == {}
    assert rule_options("trimmed_mean", 8, 2) in ({"beta": 0.25}, {"num_byzantine": 2})


def test_attackers_are_the_highest_client_ids() -> None:
    """The run uses the attack task with the attackers 7 and 6 and the rule's options."""
    argv = coordinator_argv(SETTINGS, "krum", "alie", 3, "unix:///r.sock", Path("/tmp"), "x")
    text = " ".join(argv)
    assert 'attackers="7,6"' in text
    assert "attack=\"alie\"" in text
    assert "partition_seed=3" in text
    assert "--strategy krum --no-progress" in text
    assert "num_byzantine=2" in text
