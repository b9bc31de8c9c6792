"""Building a run's slots: each a `Slot` with its round protocol, its evaluation chain
and, for weight slots with PBT or merges, its place in the population.

The one place that knows every collaborator a slot may use; each part gets only
those it uses, by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
import torch

from bus.keys import Keys
from coordinator.evaluation import Evaluator
from coordinator.gradient.optimizer import FlatModel, ServerOptimizer
from coordinator.leases import LeaseBroker
from coordinator.population.config import SlotConfig
from coordinator.population.hooks import Population, Snapshot
from coordinator.results.sink import ResultSink
from coordinator.results.validation import ResultValidator
from coordinator.run_state import RunState
from coordinator.settings import CoordinatorSettings
from coordinator.slots.chain import EvaluationChain
from coordinator.slots.gradients import GradientSessions, SlotStreams
from coordinator.slots.lifecycle import Slot
from coordinator.slots.protocol import RoundProtocol, State
from coordinator.slots.publishing import JobPublisher, ModelPublisher
from coordinator.slots.weights import WeightRounds
from coordinator.status import RunStatus, SlotStatus
from coordinator.strategies import Strategy
from serialization import decode


class GradientModeError(ValueError):
    """The task's model cannot run in gradient mode."""


@dataclass(frozen=True)
class SlotBuilder:
    """The run's services a slot is built from (start-up only; no slot keeps this)."""

    settings: CoordinatorSettings
    redis: aioredis.Redis
    keys: Keys
    leases: LeaseBroker
    evaluator: Evaluator
    run_state: RunState
    status: RunStatus
    models: ModelPublisher
    jobs: JobPublisher
    validator: ResultValidator
    results: ResultSink

    def weight_slot(self, slot_id: int, state: State, first_round: int, config: SlotConfig,
                    strategy: Strategy) -> Slot:
        latest = Snapshot(first_round - 1, state, strategy.state_dict(), 0)
        rounds = WeightRounds(slot_id, latest, strategy, config, models=self.models,
                              jobs=self.jobs, validator=self.validator, results=self.results,
                              status=self.status, settings=self.settings)
        return self._slot(slot_id, rounds, first_round)

    def gradient_slot(self, slot_id: int, state: State, first_round: int) -> Slot:
        """A gradient slot starting at `first_round` (its optimiser restored when resuming)."""
        buffers = self.evaluator.float_buffers()
        if buffers:
            raise GradientModeError(f"gradient mode cannot carry the model's floating-point "
                                    f"buffers {buffers[:3]} (BatchNorm statistics)")
        s = self.settings
        optimizer = ServerOptimizer(s.server_optimizer, s.server_optimizer_options())
        model = FlatModel(state, self.evaluator.parameter_shapes(), optimizer)
        path = self.run_state.store.model_path(slot_id, first_round - 1, "strategy")
        if first_round > 1 and path.exists():
            model.load_optimizer_state(dict(decode(path.read_bytes())[0]))
        streams = SlotStreams(self.redis, self.keys, slot_id)
        rounds = GradientSessions(slot_id, model, first_round, streams=streams, jobs=self.jobs,
                                  results=self.results, validator=self.validator, settings=s)
        return self._slot(slot_id, rounds, first_round)

    def _slot(self, slot_id: int, rounds: RoundProtocol, first_round: int) -> Slot:
        chain = EvaluationChain(slot_id, evaluator=self.evaluator, run_state=self.run_state,
                                status=self.status, settings=self.settings)
        return Slot(slot_id, rounds, leases=self.leases, chain=chain, results=self.results,
                    status=self.status, first_round=first_round, last_round=self.settings.rounds)


class PopulationMember:
    """A weight slot as the population sees it (`coordinator.population.hooks.SlotHandle`),
    and the boundary hook its `Slot` calls."""

    def __init__(self, slot: Slot, population: Population) -> None:
        assert isinstance(slot.rounds, WeightRounds)
        self._slot = slot
        self._rounds: WeightRounds = slot.rounds
        self._population = population
        self.slot_id = slot.slot_id

    @property
    def config(self) -> SlotConfig:
        return self._rounds.config

    @property
    def strategy(self) -> Strategy:
        return self._rounds.strategy

    @property
    def latest(self) -> Snapshot:
        return self._rounds.latest

    @property
    def status(self) -> SlotStatus:
        return self._slot.status

    async def replace_model(self, state: dict[str, torch.Tensor], strategy: Strategy,
                            config: SlotConfig, round_: int) -> None:
        """PBT or a merge replaced the model the next round starts from: checkpointed as
        round `round_` behind the round's own evaluation and checkpoint (not waited for), so
        a resumed run goes on from it with this configuration."""
        payload = await self._rounds.adopt(state, strategy, config, round_)
        self._slot.chain.checkpoint_replaced(round_, payload, self._rounds.latest.strategy_state,
                                             config)

    async def round_closed(self, round_: int) -> None:
        await self._population.round_closed(self, round_)

    async def slot_failed(self, round_: int) -> None:
        await self._population.slot_failed(self.slot_id, round_)
