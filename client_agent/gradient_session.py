"""One gradient session's conversation with its trainer: open, steps, close, each bounded.

A session holds a trainer (`TrainerLease`) that other sessions of the lease may
share, taking turns on its pipe. Every call is bounded (`client_agent.limits`):
a call that outlasts its bound has its trainer killed and restarted by the pool
(`TrainTimeout`, the same code as a weight job's train timeout), and this session
fails with `train_timeout`, so its lease goes back. A session whose trainer was
replaced under it (another session's call hung, or the trainer died on another
session's call) reattaches to the replacement and reopens there, skipping the
batches it already took, so it goes on as if nothing had happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from multiprocessing import shared_memory
from typing import Any, TypeVar

import structlog

from client_agent.trainers import TrainerLease, TrainerReplaced
from serialization import GradientJob, PayloadError
from serialization.messages import Message
from trainer_worker import protocol, shm

log = structlog.get_logger()
R = TypeVar("R", protocol.GradOpened, protocol.GradDone)


class SessionFailed(Exception):
    """A gradient session could not go on (its reason is the message)."""


@dataclass
class SessionTalk:
    """A session on its trainer: the gradient segment it writes, the batches it took."""

    lease: TrainerLease
    job: GradientJob
    weights_shm: str
    weights_nbytes: int
    layout: int  # the slot's parameter layout, which the trainer's model must match
    limit_s: float  # each call's bound (`client_agent.limits.gradient_call_limit_s`)
    taken: int = 0  # batches whose gradient the trainer computed
    # With `validate`: the weights the session opened on, scored on the client's
    # validation split at the first open (a reopen does not score again).
    validation: dict[str, Any] = field(default_factory=dict)
    validate_s: float | None = None
    _memory: shared_memory.SharedMemory | None = None
    _grad_shm: str = ""

    async def open(self) -> None:
        """Open the session on the trainer (reattaching first if it was replaced)."""
        try:
            await self._open()
        except TrainerReplaced:
            await self.lease.reattach()
            await self._open()

    async def step(self, step: int) -> protocol.GradDone:
        """Have the trainer take the next batch's gradient into the segment."""
        message = protocol.GradStep(job_id=self.job.job_id, step=step)
        try:
            raw = await self._ask(message, self.limit_s)
        except TrainerReplaced:
            await self._reopen()
            raw = await self._ask(message, self.limit_s)
        reply = _reply(raw, protocol.GradDone)
        self.taken += 1
        return reply

    def gradient(self, nbytes: int) -> memoryview:
        """The segment's first `nbytes` (the step's gradient), a view."""
        assert self._memory is not None
        return shm.buffer(self._memory)[:nbytes]

    async def close(self) -> None:
        """Close the session and unlink its segment; a trainer gone by then took the session
        with it."""
        try:
            if self._grad_shm:
                await self._ask(protocol.GradClose(job_id=self.job.job_id), self.limit_s)
        except TrainerReplaced:
            pass  # its trainer is gone, and the session with it
        finally:
            self._drop_segment()

    async def _open(self) -> None:
        raw = await self._ask(protocol.GradOpen(
            job_id=self.job.job_id, client_id=self.job.client_id, task=self.job.task,
            task_options=self.job.task_options, config=self.job.config,
            weights_shm=self.weights_shm, weights_nbytes=self.weights_nbytes,
            skip_batches=self.taken), self.limit_s)
        reply = _reply(raw, protocol.GradOpened)
        self._grad_shm = reply.grad_shm
        if reply.metrics and not self.validation:
            self.validation = dict(reply.metrics)
            self.validate_s = reply.timings.get("validate_s")
        if reply.layout != self.layout:
            await self.close()
            raise SessionFailed("the trainer's model does not match the slot's parameters")
        self._memory = shm.attach(reply.grad_shm)
        log.info("gradient_session_opened", job_id=self.job.job_id,
                 client_id=self.job.client_id, session=self.job.session,
                 device=self.lease.device, skipped=self.taken)

    async def _reopen(self) -> None:
        log.warning("gradient_session_reopened", job_id=self.job.job_id,
                    client_id=self.job.client_id, session=self.job.session,
                    device=self.lease.device, taken=self.taken)
        self._drop_segment()
        await self.lease.reattach()
        await self._open()

    async def _ask(self, message: protocol.GradRequest, limit_s: float) -> Message:
        return await self.lease.request(message, timeout_s=limit_s,
                                        client_id=self.job.client_id)

    def _drop_segment(self) -> None:
        memory, self._memory = self._memory, None
        if memory is not None:
            shm.release(memory)
        if self._grad_shm:
            shm.remove(self._grad_shm)
            self._grad_shm = ""


def _reply(message: Message, kind: type[R]) -> R:
    """The trainer's answer as `kind`; SessionFailed when it failed or is another kind."""
    try:
        reply = protocol.expect(message, kind)
    except PayloadError as exc:
        raise SessionFailed(str(exc)) from None
    if reply.status != "ok":
        raise SessionFailed(reply.error or f"the trainer's {kind.kind} failed")
    return reply
