"""Aggregation strategies: streaming FedAvg, server optimisers, robust rules, the factory."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from coordinator.strategies import (
    STRATEGIES,
    Aggregate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedYogi,
    Krum,
    Median,
    Strategy,
    StrategyError,
    TrimmedMean,
    make_strategy,
)
from coordinator.strategies.functional import (
    accumulator_dtype,
    cast_back,
    coordinate_median,
    krum_select,
    pairwise_squared_distances,
    trimmed_mean,
    weighted_mean,
)

State = dict[str, Tensor]


def random_state(gen: torch.Generator, dtype: torch.dtype = torch.float32) -> State:
    """A small model: a weight, a bias and BatchNorm's integer counter."""
    return {
        "w": (torch.randn(3, 4, generator=gen) * 2).to(dtype),
        "b": torch.randn(4, generator=gen).to(dtype),
        "num_batches_tracked": torch.randint(0, 1000, (), generator=gen),
    }


def reference_mean(states: list[State], weights: list[float], name: str) -> Tensor:
    """The weighted mean computed at once in float64, independently of the fold."""
    stack = torch.stack([s[name].to(torch.float64) for s in states])
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * (stack.dim() - 1)))
    return (stack * w).sum(0) / w.sum()


def run_round(strategy: Strategy, start: State, updates: list[tuple[State, int]]) -> State:
    agg = strategy.begin_round(start)
    for update, num_examples in updates:
        strategy.fold(agg, update, num_examples)
    return strategy.finalize(agg, start)


# -- functional ----------------------------------------------------------------------


def test_accumulator_dtypes() -> None:
    """Half precisions and bool sum in float32; float64 and integers in float64."""
    assert accumulator_dtype(torch.float16) == torch.float32
    assert accumulator_dtype(torch.bfloat16) == torch.float32
    assert accumulator_dtype(torch.float32) == torch.float32
    assert accumulator_dtype(torch.bool) == torch.float32
    assert accumulator_dtype(torch.float64) == torch.float64
    assert accumulator_dtype(torch.int64) == torch.float64
    with pytest.raises(ValueError, match="complex"):
        accumulator_dtype(torch.complex64)


def test_cast_back_rounds_integers_and_takes_bool_majority() -> None:
    """Integers are rounded, bools are True above one half, floats just cast."""
    value = torch.tensor([0.4, 0.6, 2.5001], dtype=torch.float64)
    assert cast_back(value, torch.int64).tolist() == [0, 1, 3]
    assert cast_back(value, torch.bool).tolist() == [False, True, True]
    assert cast_back(value, torch.float16).dtype == torch.float16


def test_weighted_mean_falls_back_to_uniform_for_zero_weights() -> None:
    """Zero total weight averages uniformly instead of dividing by zero."""
    stack = torch.tensor([[1.0], [3.0]])
    assert weighted_mean(stack, torch.tensor([1.0, 3.0])).item() == pytest.approx(2.5)
    assert weighted_mean(stack, torch.tensor([0.0, 0.0])).item() == pytest.approx(2.0)


def test_median_odd_even_and_outlier() -> None:
    """The coordinate median ignores an outlier; an even count averages the middle two."""
    assert coordinate_median(torch.tensor([[1.0, 5.0], [2.0, 6.0], [100.0, -90.0]])).tolist() == [
        2.0,
        5.0,
    ]
    assert coordinate_median(torch.tensor([1.0, 2.0, 3.0, 100.0])).item() == 2.5


def test_trimmed_mean_drops_extremes() -> None:
    """beta 0.25 of four values drops the lowest and the highest (the outlier)."""
    stack = torch.tensor([1.0, 2.0, 3.0, 100.0])
    assert trimmed_mean(stack, 0.25).item() == 2.5
    assert trimmed_mean(stack, 0.0).item() == 26.5
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean(stack, 0.5)


def cluster_with_outlier() -> list[State]:
    points = [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [0.1, 0.1], [50.0, 50.0]]
    return [{"p": torch.tensor(p)} for p in points]


def test_krum_picks_a_clustered_point_never_the_outlier() -> None:
    """Krum with f=1 selects from the cluster; multi-Krum's m best exclude the outlier.
    The four corners tie on score; the tie goes by sorted distances, not by index."""
    distances = pairwise_squared_distances(cluster_with_outlier())
    assert distances[0, 4].item() == pytest.approx(5000.0)
    assert krum_select(distances, num_byzantine=1) == [3]
    reversed_order = distances.flip(0).flip(1)
    assert krum_select(reversed_order, num_byzantine=1) == [1]  # the same point, [0.1, 0.1]
    assert 4 not in krum_select(distances, num_byzantine=1, num_selected=4)


