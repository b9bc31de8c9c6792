"""Per-client HMAC signatures on results (agent to coordinator) and jobs (the other way)."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from serialization import GradientJob, Job, Result
from serialization.gradient import StepGradient
from serialization.signing import (
    SIGNATURE_BYTES,
    gradient_payload_problem,
    gradient_signature_problem,
    job_signature,
    job_signature_problem,
    result_signature,
    signature_problem,
    signed,
    signed_gradient,
    signed_job,
)

KEY, OTHER = b"a" * 32, b"b" * 32
RESULT = Result(job_id="s0-r1-c3-abcd", run_id="run", slot_id=0, round=1, client_id="3",
                status="ok", agent_id="silo-a", update_digest="f" * 64, update_nbytes=1000,
                num_examples=64)


def test_signed_result_verifies_after_the_wire() -> None:
    """A result signed with its client's key passes the check after to_bytes / from_bytes."""
    sent = signed(RESULT, KEY)
    assert len(sent.signature) == SIGNATURE_BYTES
    assert signature_problem(Result.from_bytes(sent.to_bytes()), KEY) is None


@pytest.mark.parametrize(("field", "value"), [
    ("job_id", "s0-r1-c3-ffff"), ("run_id", "other"), ("client_id", "4"), ("status", "failed"),
    ("update_digest", "e" * 64), ("update_nbytes", 1001), ("num_examples", 6400),
])
def test_any_deciding_field_changed_breaks_the_signature(field: str, value: object) -> None:
    """Changing the job, client, status, digest, size or weight invalidates the signature."""
    forged = dataclasses.replace(signed(RESULT, KEY), **{field: value})
    assert signature_problem(forged, KEY) == "signature does not match the client's key"


@pytest.mark.parametrize(("field", "value"), [
    ("metrics", {"train_loss": 0.1}), ("timings", {"train_s": 1.0}), ("error", "made up"),
    ("agent_id", "x"), ("slot_id", 1), ("round", 2),
])
def test_what_the_coordinator_logs_is_signed_too(field: str, value: object) -> None:
    """Metrics, timings, error and agent name go into the run's log: changing one is a forgery."""
    forged = dataclasses.replace(signed(RESULT, KEY), **{field: value})
    assert signature_problem(forged, KEY) == "signature does not match the client's key"


def test_map_order_does_not_change_a_signature() -> None:
    """Metrics signed in one key order verify in another (the map is signed canonically)."""
    sent = signed(dataclasses.replace(RESULT, metrics={"b": 1.0, "a": {"y": 2, "x": 3}}), KEY)
    reordered = dataclasses.replace(sent, metrics={"a": {"x": 3, "y": 2}, "b": 1.0})
    assert signature_problem(reordered, KEY) is None


def test_wrong_key_missing_signature_or_unknown_client_are_problems() -> None:
    """Another client's key, no signature, or no key for the client: each says why."""
    assert signature_problem(signed(RESULT, OTHER), KEY) == (
        "signature does not match the client's key")
    assert signature_problem(RESULT, KEY) == "result is not signed"
    assert signature_problem(signed(RESULT, KEY), None) == "no signing key for client '3'"


JOB = Job(job_id="s0-r1-c3-abcd", run_id="run", slot_id=0, round=1, client_id="3",
          model_digest="f" * 64, model_nbytes=1000, deadline_ts=1700000000.5,
          task="trainer_worker.tasks.synthetic:SyntheticTask",
          task_options={"num_clients": 4}, config={"lr": 0.01, "epochs": 1},
          published_ts=1699999999.25)


def test_signed_job_verifies_after_the_wire() -> None:
    """A job signed with its client's key passes the agent's check after the wire."""
    sent = signed_job(JOB, KEY)
    assert len(sent.signature) == SIGNATURE_BYTES
    assert job_signature_problem(Job.from_bytes(sent.to_bytes()), KEY) is None


