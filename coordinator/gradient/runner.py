"""One gradient slot: leases of `gradient_steps` steps, one server optimiser step per step.

A round leases clients as a weight slot's does and publishes one gradient job
per client (a session of `steps` steps). Each step the slot adds its current
weights to its broadcast stream (one XADD, the bytes inline), gathers one
gradient per client from its up stream, takes the batch-size weighted mean and
one optimiser step (`FlatModel`, in a thread), and goes on. A client that
fails, is lost or misses the step deadline leaves the session; the step goes on
with the others, and when none is left the round ends early (failed if it took
no step). After the last step the clients report their session results (the
dispatcher returns their leases), and evaluation and the checkpoint run in the
background as in weight mode.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import torch

from bus import gradient as gstreams
from bus.connection import raise_if_cancelled
from coordinator.context import RunContext
from coordinator.delivery import Delivery
from coordinator.evaluation import evaluate_round
from coordinator.gradient.optimizer import FlatModel, weighted_mean
from coordinator.job_table import JobRecord, new_job_id
from serialization import GradientJob, PayloadError, encode
from serialization.gradient import StepGradient, StepWeights, flat_view, layout_digest

log = structlog.get_logger()
MAX_CONSECUTIVE_FAILURES = 5
READ_BLOCK_MS = 1000


class GradientSlotFailed(Exception):
    """A gradient slot's rounds kept failing (no client finished a step) and it gave up."""


@dataclass
class Session:
    """One round's lease in progress: its clients, step and bookkeeping."""

    round: int
    name: str
    jobs: dict[str, JobRecord]  # by client id
    active: set[str]  # clients still stepping
    answered: set[str] = field(default_factory=set)  # session results received
    num_examples: int = 0
    steps_done: int = 0
    read_ids: list[str] = field(default_factory=list)  # up-stream entries to delete
    down_id: str = ""


