"""Unit tests of the coordinator's acceptance decision and its registry of live models."""

from __future__ import annotations

import pytest
import torch

from bus.blobs import BlobRef
from bus.credentials import Keyring
from bus.keys import Keys
from bus.streams import Entry
from coordinator.job_table import JobRecord, JobTable
from coordinator.results.validation import ResultValidator, UpdateRejected, payload_bound
from coordinator.slots.published import PublishedModels
from serialization import Result, encode, schema_of
from serialization.signing import signed

KEYS = Keys("run1")
STATE = {"w": torch.zeros(4, 4)}


def _validator(jobs: JobTable, keyring: Keyring | None = None,
               late_policy: str = "drop") -> ResultValidator:
    return ResultValidator(run_id="run1", jobs=jobs, known_clients={"c1", "c2"},
                           results_stream=KEYS.results, schema=schema_of(STATE),
                           max_update_bytes=2**30, keyring=keyring, late_policy=late_policy)


def _entry(result: Result, slot_id: int = 0) -> Entry:
    return Entry(KEYS.results(slot_id), "1-0", result.to_bytes())


def _result(job_id: str = "j1", client_id: str = "c1", **fields: object) -> Result:
    values: dict[str, object] = {"run_id": "run1", "slot_id": 0, "round": 1, "status": "ok",
                                 "update_digest": "a" * 64, "update_nbytes": 100,
                                 "num_examples": 10} | fields
    return Result(job_id=job_id, client_id=client_id, **values)  # type: ignore[arg-type]


def _jobs() -> JobTable:
    jobs = JobTable()
    jobs.add(JobRecord("j1", 0, 1, "c1"))
    return jobs


def _reason(call: object) -> str:
    with pytest.raises(UpdateRejected) as info:
        call()  # type: ignore[operator]
    return info.value.reason


def test_a_job_is_admitted_once_then_duplicate() -> None:
    """The first result of a job is admitted and answers it; a replay is a duplicate."""
    validator = _validator(_jobs())
    delivery = validator.admit(_entry(_result()))
    assert delivery.record.job_id == "j1"
    assert not delivery.recovered
    assert _reason(lambda: validator.admit(_entry(_result()))) == "duplicate"


def test_unknown_mismatched_and_undecodable_results_are_rejected() -> None:
    """Unknown job or client, another slot's stream, and bytes that are no result: rejected."""
    validator = _validator(_jobs())
    assert _reason(lambda: validator.admit(_entry(_result("nope")))) == "unknown_job"
    assert _reason(lambda: validator.admit(_entry(_result("nope", "c9")))) == "unknown_client"
    assert _reason(lambda: validator.admit(_entry(_result(), slot_id=1))) == "mismatch"
    garbage = Entry(KEYS.results(0), "1-0", b"\x93garbage")
    assert _reason(lambda: validator.admit(garbage)) == "malformed"


def test_a_forged_result_does_not_use_up_its_job() -> None:
    """With signing on, a bad signature is rejected and the client's own result still counts."""
    keyring = Keyring({"c1": b"k" * 32})
    validator = _validator(_jobs(), keyring)
    forged = signed(_result(), b"x" * 32)
    assert _reason(lambda: validator.admit(_entry(forged))) == "bad_signature"
    assert validator.admit(_entry(signed(_result(), b"k" * 32))).record.job_id == "j1"


def test_claims_are_bounded_before_any_fetch() -> None:
    """Digest format, size within the model's bound, and num_examples are checked first."""
    validator = _validator(_jobs())
    bound = payload_bound(schema_of(STATE))
    assert validator.update_limit == bound
    assert _reason(lambda: validator.claimed_blob(_result(update_digest="x"))) == "bad_digest"
    too_big = _result(update_nbytes=bound + 1)
    assert _reason(lambda: validator.claimed_blob(too_big)) == "too_large"
    assert _reason(lambda: validator.claimed_blob(_result(num_examples=0))) == "bad_num_examples"
    assert validator.claimed_blob(_result()) == BlobRef("a" * 64, 100)


def test_decoded_updates_must_hash_to_their_digest() -> None:
    """Bytes that do not hash to the claimed digest are rejected before decoding."""
    payload = encode(STATE)
    assert _reason(lambda: _validator(_jobs()).decode_update(payload, "0" * 64)) == (
        "digest_mismatch")


def test_late_updates_fold_only_under_the_fold_policy() -> None:
    """A late ok update folds into an open round only with --late-policy fold."""
    assert not _validator(_jobs()).folds_late(_result(), round_open=True)
    folding = _validator(_jobs(), late_policy="fold")
    assert folding.folds_late(_result(), round_open=True)
    assert not folding.folds_late(_result(), round_open=False)
    assert not folding.folds_late(_result(status="failed"), round_open=True)


class _Blobs:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    async def delete(self, ref: BlobRef) -> None:
        self.deleted.append(ref.digest)


async def test_a_live_model_is_never_retired() -> None:
    """retire unlinks a blob unless some slot serves it as its model now."""
    blobs = _Blobs()
    models = PublishedModels(blobs)
    live, other = BlobRef("a" * 64, 1), BlobRef("b" * 64, 1)
    models.publish(0, live)
    await models.retire(live)
    await models.retire(other)
    assert blobs.deleted == [other.digest]
    models.withdraw(0)
    await models.retire(live)
    assert blobs.deleted == [other.digest, live.digest]
