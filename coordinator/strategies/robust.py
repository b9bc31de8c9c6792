"""Robust rules: coordinate-wise median, trimmed mean, (multi-)Krum.

They need every update at once, so they are not streaming: each fold keeps a copy
of the update (memory O(clients x model)). Median and trimmed mean ignore the
weights (each client counts once); multi-Krum averages the selected updates
weighted by num_examples * scale.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

from coordinator.strategies.base import Aggregate, Strategy, StrategyError
from coordinator.strategies.functional import (
    accumulator_dtype,
    cast_back,
    coordinate_median,
    krum_select,
    pairwise_squared_distances,
    trim_count,
    trimmed_mean,
    weighted_mean,
)


def stacked(updates: list[dict[str, Tensor]], name: str) -> Tensor:
    """One tensor's values from every update, stacked on dim 0 in its accumulator dtype."""
    stack = torch.stack([u[name] for u in updates])
    return stack.to(accumulator_dtype(stack.dtype))


class RobustStrategy(Strategy):
    """Keeps a copy of every update; `combine` reduces them when the round closes."""

    streaming = False

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
        combined = self.combine(agg)
        return {name: cast_back(t, global_state[name].dtype) for name, t in combined.items()}

    @abstractmethod
    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        """The new model (accumulator dtypes) from `agg.kept`, which is not empty."""


class Median(RobustStrategy):
    """Coordinate-wise median of the updates."""

    name = "median"

    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        updates = [u for u, _ in agg.kept]
        return {name: coordinate_median(stacked(updates, name)) for name in agg.shapes}


class TrimmedMean(RobustStrategy):
    """Coordinate-wise mean without the int(beta * n) lowest and highest values."""

    name = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1) -> None:
        self.beta = float(beta)
        try:
            trim_count(1, self.beta)
        except ValueError as exc:
            raise StrategyError(str(exc)) from exc

    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        updates = [u for u, _ in agg.kept]
        return {name: trimmed_mean(stacked(updates, name), self.beta) for name in agg.shapes}


class Krum(RobustStrategy):
    """Krum (Blanchard et al., 2017): the update closest to its n - f - 2 nearest
    neighbours; with ``num_selected`` m > 1, the weighted mean of the m best (multi-Krum)."""

    name = "krum"

    def __init__(self, *, num_byzantine: int = 0, num_selected: int = 1) -> None:
        self.num_byzantine, self.num_selected = int(num_byzantine), int(num_selected)
        if self.num_byzantine < 0 or self.num_selected < 1:
            raise StrategyError("krum: num_byzantine must be >= 0 and num_selected >= 1")

    def combine(self, agg: Aggregate) -> dict[str, Tensor]:
        updates = [u for u, _ in agg.kept]
        chosen = krum_select(
            pairwise_squared_distances(updates), self.num_byzantine, self.num_selected
        )
        picked = [updates[i] for i in chosen]
        weights = torch.tensor([agg.kept[i][1] for i in chosen], dtype=torch.float64)
        return {name: weighted_mean(stacked(picked, name), weights) for name in agg.shapes}
