"""The local handoff (`bus.handoff`): models and updates in shared memory on one host.

Unit tests pin the proof of the same host, the bounded reads and the names each
side may touch (in a private directory standing for /dev/shm). The end-to-end tests
run real coordinators, agents and trainers: the same run through shared memory,
through Redis only, and with one agent of each kind ends with bit-identical models
and leaves no segment behind; a fake agent on this host hands over tampered,
oversized, missing and foreign segments, each rejected and counted as a bad Redis
blob would be, and the run goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from bus.blobs import BlobRef
from bus.embedded import EmbeddedRedis
from bus.errors import BlobMissing, BlobSizeMismatch
from bus.handoff import SHM_DIR, SPARE_MODELS, Advert, AgentHandoff, HostHandoff
from coordinator.delivery import Delivery
from coordinator.job_table import JobRecord
from coordinator.results.fold import fetch_and_fold
from coordinator.results.validation import ResultValidator, SegmentReader
from coordinator.strategies import make_strategy
from serialization import Result, encode, schema_of
from tests.e2e import Run, read_events, start_coordinator
from tests.faults import AgentProc, start_agent
from tests.test_bad_input import FakeAgent, _closed, _faked_run, _status, wait_for

SHM = Path(SHM_DIR)  # where the real runs' segments live
STATE = {"w": torch.arange(16.0).reshape(4, 4)}


def _segment(directory: Path, name: str, data: bytes) -> str:
    (directory / name).write_bytes(data)
    return name


# --- unit: proof of the same host, names, bounds ----------------------------------------


def test_only_an_agent_that_reads_the_token_counts_as_local(tmp_path: Path) -> None:
    """The advertised token proves the host: a wrong digest, another /dev/shm (a remote
    host), a name outside the pattern or the handoff turned off all mean Redis."""
    host = HostHandoff(directory=str(tmp_path))
    advert = host.advert
    assert AgentHandoff(directory=str(tmp_path)).coordinator_pid(advert) == os.getpid()
    assert AgentHandoff(directory=str(tmp_path)).coordinator_pid(
        Advert(advert.name, "0" * 64)) is None
    elsewhere = tmp_path / "other-host"
    elsewhere.mkdir()
    assert AgentHandoff(directory=str(elsewhere)).coordinator_pid(advert) is None
    assert AgentHandoff(directory=str(tmp_path)).coordinator_pid(
        Advert("../" + advert.name, advert.digest)) is None
    assert AgentHandoff(enabled=False, directory=str(tmp_path)).coordinator_pid(advert) is None
    host.close()
    assert list(elsewhere.parent.iterdir()) == [elsewhere]


def test_an_update_is_renamed_over_and_taken_exactly_as_claimed(tmp_path: Path) -> None:
    """Handing over renames (no copy); the coordinator takes its own names only, exactly the
    claimed size (mapped, the name unlinked at once), and unlinks only its own names."""
    host = HostHandoff(directory=str(tmp_path))
    agent = AgentHandoff(directory=str(tmp_path))
    payload = encode(STATE)
    mine = _segment(tmp_path, "pwfl-1-t00-1-abcd", payload)
    name = agent.hand_over(mine, host.pid)
    assert not (tmp_path / mine).exists()
    assert host.owns_update(name)
    with pytest.raises(BlobSizeMismatch):
        host.take_update(name, len(payload) - 1)
    assert (tmp_path / name).exists()  # a rejected segment waits for discard_update
    taken = host.take_update(name, len(payload))
    assert not (tmp_path / name).exists()
    assert taken.readonly
    assert bytes(taken) == payload
    with pytest.raises(BlobMissing):
        host.take_update(name, len(payload))  # once only
    foreign = _segment(tmp_path, f"pwfl-1-u{'0' * 32}", payload)
    with pytest.raises(BlobMissing):
        host.take_update(foreign, len(payload))
    with pytest.raises(BlobMissing):
        host.take_update(f"{host.prefix}u{'1' * 32}", len(payload))
    host.discard_update(foreign)
    host.discard_update(name)
    assert (tmp_path / foreign).exists()
    host.close()
    assert [p.name for p in tmp_path.iterdir()] == [foreign]


def test_old_model_segments_go_beyond_the_live_and_spare_ones(tmp_path: Path) -> None:
    """A model segment per digest; the oldest ones not live and beyond SPARE_MODELS are
    unlinked (stragglers needing them read the Redis blob)."""
    host = HostHandoff(directory=str(tmp_path))
    digests = [hashlib.sha256(bytes([i])).hexdigest() for i in range(SPARE_MODELS + 4)]
    first = host.write_model(digests[0], b"model 0")
    assert host.write_model(digests[0], b"model 0") == first
    for i, digest in enumerate(digests[1:], 1):
        host.write_model(digest, f"model {i}".encode(), live={digests[0]})
    kept = [d for d in digests if host.model_segment(d) is not None]
    assert kept == [digests[0], *digests[-SPARE_MODELS - 1:]]
    assert (tmp_path / first).read_bytes() == b"model 0"
    host.drop_model(digests[0])
    assert not (tmp_path / first).exists()
    host.close()
    assert list(tmp_path.iterdir()) == []


async def test_bad_segments_are_rejected_with_the_reasons_of_bad_blobs(tmp_path: Path) -> None:
    """Tampered bytes, another size, a missing or foreign segment: digest_mismatch,
    size_mismatch, missing_blob, as for a blob in Redis; a good one folds."""
    host = HostHandoff(directory=str(tmp_path))
    payload = encode(STATE)
    digest = hashlib.sha256(payload).hexdigest()
    validator = ResultValidator(run_id="r", jobs=None, known_clients=set(),  # type: ignore[arg-type]
                                results_stream=str, schema=schema_of(STATE),
                                max_update_bytes=2**30)
    strategy = make_strategy("fedavg")
    aggregate = strategy.begin_round(STATE)

    async def fold(data: bytes, nbytes: int | None = None, name: str | None = None) -> str:
        segment = name or _segment(tmp_path, f"{host.prefix}u{os.urandom(16).hex()}", data)
        result = Result(job_id="j", run_id="r", slot_id=0, round=1, client_id="c",
                        status="ok", update_digest=digest,
                        update_nbytes=nbytes or len(payload), num_examples=3,
                        update_shm=segment)
        delivery = Delivery(JobRecord("j", 0, 1, "c"), result)
        verdict = await fetch_and_fold(SegmentReader(host, segment), validator, strategy,
                                       aggregate, delivery, 1.0)
        return "folded" if verdict.accepted else verdict.reason

    tampered = bytearray(payload)
    tampered[-1] ^= 1
    assert await fold(bytes(tampered)) == "digest_mismatch"
    assert await fold(payload + b"\0" * 64) == "size_mismatch"
    assert await fold(payload, name=f"{host.prefix}u{'2' * 32}") == "missing_blob"
    foreign = _segment(tmp_path, f"pwfl-1-u{'3' * 32}", payload)
    assert await fold(payload, name=foreign) == "missing_blob"
    assert await fold(payload) == "folded"
    with pytest.raises(BlobMissing):
        await SegmentReader(None, foreign).get(BlobRef(digest, len(payload)))
    host.close()


# --- end to end: real coordinators, agents and trainers ---------------------------------

SLOW = "tests.e2e_tasks:SlowClientTask"
ROUNDS = 3
# Client 1 always answers last (two trainers, it sleeps longer), so every run folds in
# the same order and the float32 sums match bit for bit (see test_faults_coordinator).
ARGS = ("--task", SLOW, "--task-option", 'slow_clients=["1"]', "--task-option", "slow_s=1.0",
        "--task-option", "base_s=0.05", "--slots", "1", "--clients", "2",
        "--rounds", str(ROUNDS), "--quorum", "1.0", "--seed", "7")



def _vias(events: list[dict[str, Any]], name: str) -> set[str]:
    return {e.get("via", "?") for e in events if e["event"] == name}


def _left_behind(pids: set[int]) -> list[str]:
    return sorted(p.name for p in SHM.iterdir()
                  if any(p.name.startswith(f"pwfl-{pid}-") for pid in pids))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_shm_redis_and_mixed_runs_end_with_identical_models_and_leave_no_segment(
        redis_server: EmbeddedRedis, tmp_path: Path, agents: list[AgentProc]) -> None:
    """The same run with local agents in shared memory, with --no-local-handoff, and with
    one agent of each kind (a remote-looking one through Redis) ends with bit-identical
    models; each path is the one expected (a model blob only where a client needs it), and
    no segment of theirs is left in /dev/shm."""
    url = redis_server.url
    local = ("--local-agents", "1", "--local-devices", "cpu,cpu")
    shm_run = start_coordinator(url, tmp_path / "shm", "ho-shm", *ARGS, *local)
    redis_run = start_coordinator(url, tmp_path / "redis", "ho-redis", *ARGS, *local,
                                  "--no-local-handoff")
    mixed = start_coordinator(url, tmp_path / "mixed", "ho-mixed", *ARGS)
    agents.append(start_agent(url, mixed.run_id, "0", tmp_path / "agents", "near"))
    agents.append(start_agent(url, mixed.run_id, "1", tmp_path / "agents", "far",
                              "--no-local-handoff"))
    runs = (shm_run, redis_run, mixed)
    for run in runs:
        with run:
            assert run.wait(200) == 0, run.output()[-3000:]
    for agent in agents:
        assert agent.proc.wait(30) == 0
    agent_logs = {
        "ho-shm": read_events(shm_run.runs_dir / "ho-shm" / "agent-0.jsonl"),
        "ho-redis": read_events(redis_run.runs_dir / "ho-redis" / "agent-0.jsonl"),
        "near": agents[0].events(), "far": agents[1].events()}
    assert _vias(shm_run.events(), "update_folded") == {"shm"}
    assert _vias(redis_run.events(), "update_folded") == {"redis"}
    mixed_folds = {e["client_id"]: e["via"] for e in mixed.events("update_folded")}
    assert mixed_folds == {"0": "shm", "1": "redis"}
    assert _vias(agent_logs["ho-shm"], "model_fetched") <= {"shm", "cache"}
    assert _vias(agent_logs["ho-redis"], "model_fetched") <= {"redis", "cache"}
    assert _vias(agent_logs["near"], "update_uploaded") == {"shm"}
    assert _vias(agent_logs["far"], "update_uploaded") == {"redis"}
    assert all(run.events("update_rejected") == [] for run in runs)
    # Every client of the shm run is local: no model blob is stored in Redis at all.
    assert {e["blob"] for e in shm_run.events("model_published")} == {False}
    assert {e["blob"] for e in redis_run.events("model_published")} == {True}
    assert {e["blob"] for e in mixed.events("model_published")} == {True}
    expected = shm_run.checkpoint(ROUNDS)
    for run in (redis_run, mixed):
        got = run.checkpoint(ROUNDS)
        assert got.keys() == expected.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), run.run_id
    pids = {run.proc.pid for run in runs} | {
        e["pid"] for events in agent_logs.values() for e in events if "pid" in e}
    assert _left_behind(pids) == []


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_bad_segments_from_a_local_agent_are_rejected_counted_and_unlinked(
        redis_url: str, tmp_path: Path) -> None:
    """A fake agent on this host hands over a tampered, an oversized, a missing and a
    foreign segment: each is rejected and counted as a bad blob would be, the coordinator
    unlinks the ones it owns, and the run goes on to finish."""
    async with _faked_run(redis_url, tmp_path) as (run, agent):
        await agent.take_jobs(10)
        job = agent.jobs["0"]
        pid = AgentHandoff().coordinator_pid(Advert(job.handoff, job.handoff_digest))
        assert pid == run.proc.pid
        payload, _ = await agent.model()
        model = (SHM / job.model_shm).read_bytes()
        assert model == payload  # the segment holds exactly the Redis blob's bytes
        handed: list[str] = []

        async def hand_over(client: str, data: bytes, **changes: Any) -> None:
            name = changes.pop("update_shm", None)
            if name is None:
                name = f"pwfl-{pid}-u{os.urandom(16).hex()}"
                (SHM / name).write_bytes(data)
                handed.append(name)
            await agent.answer(client, None, update_digest=hashlib.sha256(payload).hexdigest(),
                               update_nbytes=len(payload), update_shm=name, **changes)

        tampered = bytearray(payload)
        tampered[-1] ^= 1
        await hand_over("0", bytes(tampered))
        await hand_over("1", payload + b"\0" * 64)
        await hand_over("2", payload, update_shm=f"pwfl-{pid}-u{'0' * 32}")
        foreign = SHM / f"pwfl-{os.getpid()}-u{'1' * 32}"
        foreign.write_bytes(payload)
        try:
            await hand_over("3", payload, update_shm=foreign.name)
            for client in map(str, range(4, 10)):
                await hand_over(client, payload)
            await wait_for(run, _closed(1))
            assert foreign.exists()  # not the coordinator's to unlink
        finally:
            foreign.unlink()
        assert _status(run)["rejected"] == {"digest_mismatch": 1, "size_mismatch": 1,
                                            "missing_blob": 2}
        reasons = sorted(e["reason"] for e in run.events("update_rejected"))
        assert reasons == ["digest_mismatch", "missing_blob", "missing_blob", "size_mismatch"]
        await _answer_remaining_rounds(run, agent)
        assert await asyncio.to_thread(run.wait, 60) == 0, run.output()[-3000:]
    assert [name for name in handed if (SHM / name).exists()] == []
    assert _left_behind({run.proc.pid}) == []


async def _answer_remaining_rounds(run: Run, agent: FakeAgent) -> None:
    """Rounds 2 and 3 answered with the model itself, through Redis."""
    await agent.take_jobs(10)
    payload, _ = await agent.model()
    for client in map(str, range(10)):
        await agent.answer(client, payload)
    await wait_for(run, _closed(2))
    await agent.take_jobs(10)
    for client in map(str, range(10)):
        await agent.answer(client, payload)
