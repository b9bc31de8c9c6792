"""The agent declares its clients' partition sizes when it registers them.

The coordinator caps each result's claimed ``num_examples`` at what its client
declared (`coordinator.results.claims`). The run's task spec and options are in the
run state, written by the coordinator when it announces the run; one of this
agent's trainers loads the task (and keeps it for the jobs to come) and reports each
client's partition size (`Task.partition_size`); with client keys each size is
signed with its client's key. A task the allowlist does not name, one that reports
nothing, or a run state that names none leaves the clients undeclared
(``examples_undeclared``): their counts are then bounded by their jobs alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Container, Sequence
from typing import Any

import structlog

from bus.connection import as_text, redis_errors
from bus.credentials import Keyring
from bus.keys import Keys
from client_agent.trainers import TrainerDied, TrainerPool
from serialization import PayloadError
from serialization.signing import declaration_signature
from trainer_worker import protocol

log = structlog.get_logger()

STATE_WAIT_S = 10.0  # a coordinator writes the run state right after pointing agents at it
STATE_POLL_S = 0.2
DESCRIBE_TIMEOUT_S = 300.0  # loading a task (its data) to report sizes; past it, killed

Declaration = tuple[dict[str, int], dict[str, bytes]]  # sizes, signatures, by client id


async def run_task(redis: Any, keys: Keys) -> tuple[str, dict[str, Any]] | None:
    """The run's task spec and options from the run state; None when it names none
    within STATE_WAIT_S (HGET: what the agents' ACL allows on the run state)."""
    deadline = time.monotonic() + STATE_WAIT_S
    while True:
        with redis_errors():
            spec = await redis.hget(keys.state(), "task")
            options = await redis.hget(keys.state(), "task_options")
        if spec:
            return as_text(spec), json.loads(as_text(options or b"{}"))
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(STATE_POLL_S)  # no event tells that a hash field was written


async def declare(redis: Any, keys: Keys, pool: TrainerPool, client_ids: Sequence[str], *,
                  allowed_tasks: Container[str], keyring: Keyring | None) -> Declaration:
    """Each client's partition size from the run's task, signed when keys are given;
    nothing (logged) when it cannot be had."""
    found = await run_task(redis, keys)
    if found is None:
        return _undeclared(client_ids, "the run state names no task")
    spec, options = found
    if spec not in allowed_tasks:
        return _undeclared(client_ids, f"task {spec!r} is not allowed on this agent")
    message = protocol.Describe(task=spec, task_options=options, client_ids=list(client_ids))
    try:
        async with pool.checkout() as lease:
            reply = protocol.expect(await lease.request(message, timeout_s=DESCRIBE_TIMEOUT_S),
                                    protocol.Described)
    except (TrainerDied, PayloadError) as exc:  # TrainTimeout too: it is a TrainerDied
        return _undeclared(client_ids, str(exc)[:200])
    if reply.status != "ok":
        return _undeclared(client_ids, reply.error[:200])
    sizes = {c: n for c, n in reply.num_examples.items()
             if c in client_ids and isinstance(n, int) and n > 0}
    log.info("examples_declared", client_ids=sorted(sizes), num_examples=sizes)
    return sizes, signatures(keys.run_id, sizes, keyring)


def signatures(run_id: str, sizes: dict[str, int], keyring: Keyring | None) -> dict[str, bytes]:
    """Each declared size signed with its client's key (none without keys)."""
    if keyring is None:
        return {}
    return {c: declaration_signature(run_id, c, n, key) for c, n in sizes.items()
            if (key := keyring.get(c)) is not None}


def _undeclared(client_ids: Sequence[str], reason: str) -> Declaration:
    log.warning("examples_undeclared", client_ids=list(client_ids), reason=reason)
    return {}, {}
