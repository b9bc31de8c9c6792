"""One job, start to finish, on the agent: model, trainer, upload, result, ack.

A job is refused (logged as `job_refused`, reported failed) when its task is not
on the agent's allowlist or, with keys, when it is not signed with its client's
key. The result entry is added before the job is acked (at-least-once; the
coordinator aggregates a job id at most once), and both writes are shielded
from cancellation so a job in hand is never half-reported. With signing on,
each result carries its client's HMAC signature (`serialization.signing`).
A job whose config says ``validate_only`` is answered with an ok result without
update (no digest, 0 bytes, 0 examples) whose metrics hold the figures of the
received model on the client's validation split (``val_accuracy``, ``val_loss``,
``val_examples``), signed like any result.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from bus import handoff as local_handoff
from bus import streams
from bus.blobs import BlobRef, BlobStore, digest_of
from bus.credentials import Keyring
from bus.errors import BlobMissing
from bus.keys import JOBS_GROUP, Keys
from client_agent.limits import train_time_limit_s
from client_agent.model_cache import ModelCache, ModelSegment
from client_agent.trainers import TrainerPool, TrainReply, TrainRequest
from serialization import AnyJob, GradientJob, Job, Result
from serialization.signing import job_signature_problem, signed
from serialization.tasks import BUILTIN_TASKS
from trainer_worker.task import VAL_ACCURACY

log = structlog.get_logger()
# Reasons a job is refused (the prefix of its failed result's error).
TASK_NOT_ALLOWED = "task_not_allowed"
BAD_JOB_SIGNATURE = "bad_job_signature"


@dataclass
class JobRunner:
    """Runs jobs for one agent; shared by all its clients."""

    redis: Any
    keys: Keys
    blobs: BlobStore
    pool: TrainerPool
    cache: ModelCache
    agent_id: str
    keyring: Keyring | None = None  # signs each result with its client's key; None: unsigned
    train_timeout_s: float | None = None  # None: derived from each job's deadline
    allowed_tasks: frozenset[str] = frozenset(BUILTIN_TASKS.values())
    # Models and updates in shared memory with a coordinator on this host (`bus.handoff`).
    handoff: local_handoff.AgentHandoff = field(
        default_factory=lambda: local_handoff.AgentHandoff(enabled=False))
    _fetching: dict[str, asyncio.Future[ModelSegment]] = field(default_factory=dict)

    async def run(self, job: AnyJob, entry: streams.Entry, received_at: float) -> None:
        """Run a weight job, or refuse a job of either kind (see `refusal`); report it."""
        try:
            result = await self._execute(job, received_at)
        except Exception as exc:
            log.exception("job_error", job_id=job.job_id)
            result = self._failed(job, f"{type(exc).__name__}: {exc}", {})
        await asyncio.shield(self._report(job, result, entry))

    async def _execute(self, job: AnyJob, received_at: float) -> Result:
        refusal = self.refusal(job)
        if refusal is not None:
            reason, detail = refusal
            log.warning("job_refused", job_id=job.job_id, slot_id=job.slot_id, round=job.round,
                        client_id=job.client_id, task=job.task, reason=reason, detail=detail)
            return self._failed(job, f"{reason}: {detail}", {})
        if isinstance(job, GradientJob):  # the agent hands sessions it runs to GradientRunner
            return self._failed(job, "a gradient session reached the weight-job runner", {})
        if job.deadline_ts < time.time():
            return self._failed(job, "deadline passed before the job started", {})
        fetch_start = time.perf_counter()
        try:
            segment = await self._model(job)
        except BlobMissing as exc:
            return self._failed(job, f"model blob missing: {exc}", {})
        fetch_s = time.perf_counter() - fetch_start
        self.cache.acquire(segment.digest)
        try:
            reply = await self._train(job, segment)
        finally:
            self.cache.release(segment.digest)
        timings = {"fetch_s": round(fetch_s, 6), **reply.timings}
        return await self._upload(job, reply, timings, received_at)

    def refusal(self, job: AnyJob) -> tuple[str, str] | None:
        """Why this agent will not run `job` (reason, detail), or None.

        With keys, a job must be signed with its client's key (else nothing in it is to
        be trusted, its task least of all); and its task must be on the allowlist, so a
        job can never make the agent import code its operator did not choose.
        """
        if self.keyring is not None:
            problem = job_signature_problem(job, self.keyring.get(job.client_id))
            if problem is not None:
                return BAD_JOB_SIGNATURE, problem
        if job.task not in self.allowed_tasks:
            return TASK_NOT_ALLOWED, (f"task {job.task!r} is not allowed on this agent "
                                      "(--allow-task)")
        return None

    async def _model(self, job: Job) -> ModelSegment:
        """The job's model in shared memory: fetched once per digest, however many ask."""
        segment = self.cache.get(job.model_digest)
        cached = segment is not None
        start = time.perf_counter()
        via = "cache"
        if segment is None:
            segment, via = await self._fetch_once(job)
        log.info("model_fetched", job_id=job.job_id, digest=job.model_digest,
                 nbytes=job.model_nbytes, cached=cached, via=via,
                 duration_s=round(time.perf_counter() - start, 6))
        return segment

    def _coordinator_pid(self, job: Job) -> int | None:
        """The pid of the job's coordinator when it shares this host and offers the handoff
        (a 32-byte read of its token, once per run); else None."""
        if not job.handoff:
            return None
        return self.handoff.coordinator_pid(local_handoff.Advert(job.handoff,
                                                                 job.handoff_digest))

    async def _fetch_once(self, job: Job) -> tuple[ModelSegment, str]:
        """(the model's segment, "redis" or "shm": where it came from)."""
        pending = self._fetching.get(job.model_digest)
        if pending is not None:
            return await asyncio.shield(pending), "cache"
        future: asyncio.Future[ModelSegment] = asyncio.get_running_loop().create_future()
        self._fetching[job.model_digest] = future
        try:
            segment = await self._from_coordinator_shm(job)
            via = "shm"
            if segment is None:
                via = "redis"
                # Signing on means silos that do not trust each other share Redis: any of
                # them could overwrite a blob, so the model is checked against its digest.
                data = await self.blobs.get(BlobRef(job.model_digest, job.model_nbytes),
                                            verify=self.keyring is not None)
                segment = await asyncio.to_thread(self.cache.put, job.model_digest, data)
            future.set_result(segment)
            return segment, via
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody warns
            raise
        finally:
            del self._fetching[job.model_digest]

    async def _from_coordinator_shm(self, job: Job) -> ModelSegment | None:
        """The model copied from the local coordinator's segment into the cache; None when
        there is none to use (a remote coordinator, the handoff off, the segment gone or
        not as claimed: logged as `handoff_fallback`), and Redis serves it instead."""
        pid = self._coordinator_pid(job)
        path = None if pid is None else self.handoff.model_path(pid, job.model_shm)
        if path is None:
            return None
        verify = self.keyring is not None  # as for the blob: other silos may share this host

        def fill(out: memoryview) -> None:
            local_handoff.read_into(path, out, job.model_nbytes, f"model {job.model_digest}")
            if verify and digest_of(out) != job.model_digest:
                raise BlobMissing(f"model segment {job.model_shm}: bytes of another digest")

        try:
            return await asyncio.to_thread(self.cache.put_filled, job.model_digest,
                                           job.model_nbytes, fill)
        except (BlobMissing, OSError) as exc:
            log.warning("handoff_fallback", job_id=job.job_id, what="model",
                        segment=job.model_shm, error=str(exc))
            return None

    async def _train(self, job: Job, segment: ModelSegment) -> TrainReply:
        request = TrainRequest(job_id=job.job_id, client_id=job.client_id, task=job.task,
                               task_options=job.task_options, config=job.config, model=segment,
                               time_limit_s=lambda: train_time_limit_s(
                                   job, self.train_timeout_s, time.time()))
        log.info("job_started", job_id=job.job_id, client_id=job.client_id)
        reply = await self.pool.train(request)
        log.info("job_finished", job_id=job.job_id, client_id=job.client_id,
                 status=reply.status, num_examples=reply.num_examples,
                 train_s=reply.timings.get("train_s"), error=reply.error or None,
                 device=reply.device)
        return reply

    async def _upload(self, job: Job, reply: TrainReply, timings: dict[str, Any],
                      received_at: float) -> Result:
        if reply.status == "ok" and reply.update is None and _validate_only(job):
            return self._evaluated(job, reply, timings, received_at)
        if reply.status != "ok" or reply.update is None:
            reply.release()
            return self._failed(job, reply.error or "trainer returned no update", timings)
        start = time.perf_counter()
        handed = None
        try:
            handed = await self._hand_over(job, reply)
            ref = handed[0] if handed is not None else await self.blobs.put(reply.update)
        finally:
            reply.release()
        timings["upload_s"] = round(time.perf_counter() - start, 6)
        timings["total_s"] = round(time.time() - received_at, 6)
        if handed is None:  # a handed-over update is logged once its result is posted
            log.info("update_uploaded", job_id=job.job_id, nbytes=ref.nbytes,
                     duration_s=timings["upload_s"], via="redis")
        return Result(job_id=job.job_id, run_id=job.run_id, slot_id=job.slot_id,
                      round=job.round, client_id=job.client_id, status="ok",
                      agent_id=self.agent_id, update_digest=ref.digest,
                      update_nbytes=ref.nbytes, num_examples=reply.num_examples,
                      metrics=reply.metrics, timings=timings,
                      update_shm="" if handed is None else handed[1])

    def _evaluated(self, job: Job, reply: TrainReply, timings: dict[str, Any],
                   received_at: float) -> Result:
        """An evaluation-only job's result: ok with the validation figures and no update,
        or failed when the task reported none (it keeps no validation split)."""
        reply.release()
        if VAL_ACCURACY not in reply.metrics:
            return self._failed(job, "validate_only: the task reported no validation accuracy "
                                "(no validation split for this client)", timings)
        timings["total_s"] = round(time.time() - received_at, 6)
        return Result(job_id=job.job_id, run_id=job.run_id, slot_id=job.slot_id,
                      round=job.round, client_id=job.client_id, status="ok",
                      agent_id=self.agent_id, num_examples=0, metrics=reply.metrics,
                      timings=timings)

    async def _hand_over(self, job: Job, reply: TrainReply) -> tuple[BlobRef, str] | None:
        """With a coordinator on this host: the update's segment renamed into its handoff
        prefix (no copy), and its reference; None to upload it to Redis instead."""
        pid = self._coordinator_pid(job)
        segment = reply.segment
        if pid is None or segment is None or reply.update is None:
            return None
        update = reply.update

        def digest_and_rename() -> tuple[str, str]:  # one trip to a worker thread
            return digest_of(update), self.handoff.hand_over(segment, pid)

        try:
            digest, name = await asyncio.to_thread(digest_and_rename)
        except OSError as exc:
            log.warning("handoff_fallback", job_id=job.job_id, what="update",
                        segment=segment, error=str(exc))
            return None
        return BlobRef(digest, update.nbytes), name

    def _failed(self, job: AnyJob, error: str, timings: dict[str, Any]) -> Result:
        return Result(job_id=job.job_id, run_id=job.run_id, slot_id=job.slot_id,
                      round=job.round, client_id=job.client_id, status="failed",
                      agent_id=self.agent_id, error=error, timings=timings)

    def _signed(self, result: Result) -> Result:
        key = None if self.keyring is None else self.keyring.get(result.client_id)
        return result if key is None else signed(result, key)

    async def _report(self, job: AnyJob, result: Result, entry: streams.Entry) -> None:
        payload = self._signed(result).to_bytes()
        # A handed-over update whose result cannot be posted stays in the coordinator's
        # prefix (the post may have landed unseen): it goes when that coordinator stops.
        await streams.publish(self.redis, self.keys.results(job.slot_id), payload)
        if result.update_shm:  # only now can the coordinator find the update
            log.info("update_uploaded", job_id=job.job_id, nbytes=result.update_nbytes,
                     duration_s=result.timings.get("upload_s"), via="shm")
        await streams.ack(self.redis, entry.stream, JOBS_GROUP, [entry.entry_id])


def _validate_only(job: Job) -> bool:
    """Whether the job asks for federated evaluation only (no training, no update)."""
    return bool(job.config.get("validate_only"))
