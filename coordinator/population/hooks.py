"""The round-boundary hook: where PBT and merges replace a running slot's model.

A slot calls `Population.round_closed` after each round closes and before it
asks for clients again. Nothing here waits for an evaluation or for another slot:
decisions use the latest figures that exist, other slots' models are read from the
snapshots they left at their own last boundary, and the replaced model's checkpoint
is queued behind the slot's evaluation chain. Only the copy or the average itself
runs (in a thread) before the slot leases clients again.

- PBT (`--population pbt`): every K rounds, `pbt.decide` with each slot's latest
  validation figures (federated evaluation on the clients' held-out splits; the
  test-set accuracy only when the run evaluates centrally alone); an exploited slot
  takes a copy of the donor's latest model, strategy state and hyperparameters, then
  `pbt.explore` perturbs them. `pbt_exploit` records which rounds' figures it used.
- Merges (`--merge every=K`): a slot at its boundary eK folds every live slot's latest
  model (its own included) into one, each weighted by the examples that slot folded in
  rounds (e-1)K+1..eK (the merge window), and goes on from the average; no slot waits
  for another. A slot that has trained past eK is weighted by its window's examples
  only (never by rounds after the boundary). Strategy state stays the slot's.

Each replacement is logged and the slot's checkpoint of that round rewritten,
so `--resume` continues from the replaced model and the new configuration.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
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

    async def replace_model(self, state: State, strategy: Strategy, config: SlotConfig,
                            round_: int) -> None: ...


@dataclass
class Population:
    """PBT and merge decisions for every slot of a run, at each slot's round boundary."""

    slots: Mapping[int, SlotHandle]
    last_round: int
    pbt_settings: pbt.PbtSettings | None = None
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    merge_every: int = 0
    # what PBT ranks slots by: "validation" (federated evaluation) or "test" (only when
    # the run evaluates centrally alone)
    selected_on: str = "validation"
    rng: random.Random = field(default_factory=random.Random)
    _folded: dict[int, dict[int, int]] = field(default_factory=dict)  # slot -> round -> examples
    _failed: set[int] = field(default_factory=set)  # slots that gave up: no donor, not merged

    async def round_closed(self, slot: SlotHandle, round_: int) -> None:
        """Called by `slot` after it closed `round_` (not after its last round)."""
        if slot.latest is None or round_ >= self.last_round:
            return
        if self.merge_every:  # an int per slot and round: slots far apart read old windows
            self._folded.setdefault(slot.slot_id, {})[round_] = slot.latest.num_examples
        if self.merge_every and round_ % self.merge_every == 0:
            await self._merge(slot, round_)
        if self.pbt_settings is not None and pbt.is_due(round_, self.pbt_settings):
            await self._pbt_step(slot, round_)

    async def slot_failed(self, slot_id: int, round_: int) -> None:
        """`slot_id` gave up: it is no PBT donor and no merge takes its model any more."""
        self._failed.add(slot_id)

    def _live(self) -> list[int]:
        return sorted(set(self.slots) - self._failed)

    # -- PBT -----------------------------------------------------------------------------

    def members(self) -> dict[int, pbt.Member]:
        """Every live slot with figures: its latest score and the round of the model it
        scored (validation figures, or the test set's with `selected_on` "test")."""
        found = {}
        for slot_id in self._live():
            status = self.slots[slot_id].status
            figures = status.validations if self.selected_on == "validation" else (
                status.accuracies)
            if figures:
                round_, score, _t = figures[-1]
                found[slot_id] = pbt.Member(slot_id, score, round_)
        return found

    async def _pbt_step(self, slot: SlotHandle, round_: int) -> None:
        assert self.pbt_settings is not None
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
                 accuracy=exploit.target.score, validated_round=exploit.target.round,
                 donor_validated_round=exploit.donor.round, selected_on=self.selected_on,
                 before=slot.config.flat(), copied=copied)
        log.info("pbt_explore", slot_id=slot.slot_id, round=round_, config=explored,
                 changed=pbt.changed(copied, explored))
        await slot.replace_model(state, strategy, config, round_)

    # -- merges --------------------------------------------------------------------------

    def _window_examples(self, slot_id: int, boundary: int) -> int:
        """Examples `slot_id` folded in the merge window that ends at round `boundary`."""
        first = boundary - self.merge_every + 1
        return sum(n for r, n in self._folded.get(slot_id, {}).items() if first <= r <= boundary)

    async def _merge(self, slot: SlotHandle, round_: int) -> None:
        taken: dict[int, Snapshot] = {}
        weights: dict[int, float] = {}
        for slot_id in self._live():
            latest = self.slots[slot_id].latest
            weight = float(self._window_examples(slot_id, round_))
            if latest is not None and weight > 0:
                taken[slot_id], weights[slot_id] = latest, weight
        if len(taken) < 2 or slot.slot_id not in taken:
            return
        order = sorted(taken)
        merged = await asyncio.to_thread(merge.weighted_average, [taken[s].state for s in order],
                                         [weights[s] for s in order])
        epoch = round_ // self.merge_every
        log.info("slots_merged", slot_id=slot.slot_id, epoch=epoch, round=round_, slot_ids=order,
                 weights={str(s): weights[s] for s in order},
                 rounds={str(s): taken[s].round for s in order})
        log.info("merge_adopted", slot_id=slot.slot_id, round=round_, epoch=epoch,
                 rounds_since=0)
        assert slot.config is not None
        await slot.replace_model(merged, slot.strategy, slot.config, round_)
