"""The strategy interface: start a round, fold one update, finalise.

The slot loop drives one `Strategy` instance per slot (server-optimiser state is
that slot's own): `begin_round` with the slot's global model, `fold` once per
accepted update (in a worker thread, calls serialised per slot), `finalize` once
when the round closes. A strategy that needs every update at once (a robust rule)
says so with ``streaming = False`` and keeps copies; a streaming one keeps one
accumulator per tensor, whatever the number of clients.

    StrategyError(ValueError)     bad options, an unknown strategy, or an update
                                  that does not match the round's model
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from coordinator.strategies.functional import accumulator_dtype


class StrategyError(ValueError):
    """A strategy cannot be built, or an update does not fit the round."""


@dataclass
class Aggregate:
    """One round's running aggregate.

    `sums` holds one accumulator per tensor (streaming strategies); `kept` holds a
    copy of each update with its weight (``streaming = False`` strategies). A
    custom strategy may use either, or put its own state in `extra`.
    """

    shapes: dict[str, torch.Size]
    sums: dict[str, Tensor] = field(default_factory=dict)
    kept: list[tuple[dict[str, Tensor], float]] = field(default_factory=list)
    extra: dict[str, Tensor] = field(default_factory=dict)
    total_weight: float = 0.0
    count: int = 0
    num_examples: int = 0

    @classmethod
    def for_model(cls, global_state: Mapping[str, Tensor], *, accumulate: bool) -> Aggregate:
        """An empty aggregate for this model, with zeroed accumulators if `accumulate`."""
        agg = cls(shapes={name: t.shape for name, t in global_state.items()})
        if accumulate:
            agg.sums = {
                name: torch.zeros(t.shape, dtype=accumulator_dtype(t.dtype), device=t.device)
                for name, t in global_state.items()
            }
        return agg

    def admit(self, update: Mapping[str, Tensor], num_examples: int, scale: float) -> float:
        """Check an update fits the model; returns its weight, num_examples * scale."""
        if num_examples < 0 or scale < 0:
            raise StrategyError(
                f"num_examples and scale must be non-negative, got {num_examples} and {scale}"
            )
        if update.keys() != self.shapes.keys():
            missing = sorted(self.shapes.keys() - update.keys())
            extra = sorted(update.keys() - self.shapes.keys())
            raise StrategyError(f"update tensors differ: missing {missing}, unexpected {extra}")
        for name, shape in self.shapes.items():
            if update[name].shape != shape:
                raise StrategyError(f"{name}: shape {tuple(update[name].shape)} != {tuple(shape)}")
        return float(num_examples) * float(scale)

    def count_update(self, num_examples: int, weight: float) -> None:
        """Record that one update of this weight was folded."""
        self.count += 1
        self.num_examples += num_examples
        self.total_weight += weight


class Strategy(ABC):
    """Start a round, fold one update, finalise: the slot loop calls nothing else."""

    name: ClassVar[str]
    # False: finalize needs every update, so the aggregate holds O(clients x model).
    streaming: ClassVar[bool] = True

    @abstractmethod
    def begin_round(self, global_state: dict[str, Tensor]) -> Aggregate:
        """An empty aggregate for a round that starts from `global_state`."""

    @abstractmethod
    def fold(
        self, agg: Aggregate, update: Mapping[str, Tensor], num_examples: int, scale: float = 1.0
    ) -> None:
        """Fold one client's update (its new weights) with weight num_examples * scale.

        `update` may be read-only views over a received buffer: never write to them,
        and copy what must outlive the call.
        """

    @abstractmethod
    def finalize(self, agg: Aggregate, global_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The new global model; `global_state` itself when nothing was folded."""

    def state_dict(self) -> dict[str, Tensor]:
        """Server-side state to checkpoint (empty for a stateless rule)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what `state_dict` returned."""
        if state:
            raise StrategyError(f"{self.name} keeps no state, got keys {sorted(state)}")
