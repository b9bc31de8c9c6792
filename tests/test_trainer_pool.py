"""The agent's trainer pool with real spawned trainer processes and the synthetic task."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
from structlog.testing import capture_logs

from client_agent.model_cache import ModelCache, ModelSegment
from client_agent.trainers import TrainerPool, TrainReply, TrainRequest
from serialization import decode, encode
from trainer_worker.task import load_task

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SPEC = "trainer_worker.tasks.synthetic:SyntheticTask"
OPTIONS = {"num_clients": 3, "examples_per_client": 32}
SHM = Path("/dev/shm")


@pytest.fixture(scope="module")
def cache() -> Iterator[ModelCache]:
    models = ModelCache()
    yield models
    models.close()


@pytest.fixture(scope="module")
def blob() -> bytes:
    return encode(load_task(SPEC, OPTIONS).build_model(seed=1).state_dict())


@pytest.fixture(scope="module")
def model(cache: ModelCache, blob: bytes) -> ModelSegment:
    return cache.put("model-1", blob)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pool() -> AsyncIterator[TrainerPool]:
    trainers = TrainerPool(["cpu", "cpu"], run_id="test-run", agent_id="test-agent")
    await trainers.start(timeout_s=60)
    yield trainers
    await trainers.close()


def _request(model: ModelSegment, job_id: str, client_id: str = "0",
             **config: Any) -> TrainRequest:
    return TrainRequest(job_id=job_id, client_id=client_id, task=SPEC, task_options=OPTIONS,
                        config=config or {"epochs": 1}, model=model)


def _segments(prefix: str) -> list[str]:
    return [p.name for p in SHM.glob(f"{prefix}*")]


async def test_job_round_trip(pool: TrainerPool, model: ModelSegment, blob: bytes) -> None:
    """A job comes back with an update that decodes to new weights of the same model."""
    reply = await pool.train(_request(model, "round-trip"))
    try:
        assert (reply.status, reply.error, reply.device) == ("ok", "", "cpu")
        assert reply.update is not None
        assert reply.update_nbytes == len(reply.update)
        assert reply.num_examples == 29  # 32 less the 10% validation split
        assert {"load_s", "train_s", "encode_s", "wait_s"} <= set(reply.timings)
        update, _ = decode(reply.update)
        received, _ = decode(blob)
        assert update.keys() == received.keys()
        assert any(not torch.equal(update[k], received[k]) for k in update)
        del update
    finally:
        reply.release()
    assert reply.update is None
    reply.release()  # idempotent


async def test_noop_returns_identical_bytes(pool: TrainerPool, model: ModelSegment,
                                            blob: bytes) -> None:
    """With noop the update is the received model, byte for byte."""
    reply = await pool.train(_request(model, "noop", noop=True))
    assert reply.update is not None
    assert bytes(reply.update) == blob
    reply.release()


async def test_task_failure_is_a_reply_and_trainers_go_on(pool: TrainerPool,
                                                          model: ModelSegment) -> None:
    """A task raising inside train gives a failed reply; the same trainers serve the next job."""
    pids = sorted(pool.pids)
    failed = await pool.train(_request(model, "bad-client", client_id="7"))
    assert failed.status == "failed"
    assert failed.error == "TaskError: client id '7' is outside 0..2"
    assert failed.update is None
    ok = await pool.train(_request(model, "after-failure"))
    ok.release()
    assert ok.status == "ok"
    assert sorted(pool.pids) == pids


async def test_jobs_wait_for_a_free_trainer(pool: TrainerPool, model: ModelSegment) -> None:
    """More jobs than trainers queue up and all finish; the trainers are idle again after."""
    replies = await asyncio.gather(*(pool.train(_request(model, f"queued-{i}", str(i % 3)))
                                     for i in range(5)))
    for reply in replies:
        reply.release()
    assert [r.job_id for r in replies] == [f"queued-{i}" for i in range(5)]
    assert all(r.status == "ok" for r in replies)
    assert pool.idle == 2


async def _killed_mid_job(pool: TrainerPool, model: ModelSegment) -> TrainReply:
    long_job = asyncio.create_task(pool.train(_request(model, "doomed", epochs=100_000)))
    # No event says "job handed out"; once no trainer is idle, it has been (a yield or two).
    while pool.idle:  # noqa: ASYNC110
        await asyncio.sleep(0)
    os.kill(pool.pids[0], signal.SIGKILL)
    return await long_job


async def test_killed_trainer_is_replaced(model: ModelSegment) -> None:
    """A trainer killed mid-job fails that job; a replacement serves the next; close cleans up."""
    pool = TrainerPool(["cpu"], agent_id="test-agent")
    await pool.start(timeout_s=60)
    try:
        first_pid = pool.pids[0]
        with capture_logs() as events:
            reply = await _killed_mid_job(pool, model)
        assert (reply.status, reply.error) == ("failed", "trainer died (exit code -9)")
        assert pool.pids != [first_pid]
        assert pool.idle == 1
        exited = [e for e in events if e["event"] == "trainer_exited"]
        assert exited[0] | {"exitcode": -9, "job_id": "doomed", "trainer_pid": first_pid,
                            "device": "cpu", "agent_id": "test-agent"} == exited[0]
        assert [e["trainer_pid"] for e in events if e["event"] == "trainer_started"] == pool.pids
        after = await pool.train(_request(model, "after-kill"))
        after.release()
        assert after.status == "ok"
    finally:
        await pool.close()
    assert _segments(pool.shm_prefix) == []
    with pytest.raises(RuntimeError, match="closed"):
        await pool.train(_request(model, "too-late"))


async def test_trainer_dead_while_idle_is_replaced_before_the_job(
    pool: TrainerPool, model: ModelSegment
) -> None:
    """A trainer that died between jobs is replaced, and the job runs on the new one."""
    victim = pool.pids[0]
    process = next(t.process for t in pool._live if t.process.pid == victim)
    os.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(process.join, 10)  # dead for sure before the jobs go out
    replies = await asyncio.gather(*(pool.train(_request(model, f"idle-{i}")) for i in range(2)))
    for reply in replies:
        reply.release()
    assert [r.status for r in replies] == ["ok", "ok"]
    assert victim not in pool.pids
    assert len(pool.pids) == 2


def _limited(request: TrainRequest, limit_s: float) -> TrainRequest:
    return dataclasses.replace(request, time_limit_s=lambda: limit_s)


async def test_a_training_call_past_its_time_limit_is_killed_and_the_next_job_runs(
        model: ModelSegment) -> None:
    """A call over its limit is logged (train_timeout), its trainer killed and restarted, the
    job fails with reason train_timeout; a job queued behind it runs on the new trainer (its
    own limit counts from when a trainer takes it, not from the wait)."""
    pool = TrainerPool(["cpu"], agent_id="test-agent")
    await pool.start(timeout_s=60)
    try:
        first_pid = pool.pids[0]
        with capture_logs() as events:
            hung, queued = await asyncio.gather(
                pool.train(_limited(_request(model, "hung", epochs=100_000), 1.0)),
                pool.train(_limited(_request(model, "queued"), 30.0)))
        queued.release()
        assert hung.status == "failed"
        assert hung.error.startswith("train_timeout: no result within 1 s")
        assert (queued.status, queued.error) == ("ok", "")
        assert queued.timings["wait_s"] > 1.0
        timeouts = [e for e in events if e["event"] == "train_timeout"]
        assert [(e["job_id"], e["trainer_pid"], e["limit_s"]) for e in timeouts] == [
            ("hung", first_pid, 1.0)]
        assert first_pid not in pool.pids
        assert len(pool.pids) == 1
    finally:
        await pool.close()
    assert _segments(pool.shm_prefix) == []


async def test_a_waiting_conversation_joins_the_one_another_opened(model: ModelSegment) -> None:
    """Two conversations (one gradient lease's clients, which step together) wait behind a
    job on the only trainer: when it comes free, one opens it and the other joins it, ahead
    of a job queued after them, instead of waiting for a free trainer that the first holds
    until the second arrives."""
    pool = TrainerPool(["cpu"], agent_id="test-agent")
    await pool.start(timeout_s=60)
    try:
        busy = asyncio.create_task(pool.train(_request(model, "busy", epochs=200)))
        while pool.idle:  # noqa: ASYNC110 - as in _killed_mid_job: no event says "handed out"
            await asyncio.sleep(0)
        held: list[object] = []
        together = asyncio.Event()

        async def converse() -> None:
            async with pool.checkout() as lease:
                held.append(lease.slot)
                if len(held) == 2:
                    together.set()
                await asyncio.wait_for(together.wait(), 20)

        conversations = asyncio.gather(converse(), converse())
        await asyncio.sleep(0)
        queued = asyncio.create_task(pool.train(_request(model, "queued")))
        (await busy).release()
        await conversations
        assert len(held) == 2
        assert held[0] is held[1]
        after = await queued
        after.release()
        assert after.status == "ok"
        assert pool.idle == 1
    finally:
        await pool.close()


def _validation_of(state_bytes: bytes | memoryview, client_id: str = "0") -> dict[str, float]:
    """The task's figures, in this process, for a model in `state_bytes` on the client's
    validation split."""
    task = load_task(SPEC, OPTIONS)
    model = task.build_model(seed=0)
    state, _ = decode(state_bytes)
    model.load_state_dict(state)
    figures = task.validate(model, client_id, torch.device("cpu"))
    assert figures is not None
    return figures


async def test_a_validate_job_scores_the_received_model_before_training(
        pool: TrainerPool, model: ModelSegment, blob: bytes) -> None:
    """With validate the reply carries val_accuracy, val_loss and val_examples of the model
    the job received (not of the trained one) on the client's validation split, and
    validate_s; the update is the one the same job trains without validate."""
    config = {"epochs": 2, "lr": 0.1, "seed": 5}
    validated, plain = await asyncio.gather(
        pool.train(_request(model, "validated", **config, validate=True)),
        pool.train(_request(model, "plain", **config)))
    try:
        assert (validated.status, validated.error) == ("ok", "")
        assert validated.update is not None
        assert plain.update is not None
        received = _validation_of(blob)
        assert validated.metrics["val_accuracy"] == received["accuracy"]
        assert validated.metrics["val_loss"] == pytest.approx(received["loss"], rel=1e-9)
        assert validated.metrics["val_examples"] == received["num_examples"] == 3
        trained = _validation_of(validated.update)
        assert trained["loss"] != pytest.approx(validated.metrics["val_loss"], rel=1e-3)
        assert validated.timings["validate_s"] > 0
        assert validated.num_examples == 29
        assert {"train_loss", "train_accuracy", "steps"} <= set(validated.metrics)
        assert not any(k.startswith("val_") for k in plain.metrics)
        assert "validate_s" not in plain.timings
        ours, theirs = decode(validated.update)[0], decode(plain.update)[0]
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        del ours, theirs
    finally:
        validated.release()
        plain.release()


async def test_a_validate_only_job_returns_the_figures_and_no_update(
        pool: TrainerPool, model: ModelSegment, blob: bytes) -> None:
    """validate_only: an ok reply with the received model's figures, no update segment, no
    examples trained, no training time."""
    before = set(_segments(pool.shm_prefix))
    reply = await pool.train(_request(model, "evaluate-only", client_id="2", validate_only=True))
    assert (reply.status, reply.error) == ("ok", "")
    assert (reply.update, reply.update_nbytes, reply.num_examples, reply.segment) == (
        None, 0, 0, None)
    received = _validation_of(blob, "2")
    assert reply.metrics == {"val_accuracy": received["accuracy"],
                             "val_loss": pytest.approx(received["loss"], rel=1e-9),
                             "val_examples": 3.0}
    assert {"load_s", "validate_s"} <= set(reply.timings)
    assert "train_s" not in reply.timings
    assert set(_segments(pool.shm_prefix)) == before
    reply.release()  # nothing to release: harmless


async def test_without_a_validation_split_a_validate_job_trains_and_reports_no_figures(
        pool: TrainerPool, model: ModelSegment) -> None:
    """A task keeping no validation split (val_fraction 0) reports no val_ keys, and the job
    trains on the whole partition as usual."""
    request = dataclasses.replace(_request(model, "no-split", validate=True),
                                  task_options={**OPTIONS, "val_fraction": 0.0})
    reply = await pool.train(request)
    try:
        assert (reply.status, reply.error) == ("ok", "")
        assert reply.update is not None
        assert reply.num_examples == 32
        assert not any(k.startswith("val_") for k in reply.metrics)
    finally:
        reply.release()
