"""One weight slot: its global model and its loop of rounds.

A round: wait for the pool to lease clients, publish the model once, publish
one job per client, fold each update into the running aggregate as it arrives
(off the event loop), close on quorum or deadline, finalise. Evaluation and the
checkpoint of round r then run in the background while round r+1 already trains,
so the slot's clients wait only for the aggregation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from bus.blobs import BlobRef, digest_of
from bus.connection import raise_if_cancelled
from coordinator.context import RunContext
from coordinator.delivery import Delivery
from coordinator.evaluation import evaluate_round, max_behind
from coordinator.job_table import JobRecord, new_job_id
from coordinator.population.config import SlotConfig
from coordinator.population.hooks import Population, Snapshot
from coordinator.quorum import Closure, RoundQuorum, staleness_weight
from coordinator.results.fold import fetch_and_fold
from coordinator.results.validation import BlobReader, SegmentReader, UpdateRejected
from coordinator.strategies import Strategy
from serialization import Job, encode

log = structlog.get_logger()

MAX_CONSECUTIVE_FAILURES = 5


class SlotFailed(Exception):
    """A slot's rounds kept failing (no quorum) and it gave up."""


@dataclass
class OpenRound:
    round: int
    jobs: dict[str, JobRecord]
    aggregate: Any
    quorum: RoundQuorum
    num_updates: int = 0
    num_examples: int = 0
    update_refs: list[BlobRef] = field(default_factory=list)


