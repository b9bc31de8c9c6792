"""Per-client signatures on results: HMAC-SHA256 with the client's own key.

An agent signs each result it sends for one of its clients; the coordinator,
which holds every client's key, checks the signature before the job counts as
answered. Every agent can write to the results streams, so without this an
agent could answer (or fail) another client's job; with it, only the holder of
that client's key can.

The signed bytes are a msgpack array of a domain tag and the fields that decide
what the update does: run, job and client ids, status, update digest and size,
and the example count (its weight in the average). The blob itself is covered
through its sha256 digest, which the coordinator checks against the bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import msgpack

from serialization.messages import Result

SIGNATURE_BYTES = 32
_DOMAIN = "pwfl-result-v1"


def _signed_bytes(result: Result) -> bytes:
    fields = [_DOMAIN, result.run_id, result.job_id, result.client_id, result.status,
              result.update_digest, result.update_nbytes, result.num_examples]
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def result_signature(result: Result, key: bytes) -> bytes:
    """HMAC-SHA256 of the result's deciding fields under `key` (32 bytes)."""
    return hmac.new(key, _signed_bytes(result), hashlib.sha256).digest()


def signed(result: Result, key: bytes) -> Result:
    """The same result carrying its signature."""
    return dataclasses.replace(result, signature=result_signature(result, key))


def signature_problem(result: Result, key: bytes | None) -> str | None:
    """None when `result` is signed with `key`; otherwise why not (for the rejection log)."""
    if key is None:
        return f"no signing key for client {result.client_id!r}"
    if not result.signature:
        return "result is not signed"
    if not hmac.compare_digest(result.signature, result_signature(result, key)):
        return "signature does not match the client's key"
    return None
