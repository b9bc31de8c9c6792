"""HMAC-SHA256 signatures with a client's own key: on its results, and on its jobs.

Results. An agent signs each result it sends for one of its clients; the
coordinator, which holds every client's key, checks the signature before the job
counts as answered. Every agent can write to the results streams, so without this
an agent could answer (or fail) another client's job; with it, only the holder of
that client's key can. The signed bytes are a msgpack array of a domain tag and
every field of the result: run, job, slot, round and client, status, update
digest and size, the example count (its weight in the average), and what goes
into the coordinator's log (agent id, metrics, timings, error). The blob itself is
covered through its sha256 digest, which the coordinator checks against the bytes.

Jobs. The coordinator signs each job (a weight job or a gradient session) with
the key of the client it is for, and an agent holding keys runs only jobs that
carry a good signature: what a job carries that changes what the agent does (run,
job, slot, round and client, the model's digest and size or the session, its
steps and step deadline, deadline, task spec, task options, training config) then
comes from the coordinator, not from whoever else can write to Redis. One key per
client serves both directions; the domain tags keep a result's signature from
passing as a job's, and one kind of job's as the other's.

Gradients. In batch-gradient federation each client adds one gradient per step
to its slot's up stream, which every agent can write to. With keys the agent
signs each entry's header (`StepGradient`) with its client's key over the
session, step, job and client ids, the example count (its weight in the mean),
the size and the body's sha256; the coordinator checks the header when it reads
the entry (`gradient_signature_problem`, cheap) and the body against the signed
digest where it validates the body, off the event loop (`gradient_payload_problem`).
So no silo can post a gradient for another silo's client.

Declarations. An agent declares each client's partition size when it registers it;
the coordinator caps the client's claimed example counts at it. With keys, each
declaration is signed with its client's key over the run, the client and the size,
so one silo cannot declare for another's client, nor carry a declaration into
another run.

The local handoff's fields (`bus.handoff`) are signed too when they are set
(appended, so a message without them signs exactly as before).

Maps (options, config, metrics) are signed in a canonical form: keys sorted, at
every depth, so the bytes do not depend on the order a map was built in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from serialization.gradient import StepGradient
from serialization.messages import AnyJob, GradientJob, Job, Result

SIGNATURE_BYTES = 32
_RESULT_DOMAIN = "pwfl-result-v2"
_JOB_DOMAIN = "pwfl-job-v1"
_DECLARATION_DOMAIN = "pwfl-declaration-v1"
_GRADIENT_JOB_DOMAIN = "pwfl-gradient-job-v1"
_GRADIENT_DOMAIN = "pwfl-gradient-v1"
J = TypeVar("J", bound=AnyJob)


def _canonical(value: Any) -> Any:
    """`value` with every map's keys sorted (lists and tuples alike become lists)."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _packed(fields: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(_canonical(fields), use_bin_type=True)
    return packed


def _result_bytes(result: Result) -> bytes:
    return _packed([_RESULT_DOMAIN, result.run_id, result.job_id, result.slot_id, result.round,
                    result.client_id, result.status, result.update_digest,
                    result.update_nbytes, result.num_examples, result.agent_id, result.metrics,
                    result.timings, result.error,
                    *([result.update_shm] if result.update_shm else [])])


def _job_bytes(job: Job) -> bytes:
    # Timestamps as floats: an int on one side and a float after the wire pack differently.
    return _packed([_JOB_DOMAIN, job.run_id, job.job_id, job.slot_id, job.round, job.client_id,
                    job.model_digest, job.model_nbytes, float(job.deadline_ts), job.task,
                    job.task_options, job.config, float(job.published_ts),
                    *([job.handoff, job.handoff_digest, job.model_shm]
                      if job.handoff or job.model_shm else [])])


def result_signature(result: Result, key: bytes) -> bytes:
    """HMAC-SHA256 of the result's fields under `key` (32 bytes)."""
    return hmac.new(key, _result_bytes(result), hashlib.sha256).digest()


def signed(result: Result, key: bytes) -> Result:
    """The same result carrying its signature."""
    return dataclasses.replace(result, signature=result_signature(result, key))


