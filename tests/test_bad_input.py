"""Bad input at every entry point: rejected with a logged reason, counted, and the process
goes on serving.

The coordinator's side: a real coordinator process whose ten clients are all hosted
by a fake agent written here, which speaks the bus protocol by hand so that it can
answer each job wrongly in its own way (and write raw stream entries besides). The
counts are read from `/status` while the run goes on; the run must still finish.

The agent's side: a real agent, fed malformed and misdirected job entries and then
a good one, which it must still train.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import torch

from bus import streams
from bus.blobs import BlobRef, BlobStore
from bus.keys import JOBS_GROUP, RESULTS_GROUP, Keys
from bus.registry import Registry
from coordinator.settings import TrainingSettings
from serialization import Job, Registration, Result, decode, encode
from serialization.messages import MAX_MESSAGE_BYTES
from tests.conftest import RedisFactory
from tests.e2e import Run, start_coordinator
from tests.faults import start_agent, stop_agents
from trainer_worker.tasks.synthetic import SyntheticTask

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

CLIENTS = [str(i) for i in range(10)]
StateDict = dict[str, torch.Tensor]


async def wait_for(run: Run, predicate: Callable[[list[dict[str, Any]]], bool],
                   timeout_s: float = 60) -> list[dict[str, Any]]:
    """Poll the coordinator's log (without blocking the loop) until `predicate(events)`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = run.events()
        if predicate(events):
            return events
        assert run.proc.poll() is None, f"coordinator exited:\n{run.output()[-3000:]}"
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _closed(round_: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda ev: any(e["event"] == "quorum_reached" and e["round"] == round_ for e in ev)


@dataclass
class FakeAgent:
    """Hosts every client of the run and answers its jobs however the test says."""

    r: aioredis.Redis
    keys: Keys
    blobs: BlobStore = field(init=False)
    jobs: dict[str, Job] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blobs = BlobStore(self.r, self.keys)

    async def heartbeat(self) -> None:
        registry = Registry(self.r, self.keys)
        await registry.register(Registration(agent_id="fake", client_ids=CLIENTS))
        while True:
            await registry.heartbeat(CLIENTS)
            await asyncio.sleep(1)

    async def take_jobs(self, count: int) -> dict[str, Job]:
        """The next `count` jobs, by client (acked at once: this agent never reclaims)."""
        job_streams = [self.keys.jobs(c) for c in CLIENTS]
        for stream in job_streams:
            await streams.ensure_group(self.r, stream, JOBS_GROUP)
        self.jobs = {}
        while len(self.jobs) < count:
            for entry in await streams.consume(self.r, job_streams, JOBS_GROUP, "fake"):
                job = Job.from_bytes(entry.payload)
                self.jobs[job.client_id] = job
                await streams.ack(self.r, entry.stream, JOBS_GROUP, [entry.entry_id])
        return self.jobs

    async def model(self) -> tuple[bytes, StateDict]:
        job = next(iter(self.jobs.values()))
        payload = bytes(await self.blobs.get(BlobRef(job.model_digest, job.model_nbytes)))
        return payload, {k: v.clone() for k, v in decode(payload)[0].items()}

    async def answer(self, client: str, update: bytes | None = None, **changes: Any) -> None:
        """A result for the client's job: `update` uploaded as its blob; fields as changed."""
        job = self.jobs[client]
        fields: dict[str, Any] = {"num_examples": 64}
        if update is not None:
            ref = await self.blobs.put(update)
            fields |= {"update_digest": ref.digest, "update_nbytes": ref.nbytes}
        result = Result(job_id=job.job_id, run_id=job.run_id, slot_id=job.slot_id,
                        round=job.round, client_id=client, status="ok", agent_id="fake")
        await self.raw({b"m": replace(result, **(fields | changes)).to_bytes()})

    async def raw(self, fields: dict[bytes, bytes]) -> None:
        await self.r.xadd(self.keys.results(0), fields)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _faked_run(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[Run, FakeAgent]]:
    run = start_coordinator(redis_url, tmp_path, "bad-input", "--task", "synthetic",
                            "--slots", "1", "--clients", "10", "--rounds", "3",
                            "--quorum", "0.9", "--late-policy", "drop")
    r = aioredis.Redis.from_url(redis_url)
    agent = FakeAgent(r, Keys(run.run_id))
    beating = asyncio.create_task(agent.heartbeat())
    try:
        with run:
            yield run, agent
    finally:
        beating.cancel()
        await r.aclose()


@pytest.fixture
async def fake_run(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[Run, FakeAgent]]:
    """A coordinator (one slot, ten clients, three rounds) and the fake agent hosting them."""
    async with _faked_run(redis_url, tmp_path) as faked:
        yield faked


def _edited(state: StateDict, how: str) -> bytes:
    name = next(iter(state))
    edited = dict(state)
    if how == "dtype":
        edited[name] = state[name].double()
    elif how == "shape":
        edited[name] = torch.zeros(state[name].numel() + 1)
    elif how == "names":
        edited["not." + name] = edited.pop(name)
    else:
        value = state[name].clone()
        value.view(-1)[0] = float(how)
        edited[name] = value
    return encode(edited)


async def _answer_round_one_wrongly(agent: FakeAgent) -> None:
    """Shallow garbage first (no job used up), then one wrong update per job, one good one."""
    payload, state = await agent.model()
    job0 = agent.jobs["0"]
    await agent.r.hset(agent.keys.clients(), "ghost", b"\xc1 not a registration")
    await agent.raw({b"m": b"\xc1 not msgpack"})
    await agent.raw({b"other": b"no m field"})
    await agent.raw({b"m": bytes(MAX_MESSAGE_BYTES + 1)})
    await agent.answer("0", job_id=job0.job_id[:-8] + "deadbeef")
    await agent.answer("0", job_id="made-up", client_id="ghost")
    await agent.answer("0", client_id="1")
    await agent.raw({b"m": b"\x82\xa1v\x01\xa1k\xa6result"})  # {"v": 1, "k": "result"}
    await agent.answer("0", payload[: len(payload) // 2])
    await agent.answer("1", _edited(state, "dtype"))
    await agent.answer("2", _edited(state, "shape"))
    await agent.answer("3", _edited(state, "names"))
    await agent.answer("4", _edited(state, "nan"))
    await agent.answer("5", _edited(state, "inf"))
    await agent.answer("6", update_digest="0" * 64, update_nbytes=10**9)
    await agent.answer("7", update_digest=hashlib.sha256(b"never put").hexdigest(),
                       update_nbytes=len(payload))
    forged = _edited(state, "0.5")  # a good update, stored under a digest not its own
    await agent.r.set(agent.keys.blob(hashlib.sha256(b"forged").hexdigest()), forged)
    await agent.answer("8", update_digest=hashlib.sha256(b"forged").hexdigest(),
                       update_nbytes=len(forged))
    await agent.answer("9", payload)
    await agent.answer("9", payload)  # the same job id again


EXPECTED_REJECTIONS = {
    "malformed": 2, "too_large": 2, "unknown_job": 1, "unknown_client": 1, "mismatch": 1,
    "missing_field": 1, "truncated": 1, "wrong_schema": 2, "wrong_names": 1, "not_finite": 2,
    "missing_blob": 1, "digest_mismatch": 1, "duplicate": 1, "closed_round": 1,
    "bad_registration": 1,  # logged once as registration_undecodable, however many polls
}


def _status(run: Run) -> dict[str, Any]:
    url = next(e["url"] for e in run.events() if e["event"] == "http_listening")
    with urllib.request.urlopen(url + "/status", timeout=10) as reply:  # noqa: S310 - our URL
        status: dict[str, Any] = json.loads(reply.read())
    return status


async def test_every_bad_result_is_rejected_counted_and_the_run_goes_on(
        fake_run: tuple[Run, FakeAgent]) -> None:
    """Malformed, oversized, unknown, mismatched, replayed, late and bad-update results are
    each rejected with a logged reason and counted in /status; the run still finishes."""
    run, agent = fake_run
    await agent.take_jobs(10)
    await _answer_round_one_wrongly(agent)
    await wait_for(run, _closed(1))
    await agent.take_jobs(10)
    payload, _ = await agent.model()
    for client in CLIENTS[:9]:
        await agent.answer(client, payload)
    await wait_for(run, _closed(2))
    late_job = agent.jobs["9"]
    jobs = dict(await agent.take_jobs(9))  # client 9 is still leased: round 3 has nine
    agent.jobs["9"] = late_job
    await agent.answer("9", payload)
    events = await wait_for(run, lambda ev: {"update_late", "registration_undecodable"} <= {
        e["event"] for e in ev})
    status = _status(run)
    assert status["rejected"] == EXPECTED_REJECTIONS
    logged: dict[str, int] = {}
    for e in events:
        if e["event"] == "update_rejected":
            logged[e["reason"]] = logged.get(e["reason"], 0) + 1
    assert logged == {k: v for k, v in EXPECTED_REJECTIONS.items()
                      if k not in {"closed_round", "bad_registration"}}
    assert [e["client_id"] for e in events if e["event"] == "registration_undecodable"] == [
        "ghost"]
    assert [e["action"] for e in events if e["event"] == "update_late"] == ["dropped"]
    assert [e["round"] for e in events if e["event"] == "quorum_reached"] == [1, 2]
    for client in jobs:
        await agent.answer(client, payload)
    assert await asyncio.to_thread(run.wait, 60) == 0, run.output()[-3000:]
    folded = [e["job_id"] for e in run.events("update_folded")]
    assert len(folded) == len(set(folded)) == 1 + 9 + 9


def _peak_rss_bytes(pid: int) -> int:
    """A process's peak resident set so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


HUGE_BYTES = 400 * 10**6


async def test_a_huge_blob_under_a_small_claim_is_rejected_unread(
        redis_factory: RedisFactory, tmp_path: Path) -> None:
    """A 400 MB value stored under the digest a small result claims is rejected as
    size_mismatch without being read: the coordinator's peak memory and Redis's bytes sent
    stay far below 400 MB, and the round still closes."""
    # A private server: the 400 MB go when it stops. Its proto-max-bulk-len (512 MB by
    # default) already allows the value, which SETRANGE builds inside Redis.
    server = redis_factory()
    async with _faked_run(server.url, tmp_path) as (run, agent):
        await agent.take_jobs(10)
        payload, _ = await agent.model()
        digest = hashlib.sha256(b"400 MB of zeros, claimed as a small update").hexdigest()
        await agent.r.setrange(agent.keys.blob(digest), HUGE_BYTES - 1, b"\0")
        assert await agent.r.strlen(agent.keys.blob(digest)) == HUGE_BYTES
        peak_before = _peak_rss_bytes(run.proc.pid)
        sent_before = int((await agent.r.info("stats"))["total_net_output_bytes"])
        await agent.answer("0", update_digest=digest, update_nbytes=len(payload))
        events = await wait_for(run, lambda ev: any(e["event"] == "update_rejected"
                                                    for e in ev))
        peak_after = _peak_rss_bytes(run.proc.pid)
        sent = int((await agent.r.info("stats"))["total_net_output_bytes"]) - sent_before
        measured = (f"coordinator peak RSS {peak_before / 2**20:.1f} MiB before, "
                    f"{peak_after / 2**20:.1f} MiB after; Redis sent {sent} bytes meanwhile")
        logging.getLogger(__name__).info(measured)
        [rejected] = [e for e in events if e["event"] == "update_rejected"]
        assert (rejected["reason"], rejected["client_id"]) == ("size_mismatch", "0")
        assert str(HUGE_BYTES) in rejected["detail"]
        assert peak_after - peak_before < 50 * 2**20, measured
        assert sent < 10 * 2**20, measured
        for client in CLIENTS[1:]:
            await agent.answer(client, payload)
        await wait_for(run, _closed(1))
        assert _status(run)["rejected"] == {"size_mismatch": 1}


async def test_agent_rejects_bad_job_entries_and_still_trains(redis_url: str,
                                                              tmp_path: Path) -> None:
    """Malformed, oversized, incomplete and misdirected job entries are logged as job_rejected
    and acked; the agent then trains a good job and reports its update."""
    keys, r = Keys("bad-jobs"), aioredis.Redis.from_url(redis_url)
    agent = start_agent(redis_url, keys.run_id, "0", tmp_path, "agent")
    try:
        agent.wait_for(lambda ev: any(e["event"] == "agent_started" for e in ev), 90)
        job = await _good_job(r, keys)
        bad = [b"\xc1", bytes(MAX_MESSAGE_BYTES + 1), b"\x81\xa1v\x01",
               replace(job, run_id="other-run").to_bytes(),
               replace(job, client_id="1").to_bytes()]
        for payload in bad:
            await r.xadd(keys.jobs("0"), {b"m": payload})
        await r.xadd(keys.jobs("0"), {b"junk": b"no m field"})
        await r.xadd(keys.jobs("0"), {b"m": job.to_bytes()})
        reply = await r.xread({keys.results(0): "0"}, block=60_000)
        result = Result.from_bytes(reply[0][1][0][1][b"m"])
        assert (result.job_id, result.status, result.error) == (job.job_id, "ok", "")
        reasons = [e["reason"] for e in agent.events("job_rejected")]
        assert reasons == ["malformed", "too_large", "missing_field", "mismatch", "mismatch",
                           "malformed"]
        await _wait_all_acked(r, keys.jobs("0"))  # the good job too, acked after its result
    finally:
        await r.hset(keys.state(), "status", "finished")  # the agent leaves on its own
        stop_agents([agent])
        await r.aclose()


async def _wait_all_acked(r: aioredis.Redis, stream: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (await r.xpending(stream, JOBS_GROUP))["pending"]:
        assert time.monotonic() < deadline, "job entries left pending"
        await asyncio.sleep(0.05)


async def _good_job(r: aioredis.Redis, keys: Keys) -> Job:
    task = SyntheticTask(num_clients=1)
    ref = await BlobStore(r, keys).put(encode(task.build_model(0).state_dict()))
    await streams.ensure_group(r, keys.results(0), RESULTS_GROUP)
    return Job(job_id="good-job", run_id=keys.run_id, slot_id=0, round=1, client_id="0",
               model_digest=ref.digest, model_nbytes=ref.nbytes, deadline_ts=time.time() + 600,
               task="trainer_worker.tasks.synthetic:SyntheticTask",
               task_options={"num_clients": 1}, config=TrainingSettings().job_config(1))
