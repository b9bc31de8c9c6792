"""End to end: with client keys, every gradient of a gradient session is signed, and one
silo cannot post a gradient for another silo's client: the forgery is rejected every time."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import redis

from bus import gradient as gstreams
from bus.credentials import Keyring
from bus.embedded import EmbeddedRedis
from bus.keys import Keys
from bus.streams import FIELD
from serialization import GradientJob, job_from_bytes
from serialization.gradient import StepGradient, StepWeights
from serialization.signing import signed_gradient
from tests.e2e import start_coordinator
from tests.security import start_agent, stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TASK = "tests.e2e_tasks:HangingGradientTask"
ROUNDS, STEPS, BATCH = 2, 4, 8
FORGED_EXAMPLES = 10**6  # the weight a forgery claims: averaged once, it would show


class Forger(threading.Thread):
    """Silo B, holding only client 1's key: for every step of slot 0 whose job it can read
    it posts a gradient for client 0 (right session, step and job id) signed with client
    1's key."""

    def __init__(self, redis_url: str, keys: Keys, key: bytes) -> None:
        super().__init__(name="forger", daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.keys, self.key = keys, key
        self.forged: list[tuple[str, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        last = "0-0"
        while not self.done.is_set():
            reply = self.client.xread({self.keys.gradient_down(0): last}, block=100)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    self._forge(StepWeights.from_bytes(fields[gstreams.HEADER]))

    def _forge(self, weights: StepWeights) -> None:
        job = self._session_job(weights.session)
        if job is None:
            return
        body = np.full(weights.numel, 1e3, dtype=np.float32).tobytes()
        header = signed_gradient(StepGradient(
            session=weights.session, step=weights.step, job_id=job.job_id, client_id="0",
            num_examples=FORGED_EXAMPLES, numel=weights.numel), body, self.key)
        self.client.xadd(self.keys.gradient_up(0), {gstreams.HEADER: header.to_bytes(),
                                                    gstreams.BODY: body})
        self.forged.append((weights.session, weights.step))

    def _session_job(self, session: str) -> GradientJob | None:
        """Client 0's job for this session, read from its job stream (as a test may)."""
        for _id, fields in self.client.xrevrange(self.keys.jobs("0"), count=4):
            job = job_from_bytes(fields[FIELD])
            if isinstance(job, GradientJob) and job.session == session:
                return job
        return None


def test_a_gradient_posted_for_another_silos_client_is_rejected_every_time(
        redis_server: EmbeddedRedis, tmp_path: Path,
        popen_agents: list[subprocess.Popen[bytes]]) -> None:
    """Two silos with their own clients' keys serve a signed gradient run; silo B posts a
    forged gradient for silo A's client at every step. Each forgery is rejected as
    bad_signature, none is averaged (no step counts its claimed examples), and client 0's
    own gradients are averaged in every step."""
    keyring = Keyring().with_generated(["0", "1"])
    vault = tmp_path / "keys"
    run = start_coordinator(
        redis_server.url, tmp_path / "runs", "forged-gradients", "--mode", "gradient",
        "--task", TASK, "--task-option", "step_s=0.3", "--slots", "1", "--clients", "2",
        "--rounds", str(ROUNDS), "--gradient-steps", str(STEPS), "--batch-size", str(BATCH),
        "--deadline", "30", "--client-keys", str(keyring.write_dir(vault / "coordinator")))
    forger = Forger(redis_server.url, Keys("forged-gradients"), keyring.get("1") or b"")
    forger.start()
    with run:
        for name, client in (("silo-a", "0"), ("silo-b", "1")):
            folder = keyring.subset([client]).write_dir(vault / name)
            popen_agents.append(start_agent(redis_server.url, tmp_path, name, client,
                                            "--run-id", "forged-gradients", "--allow-task",
                                            TASK, "--client-keys", str(folder)))
        assert run.wait(180) == 0, run.output()[-3000:]
    forger.done.set()
    forger.join(10)
    assert [stop(a) for a in popen_agents] == [0, 0]
    # Step 1's weights go out before the jobs, so the forger has a job id from step 2 on.
    assert len(forger.forged) >= ROUNDS * (STEPS - 1)
    rejected = [e for e in run.events("update_rejected") if e["reason"] == "bad_signature"]
    print(f"forged {len(forger.forged)} gradients, rejected {len(rejected)}: "  # noqa: T201
          f"{rejected[0]['detail']!r}")
    assert len(rejected) == len(forger.forged)
    assert all("client '0'" in e["detail"] and "does not match the client's key" in e["detail"]
               for e in rejected)
    steps = run.events("gradient_step")
    assert [(e["clients"], e["num_examples"]) for e in steps] == [(2, 2 * BATCH)] * (
        ROUNDS * STEPS)