# -- FedAvg --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    weights=st.lists(st.integers(1, 500), min_size=1, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_streaming_fedavg_equals_the_weighted_mean(
    seed: int, weights: list[int], dtype: torch.dtype
) -> None:
    """Folding one update at a time gives the stacked weighted mean, in every dtype."""
    gen = torch.Generator().manual_seed(seed)
    start = random_state(gen, dtype)
    updates = [random_state(gen, dtype) for _ in weights]
    result = run_round(FedAvg(), start, list(zip(updates, weights, strict=True)))
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    for name in ("w", "b"):
        expected = reference_mean(updates, [float(w) for w in weights], name)
        assert result[name].dtype == dtype
        torch.testing.assert_close(
            result[name].to(torch.float64),
            expected.to(dtype).to(torch.float64),
            rtol=tolerance,
            atol=tolerance,
        )
    counter = reference_mean(updates, [float(w) for w in weights], "num_batches_tracked")
    assert result["num_batches_tracked"].dtype == torch.int64
    assert result["num_batches_tracked"].item() == round(counter.item())


def test_fedavg_memory_is_one_accumulator_per_tensor() -> None:
    """Fifty folds reuse the accumulators created at begin_round and keep no update."""
    gen = torch.Generator().manual_seed(0)
    start = random_state(gen)
    strategy = FedAvg()
    agg = strategy.begin_round(start)
    pointers = {name: acc.data_ptr() for name, acc in agg.sums.items()}
    for _ in range(50):
        strategy.fold(agg, random_state(gen), num_examples=10)
    assert {name: acc.data_ptr() for name, acc in agg.sums.items()} == pointers
    assert agg.kept == []
    assert (agg.count, agg.num_examples, agg.total_weight) == (50, 500, 500.0)
    assert agg.sums["w"].dtype == torch.float32
    assert agg.sums["num_batches_tracked"].dtype == torch.float64


def test_scale_multiplies_the_weight() -> None:
    """An update folded with scale 0.5 counts like half its examples."""
    start = {"x": torch.zeros(1)}
    strategy = FedAvg()
    agg = strategy.begin_round(start)
    strategy.fold(agg, {"x": torch.tensor([0.0])}, num_examples=10)
    strategy.fold(agg, {"x": torch.tensor([3.0])}, num_examples=10, scale=0.5)
    assert agg.total_weight == 15.0
    assert strategy.finalize(agg, start)["x"].item() == pytest.approx(1.0)


def test_finalize_without_updates_returns_the_global_state() -> None:
    """No update (or only zero-weight ones) leaves the model unchanged."""
    start = {"x": torch.ones(2)}
    strategy = FedAvg()
    assert strategy.finalize(strategy.begin_round(start), start) is start
    agg = strategy.begin_round(start)
    strategy.fold(agg, {"x": torch.zeros(2)}, num_examples=0)
    assert strategy.finalize(agg, start) is start


def test_bool_tensors_take_the_weighted_majority() -> None:
    """A bool mask becomes True where more than half the weight says True."""
    start = {"mask": torch.tensor([False, False, True])}
    updates = [
        ({"mask": torch.tensor([True, False, True])}, 3),
        ({"mask": torch.tensor([False, True, False])}, 1),
    ]
    result = run_round(FedAvg(), start, updates)
    assert result["mask"].tolist() == [True, False, True]


def test_fold_reads_read_only_views_without_writing_them() -> None:
    """Updates that are frombuffer views over received bytes are folded and left intact."""
    payload = bytes(torch.arange(4, dtype=torch.float32).numpy().tobytes())
    view = torch.frombuffer(payload, dtype=torch.float32)
    start = {"x": torch.zeros(4)}
    result = run_round(FedAvg(), start, [({"x": view}, 2)])
    assert result["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert payload == torch.arange(4, dtype=torch.float32).numpy().tobytes()


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"x": torch.zeros(1)}, "shape"),
        ({"x": torch.zeros(3), "y": torch.zeros(1)}, "unexpected"),
        ({}, "missing"),
    ],
)
def test_mismatched_update_is_refused(update: State, match: str) -> None:
    """An update with other names or shapes (even broadcastable) is refused, not folded."""
    strategy = FedAvg()
    agg = strategy.begin_round({"x": torch.zeros(3)})
    with pytest.raises(StrategyError, match=match):
        strategy.fold(agg, update, num_examples=1)
    assert agg.count == 0


def test_negative_weight_is_refused() -> None:
    """Negative num_examples or scale is refused."""
    strategy = FedAvg()
    agg = strategy.begin_round({"x": torch.zeros(1)})
    with pytest.raises(StrategyError, match="non-negative"):
        strategy.fold(agg, {"x": torch.zeros(1)}, num_examples=1, scale=-1.0)


