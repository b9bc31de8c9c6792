"""The agent's trainer processes: one per device, fed jobs over msgpack pipes.

`TrainerPool` spawns `trainer_worker.worker.run` once per device entry and
hands each job to a free trainer (first come, first served). Only the small
messages of `trainer_worker.protocol` cross the pipes; the model and the update
travel in shared memory (see `trainer_worker.worker` for the copies). The event
loop only waits: a pipe is watched with `loop.add_reader`, together with the
process sentinel.

A trainer that dies in the middle of a job (killed, crashed, out of memory) is
logged (`trainer_exited`), replaced on the same device, and the job returns a
failed `TrainReply`; task failures are failed replies too, so `train` does not
raise for them. A training call that outlasts its request's time limit (a stuck
user call, a deadlocked data loader) is logged (`train_timeout`), its trainer is
killed and replaced the same way, and the job fails with reason `train_timeout`:
the trainer serves the agent's other clients again instead of holding them too.
A gradient session's calls (`TrainerLease.request`) are bounded the same way, by
the same code; the other sessions sharing the trainer reopen on its replacement.
Every update segment a trainer makes is named after the pool
and that trainer, so whatever a dead trainer leaves behind can be found and
unlinked.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import structlog

from client_agent.model_cache import ModelSegment
from serialization.errors import PayloadError
from serialization.messages import Message
from trainer_worker import protocol, shm, worker

log = structlog.get_logger()


class TrainerStartError(RuntimeError):
    """A trainer process exited before it said it was ready."""


SHM_DIR = Path(shm.SHM_DIR)
# The reason a job fails with when its training call outlasts its time limit.
TRAIN_TIMEOUT = "train_timeout"


@dataclass(frozen=True)
class TrainRequest:
    """One job for a trainer: which client, which task, and the model to start from."""

    job_id: str
    client_id: str
    task: str
    task_options: dict[str, Any]
    config: dict[str, Any]
    model: ModelSegment
    # Seconds the training call may take, asked when a trainer takes the job (so time spent
    # waiting for a free trainer does not count); None: no limit.
    time_limit_s: Callable[[], float | None] | None = None


@dataclass
class TrainReply:
    """A trainer's answer. `update` is a view over the update segment until `release()`."""

    job_id: str
    status: str  # "ok" or "failed"
    device: str
    update: memoryview | None = None
    update_nbytes: int = 0
    num_examples: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    _memory: SharedMemory | None = field(default=None, repr=False)
    _on_release: Callable[[str], None] | None = field(default=None, repr=False)

    @property
    def segment(self) -> str | None:
        """The update segment's name (None once released, or with no update)."""
        return None if self._memory is None else self._memory.name

    def release(self) -> None:
        """Close and unlink the update segment (idempotent; a segment handed over to the
        coordinator under another name is its to unlink)."""
        memory, self._memory = self._memory, None
        if self.update is not None:
            with contextlib.suppress(BufferError):  # a slice of it is still alive
                self.update.release()
            self.update = None
        if memory is not None:
            shm.release(memory, unlink=True)
            if self._on_release is not None:
                self._on_release(memory.name)


@dataclass(eq=False)
class _Trainer:
    """One trainer process and the agent's end of its pipe."""

    device: str
    process: BaseProcess
    conn: Connection
    shm_prefix: str


@dataclass(eq=False)
class TrainerSlot:
    """A device's place in the pool; its trainer is None while none is running."""

    device: str
    trainer: _Trainer | None = None


