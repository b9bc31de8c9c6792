"""Scoring a model on the clients' validation splits, outside any slot's rounds.

`--merge final` chooses among models no slot trains (each slot's last model, their
average, soups) by federated evaluation: for each, one validate-only job per live
client (the client evaluates the model it received on its held-out split and
trains nothing, so its result carries figures and no update), the figures tallied
as a round's are (`coordinator.results.figures`). It runs after every slot has
finished, so it takes the idle clients without a lease; its results come through
the dispatcher like any slot's, under its own id (one past the last slot).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
import torch

from coordinator.delivery import Delivery
from coordinator.job_table import JobRecord
from coordinator.results.figures import Validation, ValidationTally
from coordinator.results.sink import ResultSink
from coordinator.results.validation import ResultValidator
from coordinator.settings import CoordinatorSettings
from coordinator.slots.publishing import JobPublisher, ModelPublisher, model_job
from serialization import Job, encode

log = structlog.get_logger()


class FederatedScorer:
    """Scores models by federated evaluation (see the module docstring); routed to by
    `coordinator.slots.registry.Slots` like a slot."""

    def __init__(self, slot_id: int, *, clients: Callable[[], set[str]], models: ModelPublisher,
                 jobs: JobPublisher, validator: ResultValidator, results: ResultSink,
                 settings: CoordinatorSettings) -> None:
        self.slot_id = slot_id
        self.finished = False
        self._clients = clients
        self._models = models
        self._jobs = jobs
        self._validator = validator
        self._results = results
        self._settings = settings
        self._inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self._round = 0

    def deliver(self, delivery: Delivery) -> None:
        self._inbox.put_nowait(delivery)

    async def drop_after_finish(self, delivery: Delivery) -> None:
        await self._results.ack(delivery)

    async def score(self, name: str, state: dict[str, torch.Tensor]) -> Validation | None:
        """`state`'s federated evaluation on every live client (None: nobody reported)."""
        clients = tuple(sorted(self._clients()))
        if not clients:
            return None
        self._round += 1
        payload = await asyncio.to_thread(encode, state)
        records = await self._publish(self._round, payload, clients)
        tally = ValidationTally(self._round)
        await self._collect({r.job_id for r in records}, tally)
        await self._models.retire(self.slot_id, self._models.withdraw(self.slot_id), payload, (),
                                  stragglers=self._jobs.jobs.may_answer(self.slot_id, self._round))
        validation = tally.result()
        log.info("final_candidate_validated", slot_id="merged", candidate=name,
                 accuracy=None if validation is None else validation.accuracy,
                 loss=None if validation is None else validation.loss,
                 num_examples=0 if validation is None else validation.num_examples,
                 clients=0 if validation is None else validation.clients, asked=len(clients))
        return validation

    async def _publish(self, round_: int, payload: bytes,
                       clients: tuple[str, ...]) -> list[JobRecord]:
        ref = await self._models.publish(self.slot_id, round_, payload, clients)
        records = self._jobs.records(self.slot_id, round_, clients)
        advert, deadline_ts = self._models.advert(ref), time.time() + self._settings.deadline_s

        def job_of(record: JobRecord, shared: dict[str, Any]) -> Job:
            config = {**self._jobs.config(record, None), "validate": True, "validate_only": True}
            return model_job(record, shared, model=ref, advert=advert, deadline_ts=deadline_ts,
                             config=config)

        await self._jobs.publish(records, job_of)
        return records

    async def _collect(self, waiting: set[str], tally: ValidationTally) -> None:
        """Until every job answered or the deadline passed; anything else is acked."""
        deadline = time.monotonic() + self._settings.deadline_s
        while waiting:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    delivery = await self._inbox.get()
            except TimeoutError:
                log.warning("final_candidate_timeout", slot_id="merged", round=self._round,
                            missing=len(waiting))
                break
            record, result = delivery.record, delivery.result
            if record.job_id in waiting:
                waiting.discard(record.job_id)
                if result.status == "ok":
                    tally.add(record.client_id, result.metrics,
                              self._validator.claims.declared(record.client_id))
            self._results.handled(delivery)
            if self._inbox.empty():
                await self._results.flush()
        await self._results.flush()