# -- server optimisers ---------------------------------------------------------------


def adaptive_by_hand(
    x: float, avgs: list[float], second: str, eta: float, b1: float, b2: float, tau: float
) -> float:
    """Reddi et al. Algorithm 2 on one scalar, in plain Python floats."""
    m, v = 0.0, tau * tau
    for avg in avgs:
        delta = avg - x
        m = b1 * m + (1 - b1) * delta
        if second == "adam":
            v = b2 * v + (1 - b2) * delta * delta
        elif second == "yogi":
            v = v - (1 - b2) * delta * delta * math.copysign(1.0, v - delta * delta)
        else:
            v = v + delta * delta
        x = x + eta * m / (math.sqrt(v) + tau)
    return x


@pytest.mark.parametrize(
    ("strategy", "second", "b2"),
    [
        (FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3), "adam", 0.99),
        (FedYogi(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3), "yogi", 0.99),
        (FedAdagrad(eta=0.1, beta_1=0.5, tau=1e-3), "adagrad", 0.0),
    ],
)
def test_server_optimisers_match_a_hand_computed_step(
    strategy: FedAdam, second: str, b2: float
) -> None:
    """Three rounds of each optimiser equal Algorithm 2 computed by hand, state carried."""
    x = torch.tensor([1.0, -2.0], dtype=torch.float64)
    client_models = [[1.5, -2.5], [0.5, -1.0], [2.0, -2.0]]
    for target in client_models:
        update = {"x": torch.tensor(target, dtype=torch.float64)}
        x = run_round(strategy, {"x": x}, [(update, 5)])["x"]
    for i in range(2):
        expected = adaptive_by_hand(
            [1.0, -2.0][i],
            [t[i] for t in client_models],
            second,
            strategy.eta,
            strategy.beta_1,
            b2,
            strategy.tau,
        )
        assert x[i].item() == pytest.approx(expected, rel=1e-9)
    assert strategy.step == 3


def test_fedadam_bias_correction_scales_eta() -> None:
    """With bias correction the first step is eta * sqrt(1 - b2) / (1 - b1) times larger."""
    plain, corrected = FedAdam(tau=1e-3), FedAdam(tau=1e-3, bias_correction=True)
    start = {"x": torch.zeros(1, dtype=torch.float64)}
    update = [({"x": torch.ones(1, dtype=torch.float64)}, 1)]
    a = run_round(plain, start, update)["x"].item()
    b = run_round(corrected, start, update)["x"].item()
    assert b / a == pytest.approx(math.sqrt(1 - 0.99) / (1 - 0.9))


def test_optimiser_leaves_integer_buffers_to_fedavg() -> None:
    """num_batches_tracked takes the averaged value, not an adaptive step."""
    start = {"w": torch.zeros(2), "n": torch.tensor(10)}
    result = run_round(FedAdam(), start, [({"w": torch.ones(2), "n": torch.tensor(14)}, 1)])
    assert result["n"].item() == 14
    assert result["w"].dtype == torch.float32


def test_optimiser_state_round_trips_through_state_dict() -> None:
    """A fresh FedYogi loaded from a checkpoint takes the same next step as the original."""
    gen = torch.Generator().manual_seed(1)
    start = random_state(gen)
    first, second = random_state(gen), random_state(gen)
    original = FedYogi()
    model = run_round(original, start, [(first, 3)])
    restored = FedYogi()
    restored.load_state_dict(original.state_dict())
    assert restored.step == 1
    torch.testing.assert_close(
        run_round(restored, model, [(second, 3)]), run_round(original, model, [(second, 3)])
    )


def test_stateless_and_bad_state_are_refused() -> None:
    """FedAvg's state is empty; an unexpected key is refused."""
    assert FedAvg().state_dict() == {}
    with pytest.raises(StrategyError):
        FedAvg().load_state_dict({"m.x": torch.zeros(1)})
    with pytest.raises(StrategyError, match="unexpected"):
        FedAdam().load_state_dict({"q.x": torch.zeros(1)})


def test_optimiser_options_are_validated() -> None:
    """A non-positive eta or a beta outside [0, 1) is refused."""
    with pytest.raises(StrategyError):
        FedAdam(eta=0.0)
    with pytest.raises(StrategyError):
        FedYogi(beta_2=1.0)


# -- robust rules --------------------------------------------------------------------


