"""Gradient sessions: a round leases clients for `gradient_steps` server steps.

Opening a round adds the slot's weights to its broadcast stream and publishes one
session job per client. Each client adds one gradient per step to the slot's up
stream (read by `serve` into the slot's inbox); once every client still in the
session has sent this step's gradient, the slot takes the batch-size weighted
mean and one optimiser step (`FlatModel`, in a thread) and broadcasts the next
weights. A client that fails, is lost or misses the step deadline leaves the
session; the step goes on with the others, and when none is left the session
stops early (failed if it took no step). After the last step the slot waits
(bounded) for the clients' session results, then closes.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import structlog

from bus import gradient as gstreams
from bus.connection import raise_if_cancelled
from bus.keys import Keys
from coordinator.delivery import Delivery
from coordinator.gradient.optimizer import FlatModel, weighted_mean
from coordinator.job_table import JobRecord
from coordinator.results.figures import ValidationTally
from coordinator.results.sink import ResultSink
from coordinator.results.validation import ResultValidator
from coordinator.settings import CoordinatorSettings
from coordinator.slots.protocol import ClosedRound, Inbox, RoundEnd, RoundProtocol, State
from coordinator.slots.publishing import JobPublisher
from serialization import GradientJob, PayloadError, encode
from serialization import slot_events as events
from serialization.gradient import StepGradient, StepWeights, flat_view, layout_digest
from serialization.slot_events import emit

log = structlog.get_logger()
READ_BLOCK_MS = 1000
Gradient = tuple[StepGradient, bytes]


@dataclass
class Session:
    """One round's lease in progress: its clients, its step and what it gathered."""

    round: int
    name: str
    jobs: dict[str, JobRecord]  # by client id
    active: set[str]  # clients still stepping
    started: float  # monotonic s: this step's weights went out, or the results wait began
    step: int = 1
    stepping: bool = True  # False: the steps are over, the session results are awaited
    got: dict[str, Gradient] = field(default_factory=dict)  # this step's gradients
    answered: set[str] = field(default_factory=set)  # session results received
    num_examples: int = 0
    steps_done: int = 0
    step_s: float = 0.0  # spent averaging and stepping: the session's aggregation


