"""A custom strategy in ten lines: FedAvg with a server learning rate.

Copy this file into your own package and run it by import path::

    python -m coordinator --strategy coordinator.strategies.examples:ServerLrFedAvg \\
        --strategy-option server_lr=0.5

Subclassing `FedAvg` gives the streaming fold (one accumulator per tensor) for free;
only `finalize` changes: the new model moves `server_lr` of the way from the global
model to the clients' weighted mean (1.0 is FedAvg). Constructor keyword arguments
are the strategy's options (``--strategy-option KEY=VALUE``, values parsed as JSON).
"""

from __future__ import annotations

from torch import Tensor

from coordinator.strategies import Aggregate, FedAvg


class ServerLrFedAvg(FedAvg):
    """new = global + server_lr * (weighted mean of the clients' models - global)."""

    name = "fedavg_server_lr"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        self.server_lr = float(server_lr)

    def finalize(self, agg: Aggregate, global_state: dict[str, Tensor]) -> dict[str, Tensor]:
        mean = super().finalize(agg, global_state)  # the plain FedAvg result
        return {
            name: (old + (mean[name] - old) * self.server_lr).to(old.dtype)
            if old.dtype.is_floating_point
            else mean[name]
            for name, old in global_state.items()
        }
