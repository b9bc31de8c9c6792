"""Server optimisers: FedAdagrad, FedAdam, FedYogi (Reddi et al., "Adaptive Federated
Optimization", 2021, Algorithm 2).

Each round folds like FedAvg; at finalisation the pseudo-gradient
``delta = fedavg(updates) - global`` drives an adaptive step:
``m = beta_1 m + (1 - beta_1) delta``, `v` by the optimiser's rule, and
``global + eta * m / (sqrt(v) + tau)``. `m` starts at 0 and `v` at tau^2 (the
paper's ``v_{-1} >= tau^2``); both persist across rounds and are checkpointed with
`state_dict`. Only floating tensors take the step: integer and bool buffers take
the FedAvg value. `eta_l` (the client learning rate) is recorded for the clients'
training configuration; the server step does not use it.

``flower_compat=True`` reproduces Flower 1.41's variant instead: `v` starts at 0,
and FedAdam scales eta by ``sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` at server
step t (Flower's exponent is its round number plus one). `ServerOptimiser` is the
shared part (the FedAvg mean, the per-tensor step, checkpointed state) that FedAvgM
also builds on.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from coordinator.strategies.base import Aggregate, StrategyError
from coordinator.strategies.fedavg import FedAvg, weighted_average
from coordinator.strategies.functional import (
    adagrad_second_moment,
    adam_second_moment,
    adaptive_step,
    cast_back,
    first_moment,
    yogi_second_moment,
)


@dataclass
class OptimiserState:
    """The server optimiser's step count and moments, replaced whole after each step."""

    step: int = 0
    m: dict[str, Tensor] = field(default_factory=dict)
    v: dict[str, Tensor] = field(default_factory=dict)


