"""Robust rules: coordinate-wise median, trimmed mean, (multi-)Krum, Bulyan, and the
geometric median (RFA).

They need every update at once, so they are not streaming: each fold keeps a copy
of the update (memory O(clients x model), inherent to any rule that compares
updates with each other). Median, trimmed mean, Krum's and Bulyan's selections count
each update once: they ignore num_examples (a client's own claim, which would let
one attacker outvote the rest) and the staleness weight of late updates (their
guarantees count updates; a late update that drifted far is an outlier like any
other, and ``--late-policy drop`` keeps late updates out entirely). Multi-Krum
averages the updates it selected weighted by num_examples * scale: weights apply only
after a selection that no claim takes part in. The geometric median counts every
update once by default (``weighted=false``): its weights decide the point itself, so
a weighted median would let a claim choose the result; ``weighted=true`` uses RFA's
alpha_i = num_examples * scale (counts capped by `coordinator.results.claims`).

Rules with a stated bound on the number f of Byzantine updates check it each round
(`bound_unmet`). When a round has too few updates the rule does not run: with
``fallback="median"`` (default) the round takes the coordinate median if the honest
updates are still a majority (n >= 2f + 1) and keeps the global model otherwise;
``fallback="keep"`` always keeps the global model. Either way the event
``strategy_bounds_unmet`` says what was done.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import structlog
import torch
from torch import Tensor

from coordinator.strategies.base import Aggregate, Strategy, StrategyError
from coordinator.strategies.functional import (
    accumulator_dtype,
    bulyan_select,
    cast_back,
    coordinate_median,
    geometric_median,
    krum_select,
    mean_around_median,
    pairwise_squared_distances,
    trim_count,
    trimmed_mean_by_count,
    weighted_mean,
)

log = structlog.get_logger()

FALLBACKS = ("median", "keep")


def stacked(updates: list[dict[str, Tensor]], name: str) -> Tensor:
    """One tensor's values from every update, stacked on dim 0 in its accumulator dtype."""
    stack = torch.stack([u[name] for u in updates])
    return stack.to(accumulator_dtype(stack.dtype))


class RobustStrategy(Strategy):
    """Keeps a copy of every update; `combine` reduces them when the round closes."""

    streaming = False
    # What a round with too few updates for the rule's bound takes (see FALLBACKS).
    fallback: str = "median"

    def begin_round(self, global_state: dict[str, Tensor]) -> Aggregate:
        return Aggregate.for_model(global_state, accumulate=False)

    def fold(
        self, agg: Aggregate, update: Mapping[str, Tensor], num_examples: int, scale: float = 1.0
    ) -> None:
        weight = agg.admit(update, num_examples, scale)
        agg.kept.append(({name: t.clone() for name, t in update.items()}, weight))
        agg.count_update(num_examples, weight)

    def finalize(self, agg: Aggregate, global_state: dict[str, Tensor]) -> dict[str, Tensor]:
        if not agg.kept:
            return global_state
        required = self.bound_unmet(len(agg.kept))
        combined = self.combine(agg) if required is None else self._fall_back(agg, required)
        if combined is None:
            return global_state
        return {name: cast_back(t, global_state[name].dtype) for name, t in combined.items()}

    @abstractmethod
    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        """The new model (accumulator dtypes) from `agg.kept`, which is not empty."""

    def bound_unmet(self, n: int) -> str | None:
        """The rule's requirement (e.g. "n >= 2f + 3") if `n` updates do not meet it."""
        return None

    def assumed_byzantine(self, n: int) -> int:
        """How many of `n` updates the rule is configured to withstand (its f)."""
        return 0

    def _fall_back(self, agg: Aggregate, required: str) -> dict[str, Tensor] | None:
        n = len(agg.kept)
        f = self.assumed_byzantine(n)
        use_median = self.fallback == "median" and n >= 2 * f + 1
        log.warning(
            "strategy_bounds_unmet",
            rule=self.name,
            n=n,
            f=f,
            required=required,
            action="median" if use_median else "kept_global_model",
        )
        return median_of(agg) if use_median else None


def median_of(agg: Aggregate) -> dict[str, Tensor]:
    """The coordinate median of the kept updates, in accumulator dtypes."""
    updates = [u for u, _ in agg.kept]
    return {name: coordinate_median(stacked(updates, name)) for name in agg.shapes}


def checked_fallback(rule: str, fallback: str) -> str:
    """`fallback` if it is one of FALLBACKS, else a StrategyError naming the rule."""
    if fallback not in FALLBACKS:
        raise StrategyError(f"{rule}: fallback must be one of {', '.join(FALLBACKS)}")
    return fallback


class Median(RobustStrategy):
    """Coordinate-wise median of the updates."""

    name = "median"

    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        return median_of(agg)