class TrainerPool:
    """Trainer processes, one per device entry, sharing jobs first come first served."""

    def __init__(self, devices: list[str], *, threads_per_trainer: int = 1,
                 log_file: str | None = None, run_id: str = "", agent_id: str = "",
                 allowed_tasks: frozenset[str] | None = None) -> None:
        self.devices = list(devices)
        # The agent's allowlist, which every task load in the trainers obeys (None: none),
        # including the tasks a task loads itself.
        self.allowed_tasks = None if allowed_tasks is None else tuple(sorted(allowed_tasks))
        self.threads_per_trainer = threads_per_trainer
        self.log_file = log_file
        self.run_id = run_id
        self.agent_id = agent_id
        self.shm_prefix = shm.owned_prefix(f"t{secrets.token_hex(4)}")
        self.start_timeout_s = 120.0
        self._ctx = multiprocessing.get_context("spawn")
        self._spawned = 0
        self._idle: deque[TrainerSlot] = deque()  # free trainers, oldest first
        # Woken whenever a trainer comes free, a conversation opens a shared one, or the
        # pool closes: whoever waits for a trainer looks again.
        self._wakers: list[asyncio.Future[None]] = []
        self._live: set[_Trainer] = set()
        self._outstanding: set[str] = set()  # update segments handed out, not yet released
        self._shared: dict[TrainerSlot, _Shared] = {}  # trainers held by conversations
        self._closed = False

    @property
    def idle(self) -> int:
        """Trainers free right now."""
        return len(self._idle)

    @property
    def pids(self) -> list[int]:
        """Process ids of the running trainers."""
        return [t.process.pid for t in self._live if t.process.pid is not None]

    async def start(self, timeout_s: float = 120) -> None:
        """Spawn one trainer per device entry and wait until each says it is ready."""
        self.start_timeout_s = timeout_s
        try:
            async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as group:
                spawns = [group.create_task(self._spawn(device)) for device in self.devices]
        except BaseException as exc:
            await self.close()
            if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                raise exc.exceptions[0] from None
            raise
        for device, spawn in zip(self.devices, spawns, strict=True):
            self._free(TrainerSlot(device, spawn.result()))

    async def train(self, request: TrainRequest) -> TrainReply:
        """Run one job on the next free trainer; failures come back as failed replies."""
        self._check_open()
        queued_at = time.perf_counter()
        while not self._idle:
            await self._changed()
            self._check_open()
        slot = self._idle.popleft()
        wait_s = time.perf_counter() - queued_at
        try:
            reply = await self._train_on(slot, request)
        finally:
            self._free(slot)
        reply.timings["wait_s"] = wait_s
        return reply

    @contextlib.asynccontextmanager
    async def checkout(self) -> AsyncIterator[TrainerLease]:
        """A trainer held for a conversation of many messages (a gradient session): a free
        one if there is one, else one that other conversations hold already (they take
        turns), so a lease of more clients than trainers still makes progress. It goes back
        to the pool when its last conversation ends.

        A conversation that waits looks again whenever a trainer comes free or another
        conversation opens one: it joins that one rather than wait for a free trainer,
        which a weight job may take first while the open conversation waits for it (the
        clients of one gradient lease step together)."""
        self._check_open()
        while not self._idle and not self._shared:
            await self._changed()
            self._check_open()
        if self._idle:
            slot = self._idle.popleft()
            self._shared[slot] = _Shared()
            self._wake()
        else:
            slot = min(self._shared, key=lambda s: self._shared[s].users)
        shared = self._shared[slot]
        shared.users += 1
        try:
            async with shared.turn:
                trainer = await self._running(slot)
            yield TrainerLease(self, slot, trainer, shared.turn)
        finally:
            shared.users -= 1
            if shared.users == 0:
                del self._shared[slot]
                self._free(slot)

    async def _lost(self, slot: TrainerSlot, trainer: _Trainer, job_id: str) -> int | None:
        """A held trainer died: reap it, start its replacement (once, whoever sharing it
        notices first); its exit code."""
        if slot.trainer is not trainer:
            return trainer.process.exitcode
        slot.trainer = None
        exitcode = await self._bury(trainer, job_id)
        if not self._closed:
            with contextlib.suppress(TimeoutError, TrainerStartError):
                slot.trainer = await self._restart(slot.device)
        return exitcode

    async def close(self, timeout_s: float = 10) -> None:
        """Stop every trainer (terminate, then kill, stragglers) and unlink leftovers."""
        self._closed = True
        self._wake()  # whoever waits for a trainer learns the pool is closed
        trainers = list(self._live)
        for trainer in trainers:
            with contextlib.suppress(OSError):
                trainer.conn.send_bytes(protocol.pack(protocol.Stop()))
        await asyncio.gather(*(self._stop(t, timeout_s) for t in trainers))
        for name in _segments(self.shm_prefix + "-") | self._outstanding:
            shm.remove(name)
        self._outstanding.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the trainer pool is closed")

    def _free(self, slot: TrainerSlot) -> None:
        self._idle.append(slot)
        self._wake()

    def _wake(self) -> None:
        wakers, self._wakers = self._wakers, []
        for waker in wakers:
            if not waker.done():
                waker.set_result(None)

    async def _changed(self) -> None:
        """Wait until a trainer comes free, a conversation opens one, or the pool closes."""
        waker = asyncio.get_running_loop().create_future()
        self._wakers.append(waker)
        await waker

    async def _train_on(self, slot: TrainerSlot, request: TrainRequest) -> TrainReply:
        try:
            trainer = await self._running(slot)
        except (TimeoutError, TrainerStartError) as exc:
            return _failed(request, slot.device, f"trainer could not start: {exc!r}")
        limit_s = None if request.time_limit_s is None else request.time_limit_s()
        try:
            trainer.conn.send_bytes(protocol.pack(_train_message(request)))
            async with asyncio.timeout(limit_s):
                message = await self._reply_for(trainer, request.job_id)
        except TimeoutError:  # before OSError, which it subclasses
            error = await self._timed_out(slot, trainer, request.job_id, request.client_id,
                                          limit_s or 0.0)
            return _failed(request, slot.device, error)
        except (EOFError, OSError):
            exitcode = await self._replace(slot, trainer, request.job_id, grace_s=5)
            return _failed(request, slot.device, f"trainer died (exit code {exitcode})")
        return self._reply(message, slot.device, request)

    async def _timed_out(self, slot: TrainerSlot, trainer: _Trainer, job_id: str,
                         client_id: str, limit_s: float) -> str:
        """A call (a weight job's training, a gradient step) outlasted its limit: log
        `train_timeout`, kill its trainer and start another; the failed call's error."""
        log.warning("train_timeout", agent_id=self.agent_id, job_id=job_id,
                    client_id=client_id, device=slot.device, trainer_pid=trainer.process.pid,
                    limit_s=limit_s)
        await self._replace(slot, trainer, job_id, grace_s=0)
        return (f"{TRAIN_TIMEOUT}: no result within {limit_s:g} s; the trainer on "
                f"{slot.device} was killed and restarted")

    async def _replace(self, slot: TrainerSlot, trainer: _Trainer, job_id: str, *,
                       grace_s: float) -> int | None:
        """Reap (or kill) the slot's trainer and start another; the old one's exit code."""
        exitcode = await self._bury(trainer, job_id, grace_s=grace_s)
        slot.trainer = None
        if not self._closed:  # a trainer stopped by close() is not replaced
            with contextlib.suppress(TimeoutError, TrainerStartError):
                slot.trainer = await self._restart(slot.device)
        return exitcode

    async def _running(self, slot: TrainerSlot) -> _Trainer:
        """The slot's trainer, replaced first if it died while idle or failed to restart."""
        if slot.trainer is not None and slot.trainer.process.exitcode is not None:
            await self._bury(slot.trainer, "")
            slot.trainer = None
        if slot.trainer is None:
            slot.trainer = await self._restart(slot.device)
        return slot.trainer

    async def _spawn(self, device: str) -> _Trainer:
        self._spawned += 1
        ours, theirs = self._ctx.Pipe()
        prefix = f"{self.shm_prefix}-{self._spawned}"
        process = self._ctx.Process(
            target=worker.run, name=f"trainer-{device}", daemon=True,
            args=(theirs, device, self.threads_per_trainer, self.log_file, self.run_id,
                  self.agent_id, prefix, self.allowed_tasks))
        process.start()
        theirs.close()
        trainer = _Trainer(device, process, ours, prefix)
        self._live.add(trainer)
        try:
            ready = await _receive(trainer)
        except BaseException as exc:
            await self._stop(trainer, 0)
            if isinstance(exc, EOFError | OSError):
                raise TrainerStartError(f"the trainer on {device} exited during start-up "
                                        f"(exit code {process.exitcode})") from exc
            raise
        log.info("trainer_started", agent_id=self.agent_id, device=device,
                 trainer_pid=ready.pid if isinstance(ready, protocol.Ready) else process.pid)
        return trainer

    async def _restart(self, device: str) -> _Trainer:
        try:
            async with asyncio.timeout(self.start_timeout_s):
                return await self._spawn(device)
        except (TimeoutError, TrainerStartError) as exc:
            log.error("trainer_restart_failed", agent_id=self.agent_id, device=device,
                      error=repr(exc))
            raise

    async def _reply_for(self, trainer: _Trainer, job_id: str) -> protocol.TrainDone:
        """The `TrainDone` for this job; replies to jobs whose waiter was cancelled are
        dropped."""
        while True:
            message = await _receive(trainer)
            if isinstance(message, protocol.TrainDone):
                if message.job_id == job_id:
                    return message
                if message.update_shm:
                    shm.remove(message.update_shm)
            log.info("trainer_reply_dropped", job_id=getattr(message, "job_id", None),
                     kind=message.kind, expected=job_id)

    async def _bury(self, trainer: _Trainer, job_id: str, *, grace_s: float = 5) -> int | None:
        """Reap a trainer that died mid-job (or kill one that hangs: `grace_s` 0); unlink
        what it left. Returns its exit code."""
        await self._stop(trainer, grace_s, job_id=job_id, level="warning")
        for name in _segments(trainer.shm_prefix + "-") - self._outstanding:
            shm.remove(name)
        return trainer.process.exitcode

    async def _stop(self, trainer: _Trainer, timeout_s: float, *, job_id: str = "",
                    level: str = "info") -> None:
        process = trainer.process
        for stop in (None, process.terminate, process.kill):
            if stop is not None:
                stop()
            if await _exited(process, timeout_s if stop is None else 2):
                break
        trainer.conn.close()
        self._live.discard(trainer)
        emit = log.warning if level == "warning" else log.info
        emit("trainer_exited", agent_id=self.agent_id, device=trainer.device,
             trainer_pid=process.pid, exitcode=process.exitcode, job_id=job_id)

    def _reply(self, message: protocol.TrainDone, device: str,
               request: TrainRequest) -> TrainReply:
        timings = dict(message.timings)
        if message.status != "ok":
            return _failed(request, device, message.error, timings)
        name, nbytes = message.update_shm, message.update_nbytes
        if not name:  # an evaluation-only job (`validate_only`): figures, no update
            return TrainReply(job_id=request.job_id, status="ok", device=device,
                              num_examples=message.num_examples, metrics=dict(message.metrics),
                              timings=timings)
        try:
            memory = shm.attach(name)
        except FileNotFoundError:
            return _failed(request, device, f"update segment {name} is gone", timings)
        self._outstanding.add(name)
        return TrainReply(
            job_id=request.job_id, status="ok", device=device,
            update=shm.buffer(memory)[:nbytes], update_nbytes=nbytes,
            num_examples=message.num_examples, metrics=dict(message.metrics), timings=timings,
            _memory=memory, _on_release=self._outstanding.discard)


