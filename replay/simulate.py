"""A discrete-event replay of a schedule through the coordinator's own scheduling code.

`coordinator.scheduling.ClientPool` decides which clients each slot leases and
`coordinator.quorum.RoundQuorum` when each round closes, exactly as in the
coordinator; only time is simulated. The slot loop mirrors `coordinator.slots.lifecycle`:
lease, publish the model, one job per client, fold each update as it arrives
(one at a time per slot), close on quorum or deadline, aggregate; evaluation and
checkpoint run in the background while the next round trains, one at a time per
slot. A client's lease returns the moment its result arrives (the dispatcher's
rule), so another slot can take it at once. Agents run jobs FIFO on their trainers.
Durations are drawn, seeded, from the recorded ones (`replay.profile`).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.quorum import Closure, QuorumRule, RoundQuorum
from coordinator.scheduling import ClientPool
from replay import intervals
from replay.intervals import Span
from replay.profile import JobSample, Profile, RoundSample

MAX_EVENTS = 2_000_000  # a runaway schedule stops here instead of spinning


DRAWS = ("ordered", "random")


@dataclass(frozen=True)
class Setting:
    """One point of a what-if grid."""

    slots: int
    policy: str
    quorum: float
    clients_per_round: int
    rounds: int
    min_clients: int
    deadline_s: float
    client_choice: str = "least-used"  # or "policy-order", as the coordinator's --client-choice


@dataclass
class SimResult:
    """What one simulated run did; times from the first lease (the broker opening)."""

    span_s: float
    slot_rounds: int
    failed_rounds: int
    finished: bool
    coordinator_busy_s: float
    client_busy_s: float
    clients: int
    round_durations: list[float]


@dataclass
class SimSlot:
    """One simulated weight slot: its round, quorum and jobs out, on the what-if clock."""

    slot_id: int
    round: int = 1
    quorum: RoundQuorum | None = None
    jobs: dict[str, str] = field(default_factory=dict)
    published: bool = False
    fold_free_at: float = 0.0
    background_end: float = 0.0
    started_at: float = 0.0
    end: float | None = None
    attempt: int = 0


class Simulation:
    """One replay of one setting; `run()` returns its `SimResult`."""

    def __init__(self, profile: Profile, setting: Setting, rng: random.Random,
                 pool_seed: int = 0, draw: str = "ordered") -> None:
        self.profile, self.setting, self.rng, self.draw = profile, setting, rng, draw
        self._jobs_drawn: dict[str, int] = {}
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.pool = ClientPool(setting.policy, clients_per_round=setting.clients_per_round,
                               min_clients=setting.min_clients, rng=random.Random(pool_seed),
                               prefer_unused=setting.client_choice != "policy-order",
                               rotate=setting.client_choice == "rotate")
        self.rule = QuorumRule(fraction=setting.quorum, min_updates=setting.min_clients,
                               deadline_s=setting.deadline_s)
        self.slots = [SimSlot(i) for i in range(setting.slots)]
        self._lanes = {agent: [0.0] * n for agent, n in profile.trainers.items()}
        self._busy: list[Span] = []
        self._leased_at: dict[str, float] = {}
        self._client_busy: list[Span] = []
        self._round_durations: list[float] = []
        self._failed_rounds = 0
        self._job_ids = itertools.count()

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> SimResult:
        for client_id in self.profile.clients:
            self.pool.add_client(client_id, 0.0)
        for slot in self.slots:
            self._wait(slot)
        for _ in range(MAX_EVENTS):
            if not self._queue or all(slot.end is not None for slot in self.slots):
                break  # what is left are deadlines of rounds that closed long ago
            self.now, _seq, action = heapq.heappop(self._queue)
            action()
        return self._result()

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), action))

    def _result(self) -> SimResult:
        ends = [slot.end for slot in self.slots if slot.end is not None]
        finished = len(ends) == len(self.slots)
        span = max(ends) if finished else self.now
        return SimResult(
            span_s=span,
            slot_rounds=len(self._round_durations),
            failed_rounds=self._failed_rounds,
            finished=finished,
            coordinator_busy_s=intervals.length(self._busy),
            client_busy_s=sum(end - start for start, end in self._client_busy),
            clients=len(self.profile.clients),
            round_durations=self._round_durations,
        )

    # -- leases ----------------------------------------------------------------------------

    def _wait(self, slot: SimSlot) -> None:
        self.pool.slot_waiting(slot.slot_id, self.now)
        self._dispatch()

    def _dispatch(self) -> None:
        for assignment in self.pool.assign(self.now):
            for client_id in assignment.client_ids:
                self._leased_at[client_id] = self.now
            self._open_round(self.slots[assignment.slot_id], assignment.client_ids)

    def _release(self, client_id: str) -> None:
        if self.pool.release(client_id, self.now) is not None:
            self._client_busy.append((self._leased_at.pop(client_id), self.now))
            self._dispatch()

    # -- a round ---------------------------------------------------------------------------

    def _work(self, start: float, duration_s: float) -> float:
        """Coordinator work from `start`; returns its end."""
        self._busy.append((start, start + duration_s))
        return start + duration_s

    def _open_round(self, slot: SimSlot, clients: tuple[str, ...]) -> None:
        publish_s = 0.0 if slot.published else self._choice(self.profile.publish_s, 0.0)
        slot.published = True
        start = self._work(self.now, publish_s)
        self._at(start, lambda: self._start_round(slot, clients))

    def _start_round(self, slot: SimSlot, clients: tuple[str, ...]) -> None:
        slot.attempt += 1
        slot.started_at = self.now
        slot.quorum = RoundQuorum(self.rule, len(clients), self.now)
        slot.jobs = {}
        for client_id in clients:
            job_id = f"{slot.slot_id}-{slot.round}-{client_id}-{next(self._job_ids)}"
            slot.jobs[job_id] = client_id
            self._send_job(slot, job_id, client_id)
        attempt = slot.attempt
        self._at(slot.quorum.deadline_at, lambda: self._deadline(slot, attempt))

    def _send_job(self, slot: SimSlot, job_id: str, client_id: str) -> None:
        job = self._job_sample(client_id)
        self._at(self.now + self.profile.latency_s / 2,
                 lambda: self._train(slot, job_id, client_id, job))

    def _train(self, slot: SimSlot, job_id: str, client_id: str, job: JobSample) -> None:
        """FIFO (in the order jobs reach the agent) on its trainers: the earliest-free one
        takes the job once the model is fetched."""
        lanes = self._lanes.setdefault(self.profile.agent_of.get(client_id, client_id), [0.0])
        lane = min(range(len(lanes)), key=lanes.__getitem__)
        lanes[lane] = max(self.now + job.fetch_s, lanes[lane]) + job.trainer_s
        arrival = lanes[lane] + job.upload_s + self.profile.latency_s / 2
        self._at(arrival, lambda: self._arrive(slot, job_id, client_id, job.ok))

    def _arrive(self, slot: SimSlot, job_id: str, client_id: str, ok: bool) -> None:
        self._release(client_id)
        if slot.quorum is None or job_id not in slot.jobs:
            return  # late: its round closed; dropped (a late fold's cost is not modelled)
        start = max(self.now, slot.fold_free_at)
        done = self._work(start, self._choice(self.profile.fold_s, 0.0)) if ok else start
        slot.fold_free_at = done
        attempt = slot.attempt
        self._at(done, lambda: self._record(slot, attempt, job_id, ok))

    def _record(self, slot: SimSlot, attempt: int, job_id: str, ok: bool) -> None:
        if slot.quorum is not None and slot.attempt == attempt:
            slot.quorum.record(job_id, ok)
            self._check(slot)

    def _deadline(self, slot: SimSlot, attempt: int) -> None:
        if slot.quorum is not None and slot.attempt == attempt:
            self._check(slot)

    def _check(self, slot: SimSlot) -> None:
        assert slot.quorum is not None
        closure = slot.quorum.closure(self.now)
        if closure is not None:
            self._closed(slot, closure)

    def _closed(self, slot: SimSlot, closure: Closure) -> None:
        slot.quorum, slot.jobs = None, {}
        if not closure.ok:
            self._failed_rounds += 1
            self._wait(slot)  # the same round again, with the model already published
            return
        sample = self._round_sample(slot)
        aggregated = self._work(self.now, sample.aggregation_s)
        self._at(aggregated, lambda: self._aggregated(slot, sample.evaluation_s
                                                      + sample.checkpoint_s))

    def _aggregated(self, slot: SimSlot, background_s: float) -> None:
        """Evaluate and checkpoint in the background, after the slot's previous ones."""
        start = max(self.now, slot.background_end)
        slot.background_end = self._work(start, background_s)
        self._round_durations.append(slot.background_end - slot.started_at)
        slot.published = False
        if slot.round >= self.setting.rounds:
            self._at(slot.background_end, lambda: self._finish(slot))
            return
        slot.round += 1
        self._at(start, lambda: self._wait(slot))

    def _finish(self, slot: SimSlot) -> None:
        slot.end = self.now
        self.pool.slot_retired(slot.slot_id)
        self._dispatch()

    # -- sampling --------------------------------------------------------------------------

    def _round_sample(self, slot: SimSlot) -> RoundSample:
        """Ordered: the same slot's same round as recorded, when there was one."""
        recorded = self.profile.round_of.get((slot.slot_id, slot.round))
        if recorded is not None and self.draw == "ordered":
            return recorded
        return self.rng.choice(self.profile.rounds)

    def _choice(self, values: list[float], default: float) -> float:
        return self.rng.choice(values) if values else default

    def _job_sample(self, client_id: str) -> JobSample:
        """Ordered: the client's k-th job replays its k-th recorded one (jobs that ran
        side by side keep their shared slow-downs); beyond those, and in random mode,
        a seeded draw from the client's recorded jobs."""
        own = self.profile.jobs.get(client_id)
        index = self._jobs_drawn.get(client_id, 0)
        self._jobs_drawn[client_id] = index + 1
        if own and self.draw == "ordered" and index < len(own):
            return own[index]
        if own:
            return self.rng.choice(own)
        pooled = [job for jobs in self.profile.jobs.values() for job in jobs]
        return self.rng.choice(pooled) if pooled else JobSample(0.0, 0.0, 0.0, True)
