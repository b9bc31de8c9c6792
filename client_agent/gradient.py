"""Gradient-session jobs on the agent: one trainer held per leased client for the lease.

A `GradientJob` opens a session on a free trainer and runs its `steps` steps.
Per step the slot's weights arrive once per agent, whatever the number of its
clients in the lease: a `Downlink` per slot reads the broadcast stream and
copies the weights into one shared-memory segment all local trainers read. Each
trainer writes its batch's gradient into its own segment, and the agent adds it
to the slot's up stream straight from there (one XADD, no copy in Python). When
the steps are done the job reports an ordinary `Result` (examples seen, mean
loss) and is acked, as a weight-mode job is; with ``validate`` in its config the
result also carries the figures of the weights the session opened on, on the
client's validation split (``val_accuracy``, ``val_loss``, ``val_examples``).
Each call to the trainer is bounded (`client_agent.gradient_session`): a hung
step fails its session with `train_timeout` and the others sharing its trainer
go on. With client keys each gradient is signed with its client's key
(`serialization.signing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any

import structlog

from bus import gradient as gstreams
from bus import streams
from bus.connection import raise_if_cancelled
from bus.credentials import Keyring
from bus.keys import JOBS_GROUP, Keys
from client_agent.gradient_session import SessionFailed, SessionTalk
from client_agent.limits import gradient_call_limit_s
from client_agent.trainers import TrainerLease, TrainerPool, TrainTimeout
from serialization import GradientJob, PayloadError, Result
from serialization.gradient import StepGradient, StepWeights
from serialization.signing import signed, signed_gradient
from trainer_worker import shm

log = structlog.get_logger()
READ_BLOCK_MS = 1000
COPY_IN_THREAD_BYTES = 8 * 1024**2  # below this a memcpy is quicker than a thread hop


@dataclass(eq=False)
class Downlink:
    """One slot's broadcast weights on this agent, in one shared-memory segment."""

    redis: Any
    stream: str
    shm_prefix: str
    users: int = 0
    latest: tuple[str, int] = ("", 0)  # (session, step) now in the segment
    header: StepWeights | None = None
    memory: shared_memory.SharedMemory | None = None
    error: str = ""
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name=f"downlink {self.stream}")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self.memory is not None:
            shm.release(self.memory, unlink=True)

    async def wait(self, session: str, step: int) -> int:
        """Wait until the segment holds `session`'s weights for `step` or a later step
        (a client the slot stopped waiting for catches up); the step it holds."""
        def ready() -> bool:
            return bool(self.error) or (self.latest[0] == session and self.latest[1] >= step)

        async with self._changed:
            await self._changed.wait_for(ready)
        if self.error:
            raise SessionFailed(self.error)
        return self.latest[1]

    async def _read(self) -> None:
        last_id = "0-0"
        try:
            while True:
                # redis-py may swallow a cancel that lands in the blocking read: a reader
                # that went on reading held `stop`, and with it its session, for ever.
                raise_if_cancelled()
                entries = await gstreams.read(self.redis, self.stream, last_id,
                                              block_ms=READ_BLOCK_MS)
                if entries:
                    last_id = entries[-1].entry_id
                    await self._take(entries[-1])  # older ones are already superseded
        except Exception as exc:  # noqa: BLE001 - waiting sessions must hear of it
            # Without a reader no weights come: fail the sessions now rather than let them
            # wait out their step deadline.
            log.warning("gradient_downlink_failed", stream=self.stream,
                        error=f"{type(exc).__name__}: {exc}")
            async with self._changed:
                self.error = f"the slot's weights stream failed: {type(exc).__name__}: {exc}"
                self._changed.notify_all()

    async def _take(self, entry: gstreams.TensorEntry) -> None:
        try:
            header = StepWeights.from_bytes(entry.header)
        except PayloadError as exc:
            log.warning("job_rejected", stream=self.stream, entry_id=entry.entry_id,
                        reason=exc.reason, detail=exc.detail)
            return
        if len(entry.body) != header.numel * 4:
            self.error = f"weights of {len(entry.body)} bytes for {header.numel} values"
        else:
            await self._copy(entry.body)
        async with self._changed:
            self.header, self.latest = header, (header.session, header.step)
            self._changed.notify_all()

    async def _copy(self, body: bytes) -> None:
        if self.memory is None:
            self.memory = shm.create(len(body), prefix=self.shm_prefix)
        if self.memory.size < len(body):
            raise SessionFailed("the model's size changed within a run")
        target = shm.buffer(self.memory)
        if len(body) >= COPY_IN_THREAD_BYTES:
            await asyncio.to_thread(target.__setitem__, slice(0, len(body)), body)
        else:
            target[: len(body)] = body


