"""Robust rules state their bounds: a round with too few updates for the rule's f logs
`strategy_bounds_unmet` and takes the median (honest majority) or keeps the model;
the new rules' options; late updates' weight in the robust rules."""

from __future__ import annotations

import pytest
import torch
from structlog.testing import capture_logs
from torch import Tensor

from coordinator.strategies import (
    Bulyan,
    FedAdam,
    FedAvgM,
    GeometricMedian,
    Krum,
    Median,
    Strategy,
    StrategyError,
    TrimmedMean,
    make_strategy,
)

State = dict[str, Tensor]
START = {"x": torch.zeros(1)}


def run_values(
    strategy: Strategy, values: list[float], scales: list[float] | None = None
) -> tuple[float, list[dict[str, object]]]:
    """One round of one-number updates; the result and the events logged."""
    agg = strategy.begin_round(START)
    for value, scale in zip(values, scales or [1.0] * len(values), strict=True):
        strategy.fold(agg, {"x": torch.tensor([value])}, 10, scale)
    with capture_logs() as events:
        result = strategy.finalize(agg, START)["x"].item()
    return result, events


@pytest.mark.parametrize(
    ("strategy", "values", "required", "action", "expected"),
    [
        (Krum(num_byzantine=1), [1.0, 2.0, 3.0, 100.0], "n >= 2f + 3", "median", 2.5),
        (Krum(num_byzantine=1), [1.0, 100.0], "n >= 2f + 3", "kept_global_model", 0.0),
        (Krum(num_byzantine=1, fallback="keep"), [1.0, 2.0, 3.0, 100.0], "n >= 2f + 3",
         "kept_global_model", 0.0),
        (Krum(num_byzantine=1, num_selected=5), [1.0, 2.0, 3.0, 4.0, 100.0],
         "num_selected <= n - f", "median", 3.0),
        (Bulyan(num_byzantine=1), [1.0, 2.0, 3.0, 4.0, 100.0], "n >= 4f + 3", "median", 3.0),
        (Bulyan(num_byzantine=2), [1.0, 2.0, 100.0, 200.0], "n >= 4f + 3",
         "kept_global_model", 0.0),
        (TrimmedMean(beta=0.1), [1.0, 2.0, 3.0, 4.0, 100.0], "int(beta * n) >= 1", "median", 3.0),
        (TrimmedMean(num_byzantine=2), [1.0, 2.0, 100.0, 200.0], "n >= 2f + 1",
         "kept_global_model", 0.0),
    ],
)  # fmt: skip
def test_a_round_below_the_bound_is_logged_and_falls_back(
    strategy: Strategy, values: list[float], required: str, action: str, expected: float
) -> None:
    """Too few updates for f: the event names rule, n, f, the requirement and the action;
    the median where honest updates are still a majority, else the model is kept."""
    result, events = run_values(strategy, values)
    assert result == pytest.approx(expected)
    assert [e["event"] for e in events] == ["strategy_bounds_unmet"]
    event = events[0]
    assert (event["rule"], event["n"], event["required"], event["action"]) == (
        strategy.name, len(values), required, action)  # fmt: skip


@pytest.mark.parametrize(
    ("strategy", "values", "expected"),
    [
        (Krum(num_byzantine=1), [1.0, 1.1, 1.2, 0.9, 100.0], 1.0),
        (Bulyan(num_byzantine=1), [1.0, 1.1, 1.2, 0.9, 1.05, 0.95, 100.0], 1.0),
        (TrimmedMean(beta=0.2), [1.0, 2.0, 3.0, 4.0, 100.0], 3.0),
        (TrimmedMean(num_byzantine=1), [1.0, 2.0, 3.0, 100.0], 2.5),
    ],
)
def test_a_round_within_the_bound_logs_nothing(
    strategy: Strategy, values: list[float], expected: float
) -> None:
    """Enough updates: the rule itself runs, silently, and ignores the outlier."""
    result, events = run_values(strategy, values)
    assert result == pytest.approx(expected, abs=0.11)
    assert min(values) <= result <= sorted(values)[-2]
    assert events == []


