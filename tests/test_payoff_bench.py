"""bench.payoff's reading of runs: targets, equal wall time, mean and spread, the verdict."""

from __future__ import annotations

import pytest

from bench.payoff import RunResult, accuracy_at, render, table, time_to, verdict


def result(mode: str, seed: int, curve: list[tuple[float, float]]) -> RunResult:
    times = {f"{t:g}": time_to(curve, t) for t in (0.80, 0.85)}
    return RunResult(mode=mode, seed=seed, wall_s=curve[-1][0], time_to=times,
                     jobs_to={k: None if v is None else int(v) for k, v in times.items()},
                     curve=curve, final_best=curve[-1][1], client_busy=0.5,
                     coordinator_busy=0.5, jobs=60)


def test_targets_and_accuracy_at_a_time_read_the_best_so_far_curve() -> None:
    """The first time the curve reaches a target; the last point at or before a time."""
    curve = [(10.0, 0.7), (20.0, 0.82), (30.0, 0.86)]
    assert (time_to(curve, 0.80), time_to(curve, 0.85), time_to(curve, 0.9)) == (20.0, 30.0, None)
    assert (accuracy_at(curve, 25.0), accuracy_at(curve, 5.0)) == (0.82, None)


def test_verdict_compares_the_best_multi_slot_mode_with_one_slot() -> None:
    """Time to 85% as a ratio of one slot's, accuracy gain at the seed's shortest wall time."""
    results = [result("one", s, [(10.0, 0.8), (40.0, 0.85), (50.0, 0.86)]) for s in (0, 1)]
    results += [result("merged", s, [(10.0, 0.84), (20.0, 0.87), (45.0, 0.88)]) for s in (0, 1)]
    results += [result("independent", s, [(10.0, 0.7), (30.0, 0.75)]) for s in (0, 1)]
    rows = table(results)
    assert rows["merged"]["time_to_0.85"] == {"mean": 20.0, "spread": 0.0, "missing": 0}
    assert rows["independent"]["time_to_0.85"]["missing"] == 2
    found = verdict(rows)
    assert found["best_mode"] == "merged"
    assert found["best_time_to_85_vs_one_slot"] == pytest.approx(0.5)
    assert found["best_accuracy_gain_points"] == pytest.approx((0.87 - 0.8) * 100)  # at t=30
    assert found["goal_met"] is True
    assert "never" in render(rows)
