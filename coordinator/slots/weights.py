"""Weight rounds: each leased client trains the slot's model and sends it back.

Opening a round publishes the model once and one job per client; each update is
fetched, validated and folded into the running aggregate as it arrives (off the
event loop, `coordinator.results.fold`); the quorum (`coordinator.quorum`) says
when the round is over; closing finalises the aggregate with the slot's strategy
and retires the round's blobs. Late updates fold into the open round with a
staleness weight when the run's late policy says so.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus.blobs import BlobRef
from coordinator.delivery import Delivery
from coordinator.job_table import JobRecord
from coordinator.population.config import SlotConfig
from coordinator.population.hooks import Snapshot
from coordinator.quorum import QuorumRule, RoundQuorum, staleness_weight
from coordinator.results.figures import ValidationTally
from coordinator.results.fold import fetch_and_fold
from coordinator.results.sink import ResultSink
from coordinator.results.validation import ResultValidator
from coordinator.settings import CoordinatorSettings
from coordinator.slots.protocol import ClosedRound, RoundEnd, RoundProtocol, State
from coordinator.slots.publishing import JobPublisher, ModelPublisher, model_job
from coordinator.status import RunStatus
from coordinator.strategies import Strategy
from serialization import Job, encode
from serialization import slot_events as events
from serialization.slot_events import emit

log = structlog.get_logger()


@dataclass
class OpenRound:
    round: int
    jobs: dict[str, JobRecord]
    aggregate: Any
    quorum: RoundQuorum
    validation: ValidationTally
    num_updates: int = 0
    num_examples: int = 0
    update_refs: list[BlobRef] = field(default_factory=list)


class WeightRounds(RoundProtocol):
    """A weight slot's rounds (see the module docstring)."""

    def __init__(self, slot_id: int, latest: Snapshot, strategy: Strategy, config: SlotConfig,
                 *, models: ModelPublisher, jobs: JobPublisher, validator: ResultValidator,
                 results: ResultSink, status: RunStatus, settings: CoordinatorSettings) -> None:
        self.slot_id = slot_id
        self.latest = latest  # the model as it left the last round boundary
        self.strategy = strategy
        self.config = config
        self._models = models
        self._jobs = jobs
        self._validator = validator
        self._results = results
        self._status = status
        self._settings = settings
        self._open: OpenRound | None = None
        self._payload: bytes | None = None  # `latest.state` encoded, once it is

    @property
    def state(self) -> State:
        return self.latest.state

    def latest_model(self) -> tuple[int, State, bytes | None]:
        return self.latest.round, self.latest.state, self._payload

    # --- opening ---------------------------------------------------------------------

    async def open(self, round_: int, clients: tuple[str, ...], wait_s: float) -> None:
        s = self._settings
        ref = await self._publish_model(round_, clients)
        records = self._jobs.records(self.slot_id, round_, clients)
        aggregate = await asyncio.to_thread(self.strategy.begin_round, self.state)
        rule = QuorumRule(fraction=s.quorum, min_updates=s.min_clients, deadline_s=s.deadline_s)
        quorum = RoundQuorum(rule, len(records), time.monotonic())
        self._open = OpenRound(round_, {r.job_id: r for r in records}, aggregate, quorum,
                               ValidationTally(self.latest.round))
        emit(log, events.RoundStarted(self.slot_id, round=round_, clients=list(clients),
                                      quorum_count=quorum.needed, deadline_s=s.deadline_s,
                                      wait_s=round(wait_s, 6)))
        advert, deadline_ts = self._models.advert(ref), time.time() + s.deadline_s

        def job_of(record: JobRecord, shared: dict[str, Any]) -> Job:
            return model_job(record, shared, model=ref, advert=advert, deadline_ts=deadline_ts,
                             config=self._jobs.config(record, self.config.training))

        await self._jobs.publish(records, job_of)

    async def _publish_model(self, round_: int, clients: tuple[str, ...]) -> BlobRef:
        start = time.perf_counter()
        if self._payload is None:
            self._payload = await asyncio.to_thread(encode, self.state)
        return await self._models.publish(self.slot_id, round_, self._payload, clients,
                                          encode_s=time.perf_counter() - start)

    # --- collecting ------------------------------------------------------------------

    def owns(self, delivery: Delivery) -> bool:
        opened = self._open
        return (opened is not None and not delivery.recovered
                and delivery.record.job_id in opened.jobs)

    async def take_result(self, delivery: Delivery) -> None:
        assert self._open is not None
        ok = await self._fold(delivery, self._open, scale=1.0)
        self._open.quorum.record(delivery.record.job_id, ok=ok)
        if ok:  # the figures of a rejected update are not taken either
            client_id = delivery.record.client_id
            self._open.validation.add(client_id, delivery.result.metrics,
                                      self._validator.claims.declared(client_id))

    async def client_failed(self, delivery: Delivery) -> None:
        assert self._open is not None
        self._open.quorum.record(delivery.record.job_id, ok=False)

    def deadline(self) -> float | None:
        assert self._open is not None
        quorum = self._open.quorum
        return None if quorum.closure(time.monotonic()) is not None else quorum.deadline_at

    def folds_late(self, delivery: Delivery) -> bool:
        return self._validator.folds_late(delivery.result, round_open=self._open is not None)

    async def fold_late(self, delivery: Delivery, staleness: int) -> None:
        assert self._open is not None
        await self._fold(delivery, self._open,
                         scale=staleness_weight(staleness, self._settings.staleness))

    async def _fold(self, delivery: Delivery, opened: OpenRound, scale: float) -> bool:
        delivery = self._validator.claims.capped(
            delivery, self._jobs.config(delivery.record, self.config.training))
        result = delivery.result
        verdict = await fetch_and_fold(self._models.update_reader(result), self._validator,
                                       self.strategy, opened.aggregate, delivery, scale)
        if not verdict.accepted:
            self._results.reject(delivery, verdict.reason, verdict.detail, **verdict.fields)
            return False
        self._status.counters["bytes_received"] += verdict.stats["nbytes"]
        self._status.counters["updates_folded"] += 1
        opened.num_updates += 1
        opened.num_examples += result.num_examples
        if not result.update_shm:  # a handed-over update is unlinked when handled
            opened.update_refs.append(BlobRef(result.update_digest, result.update_nbytes))
        record = delivery.record
        emit(log, events.UpdateFolded(self.slot_id, round=record.round,
                                      client_id=record.client_id, job_id=record.job_id,
                                      via="shm" if result.update_shm else "redis",
                                      more=verdict.stats))
        return True

    # --- closing ---------------------------------------------------------------------

    def end(self) -> RoundEnd:
        assert self._open is not None
        opened = self._open
        closure = opened.quorum.closure(time.monotonic())
        assert closure is not None
        emit(log, events.QuorumReached(
            self.slot_id, round=opened.round, reason=closure.reason, received=closure.succeeded,
            failed=closure.failed, expected=closure.expected,
            wait_s=round(time.monotonic() - opened.quorum.started_at, 6)))
        if not closure.ok:
            self._open = None
        return RoundEnd(closure.ok, "no_quorum",
                        {"received": closure.succeeded, "failed": closure.failed})

    async def close(self) -> ClosedRound:
        opened, self._open = self._open, None
        assert opened is not None
        start = time.perf_counter()
        new_state = await asyncio.to_thread(self.strategy.finalize, opened.aggregate, self.state)
        strategy_state = self.strategy.state_dict()  # this round's, before the next one steps
        payload = await asyncio.to_thread(encode, new_state)
        emit(log, events.AggregationFinished(self.slot_id, round=opened.round,
                                             num_updates=opened.num_updates,
                                             num_examples=opened.num_examples,
                                             duration_s=round(time.perf_counter() - start, 6)))
        old_payload = self._payload
        assert old_payload is not None  # published when the round opened
        self.latest = Snapshot(opened.round, new_state, strategy_state, opened.num_examples)
        self._payload = payload
        await self._models.retire(
            self.slot_id, self._models.withdraw(self.slot_id), old_payload,
            opened.update_refs,
            stragglers=self._jobs.jobs.may_answer(self.slot_id, opened.round))
        return ClosedRound(opened.round, new_state, payload, strategy_state,
                           opened.num_updates, opened.num_examples,
                           validation=opened.validation.result())

    # --- the population's replacements -----------------------------------------------

    async def adopt(self, state: State, strategy: Strategy, config: SlotConfig,
                    round_: int) -> bytes:
        """PBT or a merge replaced the model the next round starts from: its bytes."""
        payload = await asyncio.to_thread(encode, state)
        self.strategy, self.config = strategy, config
        self._payload = payload
        self._models.withdraw(self.slot_id)
        self.latest = Snapshot(round_, state, strategy.state_dict(), 0)
        return payload