@dataclass
class GradientSlotRunner:
    """Runs one gradient slot from `first_round` to the last (see the module docstring)."""

    ctx: RunContext
    slot_id: int
    model: FlatModel
    first_round: int = 1
    inbox: asyncio.Queue[Delivery | gstreams.TensorEntry] = field(
        default_factory=asyncio.Queue)
    finished: bool = False
    _background: asyncio.Task[None] | None = None
    _latest: tuple[int, dict[str, torch.Tensor]] | None = None
    _layout: int = 0

    def __post_init__(self) -> None:
        self._layout = layout_digest(self.model.shapes)

    @property
    def status(self) -> Any:
        return self.ctx.status.slots[self.slot_id]

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def latest_model(self) -> tuple[int, dict[str, torch.Tensor], bytes | None]:
        """Read-only, for downloads: (round, state, None) of the model the last round ended
        with; round first_round - 1 (the state it started from) before any ended."""
        if self._latest is not None:
            return (*self._latest, None)
        return self.first_round - 1, self.model.state_dict(), None

    def deliver(self, delivery: Delivery) -> None:
        """A session result (the dispatcher already returned the lease)."""
        self.inbox.put_nowait(delivery)

    async def drop_after_finish(self, delivery: Delivery) -> None:
        """A result for a slot that has finished: acked and dropped."""
        await self.ctx.ack(delivery)

    async def run(self) -> None:
        with structlog.contextvars.bound_contextvars(slot_id=self.slot_id):
            try:
                async with asyncio.TaskGroup() as group:
                    reader = group.create_task(self._read_uplink(), name="uplink")
                    for round_ in range(self.first_round, self.ctx.settings.rounds + 1):
                        await self._complete_round(round_)
                    if self._background is not None:
                        await self._background
                    reader.cancel()
            finally:
                self.finished = True
                self.ctx.broker.retire(self.slot_id)
                await gstreams.delete(self.ctx.redis, self.ctx.keys.gradient_down(self.slot_id),
                                      self.ctx.keys.gradient_up(self.slot_id))
        self.status.state = "done"
        log.info("slot_finished", slot_id=self.slot_id, rounds=self.status.rounds_done,
                 accuracy=self.status.last_accuracy)

    async def _read_uplink(self) -> None:
        """Every gradient the clients add, into the inbox (one XREAD BLOCK at a time)."""
        stream, last_id = self.ctx.keys.gradient_up(self.slot_id), "0-0"
        while True:
            raise_if_cancelled()
            for entry in await gstreams.read(self.ctx.redis, stream, last_id,
                                             block_ms=READ_BLOCK_MS):
                last_id = entry.entry_id
                self.inbox.put_nowait(entry)

    async def _complete_round(self, round_: int) -> None:
        failures = 0
        while not await self._attempt(round_):
            failures += 1
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise GradientSlotFailed(f"gradient slot {self.slot_id} round {round_} "
                                         f"failed {failures} times")

    async def _attempt(self, round_: int) -> bool:
        raise_if_cancelled()
        self.status.state, self.status.round = "waiting", round_
        waiting_since = time.monotonic()
        clients = await self.ctx.broker.lease(self.slot_id, round_)
        session = await self._open(round_, clients, time.monotonic() - waiting_since)
        started = time.monotonic()
        steps = self.ctx.settings.gradient_steps
        for step in range(1, steps + 1):
            if not await self._step(session, step, last=step == steps):
                break
        await self._collect_results(session)
        if session.steps_done == 0:
            self.ctx.status.counters["rounds_failed"] += 1
            log.warning("round_failed", slot_id=self.slot_id, round=round_, reason="no_step")
            return False
        self._after_round(session, time.monotonic() - started)
        return True

    async def _open(self, round_: int, clients: tuple[str, ...], wait_s: float) -> Session:
        ctx = self.ctx
        self.status.state, self.status.clients = "training", clients
        name = f"s{self.slot_id}-r{round_}-{secrets.token_hex(3)}"
        records = {c: JobRecord(new_job_id(self.slot_id, round_, c), self.slot_id, round_, c)
                   for c in clients}
        session = Session(round_, name, records, set(clients))
        log.info("round_started", slot_id=self.slot_id, round=round_, clients=list(clients),
                 quorum_count=len(clients), deadline_s=ctx.settings.deadline_s,
                 wait_s=round(wait_s, 6), mode="gradient", steps=ctx.settings.gradient_steps)
        await self._publish_weights(session, 1)  # before the jobs: agents find it at once
        await self._publish_jobs(session)
        return session

    async def _publish_jobs(self, session: Session) -> None:
        ctx = self.ctx
        deadline_ts = time.time() + ctx.settings.deadline_s * ctx.settings.gradient_steps
        items = []
        for record in session.jobs.values():
            ctx.jobs.add(record)
            config = ctx.job_config(record)
            job = GradientJob(job_id=record.job_id, run_id=ctx.settings.run_id,
                              slot_id=self.slot_id, round=record.round,
                              client_id=record.client_id, session=session.name,
                              steps=ctx.settings.gradient_steps,
                              step_deadline_s=2 * ctx.settings.deadline_s,
                              deadline_ts=deadline_ts, task=ctx.settings.task,
                              task_options=ctx.task_options, config=config,
                              published_ts=time.time())
            items.append((ctx.keys.jobs(record.client_id), ctx.job_bytes(job)))
            log.info("job_published", slot_id=self.slot_id, round=record.round,
                     client_id=record.client_id, job_id=record.job_id, seed=config["seed"])
        await ctx.publish_many(items)
        ctx.status.counters["jobs_published"] += len(items)

    async def _publish_weights(self, session: Session, step: int) -> None:
        header = StepWeights(session=session.name, step=step, numel=self.model.numel,
                             layout=self._layout).to_bytes()
        up = self.ctx.keys.gradient_up(self.slot_id)
        down = self.ctx.keys.gradient_down(self.slot_id)
        previous = session.down_id
        session.down_id = await gstreams.add_after_trim(
            self.ctx.redis, down, header, self.model.weights_bytes(),
            delete=[(up, session.read_ids), (down, [previous] if previous else [])])
        session.read_ids = []

    async def _step(self, session: Session, step: int, *, last: bool) -> bool:
        """One step: gather the gradients, step the optimiser, publish the next weights."""
        started = time.perf_counter()
        gradients = await self._gather(session, step)
        gathered = time.perf_counter()
        if not gradients:
            return False
        examples = await asyncio.to_thread(self._apply, gradients)
        if examples == 0:
            return False
        session.steps_done, session.num_examples = step, session.num_examples + examples
        if not last:
            await self._publish_weights(session, step + 1)
        computes = [_seconds(h.timings, "load_s", "grad_s", "write_s") for h, _ in gradients]
        hop_s = max(_seconds(h.timings, "trainer_s") - c
                    for (h, _), c in zip(gradients, computes, strict=True))
        compute_s = max(computes)
        log.debug("gradient_step", slot_id=self.slot_id, round=session.round, step=step,
                  clients=len(gradients), num_examples=examples,
                  gather_s=round(gathered - started, 6), compute_s=round(compute_s, 6),
                  hop_s=round(hop_s, 6),
                  duration_s=round(time.perf_counter() - started, 6))
        return True

    async def _gather(self, session: Session, step: int) -> list[tuple[StepGradient, bytes]]:
        """This step's gradients from the clients still active; a client that misses the
        deadline leaves the session."""
        got: dict[str, tuple[StepGradient, bytes]] = {}
        deadline = time.monotonic() + self.ctx.settings.deadline_s
        while session.active - got.keys():
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    item = await self.inbox.get()
            except TimeoutError:
                for client in session.active - got.keys():
                    self._leave(session, client, "step_deadline")
                break
            if isinstance(item, gstreams.TensorEntry):
                self._take_gradient(session, step, item, got)
            else:
                await self._take_result(session, item)
        return [got[c] for c in sorted(got)]

    def _take_gradient(self, session: Session, step: int, entry: gstreams.TensorEntry,
                       got: dict[str, tuple[StepGradient, bytes]]) -> None:
        session.read_ids.append(entry.entry_id)
        try:
            header = StepGradient.from_bytes(entry.header)
            self.ctx.validator.check_gradient(header)
        except PayloadError as exc:
            self.ctx.reject(None, exc.reason, exc.detail, entry_id=entry.entry_id)
            return
        record = session.jobs.get(header.client_id)
        if (header.session != session.name or record is None
                or record.job_id != header.job_id or header.client_id not in session.active):
            self.ctx.status.reject("stale_gradient")  # an earlier session's, or a dropped client's
            return
        if header.step != step or header.numel != self.model.numel:
            self.ctx.reject(None, "mismatch", f"gradient for step {header.step} at step {step}",
                            client_id=header.client_id, job_id=header.job_id)
            return
        got[header.client_id] = (header, entry.body)

    async def _take_result(self, session: Session, delivery: Delivery) -> None:
        """A session's end: a failed client leaves the session. A finished one stays until
        its last gradient is read: the agent added it before the result, but the two come
        through different streams and readers, so the result may be here first."""
        try:
            client = delivery.record.client_id
            record = session.jobs.get(client)
            if record is None or record.job_id != delivery.record.job_id:
                return  # an earlier round's session, already over
            session.answered.add(client)
            if delivery.result.status != "ok":
                log.warning("job_failed", slot_id=self.slot_id, round=session.round,
                            client_id=client, job_id=record.job_id, error=delivery.result.error)
                self.ctx.status.counters["jobs_failed"] += 1
                self._leave(session, client, "")
        finally:
            await self.ctx.ack(delivery)

    def _leave(self, session: Session, client: str, reason: str) -> None:
        if client in session.active and reason:
            log.warning("gradient_client_dropped", slot_id=self.slot_id, round=session.round,
                        client_id=client, reason=reason)
        session.active.discard(client)

    def _apply(self, gradients: list[tuple[StepGradient, bytes]]) -> int:
        """Validate, average and step (in a worker thread); the examples used."""
        valid: list[tuple[np.ndarray, int]] = []
        for header, body in gradients:
            try:
                self.ctx.validator.check_gradient(header, body)
                valid.append((flat_view(body, self.model.numel), header.num_examples))
            except PayloadError as exc:
                self.ctx.reject(None, exc.reason, exc.detail, client_id=header.client_id,
                                job_id=header.job_id)
        valid = [(g, n) for g, n in valid if n > 0]
        if not valid:
            return 0
        self.model.step(weighted_mean(valid, self.model.mean, self.model.scratch))
        return sum(n for _, n in valid)

    async def _collect_results(self, session: Session) -> None:
        """Wait for the session results of the clients that stepped to the end (bounded)."""
        deadline = time.monotonic() + self.ctx.settings.deadline_s
        while set(session.jobs) - session.answered:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    item = await self.inbox.get()
            except TimeoutError:
                return
            if isinstance(item, gstreams.TensorEntry):
                session.read_ids.append(item.entry_id)  # a late gradient: nothing to do
            else:
                await self._take_result(session, item)

    def _after_round(self, session: Session, duration_s: float) -> None:
        """Evaluate and checkpoint in the background; the next lease need not wait."""
        previous = self._background
        state, optimizer_state = self.model.state_dict(), self.model.optimizer_state()
        self._latest = (session.round, state)
        log.info("aggregation_finished", slot_id=self.slot_id, round=session.round,
                 num_updates=session.steps_done, num_examples=session.num_examples,
                 duration_s=round(duration_s, 6))
        self._background = asyncio.create_task(
            self._evaluate_and_checkpoint(session, state, optimizer_state, previous,
                                          duration_s),
            name=f"slot{self.slot_id}-round{session.round}-eval")
        self.status.state = "waiting"

    async def _evaluate_and_checkpoint(self, session: Session, state: dict[str, torch.Tensor],
                                       optimizer_state: dict[str, torch.Tensor],
                                       previous: asyncio.Task[None] | None,
                                       duration_s: float) -> None:
        if previous is not None:
            await previous  # one evaluation per slot at a time
        with structlog.contextvars.bound_contextvars(slot_id=self.slot_id):
            metrics = await self._evaluate(session.round, state)
            payload = await asyncio.to_thread(encode, state)
            await self.ctx.run_state.checkpoint(self.slot_id, session.round, payload,
                                                optimizer_state, metrics)
            accuracy = metrics.get("accuracy") if metrics else None
            self.status.rounds_done = session.round
            if accuracy is not None:
                self.status.record_accuracy(session.round, accuracy, self.ctx.status.elapsed_s)
            log.info("round_closed", slot_id=self.slot_id, round=session.round,
                     duration_s=round(duration_s, 6), accuracy=accuracy,
                     num_updates=session.steps_done, steps=session.steps_done,
                     num_examples=session.num_examples)

    async def _evaluate(self, round_: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        s = self.ctx.settings
        return await evaluate_round(self.ctx.evaluator, self.slot_id, round_, state,
                                    eval_every=s.eval_every, last_round=s.rounds)


def _seconds(timings: dict[str, Any], *keys: str) -> float:
    """The sum of a client's reported timings under `keys`; junk counts as 0."""
    values = (timings.get(k) for k in keys)
    return sum(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))