class TrainerDied(RuntimeError):
    """The trainer held by a `TrainerLease` exited in the middle of a conversation."""


class TrainerReplaced(TrainerDied):
    """The lease's trainer was replaced under this conversation (another conversation's
    call hung or killed it): `reattach`, then reopen what the old trainer held."""


class TrainTimeout(TrainerDied):
    """This conversation's call outlasted its limit: its trainer was killed and restarted
    (the message is the failed call's error, ``train_timeout: ...``)."""


@dataclass(eq=False)
class _Shared:
    """A trainer held by conversations: how many, and whose turn it is on the pipe."""

    users: int = 0
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class TrainerLease:
    """A trainer checked out of the pool: send a message, await its reply (one
    conversation at a time on the pipe)."""

    pool: TrainerPool
    slot: TrainerSlot
    trainer: _Trainer
    turn: asyncio.Lock

    @property
    def device(self) -> str:
        return self.slot.device

    async def request(self, message: protocol.GradRequest | protocol.Describe, *,
                      timeout_s: float | None = None, client_id: str = "") -> Message:
        """Send one message and return the trainer's reply within `timeout_s` (None: no
        bound). TrainTimeout when it takes longer (the trainer is killed and restarted
        before the others sharing it get their turn), TrainerReplaced when the trainer was
        replaced under this conversation, TrainerDied if it exits."""
        try:
            async with self.turn:
                if self.slot.trainer is not self.trainer:
                    raise TrainerReplaced("the trainer was replaced")
                self.trainer.conn.send_bytes(protocol.pack(message))
                try:
                    async with asyncio.timeout(timeout_s):
                        return await _receive(self.trainer)
                except TimeoutError:  # before OSError, which it subclasses
                    error = await self.pool._timed_out(self.slot, self.trainer,
                                                       message.job_id, client_id,
                                                       timeout_s or 0.0)
                    raise TrainTimeout(error) from None
        except (EOFError, OSError):
            exitcode = await self.pool._lost(self.slot, self.trainer, message.job_id)
            raise TrainerDied(f"trainer died (exit code {exitcode})") from None

    async def reattach(self) -> None:
        """Take the slot's current trainer (started anew if none is running) after
        TrainerReplaced; whatever the old one held is gone."""
        async with self.turn:
            self.trainer = await self.pool._running(self.slot)


