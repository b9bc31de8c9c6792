"""The round-boundary hook: where PBT and merges replace a running slot's model.

A slot calls `Population.round_closed` after each round closes and before it
asks for clients again. Only that slot waits (for its own evaluation, at a PBT
decision, and for the copy or average, in a thread); the other slots keep
training, and their models are read from the snapshots they left at their own
last boundary, never locked.

- PBT (`--population pbt`): every K rounds, `pbt.decide` with each slot's latest
  evaluation; an exploited slot takes a copy of the donor's latest model,
  strategy state and hyperparameters, then `pbt.explore` perturbs them.
- Merges (`--merge every=K`): when the last slot closes round eK, the slots'
  round-eK models are averaged, weighted by the examples each folded in rounds
  (e-1)K+1..eK; each slot adopts the average at its next boundary, keeping what
  it learnt since round eK (`merge.with_progress`). Strategy state stays the slot's.

Each replacement is logged and the slot's checkpoint of that round rewritten,
so `--resume` continues from the replaced model and the new configuration.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import structlog
import torch

from coordinator.population import merge, pbt
from coordinator.population.config import SlotConfig, from_flat
from coordinator.strategies import Strategy

if TYPE_CHECKING:
    from coordinator.status import SlotStatus

log = structlog.get_logger()
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Snapshot:
    """A slot's model as it left its last boundary."""

    round: int
    state: State
    strategy_state: State
    num_examples: int  # folded in that round


class SlotHandle(Protocol):
    """What the hook needs of a running weight slot (`slots.factory.PopulationMember`)."""

    slot_id: int

    @property
    def config(self) -> SlotConfig: ...

    @property
    def strategy(self) -> Strategy: ...

    @property
    def latest(self) -> Snapshot: ...

    @property
    def status(self) -> SlotStatus: ...

    async def settle(self) -> None: ...

    async def replace_model(self, state: State, strategy: Strategy, config: SlotConfig,
                            round_: int) -> None: ...


class MergeEvaluations:
    """Merged models evaluated in the background (`evaluate` blocks: it queues on the
    coordinator's evaluation thread), logged as ``merge_evaluated``."""

    def __init__(self, evaluate: Callable[[State], dict[str, float]]) -> None:
        self._evaluate = evaluate
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, epoch: int, round_: int, state: State) -> None:
        task = asyncio.create_task(self._run(epoch, round_, state), name=f"merge-{epoch}-eval")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks)

    async def _run(self, epoch: int, round_: int, state: State) -> None:
        metrics = await asyncio.to_thread(self._evaluate, state)
        log.info("merge_evaluated", slot_id="merged", epoch=epoch, round=round_,
                 accuracy=metrics.get("accuracy"), loss=metrics.get("loss"))


@dataclass
class PendingMerge:
    epoch: int
    state: State
    taken: dict[int, State]


