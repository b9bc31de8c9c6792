"""An agent runs only the tasks it allows, and (with keys) only jobs its clients' keys signed."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from bus import streams
from bus.blobs import BlobStore
from bus.credentials import Keyring
from bus.keys import JOBS_GROUP, RESULTS_GROUP, Keys
from client_agent.cli import build_parser, settings_from_args
from client_agent.job_runner import JobRunner
from client_agent.model_cache import ModelCache
from serialization import Job, Result
from serialization.signing import signature_problem, signed_job
from serialization.tasks import BUILTIN_TASKS

KEY = b"k" * 32
SYNTHETIC = BUILTIN_TASKS["synthetic"]


class _NoTrainers:
    """A trainer pool that must not be reached: a refused job never gets this far."""

    async def train(self, request: Any) -> Any:
        raise AssertionError(f"job {request.job_id} reached a trainer")


def _job(keys: Keys, task: str = SYNTHETIC) -> Job:
    return Job(job_id="s0-r1-c0-aaaa", run_id=keys.run_id, slot_id=0, round=1, client_id="0",
               model_digest="d" * 64, model_nbytes=10, deadline_ts=4e9, task=task,
               published_ts=1.0)


async def _refused(client: aioredis.Redis, keys: Keys, job: Job,
                   keyring: Keyring | None) -> tuple[Result, list[dict[str, Any]]]:
    """Run `job` on a JobRunner; the result it reported and the events it logged."""
    stream = keys.jobs(job.client_id)
    await streams.ensure_group(client, stream, JOBS_GROUP)
    await streams.ensure_group(client, keys.results(0), RESULTS_GROUP)
    await streams.publish(client, stream, job.to_bytes())
    [entry] = await streams.consume(client, [stream], JOBS_GROUP, "agent", count=1, block_ms=100)
    cache = ModelCache()
    runner = JobRunner(client, keys, BlobStore(client, keys), _NoTrainers(), cache,  # type: ignore[arg-type]
                       "agent", keyring=keyring)
    try:
        with capture_logs() as events:
            await runner.run(job, entry, 0.0)
    finally:
        cache.close()
    [reported] = await streams.consume(client, [keys.results(0)], RESULTS_GROUP, "c", count=1,
                                       block_ms=100)
    return Result.from_bytes(reported.payload), events


async def test_a_task_outside_the_allowlist_is_refused_and_reported_failed(
        redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """A job naming a task not allowed here is logged (job_refused), never trained, and
    reported failed with reason task_not_allowed; the job entry is acked."""
    result, events = await _refused(redis_client, run_keys,
                                    _job(run_keys, "os:system"), keyring=None)
    assert result.status == "failed"
    assert result.error.startswith("task_not_allowed: task 'os:system' is not allowed")
    [refused] = [e for e in events if e["event"] == "job_refused"]
    assert (refused["reason"], refused["task"], refused["client_id"]) == (
        "task_not_allowed", "os:system", "0")
    pending = await redis_client.xpending(run_keys.jobs("0"), JOBS_GROUP)
    assert pending["pending"] == 0


@pytest.mark.parametrize("key", [None, b"x" * 32])
async def test_with_keys_an_unsigned_or_badly_signed_job_is_refused(
        redis_client: aioredis.Redis, run_keys: Keys, key: bytes | None) -> None:
    """An agent holding its client's key refuses a job without that key's signature (the
    refusal itself is signed, so the coordinator can trust it)."""
    job = _job(run_keys) if key is None else signed_job(_job(run_keys), key)
    result, events = await _refused(redis_client, run_keys, job, Keyring({"0": KEY}))
    assert result.error.startswith("bad_job_signature: ")
    assert signature_problem(result, KEY) is None
    assert [e["reason"] for e in events if e["event"] == "job_refused"] == ["bad_job_signature"]


async def test_a_signed_job_of_a_not_allowed_task_is_still_refused(
        redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """A good signature does not widen the allowlist: the agent's operator chooses the code."""
    job = signed_job(_job(run_keys, "evil:Task"), KEY)
    result, _ = await _refused(redis_client, run_keys, job, Keyring({"0": KEY}))
    assert result.error.startswith("task_not_allowed: ")


def test_the_allowlist_is_the_builtins_plus_the_named_tasks() -> None:
    """--allow-task adds to the built-in tasks; a built-in short name means its spec."""
    parser = build_parser()
    args = parser.parse_args(["--redis", "redis://x", "--clients", "0", "--allow-task",
                              "my.tasks:Task", "--allow-task", "synthetic"])
    allowed = settings_from_args(args, environ={}).allowed_tasks
    assert allowed == {*BUILTIN_TASKS.values(), "my.tasks:Task"}
    default = parser.parse_args(["--redis", "redis://x", "--clients", "0"])
    assert settings_from_args(default, environ={}).allowed_tasks == set(BUILTIN_TASKS.values())


def test_an_allow_task_that_is_no_spec_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--allow-task takes module:factory or a built-in name, nothing else."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--redis", "r", "--clients", "0", "--allow-task", "nocolon"])
    assert "neither a built-in task" in capsys.readouterr().err
