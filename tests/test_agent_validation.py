"""Federated evaluation end to end on the agent: a real `python -m client_agent` (with its
spawned trainer) on a real redis-server answers a signed validate_only job with a signed ok
result that carries the received model's validation figures and no update, and a validate
job with its update and the same figures."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import torch

from bus import streams
from bus.blobs import BlobRef, BlobStore
from bus.credentials import Keyring
from bus.keys import Keys
from serialization import Job, Result, decode, encode
from serialization.signing import signature_problem, signed_job
from tests.faults import AgentProc, start_agent
from trainer_worker.task import load_task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SPEC = "trainer_worker.tasks.synthetic:SyntheticTask"
OPTIONS = {"num_clients": 2, "examples_per_client": 40}


def _job(keys: Keys, job_id: str, digest: str, nbytes: int, config: dict[str, object]) -> Job:
    return Job(job_id=job_id, run_id=keys.run_id, slot_id=0, round=1, client_id="1",
               model_digest=digest, model_nbytes=nbytes, deadline_ts=time.time() + 120,
               task=SPEC, task_options=OPTIONS, config=config, published_ts=time.time())


async def _results(client: aioredis.Redis, keys: Keys, count: int,
                   agent: AgentProc) -> dict[str, Result]:
    """The first `count` results on slot 0's stream, by job id (polled: the agent posts them)."""
    deadline = time.monotonic() + 120
    while True:
        entries = await client.xrange(keys.results(0))
        if len(entries) >= count:
            results = [Result.from_bytes(fields[streams.FIELD]) for _, fields in entries]
            return {r.job_id: r for r in results}
        assert agent.proc.poll() is None, agent.output()
        assert time.monotonic() < deadline, f"no {count} results in time: {agent.output()}"
        last = entries[-1][0] if entries else "0-0"  # wait for the next entry, not a tick
        await client.xread({keys.results(0): last}, block=200)


async def test_an_agent_answers_validate_only_with_a_signed_result_without_update(
        redis_client: aioredis.Redis, redis_url: str, run_keys: Keys, tmp_path: Path,
        agents: list[AgentProc]) -> None:
    """The validate_only job's result: ok, no update digest, 0 bytes, 0 examples, the
    figures of the model it was sent on client 1's validation split, signed with client
    1's key. The validate job's result: its update and the same figures, signed too."""
    keyring = Keyring().with_generated(["1"])
    key = keyring.get("1")
    assert key is not None
    task = load_task(SPEC, OPTIONS)
    model = task.build_model(seed=7)
    blob = encode(model.state_dict())
    ref = await BlobStore(redis_client, run_keys).put(blob)
    await redis_client.hset(run_keys.state(), mapping={
        "task": SPEC, "task_options": json.dumps(OPTIONS), "status": "running"})
    for job_id, config in (("evaluate", {"validate_only": True}),
                           ("train", {"validate": True, "epochs": 1, "seed": 3})):
        job = signed_job(_job(run_keys, job_id, ref.digest, ref.nbytes, config), key)
        await streams.publish(redis_client, run_keys.jobs("1"), job.to_bytes())
    agent = start_agent(redis_url, run_keys.run_id, "1", tmp_path, "validator",
                        "--client-keys", str(keyring.write_dir(tmp_path / "keys")))
    agents.append(agent)
    results = await _results(redis_client, run_keys, 2, agent)
    await redis_client.hset(run_keys.state(), "status", "finished")
    assert await asyncio.to_thread(agent.proc.wait, 60) == 0, agent.output()

    want = task.validate(model, "1", torch.device("cpu"))
    assert want is not None
    figures = {"val_accuracy": want["accuracy"], "val_loss": pytest.approx(want["loss"]),
               "val_examples": 4.0}
    evaluated, trained = results["evaluate"], results["train"]
    for result in (evaluated, trained):
        assert signature_problem(result, key) is None
        assert (result.status, result.error, result.client_id) == ("ok", "", "1")
    assert (evaluated.update_digest, evaluated.update_nbytes, evaluated.num_examples,
            evaluated.update_shm) == ("", 0, 0, "")
    assert evaluated.metrics == figures
    assert "validate_s" in evaluated.timings
    assert trained.update_digest
    assert trained.update_nbytes > 0
    assert trained.num_examples == 36  # 40 less the 10% validation split
    assert {k: trained.metrics[k] for k in figures} == figures
    update = await BlobStore(redis_client, run_keys).get(
        BlobRef(trained.update_digest, trained.update_nbytes))
    assert decode(update)[0].keys() == model.state_dict().keys()
