"""Per-client HMAC signatures on results."""

from __future__ import annotations

import dataclasses

import pytest

from serialization import Result
from serialization.signing import SIGNATURE_BYTES, signature_problem, signed

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


def test_fields_outside_the_signature_may_differ() -> None:
    """Timings, metrics and the agent name are informative and not signed."""
    sent = dataclasses.replace(signed(RESULT, KEY), timings={"train_s": 1.0}, agent_id="x")
    assert signature_problem(sent, KEY) is None


def test_wrong_key_missing_signature_or_unknown_client_are_problems() -> None:
    """Another client's key, no signature, or no key for the client: each says why."""
    assert signature_problem(signed(RESULT, OTHER), KEY) == (
        "signature does not match the client's key")
    assert signature_problem(RESULT, KEY) == "result is not signed"
    assert signature_problem(signed(RESULT, KEY), None) == "no signing key for client '3'"