def test_bulyan_keeps_the_values_closest_to_the_median() -> None:
    """n = 7, f = 1: Krum picks 5 of the six inliers, the 3 closest to their median are
    averaged, so the result is the mean of three neighbouring values in the middle."""
    result, _ = run_values(Bulyan(num_byzantine=1), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1000.0])
    assert 2.0 <= result <= 3.0


def test_robust_rules_count_each_update_once_whatever_its_staleness() -> None:
    """Median ignores the staleness weight (documented); the geometric median uses it only
    with weighted=true (its default counts each update once, issue 23)."""
    values, fresh, stale = [1.0, 2.0, 10.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.01]
    assert run_values(Median(), values, stale)[0] == run_values(Median(), values, fresh)[0]
    plain = run_values(GeometricMedian(weighted=True), [1.0, 10.0], [1.0, 1.0])[0]
    weighted = run_values(GeometricMedian(weighted=True), [1.0, 10.0], [1.0, 0.01])[0]
    assert weighted == pytest.approx(1.0, abs=1e-3)
    assert weighted != pytest.approx(plain)
    unweighted = run_values(GeometricMedian(weighted=False), [1.0, 10.0], [1.0, 0.01])[0]
    assert unweighted == pytest.approx(plain)
    assert run_values(GeometricMedian(), [1.0, 10.0], [1.0, 0.01])[0] == pytest.approx(plain)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("krum", {"fallback": "mean"}, "fallback"),
        ("bulyan", {"num_byzantine": -1}, "num_byzantine"),
        ("trimmed_mean", {"num_byzantine": -1}, "num_byzantine"),
        ("geomed", {"nu": 0}, "nu"),
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedavgm", {"server_lr": 0}, "server_lr"),
        ("fedadam", {"flower_compat": True, "bias_correction": True}, "flower_compat"),
    ],
)
def test_bad_options_are_refused(name: str, options: dict[str, object], match: str) -> None:
    """Each option is checked when the strategy is built, with the option named."""
    with pytest.raises(StrategyError, match=match):
        make_strategy(name, **options)


def test_new_rules_by_name_alias_and_options() -> None:
    """fedavgm, bulyan, geomed (alias rfa) build with their options from the command line."""
    assert isinstance(make_strategy("rfa", nu=1e-5, max_iter=5), GeometricMedian)
    momentum = make_strategy("fedavgm", server_lr=0.5, momentum=0.8, nesterov=True)
    assert isinstance(momentum, FedAvgM)
    assert (momentum.server_lr, momentum.momentum, momentum.nesterov) == (0.5, 0.8, True)
    assert make_strategy("bulyan", num_byzantine=2).num_byzantine == 2  # type: ignore[attr-defined]
    assert make_strategy("fedyogi", flower_compat=True).flower_compat  # type: ignore[attr-defined]


def test_flower_compat_first_fedadam_step_in_closed_form() -> None:
    """Ours starts v at tau^2 with eta as given (Reddi Alg. 2); Flower's starts v at 0 and
    scales eta by sqrt(1 - b2^2) / (1 - b1^2) in round 1."""
    start = {"x": torch.zeros(1, dtype=torch.float64)}
    update = {"x": torch.ones(1, dtype=torch.float64)}
    results = []
    for strategy in (FedAdam(tau=1e-3), FedAdam(tau=1e-3, flower_compat=True)):
        agg = strategy.begin_round(start)
        strategy.fold(agg, update, 1)
        results.append(strategy.finalize(agg, start)["x"].item())
    m, tau = 0.1, 1e-3
    ours = 0.1 * m / ((0.99 * tau**2 + 0.01) ** 0.5 + tau)
    flower = 0.1 * (1 - 0.99**2) ** 0.5 / (1 - 0.9**2) * m / (0.01**0.5 + tau)
    assert results == pytest.approx([ours, flower], rel=1e-12)