@dataclass
class GradientRunner:
    """Runs one agent's gradient sessions; shares a `Downlink` per slot among them."""

    redis: Any
    keys: Keys
    pool: TrainerPool
    agent_id: str
    keyring: Keyring | None = None
    train_timeout_s: float | None = None  # --train-timeout-s; None: from the step deadline
    _downlinks: dict[int, Downlink] = field(default_factory=dict)

    async def run(self, job: GradientJob, entry: streams.Entry, received_at: float) -> None:
        """Serve the job's session, then report its result and ack it (shielded)."""
        try:
            result = await self._serve(job, received_at)
        except Exception as exc:  # noqa: BLE001 - any failure is this job's failed result
            error = str(exc) if isinstance(exc, TrainTimeout) else f"{type(exc).__name__}: {exc}"
            log.warning("gradient_session_failed", job_id=job.job_id, client_id=job.client_id,
                        error=error)
            result = self._result(job, "failed", error=error)
        await asyncio.shield(self._report(job, result, entry))

    async def _serve(self, job: GradientJob, received_at: float) -> Result:
        downlink = self._downlink(job.slot_id)
        try:
            async with asyncio.timeout(max(job.deadline_ts - time.time(), 0.0)):
                await downlink.wait(job.session, 1)
            async with self.pool.checkout() as trainer:
                talk = self._talk(trainer, job, downlink)
                await talk.open()
                try:
                    totals = await self._steps(talk, job, downlink)
                finally:
                    await talk.close()
        finally:
            await self._release(job.slot_id)
        examples, loss_sum, done = totals
        # With `validate`: the opening weights on the validation split (val_* keys).
        metrics = {"train_loss": loss_sum / max(examples, 1), "steps": float(done),
                   **talk.validation}
        timings = {"total_s": round(time.time() - received_at, 6)}
        if talk.validate_s is not None:
            timings["validate_s"] = round(talk.validate_s, 6)
        return self._result(job, "ok", num_examples=examples, metrics=metrics, timings=timings)

    def _talk(self, trainer: TrainerLease, job: GradientJob, downlink: Downlink) -> SessionTalk:
        assert downlink.memory is not None
        assert downlink.header is not None
        return SessionTalk(trainer, job, downlink.memory.name, downlink.header.numel * 4,
                           downlink.header.layout,
                           limit_s=gradient_call_limit_s(job, self.train_timeout_s))

    def _downlink(self, slot_id: int) -> Downlink:
        downlink = self._downlinks.get(slot_id)
        if downlink is None:
            downlink = Downlink(self.redis, self.keys.gradient_down(slot_id),
                                self.pool.shm_prefix + f"-g{slot_id}")
            self._downlinks[slot_id] = downlink
        downlink.users += 1
        downlink.start()
        return downlink

    async def _release(self, slot_id: int) -> None:
        downlink = self._downlinks[slot_id]
        downlink.users -= 1
        if downlink.users == 0:
            del self._downlinks[slot_id]
            await downlink.stop()

    async def _steps(self, talk: SessionTalk, job: GradientJob,
                     downlink: Downlink) -> tuple[int, float, int]:
        stream = self.keys.gradient_up(job.slot_id)
        examples, loss_sum, done, step = 0, 0.0, 0, 1
        while step <= job.steps:
            async with asyncio.timeout(job.step_deadline_s):  # the slot may give up on us
                step = await downlink.wait(job.session, step)
            asked = time.perf_counter()
            reply = await talk.step(step)
            timings = {**reply.timings,
                       "trainer_s": time.perf_counter() - asked}  # compute + pipe hop
            numel = downlink.header.numel if downlink.header is not None else 0
            header = StepGradient(session=job.session, step=step, job_id=job.job_id,
                                  client_id=job.client_id, num_examples=reply.num_examples,
                                  numel=numel, loss=reply.loss, agent_id=self.agent_id,
                                  timings=timings)
            body = talk.gradient(numel * 4)
            header = await self._signed(header, body)
            await gstreams.add(self.redis, stream, header.to_bytes(), body)
            del body
            examples += header.num_examples
            loss_sum += header.loss * header.num_examples
            done, step = done + 1, step + 1
        return examples, loss_sum, done

    async def _signed(self, header: StepGradient, body: memoryview) -> StepGradient:
        """With its client's key, the header signed over its body's digest (hashed off the
        loop when big); unchanged without one."""
        key = None if self.keyring is None else self.keyring.get(header.client_id)
        if key is None:
            return header
        if len(body) >= COPY_IN_THREAD_BYTES:
            return await asyncio.to_thread(signed_gradient, header, body, key)
        return signed_gradient(header, body, key)

    def _result(self, job: GradientJob, status: str, **fields: Any) -> Result:
        return Result(job_id=job.job_id, run_id=job.run_id, slot_id=job.slot_id,
                      round=job.round, client_id=job.client_id, status=status,
                      agent_id=self.agent_id, **fields)

    async def _report(self, job: GradientJob, result: Result, entry: streams.Entry) -> None:
        key = None if self.keyring is None else self.keyring.get(result.client_id)
        payload = (result if key is None else signed(result, key)).to_bytes()
        await streams.publish(self.redis, self.keys.results(job.slot_id), payload)
        await streams.ack(self.redis, entry.stream, JOBS_GROUP, [entry.entry_id])

    async def close(self) -> None:
        for slot_id in list(self._downlinks):
            await self._downlinks.pop(slot_id).stop()