class SlotStreams:
    """A gradient slot's two streams: the weights it broadcasts, the gradients it reads."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, slot_id: int) -> None:
        self._redis = redis
        self._down = keys.gradient_down(slot_id)
        self._up = keys.gradient_up(slot_id)
        self._read_ids: list[str] = []  # up-stream entries read, to delete
        self._down_id = ""  # the broadcast's current entry

    async def broadcast(self, header: bytes, weights: bytes | memoryview) -> None:
        """The next step's weights; what was read of the up stream, and the broadcast's
        previous step, go in the same round trip."""
        previous, read = self._down_id, self._read_ids
        self._read_ids = []
        self._down_id = await gstreams.add_after_trim(
            self._redis, self._down, header, weights,
            delete=[(self._up, read), (self._down, [previous] if previous else [])])

    def read(self, entry_id: str) -> None:
        """`entry_id` of the up stream has been read: deleted with the next broadcast."""
        self._read_ids.append(entry_id)

    async def gradients(self, inbox: Inbox) -> None:
        """Every gradient the clients add, into the inbox (one XREAD BLOCK at a time)."""
        last_id = "0-0"
        while True:
            raise_if_cancelled()
            for entry in await gstreams.read(self._redis, self._up, last_id,
                                             block_ms=READ_BLOCK_MS):
                last_id = entry.entry_id
                inbox.put_nowait(entry)

    async def delete(self) -> None:
        await gstreams.delete(self._redis, self._down, self._up)


class GradientSessions(RoundProtocol):
    """A gradient slot's rounds (see the module docstring)."""

    def __init__(self, slot_id: int, model: FlatModel, first_round: int, *,
                 streams: SlotStreams, jobs: JobPublisher, results: ResultSink,
                 validator: ResultValidator, settings: CoordinatorSettings) -> None:
        self.slot_id = slot_id
        self._validator = validator  # signatures; its claims cap each step's batch
        self.model = model
        self._streams = streams
        self._jobs = jobs
        self._results = results
        self._settings = settings
        self._layout = layout_digest(model.shapes)
        self._session: Session | None = None
        self._latest: tuple[int, State] = (first_round - 1, model.state_dict())
        self._tally = ValidationTally(first_round - 1)  # the open session's clients' figures

    @property
    def state(self) -> State:
        return self.model.state_dict()

    def latest_model(self) -> tuple[int, State, bytes | None]:
        return (*self._latest, None)

    async def serve(self, inbox: Inbox) -> None:
        await self._streams.gradients(inbox)

    async def finish(self) -> None:
        await self._streams.delete()

    # --- opening ---------------------------------------------------------------------

    async def open(self, round_: int, clients: tuple[str, ...], wait_s: float) -> None:
        s = self._settings
        name = f"s{self.slot_id}-r{round_}-{secrets.token_hex(3)}"
        records = self._jobs.records(self.slot_id, round_, clients)
        self._tally = ValidationTally(self._latest[0])
        self._session = Session(round_, name, {r.client_id: r for r in records}, set(clients),
                                time.monotonic())
        emit(log, events.RoundStarted(self.slot_id, round=round_, clients=list(clients),
                                      quorum_count=len(clients), deadline_s=s.deadline_s,
                                      wait_s=round(wait_s, 6),
                                      more={"mode": "gradient", "steps": s.gradient_steps}))
        await self._broadcast(name, 1)  # before the jobs: agents find it at once
        deadline_ts = time.time() + s.deadline_s * s.gradient_steps

        def job_of(record: JobRecord, shared: dict[str, Any]) -> GradientJob:
            return GradientJob(job_id=record.job_id, slot_id=self.slot_id, round=record.round,
                               client_id=record.client_id, session=name,
                               steps=s.gradient_steps, step_deadline_s=2 * s.deadline_s,
                               deadline_ts=deadline_ts,
                               config=self._jobs.config(record, None), **shared)

        await self._jobs.publish(records, job_of)

    async def _broadcast(self, session: str, step: int) -> None:
        header = StepWeights(session=session, step=step, numel=self.model.numel,
                             layout=self._layout).to_bytes()
        await self._streams.broadcast(header, self.model.weights_bytes())

    # --- collecting ------------------------------------------------------------------

    def owns(self, delivery: Delivery) -> bool:
        session = self._session
        record = session.jobs.get(delivery.record.client_id) if session else None
        return record is not None and record.job_id == delivery.record.job_id

    async def take_result(self, delivery: Delivery) -> None:
        """A finished client stays until its last gradient is read: the agent added it
        before the result, but the two come through different readers."""
        assert self._session is not None
        self._session.answered.add(delivery.record.client_id)
        client_id = delivery.record.client_id
        self._tally.add(client_id, delivery.result.metrics,
                        self._validator.claims.declared(client_id))

    async def client_failed(self, delivery: Delivery) -> None:
        session = self._session
        assert session is not None
        session.answered.add(delivery.record.client_id)
        session.active.discard(delivery.record.client_id)
        await self._step_if_gathered(session)

    async def take_entry(self, entry: gstreams.TensorEntry) -> None:
        self._streams.read(entry.entry_id)
        session = self._session
        try:
            header = StepGradient.from_bytes(entry.header)
            self._validator.check_gradient(header)  # with keys: its client's signature
        except PayloadError as exc:
            self._results.reject(None, exc.reason, exc.detail, entry_id=entry.entry_id)
            return
        if session is None or not self._current(session, header):
            self._results.reject(None, "stale_gradient", "an earlier session's, or a dropped "
                                 "client's", client_id=header.client_id, job_id=header.job_id)
            return
        if header.step != session.step or header.numel != self.model.numel:
            self._results.reject(None, "mismatch", f"gradient for step {header.step} at step "
                                 f"{session.step}", client_id=header.client_id,
                                 job_id=header.job_id)
            return
        session.got[header.client_id] = (header, entry.body)
        await self._step_if_gathered(session)

    @staticmethod
    def _current(session: Session, header: StepGradient) -> bool:
        record = session.jobs.get(header.client_id)
        return (session.stepping and header.session == session.name and record is not None
                and record.job_id == header.job_id and header.client_id in session.active)

    def deadline(self) -> float | None:
        session = self._session
        assert session is not None
        if not session.stepping and not set(session.jobs) - session.answered:
            return None
        return session.started + self._settings.deadline_s

    async def expire(self) -> None:
        """A step's deadline: who has not sent its gradient leaves the session. The
        results' deadline: the round goes on without the missing ones."""
        session = self._session
        assert session is not None
        if not session.stepping:
            session.answered |= set(session.jobs)
            return
        for client in sorted(session.active - session.got.keys()):
            log.warning("gradient_client_dropped", slot_id=self.slot_id, round=session.round,
                        client_id=client, reason="step_deadline")
            session.active.discard(client)
        await self._step_if_gathered(session)

    # --- stepping --------------------------------------------------------------------

    async def _step_if_gathered(self, session: Session) -> None:
        """Once every active client has sent this step's gradient: step, and go on to the
        next step or stop stepping."""
        if not session.stepping or session.active - session.got.keys():
            return
        gathered, session.got = [session.got[c] for c in sorted(session.got)], {}
        steps = self._settings.gradient_steps
        session.stepping = await self._step(session, gathered) and session.step < steps
        session.started = time.monotonic()
        if session.stepping:
            session.step += 1
            await self._broadcast(session.name, session.step)

    async def _step(self, session: Session, gathered: list[Gradient]) -> bool:
        """One optimiser step on the gathered gradients; False if none could be used."""
        if not gathered:
            return False
        started = time.monotonic()
        usable, rejected = await asyncio.to_thread(self._apply, gathered)
        for header, exc in rejected:
            self._results.reject(None, exc.reason, exc.detail, client_id=header.client_id,
                                 job_id=header.job_id)
        if usable == 0:
            return False
        session.steps_done, session.num_examples = session.step, session.num_examples + usable
        now = time.monotonic()
        session.step_s += now - started
        log.debug("gradient_step", slot_id=self.slot_id, round=session.round, step=session.step,
                  clients=len(gathered), num_examples=usable,
                  gather_s=round(started - session.started, 6),
                  duration_s=round(now - session.started, 6), **_compute_split(gathered))
        return True

    def _apply(self, gathered: list[Gradient]) -> tuple[int, list[tuple[StepGradient,
                                                                        PayloadError]]]:
        """Blocking (a worker thread): validate, average and step; the examples used and
        the gradients rejected."""
        valid: list[tuple[np.ndarray, int]] = []
        rejected = []
        for header, body in gathered:
            try:
                self._validator.check_gradient(header, body)  # the body is what was signed
                counted = self._validator.claims.capped_step(
                    header.client_id, header.num_examples, self._settings.training.batch_size)
                valid.append((flat_view(body, self.model.numel), counted))
            except PayloadError as exc:
                rejected.append((header, exc))
        valid = [(g, n) for g, n in valid if n > 0]
        if valid:
            self.model.step(weighted_mean(valid, self.model.mean, self.model.scratch))
        return sum(n for _, n in valid), rejected

    # --- closing ---------------------------------------------------------------------

    def end(self) -> RoundEnd:
        assert self._session is not None
        if self._session.steps_done == 0:
            self._session = None
            return RoundEnd(False, "no_step")
        return RoundEnd(True)

    async def close(self) -> ClosedRound:
        session, self._session = self._session, None
        assert session is not None
        state, optimizer_state = self.model.state_dict(), self.model.optimizer_state()
        payload = await asyncio.to_thread(encode, state)
        self._latest = (session.round, state)
        emit(log, events.AggregationFinished(self.slot_id, round=session.round,
                                             num_updates=session.steps_done,
                                             num_examples=session.num_examples,
                                             duration_s=round(session.step_s, 6)))
        return ClosedRound(session.round, state, payload, optimizer_state, session.steps_done,
                           session.num_examples,
                           {"steps": session.steps_done, "num_examples": session.num_examples},
                           validation=self._tally.result())


def _compute_split(gathered: list[Gradient]) -> dict[str, float]:
    """The slowest client's compute, and the most any client lost between its trainer
    and the agent (from the timings the clients report)."""
    computes = [_seconds(h.timings, "load_s", "grad_s", "write_s") for h, _ in gathered]
    hops = [_seconds(h.timings, "trainer_s") - c
            for (h, _), c in zip(gathered, computes, strict=True)]
    return {"compute_s": round(max(computes), 6), "hop_s": round(max(hops), 6)}


def _seconds(timings: dict[str, Any], *keys: str) -> float:
    """The sum of a client's reported timings under `keys`; junk counts as 0."""
    values = (timings.get(k) for k in keys)
    return sum(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))
