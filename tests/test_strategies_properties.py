"""What must hold for every rule, whatever the updates (hypothesis, bounded to seconds):
fold order never matters, identical updates give themselves back, and each robust rule
stays within a bound set by the honest updates alone when up to its f updates are
arbitrary (far off, near, or colluding)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from coordinator.strategies import (
    STRATEGIES,
    Bulyan,
    FedAvg,
    GeometricMedian,
    Krum,
    Median,
    Strategy,
    TrimmedMean,
    make_strategy,
)
from coordinator.strategies.examples import ServerLrFedAvg

State = dict[str, Tensor]
FEW = settings(max_examples=15, deadline=None)

RULES: dict[str, Callable[[], Strategy]] = {
    **{name: (lambda name=name: make_strategy(name)) for name in STRATEGIES},
    "krum f=1 m=3": lambda: Krum(num_byzantine=1, num_selected=3),
    "trimmed_mean f=2": lambda: TrimmedMean(num_byzantine=2),
    "fedadam flower_compat": lambda: make_strategy("fedadam", flower_compat=True),
    "fedavgm nesterov": lambda: make_strategy("fedavgm", nesterov=True),
    "example server_lr": lambda: ServerLrFedAvg(server_lr=0.5),
}


def random_state(gen: torch.Generator, spread: float = 1.0) -> State:
    return {
        "w": torch.randn(3, 5, generator=gen) * spread,
        "b": torch.randn(5, generator=gen) * spread,
        "n": torch.randint(0, 100, (), generator=gen),
    }


def run_round(strategy: Strategy, start: State, updates: list[tuple[State, int]]) -> State:
    agg = strategy.begin_round(start)
    for update, num_examples in updates:
        strategy.fold(agg, update, num_examples)
    return strategy.finalize(agg, start)


def flat(state: State) -> Tensor:
    """Every tensor as one float64 vector (the integer counter too: rules measure it)."""
    return torch.cat([state[name].double().ravel() for name in ("w", "b", "n")])


@pytest.mark.parametrize("rule", RULES)
@FEW
@given(seed=st.integers(0, 2**31), n=st.integers(1, 10), data=st.data())
def test_fold_order_never_matters(rule: str, seed: int, n: int, data: st.DataObject) -> None:
    """Two rounds folded in one order and in a permuted order give the same models
    (to float32 rounding of the sums), optimiser state included."""
    gen = torch.Generator().manual_seed(seed)
    start = random_state(gen)
    rounds = [[(random_state(gen), int(k)) for k in torch.randint(1, 50, (n,), generator=gen)]
              for _ in range(2)]  # fmt: skip
    order = data.draw(st.permutations(range(n)))
    in_order, permuted = RULES[rule](), RULES[rule]()
    a, b = start, start
    for updates in rounds:
        a = run_round(in_order, a, updates)
        b = run_round(permuted, b, [updates[i] for i in order])
    for name in ("w", "b"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
    assert abs(int(a["n"]) - int(b["n"])) <= 1  # an integer mean may round either way


@pytest.mark.parametrize("rule", ["fedavg", "median", "trimmed_mean", "krum", "bulyan", "geomed"])
@FEW
@given(seed=st.integers(0, 2**31), n=st.integers(3, 9))
def test_identical_updates_give_themselves_back(rule: str, seed: int, n: int) -> None:
    """n copies of one model, any weights: the aggregate is that model (float32 rounding).
    (Bulyan's default f = 1 keeps the global model below 3 updates: see the bounds tests.)"""
    gen = torch.Generator().manual_seed(seed)
    start, update = random_state(gen), random_state(gen)
    weights = [int(k) for k in torch.randint(1, 1000, (n,), generator=gen)]
    result = run_round(make_strategy(rule), start, [(update, w) for w in weights])
    for name in ("w", "b"):
        torch.testing.assert_close(result[name], update[name], rtol=2e-6, atol=2e-6)
    assert int(result["n"]) == int(update["n"])


@pytest.mark.parametrize("rule", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_server_optimisers_stay_put_when_clients_return_the_model(rule: str) -> None:
    """A zero pseudo-gradient from fresh state moves nothing."""
    start = random_state(torch.Generator().manual_seed(0))
    result = run_round(make_strategy(rule), start, [(start, 3), (start, 5)])
    for name in ("w", "b"):
        torch.testing.assert_close(result[name], start[name], rtol=0, atol=0)


# -- robustness: f arbitrary updates among n ------------------------------------------


def attack(
    gen: torch.Generator, honest: list[State], f: int, magnitude: float, colluding: bool
) -> list[State]:
    """f updates at the honest mean plus `magnitude` times a random direction; colluding
    attackers all send the same one."""
    centre = {k: torch.stack([h[k].float() for h in honest]).mean(0) for k in ("w", "b")}
    counter = torch.tensor(int(magnitude))  # the integer buffer is attacked too
    made: list[State] = []
    for _ in range(f):
        if colluding and made:
            made.append(made[0])
            continue
        made.append({"w": centre["w"] + torch.randn(3, 5, generator=gen) * magnitude,
                     "b": centre["b"] + torch.randn(5, generator=gen) * magnitude,
                     "n": counter})  # fmt: skip
    return made


def within_honest_range(result: State, honest: list[State], widen: float = 0.0) -> bool:
    """Each coordinate within the honest minimum and maximum, widened by `widen` widths."""
    stack = torch.stack([flat(h) for h in honest])
    low, high = stack.min(0).values, stack.max(0).values
    slack = (high - low) * widen + 1e-5
    value = flat(result)
    return bool(((value >= low - slack) & (value <= high + slack)).all())


def honest_diameter(honest: list[State]) -> float:
    stack = torch.stack([flat(h) for h in honest])
    return float(torch.cdist(stack, stack).max())


ATTACK = {
    "seed": st.integers(0, 2**31),
    "f": st.integers(1, 3),
    "extra": st.integers(0, 3),
    "magnitude": st.sampled_from([0.1, 3.0, 1e3, 1e6]),
    "colluding": st.booleans(),
}


def honest_and_attackers(
    seed: int, honest_count: int, f: int, magnitude: float, colluding: bool
) -> tuple[list[State], list[tuple[State, int]]]:
    gen = torch.Generator().manual_seed(seed)
    honest = [random_state(gen) for _ in range(honest_count)]
    attackers = attack(gen, honest, f, magnitude, colluding)
    updates = [(u, 10) for u in honest + attackers]
    order = torch.randperm(len(updates), generator=gen).tolist()
    return honest, [updates[i] for i in order]


@FEW
@given(**ATTACK)
def test_median_and_trimmed_mean_stay_in_the_honest_range(
    seed: int, f: int, extra: int, magnitude: float, colluding: bool
) -> None:
    """With f < n / 2 (median) or f trimmed at each end, every coordinate lies within the
    honest updates' range: the attackers cannot pull it out, however far they are."""
    honest, updates = honest_and_attackers(seed, f + 1 + extra, f, magnitude, colluding)
    start = random_state(torch.Generator().manual_seed(1))
    for strategy in (Median(), TrimmedMean(num_byzantine=f)):
        assert within_honest_range(run_round(strategy, start, updates), honest), strategy.name


@FEW
@given(**ATTACK)
def test_krum_and_multi_krum_stay_near_the_honest_updates(
    seed: int, f: int, extra: int, magnitude: float, colluding: bool
) -> None:
    """With n >= 2f + 3, Krum's choice (and each of multi-Krum's m <= n - f) has a score no
    worse than an honest one, so it lies within sqrt(n - f - 2) honest diameters of an
    honest update; far attackers are never chosen."""
    n = 2 * f + 3 + extra
    honest, updates = honest_and_attackers(seed, n - f, f, magnitude, colluding)
    diameter = honest_diameter(honest)
    centre = torch.stack([flat(h) for h in honest]).mean(0)
    start = random_state(torch.Generator().manual_seed(1))
    bound = (math.sqrt(n - f - 2) + 1) * diameter + 1e-4
    for m in (1, n - f):
        result = flat(run_round(Krum(num_byzantine=f, num_selected=m), start, updates))
        assert float((result - centre).norm()) <= bound, (m, float((result - centre).norm()))
        if magnitude >= 1e3:
            assert within_honest_range(run_round(Krum(num_byzantine=f), start, updates), honest)


@FEW
@given(**ATTACK)
def test_bulyan_stays_within_the_honest_range_widened_once(
    seed: int, f: int, extra: int, magnitude: float, colluding: bool
) -> None:
    """With n >= 4f + 3, each coordinate is within the honest range widened by its own
    width on each side (the values kept are no farther from an in-range median than an
    honest value); far attackers leave it inside the honest range."""
    n = 4 * f + 3 + extra
    honest, updates = honest_and_attackers(seed, n - f, f, magnitude, colluding)
    start = random_state(torch.Generator().manual_seed(1))
    result = run_round(Bulyan(num_byzantine=f), start, updates)
    assert within_honest_range(result, honest, widen=1.0)
    if magnitude >= 1e3:
        assert within_honest_range(result, honest)


@FEW
@given(**ATTACK)
def test_geometric_median_stays_within_its_breakdown_bound(
    seed: int, f: int, extra: int, magnitude: float, colluding: bool
) -> None:
    """Attackers with less than half the weight move the geometric median at most
    2 r H / (H - A) from the honest mean (r: the honest radius, H and A the honest and
    attacking weights), whatever they send."""
    honest, updates = honest_and_attackers(seed, f + 1 + extra, f, magnitude, colluding)
    centre = torch.stack([flat(h) for h in honest]).mean(0)
    radius = max(float((flat(h) - centre).norm()) for h in honest)
    weight_h, weight_a = 10.0 * len(honest), 10.0 * f
    bound = 2 * radius * weight_h / (weight_h - weight_a)
    start = random_state(torch.Generator().manual_seed(1))
    result = flat(run_round(GeometricMedian(), start, updates))
    distance = float((result - centre).norm())
    assert distance <= bound * 1.001 + 1e-4, (distance, bound)


def test_fedavg_has_no_such_bound() -> None:
    """For contrast: one far update drags FedAvg out of the honest range."""
    honest, updates = honest_and_attackers(0, 5, 1, 1e3, False)
    start = random_state(torch.Generator().manual_seed(1))
    assert not within_honest_range(run_round(FedAvg(), start, updates), honest)
