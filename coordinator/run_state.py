"""The run's durable state: each slot's checkpoints, state.json, the round in Redis.

What `--resume` reads back. Every write here must land whatever happens, so
`checkpoint` is shielded from cancellation, and the state document's writes are
serialised so that no slot's entry is lost to another's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
import structlog

from bus.keys import Keys
from coordinator.checkpoints import CheckpointStore, json_safe
from serialization import encode

log = structlog.get_logger()


class RunState:
    """Checkpoints on disk plus the state document that names them."""

    def __init__(self, store: CheckpointStore, redis: aioredis.Redis, keys: Keys) -> None:
        self.store = store
        self._redis = redis
        self._keys = keys
        self.doc: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def announce(self, doc: dict[str, Any]) -> None:
        """Start the run's state document (a resumed run's keeps its slots' entries)."""
        self.doc = doc
        await asyncio.to_thread(self.store.write_state, doc)

    async def checkpoint(self, slot_id: int, round_: int, payload: bytes,
                         strategy_state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write the slot's model and the run's state; shielded from cancellation."""
        await asyncio.shield(self._checkpoint(slot_id, round_, payload, strategy_state, metrics))

    async def _checkpoint(self, slot_id: int, round_: int, payload: bytes,
                          strategy_state: dict[str, Any], metrics: dict[str, float]) -> None:
        start = time.perf_counter()
        write = self.store.write_model
        path = await asyncio.to_thread(write, slot_id, round_, payload)
        if strategy_state:
            extra = await asyncio.to_thread(encode, strategy_state)
            await asyncio.to_thread(write, slot_id, round_, extra, "strategy")
        slot_state = {"round": round_, "metrics": metrics, "path": str(path)}
        await self._save_state(slot_id, round_, slot_state)
        await asyncio.to_thread(self.store.prune, slot_id)
        log.info("checkpoint_written", slot_id=slot_id, round=round_, path=str(path),
                 nbytes=len(payload), duration_s=round(time.perf_counter() - start, 6))

    async def _save_state(self, slot_id: int, round_: int, slot_state: dict[str, Any]) -> None:
        """Update the run's state document; writes are serialised so none is lost."""
        self.doc.setdefault("slots", {})[str(slot_id)] = slot_state
        async with self._lock:
            snapshot = json_safe(self.doc)
            await asyncio.to_thread(self.store.write_state, snapshot)
        await self._redis.hset(self._keys.state(), f"slot:{slot_id}:round", str(round_))
