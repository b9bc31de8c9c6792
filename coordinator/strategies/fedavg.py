"""FedAvg, streaming: each update is added into a per-tensor accumulator as it arrives.

The coordinator holds one accumulator per tensor (float32, or float64 for float64
and integer tensors) whatever the number of clients. FedProx needs nothing here:
its proximal term lives in the clients' training (``proximal_mu``), and the server
averages as FedAvg does.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from coordinator.strategies.base import Aggregate, Strategy
from coordinator.strategies.functional import cast_back, fold_into


def weighted_average(agg: Aggregate) -> dict[str, Tensor] | None:
    """The weighted mean of the folded updates, in accumulator dtypes; None if no weight."""
    if agg.count == 0 or agg.total_weight <= 0.0:
        return None
    return {name: acc / agg.total_weight for name, acc in agg.sums.items()}


class FedAvg(Strategy):
    """The new model is the mean of the clients' models weighted by num_examples * scale."""

    name = "fedavg"

    def begin_round(self, global_state: dict[str, Tensor]) -> Aggregate:
        return Aggregate.for_model(global_state, accumulate=True)

    def fold(
        self, agg: Aggregate, update: Mapping[str, Tensor], num_examples: int, scale: float = 1.0
    ) -> None:
        weight = agg.admit(update, num_examples, scale)
        if weight > 0.0:
            for name, acc in agg.sums.items():
                fold_into(acc, update[name], weight)
        agg.count_update(num_examples, weight)

    def finalize(self, agg: Aggregate, global_state: dict[str, Tensor]) -> dict[str, Tensor]:
        mean = weighted_average(agg)
        if mean is None:
            return global_state
        return {name: cast_back(t, global_state[name].dtype) for name, t in mean.items()}
