"""What the parts of a running coordinator share: settings, Redis, blobs, pool, jobs.

Also the few writes that must land whatever happens (acks, checkpoints), which
are shielded from cancellation. The context knows no slot runner: results reach
slots through `inboxes` (`coordinator.delivery`), live models are in `models`
(`coordinator.models`), and what a result must be to be accepted is `validator`'s
decision (`coordinator.results.validation`).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog

from bus import streams
from bus.blobs import BlobStore
from bus.keys import RESULTS_GROUP, Keys
from coordinator.checkpoints import CheckpointStore, json_safe
from coordinator.delivery import Delivery, SlotInboxes
from coordinator.evaluation import Evaluator
from coordinator.job_table import JobRecord, JobTable
from coordinator.leases import LeaseBroker
from coordinator.models import PublishedModels
from coordinator.quorum import QuorumRule
from coordinator.results.validation import Rejections, ResultValidator
from coordinator.settings import CoordinatorSettings
from coordinator.status import RunStatus
from serialization import encode

log = structlog.get_logger()


@dataclass
class RunContext:
    """The run's shared services; each part takes the few it uses (see the module docstring)."""

    settings: CoordinatorSettings
    redis: aioredis.Redis
    keys: Keys
    blobs: BlobStore
    broker: LeaseBroker
    evaluator: Evaluator
    checkpoints: CheckpointStore
    status: RunStatus
    jobs: JobTable
    validator: ResultValidator
    rejections: Rejections
    models: PublishedModels
    inboxes: SlotInboxes = field(default_factory=SlotInboxes)
    state_doc: dict[str, Any] = field(default_factory=dict)
    _state_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def quorum_rule(self) -> QuorumRule:
        s = self.settings
        return QuorumRule(fraction=s.quorum, min_updates=s.min_clients, deadline_s=s.deadline_s)

    @property
    def task_options(self) -> dict[str, Any]:
        return self.settings.full_task_options()

    def job_config(self, record: JobRecord) -> dict[str, Any]:
        """Training settings with a seed fixed by (run seed, slot, round, client)."""
        key = f"{self.settings.seed}:{record.slot_id}:{record.round}:{record.client_id}"
        return self.settings.training.job_config(zlib.crc32(key.encode()) & 0x7FFFFFFF)

    async def publish_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        await streams.publish_many(self.redis, items)

    async def ack(self, delivery: Delivery) -> None:
        """Ack a handled result; shielded, so a cancelled slot still acks what it folded."""
        if delivery.stream is None or delivery.entry_id is None:
            return
        ack = streams.ack(self.redis, delivery.stream, RESULTS_GROUP, [delivery.entry_id])
        await asyncio.shield(ack)

    def reject(self, delivery: Delivery | None, reason: str, detail: str, **fields: Any) -> None:
        """Log and count a rejected update or message; the process goes on serving."""
        self.rejections.report(delivery, reason, detail, **fields)

    async def checkpoint(self, slot_id: int, round_: int, payload: bytes,
                         strategy_state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write the slot's model and the run's state; shielded from cancellation."""
        await asyncio.shield(self._checkpoint(slot_id, round_, payload, strategy_state, metrics))

    async def _checkpoint(self, slot_id: int, round_: int, payload: bytes,
                          strategy_state: dict[str, Any], metrics: dict[str, float]) -> None:
        start = time.perf_counter()
        write = self.checkpoints.write_model
        path = await asyncio.to_thread(write, slot_id, round_, payload)
        if strategy_state:
            extra = await asyncio.to_thread(encode, strategy_state)
            await asyncio.to_thread(write, slot_id, round_, extra, "strategy")
        slot_state = {"round": round_, "metrics": metrics, "path": str(path)}
        await self._save_state(slot_id, round_, slot_state)
        await asyncio.to_thread(self.checkpoints.prune, slot_id)
        log.info("checkpoint_written", slot_id=slot_id, round=round_, path=str(path),
                 nbytes=len(payload), duration_s=round(time.perf_counter() - start, 6))

    async def _save_state(self, slot_id: int, round_: int, slot_state: dict[str, Any]) -> None:
        """Update the run's state document; writes are serialised so none is lost."""
        self.state_doc.setdefault("slots", {})[str(slot_id)] = slot_state
        async with self._state_lock:
            snapshot = json_safe(self.state_doc)
            await asyncio.to_thread(self.checkpoints.write_state, snapshot)
        await self.redis.hset(self.keys.state(), f"slot:{slot_id}:round", str(round_))