@dataclass
class SlotRunner:
    """Runs one slot's rounds from `first_round` to the last."""

    ctx: RunContext
    slot_id: int
    strategy: Strategy
    state: dict[str, torch.Tensor]
    first_round: int = 1
    inbox: asyncio.Queue[Delivery] = field(default_factory=asyncio.Queue)
    _payload: bytes | None = None
    _open: OpenRound | None = None
    _background: asyncio.Task[None] | None = None  # the newest evaluate-and-checkpoint link
    _behind: int = 0  # links of that chain not finished yet
    _newest_closed: int = 0
    _unacked: list[Delivery] = field(default_factory=list)  # handled, ack to follow
    _stored: str | None = None  # the digest of the model blob in Redis (None: not stored)
    finished: bool = False
    config: SlotConfig | None = None  # None: the command line's training settings
    population: Population | None = None  # PBT / merges at the round boundary
    latest: Snapshot | None = None  # the model as it left the last round boundary
    aggregated_round: int | None = None  # the round `state` comes from (None: first_round - 1)

    @property
    def model_ref(self) -> BlobRef | None:
        """The model this slot serves now (None between a round's close and the next publish)."""
        return self.ctx.models.of_slot(self.slot_id)

    @property
    def status(self) -> Any:
        return self.ctx.status.slots[self.slot_id]

    def latest_model(self) -> tuple[int, dict[str, torch.Tensor], bytes | None]:
        """Read-only, for downloads: (round, state, wire bytes if encoded) of the newest
        global model; round first_round - 1 before this run aggregated any."""
        aggregated = self.aggregated_round
        return (self.first_round - 1 if aggregated is None else aggregated,
                self.state, self._payload)

    def deliver(self, delivery: Delivery) -> None:
        """A result for one of this slot's jobs (the dispatcher already returned the lease)."""
        self.inbox.put_nowait(delivery)

    async def run(self) -> None:
        bound = structlog.contextvars.bound_contextvars(slot_id=self.slot_id)
        with bound:
            try:
                for round_ in range(self.first_round, self.ctx.settings.rounds + 1):
                    await self._complete_round(round_)
                    if self.population is not None:
                        await self.population.round_closed(self, round_)
                if self._background is not None:
                    await self._background
            except SlotFailed as exc:
                await self._give_up(exc)
                return
            finally:
                self.finished = True
                self.ctx.broker.retire(self.slot_id)
        self.status.state = "done"
        log.info("slot_finished", slot_id=self.slot_id, rounds=self.status.rounds_done,
                 accuracy=self.status.last_accuracy)

    async def _give_up(self, exc: SlotFailed) -> None:
        """The slot stops (a diverged sweep point, say); the run's other slots go on. Its
        last evaluation and checkpoint still land."""
        if self._background is not None:
            await self._background
        self.status.state = "failed"
        log.error("slot_failed", slot_id=self.slot_id, round=self.status.round, reason=str(exc),
                  rounds=self.status.rounds_done, accuracy=self.status.last_accuracy)
        if self.population is not None:
            await self.population.slot_failed(self.slot_id, self.status.round)

    async def _complete_round(self, round_: int) -> None:
        failures = 0
        while not await self._attempt(round_):
            failures += 1
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise SlotFailed(f"slot {self.slot_id} round {round_} failed {failures} times")

    async def _attempt(self, round_: int) -> bool:
        raise_if_cancelled()
        self.status.state, self.status.round = "waiting", round_
        waiting_since = time.monotonic()
        clients = await self.ctx.broker.lease(self.slot_id, round_)
        opened = await self._open_round(round_, clients, time.monotonic() - waiting_since)
        closure = await self._collect(opened)
        self._open = None
        log.info("quorum_reached", slot_id=self.slot_id, round=round_, reason=closure.reason,
                 received=closure.succeeded, failed=closure.failed, expected=closure.expected,
                 wait_s=round(time.monotonic() - opened.quorum.started_at, 6))
        if not closure.ok:
            self._round_failed(opened, closure)
            return False
        await self._close_round(opened)
        return True

    async def _open_round(self, round_: int, clients: tuple[str, ...], wait_s: float) -> OpenRound:
        ctx = self.ctx
        self.status.state, self.status.clients = "training", clients
        ref = await self._publish_model(round_, clients)
        records = [JobRecord(new_job_id(self.slot_id, round_, c), self.slot_id, round_, c)
                   for c in clients]
        aggregate = await asyncio.to_thread(self.strategy.begin_round, self.state)
        quorum = RoundQuorum(ctx.quorum_rule, len(records), time.monotonic())
        self._open = OpenRound(round_, {r.job_id: r for r in records}, aggregate, quorum)
        log.info("round_started", slot_id=self.slot_id, round=round_, clients=list(clients),
                 quorum_count=quorum.needed, deadline_s=ctx.settings.deadline_s,
                 wait_s=round(wait_s, 6))
        await self._publish_jobs(records, ref)
        return self._open

    async def _publish_model(self, round_: int, clients: Sequence[str]) -> BlobRef:
        """The model every job of the round points at: its Redis blob, unless every client
        takes it from shared memory (agents on this host), and its segment for those."""
        if self.model_ref is not None and self._payload is not None:
            ref = self.model_ref  # a retried round publishes the same model
            if self._stored != ref.digest and not self.ctx.all_local(clients):
                await self.ctx.blobs.put(self._payload, ref.digest)
                self._stored = ref.digest
            return ref
        start = time.perf_counter()
        payload = self._payload
        if payload is None:
            payload = await asyncio.to_thread(encode, self.state)
        encode_s = time.perf_counter() - start
        digest = await asyncio.to_thread(digest_of, payload)
        ref = BlobRef(digest, len(payload))
        if self.ctx.all_local(clients):
            shm_s = await self._model_segment(digest, payload)
            blob = shm_s is None  # the segment could not be written: Redis it is
            if blob:
                await self.ctx.blobs.put(payload, digest)
        else:
            blob = True
            _, shm_s = await asyncio.gather(self.ctx.blobs.put(payload, digest),
                                            self._model_segment(digest, payload))
        self._stored = digest if blob else None
        self._payload = payload
        self.ctx.models.publish(self.slot_id, ref)
        self.ctx.status.counters["bytes_published"] += ref.nbytes
        log.info("model_published", slot_id=self.slot_id, round=round_, digest=ref.digest,
                 nbytes=ref.nbytes, encode_s=round(encode_s, 6),
                 put_s=round(time.perf_counter() - start - encode_s, 6),
                 shm_s=round(shm_s or 0.0, 6), blob=blob,
                 duration_s=round(time.perf_counter() - start, 6))
        return ref

    async def _model_segment(self, digest: str, payload: bytes) -> float | None:
        """With the local handoff on: the model's shared-memory copy for agents on this
        host (seconds spent; None if it could not be written, 0 with the handoff off).

        The Redis blob is written as well whenever a client of the round is not on such an
        agent (remote agents, and a local agent that cannot use the segment, read that)."""
        handoff = self.ctx.handoff
        if handoff is None:
            return 0.0
        start = time.perf_counter()
        live = self.ctx.models.live_digests()
        try:
            await asyncio.to_thread(handoff.write_model, digest, payload, live)
        except OSError as exc:  # /dev/shm full, say: the agents read the blob
            log.warning("handoff_unavailable", slot_id=self.slot_id, error=str(exc))
            return None
        return time.perf_counter() - start

    async def _publish_jobs(self, records: list[JobRecord], ref: BlobRef) -> None:
        ctx = self.ctx
        deadline_ts = time.time() + ctx.settings.deadline_s
        token, token_digest, segment = "", "", ""  # the local handoff, when offered
        if ctx.handoff is not None and (shm := ctx.handoff.model_segment(ref.digest)):
            advert = ctx.handoff.advert
            token, token_digest, segment = advert.name, advert.digest, shm
        items = []
        for record in records:
            ctx.jobs.add(record)
            job = Job(job_id=record.job_id, run_id=ctx.settings.run_id, slot_id=self.slot_id,
                      round=record.round, client_id=record.client_id, model_digest=ref.digest,
                      model_nbytes=ref.nbytes, deadline_ts=deadline_ts, task=ctx.settings.task,
                      task_options=ctx.task_options, config=self._job_config(record),
                      published_ts=time.time(), handoff=token,
                      handoff_digest=token_digest, model_shm=segment)
            items.append((ctx.keys.jobs(record.client_id), ctx.job_bytes(job)))
        await ctx.publish_many(items)
        for record in records:
            log.info("job_published", slot_id=self.slot_id, round=record.round,
                     client_id=record.client_id, job_id=record.job_id,
                     seed=self._job_config(record)["seed"])
        ctx.status.counters["jobs_published"] += len(records)

    def _job_config(self, record: JobRecord) -> dict[str, Any]:
        """The run's job config (its seed per job) with this slot's training settings."""
        config = self.ctx.job_config(record)
        if self.config is not None:
            config.update(self.config.training.job_config(config["seed"]))
        return config

    async def _collect(self, opened: OpenRound) -> Closure:
        """Handle deliveries until the quorum closes the round."""
        while (closure := opened.quorum.closure(time.monotonic())) is None:
            raise_if_cancelled()
            remaining = opened.quorum.deadline_at - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    delivery = await self.inbox.get()
            except TimeoutError:
                continue
            await self._handle(delivery, opened)
        await self._flush_acks()
        return closure

    async def _handle(self, delivery: Delivery, opened: OpenRound) -> None:
        handled = False
        try:
            if delivery.recovered or delivery.record.job_id not in opened.jobs:
                await self._handle_late(delivery, opened)
            elif delivery.result.status != "ok":
                self._job_failed(delivery)
                opened.quorum.record(delivery.record.job_id, ok=False)
            else:
                ok = await self._fold(delivery, opened, scale=1.0)
                opened.quorum.record(delivery.record.job_id, ok=ok)
            handled = True
        finally:
            self.ctx.discard_update(delivery)
            self._unacked.append(delivery)
            # With more results waiting, their acks go together after them (one XACK);
            # an error or a cancellation acks at once what was handled.
            if not handled or self.inbox.empty():
                await self._flush_acks()

    async def _flush_acks(self) -> None:
        unacked, self._unacked = self._unacked, []
        if unacked:
            await self.ctx.ack_many(unacked)

    def _job_failed(self, delivery: Delivery) -> None:
        record = delivery.record
        log.warning("job_failed", slot_id=self.slot_id, round=record.round,
                    client_id=record.client_id, job_id=record.job_id, error=delivery.result.error)
        self.ctx.status.counters["jobs_failed"] += 1

    async def _fold(self, delivery: Delivery, opened: OpenRound, scale: float) -> bool:
        delivery = self.ctx.validator.claims.capped(delivery, self._job_config(delivery.record))
        try:
            stats = await fetch_and_fold(self._update_source(delivery), self.ctx.validator,
                                         self.strategy, opened.aggregate, delivery, scale)
        except UpdateRejected as exc:
            self.ctx.reject(delivery, exc.reason, exc.detail, **exc.fields)
            return False
        self.ctx.status.counters["bytes_received"] += stats["nbytes"]
        self.ctx.status.counters["updates_folded"] += 1
        opened.num_updates += 1
        opened.num_examples += delivery.result.num_examples
        handed_over = bool(delivery.result.update_shm)  # unlinked when acked, no blob
        if not handed_over:
            opened.update_refs.append(BlobRef(delivery.result.update_digest,
                                              delivery.result.update_nbytes))
        log.info("update_folded", slot_id=self.slot_id, round=delivery.record.round,
                 client_id=delivery.record.client_id, job_id=delivery.record.job_id,
                 via="shm" if handed_over else "redis", **stats)
        return True

    def _update_source(self, delivery: Delivery) -> BlobReader:
        """Where the update's bytes are: its handed-over segment, or the blob store."""
        name = delivery.result.update_shm
        if not name:
            return self.ctx.blobs
        return SegmentReader(self.ctx.handoff, name)

    async def _handle_late(self, delivery: Delivery, opened: OpenRound | None) -> None:
        """An update whose round has closed (or whose job already counted as failed when its
        client was lost): it waited in the inbox for the next round."""
        record = delivery.record
        fold = self.ctx.validator.folds_late(delivery.result, round_open=opened is not None)
        current = opened.round if opened is not None else None
        staleness = (current or self.status.round) - record.round
        action = "folded" if fold else "dropped"
        log.info("update_late", slot_id=self.slot_id, round=record.round, current_round=current,
                 client_id=record.client_id, job_id=record.job_id, action=action,
                 staleness=staleness)
        self.ctx.status.counters[f"late_{action}"] += 1
        if not fold and delivery.result.status == "ok":
            self.ctx.rejections.closed_round()
        if fold and opened is not None:
            scale = staleness_weight(staleness, self.ctx.settings.staleness)
            await self._fold(delivery, opened, scale=scale)

    def _round_failed(self, opened: OpenRound, closure: Closure) -> None:
        self.ctx.status.counters["rounds_failed"] += 1
        log.warning("round_failed", slot_id=self.slot_id, round=opened.round,
                    reason="no_quorum", received=closure.succeeded, failed=closure.failed)

    async def _close_round(self, opened: OpenRound) -> None:
        self.status.state = "aggregating"
        start = time.perf_counter()
        new_state = await asyncio.to_thread(self.strategy.finalize, opened.aggregate, self.state)
        strategy_state = self.strategy.state_dict()  # this round's, before the next one steps
        payload = await asyncio.to_thread(encode, new_state)
        log.info("aggregation_finished", slot_id=self.slot_id, round=opened.round,
                 num_updates=opened.num_updates, num_examples=opened.num_examples,
                 duration_s=round(time.perf_counter() - start, 6))
        old_ref, old_payload = self.model_ref, self._payload
        self.state, self._payload = new_state, payload
        self.ctx.models.withdraw(self.slot_id)
        self.latest = Snapshot(opened.round, new_state, strategy_state, opened.num_examples)
        self.aggregated_round = opened.round
        await self._retire_blobs(opened, old_ref, old_payload)
        await self._after_round(opened, payload, strategy_state)

    async def _retire_blobs(self, opened: OpenRound, old_model: BlobRef | None,
                            old_payload: bytes | None) -> None:
        """Unlink the round's update blobs and its model, unless one of the round's jobs may
        still train on it (a straggler, or a lost client's job a replacement agent reclaims).
        Such a model is stored in Redis now if only shared memory held it: its segment
        may go before the straggler reads it, and a replacement agent may be remote."""
        stragglers = self.ctx.jobs.may_answer(self.slot_id, opened.round)
        refs = {ref.digest: ref for ref in opened.update_refs}
        if old_model is not None:
            if stragglers:
                refs.pop(old_model.digest, None)  # left to its TTL
                if self._stored != old_model.digest and old_payload is not None:
                    await self.ctx.blobs.put(old_payload, old_model.digest)
                    self._stored = old_model.digest
            else:
                refs[old_model.digest] = old_model
        for ref in refs.values():
            await self.ctx.models.retire(ref)

    async def _after_round(self, opened: OpenRound, payload: bytes,
                           strategy_state: dict[str, torch.Tensor]) -> None:
        """Evaluate and checkpoint in the background, in round order; the next round does
        not wait for them. A round whose evaluation has not started when a newer round
        closes is checkpointed without one (`evaluation_skipped`), so a slow evaluator
        (a busy machine, `--eval-nice`) skips ahead instead of holding the slot; only when
        `max_behind` rounds are still queued does the slot wait (bounded memory)."""
        if self._behind >= max_behind(len(payload)) and self._background is not None:
            await asyncio.shield(self._background)
        self._newest_closed = opened.round
        self._behind += 1
        self._background = asyncio.create_task(
            self._evaluate_and_checkpoint(self._background, opened, self.state, payload,
                                          strategy_state),
            name=f"slot{self.slot_id}-round{opened.round}-eval",
        )
        self.status.state = "waiting"

    async def _evaluate_and_checkpoint(self, previous: asyncio.Task[None] | None,
                                       opened: OpenRound, state: dict[str, torch.Tensor],
                                       payload: bytes,
                                       strategy_state: dict[str, torch.Tensor]) -> None:
        try:
            if previous is not None:
                await previous  # rounds are checkpointed in order
            with structlog.contextvars.bound_contextvars(slot_id=self.slot_id):
                metrics = await self._evaluate(opened.round, state)
                await self.ctx.run_state.checkpoint(self.slot_id, opened.round, payload,
                                                    strategy_state, metrics)
                accuracy = metrics.get("accuracy") if metrics else None
                self.status.rounds_done = opened.round
                if accuracy is not None:
                    self.status.record_accuracy(opened.round, accuracy,
                                                self.ctx.status.elapsed_s)
                log.info("round_closed", slot_id=self.slot_id, round=opened.round,
                         duration_s=round(time.monotonic() - opened.quorum.started_at, 6),
                         accuracy=accuracy, num_updates=opened.num_updates)
        finally:
            self._behind -= 1

    async def _evaluate(self, round_: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        s = self.ctx.settings
        return await evaluate_round(self.ctx.evaluator, self.slot_id, round_, state,
                                    eval_every=s.eval_every, last_round=s.rounds,
                                    newest_round=self._newest_closed)

    async def settle(self) -> None:
        """Wait for the last round's evaluation and checkpoint."""
        if self._background is not None:
            await self._background

    async def replace_model(self, state: dict[str, torch.Tensor], strategy: Strategy,
                            config: SlotConfig, round_: int) -> None:
        """PBT or a merge replaced the model the next round starts from: checkpointed as
        round `round_`, so a resumed run goes on from it with this configuration."""
        await self.settle()
        payload = await asyncio.to_thread(encode, state)
        strategy_state = strategy.state_dict()
        self.state, self.strategy, self.config = state, strategy, config
        self._payload = payload
        self.ctx.models.withdraw(self.slot_id)
        self.latest = Snapshot(round_, state, strategy_state, 0)
        self.aggregated_round = round_
        self.status.config = config.flat()
        run_state = self.ctx.run_state
        run_state.doc.setdefault("slot_configs", {})[str(self.slot_id)] = config.flat()
        if not strategy_state:  # a stateless strategy now: no stale moments for --resume
            run_state.store.model_path(self.slot_id, round_, "strategy").unlink(missing_ok=True)
        await run_state.checkpoint(self.slot_id, round_, payload, strategy_state, {})

    async def drop_after_finish(self, delivery: Delivery) -> None:
        """A late result for a slot that has finished all its rounds: dropped and acked."""
        try:
            await self._handle_late(delivery, None)
        finally:
            await self.ctx.ack(delivery)