def _train_message(request: TrainRequest) -> protocol.TrainJob:
    return protocol.TrainJob(job_id=request.job_id, client_id=request.client_id,
                             task=request.task, task_options=request.task_options,
                             config=request.config, model_shm=request.model.name,
                             model_nbytes=request.model.nbytes,
                             model_digest=request.model.digest)


def _failed(request: TrainRequest, device: str, error: str,
            timings: dict[str, Any] | None = None) -> TrainReply:
    return TrainReply(job_id=request.job_id, status="failed", device=device, error=error,
                      timings=timings or {})


async def _receive(trainer: _Trainer) -> Message:
    """The next message from a trainer; EOFError once it has exited, and once it sends
    what is no message (a trainer that breaks the protocol is treated as dead)."""
    conn = trainer.conn
    if not conn.poll():
        await _readable(conn.fileno(), trainer.process.sentinel)
    if conn.poll():
        raw = conn.recv_bytes()  # EOFError at end of file
        try:
            return protocol.unpack(raw)
        except PayloadError as exc:
            log.error("trainer_bad_message", trainer_pid=trainer.process.pid,
                      reason=exc.reason, error=exc.detail)
            raise EOFError(f"the trainer sent a bad message: {exc}") from None
    raise EOFError("trainer exited")


async def _readable(*fds: int) -> None:
    """Wait, without blocking the loop, until one of the descriptors is readable."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    for fd in fds:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        for fd in fds:
            loop.remove_reader(fd)


async def _exited(process: BaseProcess, timeout_s: float) -> bool:
    """Whether the process has exited within the timeout (it is reaped if so)."""
    if process.exitcode is None:
        try:
            async with asyncio.timeout(timeout_s):
                await _readable(process.sentinel)
        except TimeoutError:
            return False
        # The sentinel closes a moment before the exit status can be collected.
        await asyncio.to_thread(process.join, 5)
    return process.exitcode is not None


def _segments(prefix: str) -> set[str]:
    """Names of the shared-memory segments starting with `prefix` (Linux: /dev/shm)."""
    if not SHM_DIR.is_dir():
        return set()
    return {path.name for path in SHM_DIR.glob(f"{prefix}*")}