@dataclass
class Population:
    """PBT and merge decisions for every slot of a run, at each slot's round boundary."""

    slots: Mapping[int, SlotHandle]
    last_round: int
    pbt_settings: pbt.PbtSettings | None = None
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    merge_every: int = 0
    evaluations: MergeEvaluations | None = None  # None: merged models are not evaluated
    rng: random.Random = field(default_factory=random.Random)
    _arrived: dict[int, dict[int, Snapshot]] = field(default_factory=dict)
    _examples: dict[int, int] = field(default_factory=dict)
    _merged: PendingMerge | None = None
    _adopted: dict[int, int] = field(default_factory=dict)
    _failed: set[int] = field(default_factory=set)  # slots that gave up: no donor, not merged

    async def round_closed(self, slot: SlotHandle, round_: int) -> None:
        """Called by `slot` after it closed `round_` (not after its last round)."""
        if slot.latest is None or round_ >= self.last_round:
            return
        self._examples[slot.slot_id] = self._examples.get(slot.slot_id, 0) + (
            slot.latest.num_examples)
        if self.merge_every:
            await self._merge_step(slot, round_)
        if self.pbt_settings is not None and pbt.is_due(round_, self.pbt_settings):
            await self._pbt_step(slot, round_)

    async def slot_failed(self, slot_id: int, round_: int) -> None:
        """`slot_id` gave up: it is no PBT donor any more, and merges go on without it (a
        merge that waited only for it happens now)."""
        self._failed.add(slot_id)
        for epoch in sorted(self._arrived):
            arrived = self._arrived[epoch]
            arrived.pop(slot_id, None)
            if arrived and len(arrived) == self._live():
                await self._merge(epoch, round_, self._arrived.pop(epoch))

    def _live(self) -> int:
        return len(set(self.slots) - self._failed)

    async def wait_evaluations(self) -> None:
        """Let the merged models' evaluations finish (the run's end waits for them)."""
        if self.evaluations is not None:
            await self.evaluations.wait()

    # -- PBT -----------------------------------------------------------------------------

    def members(self) -> dict[int, pbt.Member]:
        """Every slot with an evaluation: its latest accuracy and that round."""
        found = {}
        for slot_id, handle in self.slots.items():
            if handle.status.accuracies and slot_id not in self._failed:
                round_, accuracy, _t = handle.status.accuracies[-1]
                found[slot_id] = pbt.Member(slot_id, accuracy, round_)
        return found

    async def _pbt_step(self, slot: SlotHandle, round_: int) -> None:
        assert self.pbt_settings is not None
        await slot.settle()  # its own evaluation of this round decides
        exploit = pbt.decide(slot.slot_id, self.members(), self.pbt_settings, self.rng)
        if exploit is None:
            return
        donor = self.slots[exploit.donor.slot_id]
        taken = donor.latest
        if taken is None:
            return
        assert donor.config is not None
        assert slot.config is not None
        copied = {**donor.config.flat(), "seed": slot.config.seed}  # the seed names the slot
        explored = pbt.explore(copied, self.bounds, self.pbt_settings, self.rng)
        config = from_flat(donor.config, slot.slot_id, explored)
        state, strategy = await asyncio.to_thread(
            pbt.exploit_copy, taken.state, taken.strategy_state, config.strategy,
            config.strategy_options)
        log.info("pbt_exploit", slot_id=slot.slot_id, round=round_,
                 donor_slot_id=donor.slot_id, donor_round=taken.round,
                 donor_evaluated_round=exploit.donor.round, donor_accuracy=exploit.donor.score,
                 accuracy=exploit.target.score, before=slot.config.flat(), copied=copied)
        log.info("pbt_explore", slot_id=slot.slot_id, round=round_, config=explored,
                 changed=pbt.changed(copied, explored))
        await slot.replace_model(state, strategy, config, round_)

    # -- merges --------------------------------------------------------------------------

    async def _merge_step(self, slot: SlotHandle, round_: int) -> None:
        assert slot.latest is not None
        if round_ % self.merge_every == 0:
            epoch = round_ // self.merge_every
            arrived = self._arrived.setdefault(epoch, {})
            arrived[slot.slot_id] = slot.latest
            if len(arrived) == self._live():
                await self._merge(epoch, round_, self._arrived.pop(epoch))
        await self._adopt(slot, round_)

    async def _merge(self, epoch: int, round_: int, arrived: dict[int, Snapshot]) -> None:
        order = sorted(arrived)
        weights = [float(self._examples.get(s, 0)) for s in order]
        states = [arrived[s].state for s in order]
        merged = await asyncio.to_thread(merge.weighted_average, states, weights)
        for slot_id in order:
            self._examples[slot_id] = 0
        self._merged = PendingMerge(epoch, merged, {s: arrived[s].state for s in order})
        log.info("slots_merged", epoch=epoch, round=round_, slot_ids=order,
                 weights=dict(zip(map(str, order), weights, strict=True)))
        if self.evaluations is not None:
            self.evaluations.submit(epoch, round_, merged)

    async def _adopt(self, slot: SlotHandle, round_: int) -> None:
        pending = self._merged
        if pending is None or self._adopted.get(slot.slot_id, 0) >= pending.epoch:
            return
        assert slot.latest is not None
        assert slot.config is not None
        self._adopted[slot.slot_id] = pending.epoch
        taken = pending.taken.get(slot.slot_id)
        current = slot.latest.state
        state = pending.state if taken is None or taken is current else await asyncio.to_thread(
            merge.with_progress, pending.state, current, taken)
        log.info("merge_adopted", slot_id=slot.slot_id, round=round_, epoch=pending.epoch,
                 rounds_since=round_ - pending.epoch * self.merge_every)
        await slot.replace_model(state, slot.strategy, slot.config, round_)