class TrimmedMean(RobustStrategy):
    """Coordinate-wise mean without the int(beta * n) lowest and highest values, or
    without the f lowest and highest with ``num_byzantine`` f (which then wins over beta).

    Bounds: with f, n >= 2f + 1; with beta > 0, at least one value trimmed at each end
    (int(beta * n) >= 1), since a round too small to trim anything is a plain mean. Its
    f is what it trims, so a beta round too small to trim takes the median instead.
    """

    name = "trimmed_mean"

    def __init__(
        self, *, beta: float = 0.1, num_byzantine: int | None = None, fallback: str = "median"
    ) -> None:
        self.beta = float(beta)
        self.num_byzantine = None if num_byzantine is None else int(num_byzantine)
        self.fallback = checked_fallback(self.name, fallback)
        try:
            trim_count(1, self.beta)
        except ValueError as exc:
            raise StrategyError(str(exc)) from exc
        if self.num_byzantine is not None and self.num_byzantine < 0:
            raise StrategyError("trimmed_mean: num_byzantine must be >= 0")

    def trimmed(self, n: int) -> int:
        """How many values are dropped at each end of `n`."""
        return trim_count(n, self.beta) if self.num_byzantine is None else self.num_byzantine

    def assumed_byzantine(self, n: int) -> int:
        return self.trimmed(n)

    def bound_unmet(self, n: int) -> str | None:
        if self.num_byzantine is not None:
            return None if n >= 2 * self.num_byzantine + 1 else "n >= 2f + 1"
        return "int(beta * n) >= 1" if self.beta > 0.0 and self.trimmed(n) == 0 else None

    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        updates = [u for u, _ in agg.kept]
        cut = self.trimmed(len(updates))
        return {name: trimmed_mean_by_count(stacked(updates, name), cut) for name in agg.shapes}


class Krum(RobustStrategy):
    """Krum (Blanchard et al., 2017): the update closest to its n - f - 2 nearest
    neighbours; with ``num_selected`` m > 1, the weighted mean of the m best (multi-Krum).
    Bounds: n >= 2f + 3 and m <= n - f."""

    name = "krum"

    def __init__(
        self, *, num_byzantine: int = 0, num_selected: int = 1, fallback: str = "median"
    ) -> None:
        self.num_byzantine, self.num_selected = int(num_byzantine), int(num_selected)
        self.fallback = checked_fallback(self.name, fallback)
        if self.num_byzantine < 0 or self.num_selected < 1:
            raise StrategyError("krum: num_byzantine must be >= 0 and num_selected >= 1")

    def assumed_byzantine(self, n: int) -> int:
        return self.num_byzantine

    def bound_unmet(self, n: int) -> str | None:
        if n < 2 * self.num_byzantine + 3:
            return "n >= 2f + 3"
        # More picks than honest updates would average an attacker in whenever f attack.
        return None if self.num_selected <= n - self.num_byzantine else "num_selected <= n - f"

    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        updates = [u for u, _ in agg.kept]
        chosen = krum_select(
            pairwise_squared_distances(updates), self.num_byzantine, self.num_selected
        )
        picked = [updates[i] for i in chosen]
        weights = torch.tensor([agg.kept[i][1] for i in chosen], dtype=torch.float64)
        return {name: weighted_mean(stacked(picked, name), weights) for name in agg.shapes}


class Bulyan(RobustStrategy):
    """Bulyan (El Mhamdi et al., 2018) over Krum: Krum picks theta = n - 2f updates one
    at a time; each coordinate is the mean of the beta = theta - 2f picked values closest
    to their median. Needs n >= 4f + 3."""

    name = "bulyan"

    def __init__(self, *, num_byzantine: int = 1, fallback: str = "median") -> None:
        self.num_byzantine = int(num_byzantine)
        self.fallback = checked_fallback(self.name, fallback)
        if self.num_byzantine < 0:
            raise StrategyError("bulyan: num_byzantine must be >= 0")

    def assumed_byzantine(self, n: int) -> int:
        return self.num_byzantine

    def bound_unmet(self, n: int) -> str | None:
        return None if n >= 4 * self.num_byzantine + 3 else "n >= 4f + 3"

    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        updates = [u for u, _ in agg.kept]
        f = self.num_byzantine
        picked = [updates[i] for i in bulyan_select(pairwise_squared_distances(updates), f)]
        kept = len(picked) - 2 * f
        return {name: mean_around_median(stacked(picked, name), kept) for name in agg.shapes}


class GeometricMedian(RobustStrategy):
    """The geometric median of the updates (RFA, Pillutla et al., 2022) by the smoothed
    Weiszfeld algorithm; every update counts once, or with ``weighted=true`` by
    num_examples * scale (then a client's claimed count moves the point).

    Its breakdown point is one half of the weight; it takes no f, so it has no per-round
    bound to check.
    """

    name = "geomed"

    def __init__(
        self, *, nu: float = 1e-6, max_iter: int = 100, eps: float = 1e-6, weighted: bool = False
    ) -> None:
        self.nu, self.max_iter, self.eps = float(nu), int(max_iter), float(eps)
        self.weighted = bool(weighted)
        if not (self.nu > 0.0 and self.max_iter >= 1 and self.eps >= 0.0):
            raise StrategyError("geomed: nu must be > 0, max_iter >= 1 and eps >= 0")
        self.last_iterations = 0

    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        updates = [u for u, _ in agg.kept]
        if self.weighted:
            weights = torch.tensor([w for _, w in agg.kept], dtype=torch.float64)
        else:
            weights = torch.ones(len(updates), dtype=torch.float64)
        stacks = {name: stacked(updates, name) for name in agg.shapes}
        point, self.last_iterations = geometric_median(
            stacks, weights, nu=self.nu, max_iter=self.max_iter, eps=self.eps
        )
        return point