@pytest.mark.parametrize(("field", "value"), [
    ("task", "evil.module:Factory"), ("task_options", {"num_clients": 5}),
    ("config", {"lr": 10.0, "epochs": 1}), ("model_digest", "e" * 64), ("job_id", "other"),
    ("client_id", "4"), ("run_id", "other"), ("deadline_ts", 1800000000.0), ("round", 2),
])
def test_any_field_that_changes_what_the_agent_does_breaks_a_job_signature(
        field: str, value: object) -> None:
    """Task spec, options, training config, model digest, ids, deadline: each is signed."""
    forged = dataclasses.replace(signed_job(JOB, KEY), **{field: value})
    assert job_signature_problem(forged, KEY) == "signature does not match the client's key"


def test_unsigned_or_wrongly_keyed_jobs_are_problems() -> None:
    """No signature, another client's key, or no key here: each says why."""
    assert job_signature_problem(JOB, KEY) == "job is not signed"
    assert job_signature_problem(signed_job(JOB, OTHER), KEY) == (
        "signature does not match the client's key")
    assert job_signature_problem(signed_job(JOB, KEY), None) == "no signing key for client '3'"


def test_a_result_signature_never_passes_as_a_job_signature() -> None:
    """The two directions use distinct domain tags under the same client key."""
    assert job_signature(JOB, KEY) != result_signature(RESULT, KEY)


GRADIENT_JOB = GradientJob(job_id="s0-r1-c3-abcd", run_id="run", slot_id=0, round=1,
                           client_id="3", session="s0-r1-abc", steps=50, step_deadline_s=60.0,
                           deadline_ts=1700000000.0, task="synthetic")


def test_a_signed_gradient_session_verifies_after_the_wire() -> None:
    """A gradient session signed with its client's key passes the agent's check."""
    sent = signed_job(GRADIENT_JOB, KEY)
    assert job_signature_problem(GradientJob.from_bytes(sent.to_bytes()), KEY) is None


@pytest.mark.parametrize(("field", "value"), [
    ("session", "other"), ("steps", 5000), ("step_deadline_s", 1.0), ("task", "evil:Task"),
    ("config", {"batch_size": 1}), ("client_id", "4"),
])
def test_what_a_gradient_session_asks_is_signed(field: str, value: object) -> None:
    """Session, steps, step deadline, task, config and ids of a gradient session are signed."""
    forged = dataclasses.replace(signed_job(GRADIENT_JOB, KEY), **{field: value})
    assert job_signature_problem(forged, KEY) == "signature does not match the client's key"


GRADIENT = StepGradient(session="s0-r1-abc", step=3, job_id="s0-r1-c3-abcd", client_id="3",
                        num_examples=32, numel=4)
BODY = struct.pack("4f", 0.1, -0.2, 0.3, 0.0)


def test_a_signed_gradient_verifies_after_the_wire() -> None:
    """A gradient header signed with its client's key over its body passes both checks."""
    sent = StepGradient.from_bytes(signed_gradient(GRADIENT, BODY, KEY).to_bytes())
    assert gradient_signature_problem(sent, KEY) is None
    assert gradient_payload_problem(sent, BODY) is None


@pytest.mark.parametrize(("field", "value"), [
    ("session", "s0-r2-abc"), ("step", 4), ("job_id", "other"), ("client_id", "4"),
    ("num_examples", 10**6), ("numel", 5), ("digest", "0" * 64),
])
def test_any_signed_field_of_a_gradient_changed_breaks_its_signature(
        field: str, value: object) -> None:
    """Session, step, job, client, example count, size and body digest are each signed."""
    forged = dataclasses.replace(signed_gradient(GRADIENT, BODY, KEY), **{field: value})
    assert gradient_signature_problem(forged, KEY) == "signature does not match the client's key"


def test_a_gradient_signed_by_another_silo_or_not_at_all_is_a_problem() -> None:
    """Another client's key, no signature, no key here, or other bytes under a good header:
    each says why."""
    assert gradient_signature_problem(signed_gradient(GRADIENT, BODY, OTHER), KEY) == (
        "signature does not match the client's key")
    assert gradient_signature_problem(GRADIENT, KEY) == "gradient is not signed"
    assert gradient_signature_problem(GRADIENT, None) == "no signing key for client '3'"
    signed_header = signed_gradient(GRADIENT, BODY, KEY)
    assert gradient_payload_problem(signed_header, BODY[:-1] + b"\x01") == (
        "the gradient's bytes do not match its signed digest")