def test_robust_rules_are_not_streaming_and_copy_updates() -> None:
    """A robust rule keeps its own copy: changing the received buffer later changes nothing."""
    buffer = bytearray(torch.ones(2).numpy().tobytes())
    strategy = Median()
    assert not strategy.streaming
    agg = strategy.begin_round({"x": torch.zeros(2)})
    strategy.fold(agg, {"x": torch.frombuffer(buffer, dtype=torch.float32)}, num_examples=1)
    buffer[:] = torch.full((2,), 9.0).numpy().tobytes()
    assert strategy.finalize(agg, {"x": torch.zeros(2)})["x"].tolist() == [1.0, 1.0]


def test_median_strategy_resists_an_outlier() -> None:
    """Median of three models with one outlier, integers rounded back."""
    start = {"x": torch.zeros(2), "n": torch.tensor(0)}
    updates = [
        ({"x": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}, 1),
        ({"x": torch.tensor([2.0, 3.0]), "n": torch.tensor(4)}, 1),
        ({"x": torch.tensor([1e6, -1e6]), "n": torch.tensor(100)}, 1000),
    ]
    result = run_round(Median(), start, updates)
    assert result["x"].tolist() == [2.0, 1.0]
    assert result["n"].item() == 4


def test_trimmed_mean_strategy_drops_the_outlier() -> None:
    """beta 0.2 of five models drops the top and bottom value per coordinate."""
    start = {"x": torch.zeros(1)}
    values = [1.0, 2.0, 3.0, 4.0, 1000.0]
    result = run_round(
        TrimmedMean(beta=0.2), start, [({"x": torch.tensor([v])}, 1) for v in values]
    )
    assert result["x"].item() == pytest.approx(3.0)


def test_krum_and_multi_krum_strategies() -> None:
    """Krum returns a clustered model; multi-Krum averages the best ones, weighted."""
    start = {"p": torch.zeros(2)}
    updates = [(s, 1) for s in cluster_with_outlier()]
    assert run_round(Krum(num_byzantine=1), start, updates)["p"].tolist() == pytest.approx(
        [0.1, 0.1]
    )
    multi = run_round(Krum(num_byzantine=1, num_selected=4), start, updates)["p"]
    torch.testing.assert_close(multi, torch.tensor([0.05, 0.05]))


def test_robust_finalize_without_updates_returns_the_global_state() -> None:
    """No update leaves the model unchanged."""
    start = {"x": torch.ones(1)}
    for strategy in (Median(), TrimmedMean(), Krum()):
        assert strategy.finalize(strategy.begin_round(start), start) is start


# -- factory -------------------------------------------------------------------------


class HalfwayStrategy(Strategy):
    """A user strategy in a few lines: the new model is halfway to the last update."""

    name = "halfway"

    def begin_round(self, global_state: State) -> Aggregate:
        return Aggregate.for_model(global_state, accumulate=False)

    def fold(
        self, agg: Aggregate, update: Mapping[str, Tensor], num_examples: int, scale: float = 1.0
    ) -> None:
        agg.extra = {k: v.clone() for k, v in update.items()}

    def finalize(self, agg: Aggregate, global_state: State) -> State:
        return (
            {k: (v + agg.extra[k]) / 2 for k, v in global_state.items()}
            if agg.extra
            else global_state
        )


@pytest.mark.parametrize("name", STRATEGIES)
def test_make_strategy_by_builtin_name(name: str) -> None:
    """Every built-in name builds a strategy of that name."""
    assert make_strategy(name).name == name


def test_make_strategy_passes_options() -> None:
    """Options reach the constructor."""
    strategy = make_strategy("krum", num_byzantine=2, num_selected=3)
    assert isinstance(strategy, Krum)
    assert (strategy.num_byzantine, strategy.num_selected) == (2, 3)


def test_make_strategy_by_import_path() -> None:
    """'module:Class' imports a Strategy subclass, ours or a user's."""
    assert isinstance(make_strategy("coordinator.strategies.fedopt:FedYogi"), FedYogi)
    user = make_strategy("tests.test_strategies:HalfwayStrategy")
    result = run_round(user, {"x": torch.zeros(1)}, [({"x": torch.ones(1)}, 1)])
    assert result["x"].item() == 0.5


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("fedsomething", "unknown strategy 'fedsomething': choose one of fedavg"),
        ("no_such_module_xyz:Thing", "cannot import"),
        ("coordinator.strategies:make_strategy", "not a Strategy subclass"),
        ("coordinator.strategies:FedOpt", "abstract"),
    ],
)
def test_make_strategy_explains_what_is_wrong(name: str, match: str) -> None:
    """An unknown name, a missing module, a non-strategy or an abstract class is refused."""
    with pytest.raises(StrategyError, match=match):
        make_strategy(name)


def test_make_strategy_rejects_unknown_options() -> None:
    """An option the strategy does not take is a StrategyError naming it."""
    with pytest.raises(StrategyError, match="bogus"):
        make_strategy("fedavg", bogus=1)
