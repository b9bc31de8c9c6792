"""What a slot publishes for its clients: its model (`ModelPublisher`) and its jobs
(`JobPublisher`).

A weight round's model goes to Redis as a content-addressed blob and, for agents
on this host, into a shared-memory segment (`bus.handoff`); a round whose clients
are all local stores no blob. After the round its update blobs and the model it
replaced are retired, unless a straggler may still read them. Jobs are written to
each client's stream in one pipeline, signed with the client's key when the run
signs, and entered in the job table that results are judged against.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
import structlog

from bus import streams
from bus.blobs import BlobRef, BlobStore, digest_of
from bus.handoff import HostHandoff
from bus.keys import Keys
from coordinator.job_table import JobRecord, JobTable, new_job_id
from coordinator.results.validation import BlobReader, SegmentReader
from coordinator.settings import CoordinatorSettings, TrainingSettings
from coordinator.slots.published import PublishedModels
from coordinator.status import RunStatus
from serialization import AnyJob, Job, Result
from serialization.slot_events import JobPublished, ModelPublished, emit

log = structlog.get_logger()


class LocalClients(Protocol):
    """Which clients take their models from shared memory (`coordinator.clients`)."""

    def all_local(self, clients: Sequence[str]) -> bool: ...


class ModelPublisher:
    """Each slot's published model, in Redis and (for agents on this host) in shared
    memory, and the retirement of blobs nobody needs any more."""

    def __init__(self, blobs: BlobStore, handoff: HostHandoff | None, local: LocalClients,
                 status: RunStatus) -> None:
        self._blobs = blobs
        self._handoff = handoff
        self._local = local
        self._status = status
        self._stored: dict[int, str] = {}  # per slot: the model digest stored in Redis
        self.published = PublishedModels(blobs, handoff)

    async def publish(self, slot_id: int, round_: int, payload: bytes,
                      clients: Sequence[str], *, encode_s: float = 0.0) -> BlobRef:
        """The model every job of the round points at: stored in Redis unless every client
        takes it from shared memory; a retried round publishes the same model again.
        (`encode_s`: what encoding `payload` took, for the event.)"""
        ref = self.published.of_slot(slot_id)
        if ref is not None:
            if not self._local.all_local(clients):
                await self.store(slot_id, ref.digest, payload)
            return ref
        start = time.perf_counter()
        ref = BlobRef(await asyncio.to_thread(digest_of, payload), len(payload))
        shm_s, blob = await self._write(slot_id, ref, payload, clients)
        self.published.publish(slot_id, ref)
        self._status.counters["bytes_published"] += ref.nbytes
        put_s = time.perf_counter() - start
        emit(log, ModelPublished(slot_id, round=round_, digest=ref.digest, nbytes=ref.nbytes,
                                 encode_s=round(encode_s, 6), put_s=round(put_s, 6),
                                 shm_s=round(shm_s, 6), blob=blob,
                                 duration_s=round(encode_s + put_s, 6)))
        return ref

    async def _write(self, slot_id: int, ref: BlobRef, payload: bytes,
                     clients: Sequence[str]) -> tuple[float, bool]:
        """Segment and/or blob: (seconds on the segment, whether a blob was stored)."""
        if self._local.all_local(clients):
            shm_s = await self._segment(slot_id, ref.digest, payload)
            if shm_s is None:  # the segment could not be written: Redis it is
                await self._put(slot_id, ref.digest, payload)
            return shm_s or 0.0, shm_s is None
        _, shm_s = await asyncio.gather(self._put(slot_id, ref.digest, payload),
                                        self._segment(slot_id, ref.digest, payload))
        return shm_s or 0.0, True

    async def _put(self, slot_id: int, digest: str, payload: bytes) -> None:
        """Always written: a model equal to an earlier one (an unchanged update) has that
        one's digest, and its blob may have been retired since."""
        await self._blobs.put(payload, digest)
        self._stored[slot_id] = digest

    async def store(self, slot_id: int, digest: str, payload: bytes) -> None:
        """The slot's current model in Redis, unless this slot stored it already (a retried
        round, a straggler's model that only shared memory held)."""
        if self._stored.get(slot_id) != digest:
            await self._put(slot_id, digest, payload)

    async def _segment(self, slot_id: int, digest: str, payload: bytes) -> float | None:
        """The model's shared-memory copy for agents on this host: seconds spent (0 with
        the handoff off), None if it could not be written (the agents read the blob)."""
        if self._handoff is None:
            return 0.0
        start = time.perf_counter()
        try:
            await asyncio.to_thread(self._handoff.write_model, digest, payload,
                                    self.published.live_digests())
        except OSError as exc:  # /dev/shm full, say
            log.warning("handoff_unavailable", slot_id=slot_id, error=str(exc))
            return None
        return time.perf_counter() - start

    def advert(self, ref: BlobRef) -> tuple[str, str, str]:
        """What a job offers agents on this host: the token segment, its digest and the
        model's segment (empty when the model is not in shared memory)."""
        segment = self._handoff.model_segment(ref.digest) if self._handoff else None
        if self._handoff is None or segment is None:
            return "", "", ""
        return self._handoff.advert.name, self._handoff.advert.digest, segment

    def withdraw(self, slot_id: int) -> BlobRef | None:
        """The slot's round closed: its model is no longer served (returned, to retire)."""
        ref = self.published.of_slot(slot_id)
        self.published.withdraw(slot_id)
        return ref

    async def retire(self, slot_id: int, old_model: BlobRef | None, old_payload: bytes,
                     updates: Iterable[BlobRef], *, stragglers: bool) -> None:
        """Unlink a closed round's update blobs and the model it replaced, unless a job of
        the round may still train on it (a straggler, or a lost client's job a
        replacement agent reclaims): that model is then stored in Redis if only shared
        memory held it, since its segment may go first and a replacement may be remote."""
        refs = {ref.digest: ref for ref in updates}
        if old_model is not None:
            if stragglers:
                refs.pop(old_model.digest, None)  # left to its TTL
                await self.store(slot_id, old_model.digest, old_payload)
            else:
                refs[old_model.digest] = old_model
        for ref in refs.values():
            await self.published.retire(ref)

    def update_reader(self, result: Result) -> BlobReader:
        """Where an update's bytes are: its handed-over segment, or the blob store."""
        return SegmentReader(self._handoff, result.update_shm) if result.update_shm else (
            self._blobs)


