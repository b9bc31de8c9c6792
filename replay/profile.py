"""What a what-if replay samples from: the durations a run recorded, per client and per round.

A client's job is split the way the agent runs it: fetch the model, wait for a
free trainer on its agent, train (load + train + encode), upload. The trainers
an agent has are read from its `agent_started` event when the log holds one,
else inferred as the most training intervals that overlapped on that agent.
What the agent's numbers do not explain of the coordinator-side turnaround
(job_published to update_received) and no queueing explains either is a fixed
per-job latency (a low quantile of the remainder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from replay.model import JobTiming, Run

_LATENCY_QUANTILE = 0.05
# Training intervals are reconstructed from agent durations and coordinator times:
# overlaps shorter than this are measurement noise, not two trainers.
_OVERLAP_TOLERANCE_S = 0.05


@dataclass(frozen=True)
class JobSample:
    """One recorded job of one client, as the simulator replays it."""

    fetch_s: float
    trainer_s: float
    upload_s: float
    ok: bool


@dataclass(frozen=True)
class RoundSample:
    """The coordinator's work for one recorded round."""

    aggregation_s: float
    evaluation_s: float
    checkpoint_s: float


@dataclass(frozen=True)
class Profile:
    """Everything the simulator needs from one recorded run."""

    clients: list[str]
    jobs: dict[str, list[JobSample]]
    agent_of: dict[str, str]
    trainers: dict[str, int]
    latency_s: float
    publish_s: list[float]
    fold_s: list[float]
    rounds: list[RoundSample]
    round_of: dict[tuple[object, int], RoundSample]
    startup_s: float
    tail_s: float
    config: dict[str, object]


def build_profile(run: Run) -> Profile:
    """The run's durations, per client and per round, ready to sample."""
    all_jobs = [job for client in run.clients.values() for job in client.jobs]
    latency_s = _latency(all_jobs)
    agent_of = _agents(run)
    return Profile(
        clients=sorted(run.clients, key=lambda c: (len(c), c)),
        jobs={cid: [_sample(job, latency_s) for job in c.jobs] for cid, c in run.clients.items()},
        agent_of=agent_of,
        trainers=_trainers(run, agent_of, latency_s),
        latency_s=latency_s,
        publish_s=[r.publish_s for rs in run.rounds.values() for r in rs if r.publish_s > 0],
        fold_s=[s.end - s.start for s in run.coordinator_spans if s.category == "aggregation"
                and s.end - s.start > 0] or [0.0],
        rounds=_round_samples(run),
        round_of={(r.slot_id, r.round): RoundSample(r.aggregation_s, r.evaluation_s,
                                                    r.checkpoint_s)
                  for rs in run.rounds.values() for r in rs if r.status == "closed"},
        startup_s=_startup_s(run),
        tail_s=_tail_s(run),
        config=dict(run.config),
    )


def _sample(job: JobTiming, latency_s: float) -> JobSample:
    if job.trainer_s > 0:
        return JobSample(job.fetch_s, job.trainer_s, job.upload_s, job.ok)
    # No agent timings: the whole turnaround is the "training", minus the latency.
    return JobSample(0.0, max(job.turnaround_s - latency_s, 0.0), 0.0, job.ok)


def _latency(jobs: list[JobTiming]) -> float:
    remainders = sorted(
        max(job.turnaround_s - job.fetch_s - job.trainer_s - job.upload_s, 0.0)
        for job in jobs if job.published_at is not None and job.trainer_s > 0
    )
    if not remainders:
        return 0.0
    return remainders[int(_LATENCY_QUANTILE * (len(remainders) - 1))]


def _agents(run: Run) -> dict[str, str]:
    agent_of = {cid: c.agent_id for cid, c in run.clients.items() if c.agent_id}
    for cid, client in run.clients.items():
        for job in client.jobs:
            if job.agent_id:
                agent_of.setdefault(cid, job.agent_id)
    for agent in run.agents.values():
        for cid in agent.client_ids:
            agent_of.setdefault(cid, agent.agent_id)
    return {cid: agent_of.get(cid, f"own:{cid}") for cid in run.clients}


def _trainers(run: Run, agent_of: dict[str, str], latency_s: float) -> dict[str, int]:
    """Trainer processes per agent: the most that overlapped, or as announced if more."""
    spans: dict[str, list[tuple[float, float]]] = {agent: [] for agent in agent_of.values()}
    for cid, client in run.clients.items():
        for job in client.jobs:
            end = job.received_at - job.upload_s - latency_s / 2
            spans[agent_of[cid]].append((end - job.trainer_s, end))
    counts = {agent: max(_max_overlap(s), 1) for agent, s in spans.items()}
    for agent in run.agents.values():  # one trainer per device entry
        if agent.agent_id in counts:
            counts[agent.agent_id] = max(counts[agent.agent_id], len(agent.devices))
    return counts


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = []
    for start, end in spans:
        if end - start > 2 * _OVERLAP_TOLERANCE_S:
            edges += [(start + _OVERLAP_TOLERANCE_S, 1), (end - _OVERLAP_TOLERANCE_S, -1)]
    depth = best = 0
    for _t, step in sorted(edges, key=lambda e: (e[0], e[1])):
        depth += step
        best = max(best, depth)
    return best


def _round_samples(run: Run) -> list[RoundSample]:
    samples = [
        RoundSample(r.aggregation_s, r.evaluation_s, r.checkpoint_s)
        for rs in run.rounds.values() for r in rs if r.status == "closed"
    ]
    return samples or [RoundSample(0.0, 0.0, 0.0)]


def _startup_s(run: Run) -> float:
    """Run start to the first lease: registration, loading data, initial models."""
    leases = [lease.start for c in run.clients.values() for lease in c.leases]
    first = min(leases, default=None)
    return 0.0 if first is None else max(first - run.start, 0.0)


def _tail_s(run: Run) -> float:
    """Last round's end to the run's end: shutdown."""
    closes = [r.closed_at for rs in run.rounds.values() for r in rs if r.closed_at is not None]
    last = max(closes, default=None)
    return 0.0 if last is None else max(run.end - last, 0.0)


def default_round_size(expected_clients: int, slots: int) -> int:
    """The coordinator's default clients per round: ceil(expected / slots)."""
    return max(1, math.ceil(expected_clients / max(slots, 1)))
