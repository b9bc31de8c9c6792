"""What the parts of a running coordinator share: settings, Redis, blobs, pool, jobs.

Also the ack of a handled result, which must land whatever happens and is
shielded from cancellation. The context knows no slot runner: results reach
slots through `inboxes` (`coordinator.delivery`), live models are in `models`
(`coordinator.models`), what a result must be to be accepted is `validator`'s
decision (`coordinator.results.validation`), and checkpoints with the state
document are `run_state`'s (`coordinator.run_state`).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from bus import streams
from bus.blobs import BlobStore
from bus.handoff import HostHandoff
from bus.keys import RESULTS_GROUP, Keys
from coordinator.delivery import Delivery, SlotInboxes
from coordinator.evaluation import Evaluator
from coordinator.job_table import JobRecord, JobTable
from coordinator.leases import LeaseBroker
from coordinator.models import PublishedModels
from coordinator.quorum import QuorumRule
from coordinator.results.validation import Rejections, ResultValidator
from coordinator.run_state import RunState
from coordinator.settings import CoordinatorSettings
from coordinator.status import RunStatus
from serialization import AnyJob, Message


@dataclass
class RunContext:
    """The run's shared services; each part takes the few it uses (see the module docstring)."""

    settings: CoordinatorSettings
    redis: aioredis.Redis
    keys: Keys
    blobs: BlobStore
    broker: LeaseBroker
    evaluator: Evaluator
    run_state: RunState
    status: RunStatus
    jobs: JobTable
    validator: ResultValidator
    rejections: Rejections
    models: PublishedModels
    inboxes: SlotInboxes = field(default_factory=SlotInboxes)
    # A job's bytes as published: signed with its client's key when the run signs.
    job_bytes: Callable[[AnyJob], bytes] = Message.to_bytes
    handoff: HostHandoff | None = None  # None: models and updates go through Redis only
    # Clients whose agents registered as sharing this host (they proved the handoff token).
    local_clients: frozenset[str] = frozenset()

    def all_local(self, clients: Sequence[str]) -> bool:
        """Whether every one of `clients` takes its models from shared memory."""
        return self.handoff is not None and set(clients) <= self.local_clients

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
        await self.ack_many([delivery])

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack handled results, one XACK per stream (shielded, as `ack`).

        An update handed over in shared memory is unlinked first: handled means done with
        it, whether it was folded, rejected, late or dropped."""
        by_stream: dict[str, list[str]] = {}
        for delivery in deliveries:
            self.discard_update(delivery)
            if delivery.stream is not None and delivery.entry_id is not None:
                by_stream.setdefault(delivery.stream, []).append(delivery.entry_id)
        for stream, entry_ids in by_stream.items():
            await asyncio.shield(streams.ack(self.redis, stream, RESULTS_GROUP, entry_ids))

    def discard_update(self, delivery: Delivery) -> None:
        """Unlink the shared-memory segment of a handled update, if it was handed over."""
        if self.handoff is not None and delivery.result.update_shm:
            self.handoff.discard_update(delivery.result.update_shm)

    def reject(self, delivery: Delivery | None, reason: str, detail: str, **fields: Any) -> None:
        """Log and count a rejected update or message; the process goes on serving."""
        self.rejections.report(delivery, reason, detail, **fields)