def _mac_problem(what: str, client_id: str, signature: object, key: bytes | None,
                 expected: Callable[[bytes], bytes]) -> str | None:
    """None when `signature` is `expected(key)`, the client's; otherwise why not (for the
    log). `signature` may come from an untrusted map: anything but bytes is none."""
    if key is None:
        return f"no signing key for client {client_id!r}"
    if not isinstance(signature, bytes) or not signature:
        return f"{what} is not signed"
    if not hmac.compare_digest(signature, expected(key)):
        return "signature does not match the client's key"
    return None


def signature_problem(result: Result, key: bytes | None) -> str | None:
    """None when `result` is signed with `key`; otherwise why not (for the rejection log)."""
    return _mac_problem("result", result.client_id, result.signature, key,
                        lambda k: result_signature(result, k))


def _gradient_job_bytes(job: GradientJob) -> bytes:
    return _packed([_GRADIENT_JOB_DOMAIN, job.run_id, job.job_id, job.slot_id, job.round,
                    job.client_id, job.session, job.steps, float(job.step_deadline_s),
                    float(job.deadline_ts), job.task, job.task_options, job.config,
                    float(job.published_ts)])


def job_signature(job: AnyJob, key: bytes) -> bytes:
    """HMAC-SHA256 of what the job asks of the agent, under its client's `key` (32 bytes);
    each kind of job under its own domain tag."""
    signed_bytes = _job_bytes(job) if isinstance(job, Job) else _gradient_job_bytes(job)
    return hmac.new(key, signed_bytes, hashlib.sha256).digest()


def signed_job(job: J, key: bytes) -> J:
    """The same job carrying its signature."""
    return dataclasses.replace(job, signature=job_signature(job, key))


def job_signature_problem(job: AnyJob, key: bytes | None) -> str | None:
    """None when `job` is signed with `key`; otherwise why not (for the refusal log)."""
    return _mac_problem("job", job.client_id, job.signature, key,
                        lambda k: job_signature(job, k))


def declaration_signature(run_id: str, client_id: str, num_examples: int, key: bytes) -> bytes:
    """HMAC-SHA256 of a client's declared partition size in a run, under its `key`."""
    packed = _packed([_DECLARATION_DOMAIN, run_id, client_id, num_examples])
    return hmac.new(key, packed, hashlib.sha256).digest()


def declaration_problem(run_id: str, client_id: str, num_examples: int, signature: object,
                        key: bytes | None) -> str | None:
    """None when the declaration is signed with `key`; otherwise why not (for the log).
    `signature` comes from an untrusted map: anything but bytes is no signature."""
    return _mac_problem("declaration", client_id, signature, key,
                        lambda k: declaration_signature(run_id, client_id, num_examples, k))


def payload_digest(body: bytes | memoryview) -> str:
    """The sha256 (hex) of a gradient's body."""
    return hashlib.sha256(body).hexdigest()


def _gradient_bytes(header: StepGradient) -> bytes:
    return _packed([_GRADIENT_DOMAIN, header.session, header.step, header.job_id,
                    header.client_id, header.num_examples, header.numel, header.digest])


def gradient_signature(header: StepGradient, key: bytes) -> bytes:
    """HMAC-SHA256 of the gradient header's signed fields under `key` (32 bytes)."""
    return hmac.new(key, _gradient_bytes(header), hashlib.sha256).digest()


def signed_gradient(header: StepGradient, body: bytes | memoryview, key: bytes) -> StepGradient:
    """The header with its body's digest and its signature (hashes the body: about a
    millisecond per 2 MB)."""
    with_digest = dataclasses.replace(header, digest=payload_digest(body))
    return dataclasses.replace(with_digest, signature=gradient_signature(with_digest, key))


def gradient_signature_problem(header: StepGradient, key: bytes | None) -> str | None:
    """None when the header is signed with `key` (its client's); otherwise why not. The
    body is checked against the signed digest apart (`gradient_payload_problem`)."""
    return _mac_problem("gradient", header.client_id, header.signature, key,
                        lambda k: gradient_signature(header, k))


def gradient_payload_problem(header: StepGradient, body: bytes | memoryview) -> str | None:
    """None when `body` is the payload whose digest the (signed) header carries."""
    if not hmac.compare_digest(header.digest, payload_digest(body)):
        return "the gradient's bytes do not match its signed digest"
    return None
