"""FedAvgM: FedAvg with server momentum (Hsu, Qi and Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019).

Each round folds like FedAvg; at finalisation the pseudo-gradient
``delta = fedavg(updates) - global`` feeds a heavy-ball buffer ``v = momentum * v +
delta`` (v starts at 0, so the first round's v is delta, as in Flower) and the model
moves ``global + server_lr * v``; with ``nesterov`` it moves by ``momentum * v +
delta`` instead. The buffer persists across rounds and is checkpointed. Only floating
tensors take the step; integer and bool buffers take the FedAvg value.

With momentum m the steady-state step is server_lr / (1 - m) times the pseudo-gradient
(Hsu et al.'s "effective learning rate"): the defaults (1.0, 0.9) take up to ten
times FedAvg's step once the buffer fills; lower server_lr if rounds oscillate.
"""

from __future__ import annotations

from torch import Tensor

from coordinator.strategies.base import StrategyError
from coordinator.strategies.fedopt import OptimiserState, ServerOptimiser
from coordinator.strategies.functional import server_momentum


class FedAvgM(ServerOptimiser):
    """FedAvg followed by a server SGD step with momentum on the pseudo-gradient."""

    name = "fedavgm"

    def __init__(
        self, *, server_lr: float = 1.0, momentum: float = 0.9, nesterov: bool = False
    ) -> None:
        super().__init__()
        self.server_lr, self.momentum = float(server_lr), float(momentum)
        self.nesterov = bool(nesterov)
        if not self.server_lr > 0.0:
            raise StrategyError(f"fedavgm: server_lr must be positive, got {server_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise StrategyError(f"fedavgm: momentum must be in [0, 1), got {momentum}")

    def _apply(self, new: OptimiserState, name: str, x: Tensor, delta: Tensor) -> Tensor:
        v = server_momentum(self._moment(new.m, name, delta, 0.0), delta, self.momentum)
        new.m[name] = v
        step = server_momentum(v, delta, self.momentum) if self.nesterov else v
        return x + step * self.server_lr
