"""What varies between a weight round and a gradient session: the round protocol.

`coordinator.slots.lifecycle.Slot` runs every slot's rounds the same way (lease,
open, collect, close, evaluate and checkpoint, give up, retire); a protocol says
what a round is: how it opens, what it does with each thing its inbox brings,
when it is over and what closing it yields. Weight rounds
(`coordinator.slots.weights`) fold client models; gradient sessions
(`coordinator.slots.gradients`) take one server step per batch of gradients.

A protocol is driven by one slot and never waits on its own: the slot awaits
its inbox until the protocol's `deadline`, hands it each item, and calls
`expire` when the deadline passes.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from bus.gradient import TensorEntry
from coordinator.delivery import Delivery
from coordinator.results.figures import Validation

State = dict[str, torch.Tensor]
InboxItem = Delivery | TensorEntry
Inbox = asyncio.Queue[InboxItem]


@dataclass(frozen=True)
class RoundEnd:
    """Whether a round that stopped collecting can be closed; if not, why (`reason`
    labels `round_failed`, with `fields`)."""

    ok: bool
    reason: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClosedRound:
    """A closed round's new global model, as evaluation and the checkpoint take it."""

    round: int
    state: State
    payload: bytes  # `state` encoded (the checkpoint's bytes)
    strategy_state: State  # the strategy's or server optimiser's state after this round
    num_updates: int
    num_examples: int
    fields: dict[str, Any] = field(default_factory=dict)  # more for `round_closed`
    # the round's clients' federated evaluation of the model they received (None: none)
    validation: Validation | None = None


class RoundProtocol(ABC):
    """One kind of round, driven by `coordinator.slots.lifecycle.Slot`."""

    @abstractmethod
    async def open(self, round_: int, clients: tuple[str, ...], wait_s: float) -> None:
        """Start round `round_` on the leased `clients` (publish what they need)."""

    @abstractmethod
    def owns(self, delivery: Delivery) -> bool:
        """Whether `delivery` answers a job of the open round (else it is late)."""

    @abstractmethod
    async def take_result(self, delivery: Delivery) -> None:
        """An ok result of the open round."""

    @abstractmethod
    async def client_failed(self, delivery: Delivery) -> None:
        """A failed result of the open round (a failed job, or a lost client's)."""

    async def take_entry(self, entry: TensorEntry) -> None:
        """A gradient from a slot's uplink; only gradient sessions read one."""
        raise TypeError(f"{type(self).__name__} reads no gradient entries")

    @abstractmethod
    def deadline(self) -> float | None:
        """When the open round next needs `expire` (monotonic s); None: done collecting."""

    async def expire(self) -> None:  # noqa: B027 - an optional hook, no-op by default
        """The deadline passed (the default: `deadline` decides on its own)."""

    @abstractmethod
    def end(self) -> RoundEnd:
        """Once `deadline` is None: whether the round can be closed."""

    @abstractmethod
    async def close(self) -> ClosedRound:
        """Aggregate the round that `end` passed: the slot's new global model."""

    def folds_late(self, delivery: Delivery) -> bool:
        """Whether a late result goes into the open round (the default: never)."""
        return False

    async def fold_late(self, delivery: Delivery, staleness: int) -> None:
        """Fold a late result `folds_late` took into the open round."""
        raise TypeError(f"{type(self).__name__} folds no late results")

    async def serve(self, inbox: Inbox) -> None:  # noqa: B027 - optional, as above
        """Runs beside the slot's rounds (a gradient slot reads its uplink); the default
        does nothing."""

    async def finish(self) -> None:  # noqa: B027 - optional, as above
        """The slot has ended: release what the protocol holds in Redis."""

    @property
    @abstractmethod
    def state(self) -> State:
        """The slot's current global model."""

    @abstractmethod
    def latest_model(self) -> tuple[int, State, bytes | None]:
        """Read-only, for downloads: (round, state, wire bytes if encoded) of the newest
        global model; round first_round - 1 before this run aggregated any."""