def model_job(record: JobRecord, shared: dict[str, Any], *, model: BlobRef,
              advert: tuple[str, str, str], deadline_ts: float, config: dict[str, Any]) -> Job:
    """A weight job (or a validate-only one) for `record` on the published `model`;
    `advert` is `ModelPublisher.advert`'s (token, its digest, the model's segment)."""
    token, token_digest, segment = advert
    return Job(job_id=record.job_id, slot_id=record.slot_id, round=record.round,
               client_id=record.client_id, model_digest=model.digest, model_nbytes=model.nbytes,
               deadline_ts=deadline_ts, config=config, **shared, handoff=token,
               handoff_digest=token_digest, model_shm=segment)


class JobPublisher:
    """Writes a round's jobs to their clients' streams and enters them in the job table."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, settings: CoordinatorSettings,
                 jobs: JobTable, job_bytes: Callable[[AnyJob], bytes], status: RunStatus) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self.jobs = jobs
        self._job_bytes = job_bytes
        self._status = status

    def records(self, slot_id: int, round_: int, clients: Iterable[str]) -> list[JobRecord]:
        return [JobRecord(new_job_id(slot_id, round_, c), slot_id, round_, c) for c in clients]

    def config(self, record: JobRecord, training: TrainingSettings | None) -> dict[str, Any]:
        """Training settings (the slot's, else the run's) with a seed fixed by (run seed,
        slot, round, client), and `validate` when the run evaluates on the clients."""
        s = self._settings
        key = f"{s.seed}:{record.slot_id}:{record.round}:{record.client_id}"
        config = (training or s.training).job_config(zlib.crc32(key.encode()) & 0x7FFFFFFF)
        return {**config, "validate": True} if s.federated else config

    async def publish(self, records: Sequence[JobRecord],
                      job_of: Callable[[JobRecord, dict[str, Any]], AnyJob]) -> None:
        """`job_of(record, fields)` builds each job from the fields every job shares."""
        s = self._settings
        shared = {"run_id": s.run_id, "task": s.task, "task_options": s.full_task_options(),
                  "published_ts": time.time()}
        items = []
        for record in records:
            self.jobs.add(record)
            job = job_of(record, shared)
            items.append((self._keys.jobs(record.client_id), self._job_bytes(job)))
            emit(log, JobPublished(record.slot_id, round=record.round, client_id=record.client_id,
                                   job_id=record.job_id, seed=job.config["seed"]))
        await streams.publish_many(self._redis, items)
        self._status.counters["jobs_published"] += len(records)