class ServerOptimiser(FedAvg):
    """FedAvg followed by a server step on the pseudo-gradient ``delta = mean - global``.

    Subclasses give `_apply` (one floating tensor's step); the state (`m`, `v`, step
    count) is replaced whole after each round, so `state_dict` never sees half a step.
    """

    def __init__(self) -> None:
        self._state = OptimiserState()

    @property
    def step(self) -> int:
        """Server steps taken so far."""
        return self._state.step

    @property
    def m(self) -> Mapping[str, Tensor]:
        """First moments (FedAvgM: the momentum buffer) by tensor name."""
        return self._state.m

    @property
    def v(self) -> Mapping[str, Tensor]:
        """Second moments by tensor name (empty for FedAvgM)."""
        return self._state.v

    def finalize(self, agg: Aggregate, global_state: dict[str, Tensor]) -> dict[str, Tensor]:
        mean = weighted_average(agg)
        if mean is None:
            return global_state
        new = OptimiserState(self.step + 1, dict(self.m), dict(self.v))
        result = {name: self._step(new, name, mean[name], global_state[name]) for name in mean}
        self._state = new  # one assignment: state_dict never sees half a step
        return result

    def _step(self, new: OptimiserState, name: str, mean: Tensor, current: Tensor) -> Tensor:
        if not current.dtype.is_floating_point:
            return cast_back(mean, current.dtype)
        x = current.to(mean.dtype)
        return cast_back(self._apply(new, name, x, mean - x), current.dtype)

    @abstractmethod
    def _apply(self, new: OptimiserState, name: str, x: Tensor, delta: Tensor) -> Tensor:
        """The new value of tensor `name` from its value `x` and pseudo-gradient `delta`;
        stores that tensor's new moments in `new`."""

    @staticmethod
    def _moment(store: Mapping[str, Tensor], name: str, delta: Tensor, initial: float) -> Tensor:
        held = store.get(name)
        if held is None:
            return torch.full_like(delta, initial)
        if held.shape != delta.shape:
            raise StrategyError(f"optimiser state for {name} has shape {tuple(held.shape)}")
        return held.to(device=delta.device, dtype=delta.dtype)

    def state_dict(self) -> dict[str, Tensor]:
        snapshot = self._state  # read once: finalize may swap it from a worker thread
        state = {"step": torch.tensor(snapshot.step, dtype=torch.int64)}
        state.update({f"m.{name}": t for name, t in snapshot.m.items()})
        state.update({f"v.{name}": t for name, t in snapshot.v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        m: dict[str, Tensor] = {}
        v: dict[str, Tensor] = {}
        for key, tensor in state.items():
            kind, _, name = key.partition(".")
            if kind in ("m", "v") and name:
                (m if kind == "m" else v)[name] = tensor.clone()
            elif key != "step":
                raise StrategyError(f"{self.name}: unexpected state key {key!r}")
        self._state = OptimiserState(int(state["step"]) if "step" in state else 0, m, v)


class FedOpt(ServerOptimiser):
    """FedAvg followed by an adaptive server step on the pseudo-gradient."""

    def __init__(
        self,
        *,
        eta: float = 0.1,
        eta_l: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
        flower_compat: bool = False,
    ) -> None:
        super().__init__()
        self.eta, self.eta_l, self.tau = float(eta), float(eta_l), float(tau)
        self.beta_1, self.beta_2 = float(beta_1), float(beta_2)
        self.flower_compat = bool(flower_compat)
        if not (self.eta > 0.0 and self.eta_l >= 0.0 and self.tau > 0.0):
            raise StrategyError(f"{self.name}: eta and tau must be positive, eta_l non-negative")
        if not (0.0 <= self.beta_1 < 1.0 and 0.0 <= self.beta_2 < 1.0):
            raise StrategyError(f"{self.name}: beta_1 and beta_2 must be in [0, 1)")

    @abstractmethod
    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        """The optimiser's v_t from v_{t-1} and the pseudo-gradient."""

    def step_size(self, step: int) -> float:
        """The server learning rate of step `step` (1-based)."""
        return self.eta

    def _apply(self, new: OptimiserState, name: str, x: Tensor, delta: Tensor) -> Tensor:
        v_initial = 0.0 if self.flower_compat else self.tau**2
        m = first_moment(self._moment(new.m, name, delta, 0.0), delta, self.beta_1)
        v = self.second_moment(self._moment(new.v, name, delta, v_initial), delta)
        new.m[name], new.v[name] = m, v
        return adaptive_step(x, m, v, self.step_size(new.step), self.tau)


class FedAdagrad(FedOpt):
    """v_t = v + delta^2; no momentum by default (beta_1 = 0), as in Flower."""

    name = "fedadagrad"

    def __init__(
        self,
        *,
        eta: float = 0.1,
        eta_l: float = 0.1,
        beta_1: float = 0.0,
        tau: float = 1e-9,
        flower_compat: bool = False,
    ) -> None:
        super().__init__(
            eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=0.0, tau=tau, flower_compat=flower_compat
        )

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return adagrad_second_moment(v, delta)


class FedAdam(FedOpt):
    """v_t = beta_2 v + (1 - beta_2) delta^2; `bias_correction` scales eta as Adam does."""

    name = "fedadam"

    def __init__(
        self,
        *,
        eta: float = 0.1,
        eta_l: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
        bias_correction: bool = False,
        flower_compat: bool = False,
    ) -> None:
        super().__init__(
            eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau, flower_compat=flower_compat
        )
        self.bias_correction = bool(bias_correction)
        if self.bias_correction and self.flower_compat:
            raise StrategyError(
                "fedadam: flower_compat brings Flower's own bias correction; "
                "do not set bias_correction too"
            )

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return adam_second_moment(v, delta, self.beta_2)

    def step_size(self, step: int) -> float:
        if not (self.bias_correction or self.flower_compat):
            return self.eta
        t = step + 1 if self.flower_compat else step  # Flower: server_round + 1
        return self.eta * math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)


class FedYogi(FedOpt):
    """v_t = v - (1 - beta_2) delta^2 sign(v - delta^2); Flower's defaults."""

    name = "fedyogi"

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        eta_l: float = 0.0316,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        flower_compat: bool = False,
    ) -> None:
        super().__init__(
            eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau, flower_compat=flower_compat
        )

    def second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return yogi_second_moment(v, delta, self.beta_2)
