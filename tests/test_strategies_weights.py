"""Claims buy no influence over the robust rules (issue 23), whatever the weights
(hypothesis, bounded to seconds): their choice never reads num_examples, and an attacker
that claims the most a result may (1e9) moves no rule out of its honest bound."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from coordinator.strategies import (
    Bulyan,
    FedAvg,
    GeometricMedian,
    Krum,
    Median,
    Strategy,
    TrimmedMean,
)
from tests.test_strategies_properties import (
    ATTACK,
    FEW,
    State,
    flat,
    honest_and_attackers,
    honest_diameter,
    random_state,
    run_round,
    within_honest_range,
)

MAX_CLAIM = 10**9  # the most a result may claim (coordinator.results.validation)

# Every rule whose choice must not read a count, built for f attackers.
UNWEIGHTED: dict[str, Callable[[int], Strategy]] = {
    "median": lambda f: Median(),
    "trimmed_mean": lambda f: TrimmedMean(num_byzantine=f),
    "krum": lambda f: Krum(num_byzantine=f),
    "bulyan": lambda f: Bulyan(num_byzantine=f),
    "geomed": lambda f: GeometricMedian(),
}

WEIGHTS = {
    "honest_weights": st.lists(st.integers(1, 10_000), min_size=1, max_size=16),
    "attacker_weight": st.sampled_from([1, 10, 10**6, MAX_CLAIM]),
}


def reweighted(updates: list[tuple[State, int]], honest: list[State], honest_weights: list[int],
               attacker_weight: int) -> list[tuple[State, int]]:
    """The same updates with the honest ones weighted as drawn and the attackers' claims
    set to `attacker_weight`."""
    honest_ids = {id(h) for h in honest}
    weights = itertools.cycle(honest_weights)
    return [(u, next(weights) if id(u) in honest_ids else attacker_weight) for u, _ in updates]


@pytest.mark.parametrize("rule", UNWEIGHTED)
@FEW
@given(**ATTACK, **WEIGHTS)
def test_claims_do_not_change_what_a_robust_rule_returns(
    rule: str, seed: int, f: int, extra: int, magnitude: float, colluding: bool,
    honest_weights: list[int], attacker_weight: int,
) -> None:
    """Median, trimmed mean, Krum, Bulyan and the geometric median (default) return what
    they return when every update claims one example (Krum's one pick to float rounding:
    it is divided by its own weight), whoever claims what."""
    n = 4 * f + 3 + extra  # within every rule's bound
    honest, updates = honest_and_attackers(seed, n - f, f, magnitude, colluding)
    start = random_state(torch.Generator().manual_seed(1))
    claimed = reweighted(updates, honest, honest_weights, attacker_weight)
    plain = run_round(UNWEIGHTED[rule](f), start, [(u, 1) for u, _ in updates])
    result = run_round(UNWEIGHTED[rule](f), start, claimed)
    for name in plain:
        torch.testing.assert_close(result[name], plain[name], rtol=1e-6, atol=1e-9)


@FEW
@given(**ATTACK, **WEIGHTS)
def test_multi_krum_weights_only_what_it_selected(
    seed: int, f: int, extra: int, magnitude: float, colluding: bool,
    honest_weights: list[int], attacker_weight: int,
) -> None:
    """Multi-Krum (m = n - f) weights its picks by their claims after choosing them without
    claims, so an attacker claiming up to 1e9 stays within (sqrt(n - f - 2) + 1) honest
    diameters of the honest mean, as with equal claims."""
    n = 2 * f + 3 + extra
    honest, updates = honest_and_attackers(seed, n - f, f, magnitude, colluding)
    start = random_state(torch.Generator().manual_seed(1))
    claimed = reweighted(updates, honest, honest_weights, attacker_weight)
    centre = torch.stack([flat(h) for h in honest]).mean(0)
    bound = (math.sqrt(n - f - 2) + 1) * honest_diameter(honest) + 1e-4
    result = flat(run_round(Krum(num_byzantine=f, num_selected=n - f), start, claimed))
    assert float((result - centre).norm()) <= bound


def issue_round(num_examples: int) -> list[tuple[State, int]]:
    """Issue 23's round: seven honest updates near 0, one of 1000 claiming `num_examples`."""
    gen = torch.Generator().manual_seed(23)
    honest = [{k: v * 1e-3 for k, v in random_state(gen).items() if k != "n"} for _ in range(7)]
    attacker = {k: torch.full_like(v, 1000.0) for k, v in honest[0].items()}
    return [(h, 100) for h in honest] + [(attacker, num_examples)]


@pytest.mark.parametrize("rule", UNWEIGHTED)
def test_issue_23_one_claim_of_1e9_moves_no_robust_rule(rule: str) -> None:
    """The issue's reproduction: seven honest updates near 0 and one of 1000 claiming 1e9;
    the geometric median returned the attacker's value, now no robust rule leaves the
    honest range (and none differs from the round where the attacker claims 100)."""
    start = {k: torch.zeros_like(v) for k, v in issue_round(1)[0][0].items()}
    updates = issue_round(MAX_CLAIM)
    honest = [u for u, _ in updates[:7]]
    result = run_round(UNWEIGHTED[rule](1), start, updates)
    stack = torch.stack([torch.cat([h[k].ravel() for k in sorted(h)]) for h in honest])
    value = torch.cat([result[k].ravel() for k in sorted(result)])
    assert bool((value >= stack.min(0).values - 1e-6).all())
    assert bool((value <= stack.max(0).values + 1e-6).all())
    modest = run_round(UNWEIGHTED[rule](1), start, issue_round(100))
    assert all(torch.equal(result[k], modest[k]) for k in result)


def test_issue_23_weighted_geomed_and_fedavg_still_follow_the_claim() -> None:
    """For contrast: with weighted=true the geometric median (and FedAvg) follow a claim of
    1e9, which is why claims are capped before any rule weights by them."""
    start = {k: torch.zeros_like(v) for k, v in issue_round(1)[0][0].items()}
    updates = issue_round(MAX_CLAIM)
    for strategy in (GeometricMedian(weighted=True), FedAvg()):
        result = run_round(strategy, start, updates)
        assert float(result["w"].mean()) > 900.0, strategy.name


def test_within_honest_range_is_what_the_rules_promise() -> None:
    """Sanity: the helper rejects a model out of the honest range (the attacker's)."""
    updates = issue_round(MAX_CLAIM)
    honest = [u | {"n": torch.tensor(0)} for u, _ in updates[:7]]
    attacker = updates[7][0] | {"n": torch.tensor(0)}
    assert not within_honest_range(attacker, honest)
