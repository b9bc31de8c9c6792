"""The client agent: one per machine, hosting several clients, serving a run's jobs.

Start-up connects, picks the run (given, or the active one), starts the trainer
processes and registers the clients. The main loop heartbeats, reads jobs for
its clients only as fast as its trainers can take them (plus one ahead, so the
next model download overlaps training), reclaims jobs a dead agent left
pending, and runs each job (`client_agent.job_runner`). Shutdown stops taking jobs,
finishes those in hand (or leaves them pending for a replacement after
`drain_timeout_s`), unregisters and stops the trainers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import Coroutine
from typing import Any

import structlog

from bus import streams
from bus.blobs import BlobStore
from bus.connection import as_text, connect, raise_if_cancelled, redis_errors, wait_ready
from bus.errors import RedisRefused
from bus.handoff import Advert, AgentHandoff
from bus.keys import JOBS_GROUP, Keys
from bus.registry import Registry, get_active_run
from client_agent import declaration
from client_agent.gradient import GradientRunner
from client_agent.job_runner import JobRunner
from client_agent.model_cache import ModelCache
from client_agent.settings import AgentSettings
from client_agent.trainers import TrainerPool
from serialization import AnyJob, GradientJob, PayloadError, Registration, job_from_bytes
from trainer_worker import shm

log = structlog.get_logger()
# Leaving does not wait for Redis: the heartbeats expire on their own.
UNREGISTER_TIMEOUT_S = 5.0

FINISHED_STATES = {b"finished", b"interrupted", b"failed"}
RECLAIM_EVERY_S = 5.0
READ_BLOCK_MS = 500  # a read of the job streams returns at least this often
READ_GRACE_S = 1.0  # past its block time, a read by a stopping agent is given up


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self._stopping = asyncio.Event()
        self._stop_reason = ""
        self._in_flight: dict[tuple[str, str], asyncio.Task[None]] = {}  # (stream, id)
        self.rejected = 0
        self._gradient: GradientRunner | None = None
        self._sessions: set[tuple[str, str]] = set()  # the in-flight gradient sessions

    def request_stop(self, reason: str = "signal") -> None:
        """Stop taking jobs; finish the ones in hand."""
        if not self._stopping.is_set():
            log.info("agent_stopping", agent_id=self.settings.name, reason=reason)
            self._stop_reason = reason
        self._stopping.set()

    async def run(self) -> None:
        s = self.settings
        orphans = await asyncio.to_thread(shm.sweep_orphans)
        if orphans:  # left by an agent that was killed (SIGKILL, OOM) before it could unlink
            log.warning("shm_orphans_removed", agent_id=s.name, segments=len(orphans))
        redis = connect(s.redis_settings())
        try:
            await wait_ready(redis, timeout_s=60)
            while not self._stopping.is_set():
                run_id = s.run_id or await self._active_run(redis)
                if run_id is None:
                    break
                await self._serve(redis, run_id)
                if s.exit_when_done or s.run_id or self._stop_reason != "run_finished":
                    break
                self._stopping.clear()  # the run ended, not the agent: wait for the next one
                self._stop_reason = ""
        finally:
            await redis.aclose()

    async def _active_run(self, redis: object) -> str | None:
        """Wait for a coordinator to announce a run (None if asked to stop meanwhile)."""
        while not self._stopping.is_set():
            raise_if_cancelled()
            run_id = await get_active_run(redis, self.settings.namespace)  # type: ignore[arg-type]
            if run_id and not await self._run_over(redis, Keys(run_id, self.settings.namespace)):
                return run_id
            try:
                async with asyncio.timeout(1.0):
                    await self._stopping.wait()
            except TimeoutError:
                pass
        return None

    async def _serve(self, redis: object, run_id: str) -> None:
        s = self.settings
        structlog.contextvars.bind_contextvars(run_id=run_id, agent_id=s.name)
        keys = Keys(run_id, s.namespace)
        registry = Registry(redis, keys, ttl_ms=s.heartbeat_ttl_ms)  # type: ignore[arg-type]
        pool = TrainerPool(list(s.devices), threads_per_trainer=s.threads, log_file=s.log_file,
                           run_id=run_id, agent_id=s.name, allowed_tasks=s.allowed_tasks)
        cache = ModelCache(s.cache_bytes)
        handoff = AgentHandoff(enabled=s.local_handoff)
        registration = Registration(agent_id=s.name, client_ids=list(s.client_ids),
                                    devices=list(s.devices), hostname=socket.gethostname(),
                                    pid=os.getpid(),
                                    handoff=await self._local_coordinator(redis, keys, handoff))
        try:
            await pool.start()
            sizes, signatures = await declaration.declare(
                redis, keys, pool, s.client_ids, allowed_tasks=s.allowed_tasks,
                keyring=s.keyring)
            registration = dataclasses.replace(registration, num_examples=sizes,
                                               examples_signatures=signatures)
            runner = JobRunner(redis, keys, BlobStore(redis, keys), pool, cache,  # type: ignore[arg-type]
                               s.name, keyring=s.keyring, train_timeout_s=s.train_timeout_s,
                               allowed_tasks=s.allowed_tasks, handoff=handoff)
            self._gradient = GradientRunner(redis, keys, pool, s.name, keyring=s.keyring,
                                            train_timeout_s=s.train_timeout_s)
            await registry.register(registration)
            log.info("agent_started", agent_id=s.name, client_ids=list(s.client_ids),
                     devices=list(s.devices), hostname=registration.hostname,
                     signing=s.keyring is not None, allowed_tasks=sorted(s.allowed_tasks))
            await self._main(redis, keys, registry, runner)
        finally:
            await self._shutdown(registry, registration, pool, cache)

    @staticmethod
    async def _local_coordinator(redis: object, keys: Keys, handoff: AgentHandoff) -> str:
        """The run's handoff token name when its coordinator shares this host (the agent
        read the token); "" otherwise. Registered, so the coordinator knows it."""
        if not handoff.enabled:
            return ""
        with redis_errors():  # HGET: what the agents' ACL allows on the run state
            name = await redis.hget(keys.state(), "handoff")  # type: ignore[attr-defined]
            digest = await redis.hget(keys.state(), "handoff_digest")  # type: ignore[attr-defined]
        advert = Advert(as_text(name or b""), as_text(digest or b""))
        local = await asyncio.to_thread(handoff.coordinator_pid, advert)
        return advert.name if local is not None else ""

    async def _main(self, redis: object, keys: Keys, registry: Registry,
                    runner: JobRunner) -> None:
        async with asyncio.TaskGroup() as tg:
            background = [tg.create_task(self._heartbeat(registry), name="heartbeat"),
                          tg.create_task(self._watch_run(redis, keys), name="run-watcher")]
            if self.settings.exit_with_parent:
                background.append(tg.create_task(self._watch_parent(), name="parent-watcher"))
            try:
                await self._consume(redis, keys, runner)
                await self._drain()
            finally:
                for task in background:
                    task.cancel()

    async def _heartbeat(self, registry: Registry) -> None:
        interval_s = self.settings.heartbeat_ttl_ms / 3000
        while True:
            raise_if_cancelled()
            try:
                await registry.heartbeat(self.settings.client_ids)
            except RedisRefused:
                raise  # a login or ACL refusal does not come back: stop the agent
            except Exception as exc:  # noqa: BLE001 - Redis away: keep beating, it comes back
                log.warning("heartbeat_failed", error=str(exc))
            await asyncio.sleep(interval_s)

    async def _watch_run(self, redis: object, keys: Keys) -> None:
        """Poll the run's status: stop serving when it has ended."""
        while not await self._run_over(redis, keys):
            raise_if_cancelled()
            await asyncio.sleep(0.5)
        self.request_stop("run_finished")

    async def _watch_parent(self) -> None:
        """Stop serving when the process that started us (a local coordinator) has gone.
        Apart from the run's watch, whose poll of Redis retries for --redis-outage-s when
        Redis went down with that coordinator."""
        parent = os.getppid()
        while os.getppid() == parent:  # noqa: ASYNC110 - no event tells a parent's exit
            await asyncio.sleep(0.5)
        self.request_stop("parent_exited")

    async def _run_over(self, redis: object, keys: Keys) -> bool:
        try:
            with redis_errors():
                status = await redis.hget(keys.state(), "status")  # type: ignore[attr-defined]
        except RedisRefused:
            raise
        except Exception:  # noqa: BLE001 - unknown counts as not over
            return False
        return status in FINISHED_STATES

    async def _consume(self, redis: object, keys: Keys, runner: JobRunner) -> None:
        job_streams = [keys.jobs(c) for c in self.settings.client_ids]
        for stream in job_streams:
            await streams.ensure_group(redis, stream, JOBS_GROUP)  # type: ignore[arg-type]
        last_reclaim = 0.0
        while not self._stopping.is_set():
            raise_if_cancelled()
            if time.monotonic() - last_reclaim > RECLAIM_EVERY_S:
                last_reclaim = time.monotonic()
                await self._reclaim(redis, keys, job_streams, runner)
            # A gradient session waits on its lease's other clients most of the time and
            # shares trainers: it must not keep them from being read (a deadlock).
            training = len(self._in_flight) - len(self._sessions)
            capacity = len(self.settings.devices) + 1 - training
            if capacity <= 0:
                await self._wait_for_capacity()
                continue
            entries = await self._read(streams.consume(
                redis, job_streams, JOBS_GROUP, self.settings.name,  # type: ignore[arg-type]
                count=capacity, block_ms=READ_BLOCK_MS))
            for entry in entries:
                await self._start_job(redis, entry, runner)

    async def _read(self, read: Coroutine[Any, Any, list[streams.Entry]]) -> list[streams.Entry]:
        """The entries a read of the job streams returns; none once the agent is stopping
        and the read has not returned within its block time (Redis away: it would retry
        for --redis-outage-s). Entries Redis delivered to a read given up stay pending in
        the group, where a replacement agent reclaims them."""
        reading = asyncio.ensure_future(read)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([reading, stop], return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                await asyncio.wait([reading], timeout=READ_BLOCK_MS / 1000 + READ_GRACE_S)
        finally:
            stop.cancel()
            given_up = not reading.done()
            if given_up:
                reading.cancel()  # redis-py may swallow it: then the read ends on its own
                await asyncio.wait([reading], timeout=READ_GRACE_S)
        return [] if given_up else reading.result()

    async def _wait_for_capacity(self) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([*self._in_flight.values(), stop],
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()

    async def _reclaim(self, redis: object, keys: Keys, job_streams: list[str],
                       runner: JobRunner) -> None:
        """Jobs another consumer (a dead agent for the same clients) left pending.

        The jobs in hand are touched first: a job that trains longer than
        `reclaim_idle_ms` is not taken over (by this agent or another), nor counted
        as redelivered until it lands in the dead-letter stream while still training.
        """
        s = self.settings
        for stream in job_streams:
            mine = [entry_id for (where, entry_id) in self._in_flight if where == stream]
            await streams.touch(redis, stream, JOBS_GROUP, s.name, mine)  # type: ignore[arg-type]
            entries = await streams.reclaim(
                redis, stream, JOBS_GROUP, s.name, min_idle_ms=s.reclaim_idle_ms,  # type: ignore[arg-type]
                max_deliveries=s.max_deliveries, dead_letter=keys.dead_letter(stream))
            for entry in entries:
                if (entry.stream, entry.entry_id) not in self._in_flight:
                    log.info("job_reclaimed", stream=stream, entry_id=entry.entry_id,
                             deliveries=entry.deliveries)
                    await self._start_job(redis, entry, runner)

    async def _start_job(self, redis: object, entry: streams.Entry, runner: JobRunner) -> None:
        job = self._job_of(entry, runner.keys)
        if job is None:
            await streams.ack(redis, entry.stream, JOBS_GROUP, [entry.entry_id])  # type: ignore[arg-type]
            return
        log.info("job_received", job_id=job.job_id, slot_id=job.slot_id, round=job.round,
                 client_id=job.client_id)
        work, gradient = self._work(job, entry, runner)
        task = asyncio.create_task(work, name=job.job_id)
        # Entry ids are unique per stream only: jobs published together share them.
        key = (entry.stream, entry.entry_id)
        self._in_flight[key] = task
        if gradient:
            self._sessions.add(key)
        task.add_done_callback(lambda _t: self._job_done(key))

    def _work(self, job: AnyJob, entry: streams.Entry,
              runner: JobRunner) -> tuple[Coroutine[Any, Any, None], bool]:
        """What serves `job`, and whether it is a gradient session. A session is checked like
        any job (signature, allowlist): a refused one goes to the job runner, which refuses
        it and reports it failed."""
        if (isinstance(job, GradientJob) and self._gradient is not None
                and runner.refusal(job) is None):
            return self._gradient.run(job, entry, time.time()), True
        return runner.run(job, entry, time.time()), False

    def _job_done(self, key: tuple[str, str]) -> None:
        self._in_flight.pop(key, None)
        self._sessions.discard(key)

    def _job_of(self, entry: streams.Entry, keys: Keys) -> AnyJob | None:
        """The entry's job (a weight job or a gradient session, by its kind), or None
        (logged and counted) when it is not a job for this stream."""
        try:
            job = job_from_bytes(entry.payload)
        except PayloadError as exc:
            reason, detail = exc.reason, exc.detail
        else:
            if job.run_id == keys.run_id and entry.stream == keys.jobs(job.client_id):
                return job
            reason = "mismatch"
            detail = f"job of run {job.run_id!r} for client {job.client_id!r} on {entry.stream}"
        self.rejected += 1
        log.warning("job_rejected", stream=entry.stream, entry_id=entry.entry_id,
                    reason=reason, detail=detail[:200])
        return None

    async def _drain(self) -> None:
        """Finish the jobs in hand; after the timeout, leave them pending for a replacement."""
        if not self._in_flight:
            return
        tasks = list(self._in_flight.values())
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _shutdown(self, registry: Registry, registration: Registration,
                        pool: TrainerPool, cache: ModelCache) -> None:
        try:  # bounded: with Redis gone, a command would retry for --redis-outage-s
            async with asyncio.timeout(UNREGISTER_TIMEOUT_S):
                await asyncio.shield(registry.unregister(registration))
        except Exception as exc:  # noqa: BLE001 - Redis may be gone; heartbeats expire anyway
            log.warning("unregister_failed", error=str(exc) or type(exc).__name__)
        await pool.close()
        cache.close()
        log.info("agent_stopped", agent_id=self.settings.name)
