"""Whether a result is acceptable: the whole decision, in one place.

A result is judged in the order it is handled, each step before any work the
next one costs:

1. `ResultValidator.admit` (the dispatcher, on the small stream message): it
   decodes; it answers an outstanding job of this run (or the real result of a
   job answered as lost), not a replayed one (``duplicate``), an unknown one
   (``unknown_job``, ``unknown_client``) or one of another slot, round or client
   (``mismatch``); with signing on it carries its client's signature
   (``bad_signature``). Admitting answers the job: a job id is admitted once.
2. `claimed_blob` (the slot, before a byte is fetched): a sha256 digest, a size
   within the model's bound and the run's limit, a sane ``num_examples``.
3. `fetch` / `decode_update` / `fold`: the blob (or the shared-memory segment a
   local agent handed over, read through `SegmentReader`) is there and stored with the
   claimed size (``missing_blob``, ``size_mismatch``: checked before it is read),
   hashes to its digest, decodes to the slot's schema with finite values, and the
   strategy takes it (``bad_update``).
4. `folds_late`: an update whose round has closed is folded or dropped
   (``closed_round``), as the late policy says.

Inside this module a rejection is an `UpdateRejected`; what leaves it is a verdict
(`coordinator.results.fold.Verdict` for updates, `admit`'s delivery or rejection for
messages), which `coordinator.results.sink.ResultSink.reject` reports
(``update_rejected``, counted in the run's status), and the run goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections.abc import Callable, Container, Mapping
from typing import Any, Protocol

import torch

from bus.blobs import BlobRef
from bus.credentials import Keyring
from bus.errors import BlobMissing, BlobSizeMismatch
from bus.handoff import HostHandoff
from bus.streams import Entry
from coordinator.delivery import Delivery
from coordinator.job_table import JobRecord, JobTable
from coordinator.results.claims import ExampleClaims
from coordinator.strategies import Strategy, StrategyError
from serialization import DTYPES, PayloadError, Result, TensorSpec, decode
from serialization.gradient import StepGradient
from serialization.signing import (
    gradient_payload_problem,
    gradient_signature_problem,
    signature_problem,
)
from serialization.tensors import ALIGN

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_NUM_EXAMPLES = 10**9
HEADER_ALLOWANCE = 1024 * 1024
Payload = bytes | bytearray | memoryview  # an update's bytes: fetched, or a mapped segment


class UpdateRejected(Exception):
    """This result or update is not folded; `reason` labels the counter."""

    def __init__(self, reason: str, detail: str, **fields: Any) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.fields = fields


class BlobReader(Protocol):
    async def get(self, ref: BlobRef) -> bytes | bytearray | memoryview: ...


class SegmentReader:
    """An update handed over in shared memory (`bus.handoff`), read like a blob: the same
    bounds and the same errors, so the same rejections follow."""

    def __init__(self, handoff: HostHandoff | None, name: str) -> None:
        self._handoff = handoff
        self._name = name

    async def get(self, ref: BlobRef) -> bytes | bytearray | memoryview:
        return await asyncio.to_thread(self.read, ref)

    def read(self, ref: BlobRef) -> memoryview:
        """Blocking: `get` in the calling thread (the segment mapped, not copied)."""
        if self._handoff is None:
            raise BlobMissing(f"update segment {self._name[:80]!r}: this coordinator takes "
                              "no shared-memory handoff (--no-local-handoff)")
        return self._handoff.take_update(self._name, ref.nbytes)


def payload_bound(schema: Mapping[str, TensorSpec]) -> int:
    """The most bytes an encoded state dict of this schema can take: its tensors, each
    aligned, and a header allowance far above what names, shapes and meta need."""
    tensors = sum(math.prod(spec.shape) * DTYPES[spec.dtype].itemsize + ALIGN
                  for spec in schema.values())
    return tensors + HEADER_ALLOWANCE + 512 * len(schema)


def _fetch_rejection(exc: BlobMissing) -> UpdateRejected:
    """A blob or segment that is not there as claimed, as the rejection it is."""
    if isinstance(exc, BlobSizeMismatch):
        return UpdateRejected("size_mismatch", str(exc))
    return UpdateRejected("missing_blob", str(exc))


class ResultValidator:
    """Judges results and their updates for one run (see the module docstring)."""

    def __init__(self, *, run_id: str, jobs: JobTable, known_clients: Container[str],
                 results_stream: Callable[[int], str], schema: Mapping[str, TensorSpec],
                 max_update_bytes: int, verify_digests: bool = True,
                 keyring: Keyring | None = None, late_policy: str = "drop") -> None:
        self._run_id = run_id
        self._jobs = jobs
        self._known_clients = known_clients
        self._results_stream = results_stream
        self._schema = schema
        self._max_update_bytes = max_update_bytes
        self._verify_digests = verify_digests
        self._keyring = keyring  # None: results are not signed
        self._late_policy = late_policy
        self.claims = ExampleClaims(run_id=run_id, keyring=keyring)  # declared sizes, caps

    @property
    def update_limit(self) -> int:
        """The most bytes an update may claim: the model's bound, within the run's limit."""
        return min(self._max_update_bytes, payload_bound(self._schema))

    # --- 1. the result message -----------------------------------------------------------

    def admit(self, entry: Entry) -> Delivery:
        """The delivery of an acceptable result entry, its job now answered; else rejected."""
        try:
            result = Result.from_bytes(entry.payload)
        except PayloadError as exc:
            raise UpdateRejected(exc.reason, exc.detail, stream=entry.stream,
                                 entry_id=entry.entry_id) from None
        record, recovered = self._job_of(result)
        same = (record.client_id, record.slot_id, record.round) == (
            result.client_id, result.slot_id, result.round)
        if not same or entry.stream != self._results_stream(record.slot_id):
            raise UpdateRejected("mismatch", "result does not match its job",
                                 job_id=result.job_id, client_id=result.client_id)
        self._check_signature(result, record)
        if recovered:
            self._jobs.recover(result.job_id)
        else:
            self._jobs.answer(result.job_id)
        return Delivery(record, result, entry.stream, entry.entry_id, recovered=recovered)

    def _job_of(self, result: Result) -> tuple[JobRecord, bool]:
        """The result's outstanding job, or its job answered as lost (True); else rejected."""
        if result.run_id == self._run_id:
            record = self._jobs.get(result.job_id)
            if record is not None:
                return record, False
            record = self._jobs.lost(result.job_id)
            if record is not None:
                return record, True
            if self._jobs.was_answered(result.job_id):
                raise UpdateRejected("duplicate", "job already answered", job_id=result.job_id)
        if result.client_id not in self._known_clients:
            raise UpdateRejected("unknown_client", "no such client in this run",
                                 job_id=result.job_id, client_id=result.client_id)
        raise UpdateRejected("unknown_job", "no such job in this run", job_id=result.job_id,
                             client_id=result.client_id)

    def _check_signature(self, result: Result, record: JobRecord) -> None:
        """With signing on: the result carries the signature of its job's client.

        Checked before the job counts as answered, so a forged result cannot use up
        the job: the client's own result is still accepted when it comes.
        """
        if self._keyring is None:
            return
        problem = signature_problem(result, self._keyring.get(record.client_id))
        if problem is not None:
            raise UpdateRejected("bad_signature", problem, job_id=result.job_id,
                                 client_id=record.client_id, agent_id=result.agent_id)

    def check_gradient(self, header: StepGradient, body: bytes | memoryview | None = None) -> None:
        """With signing on, PayloadError (bad_signature) unless a gradient entry's header
        carries its client's signature and, given the body, the body is what it signed
        (hashing it: call that from a worker thread). The rules: `serialization.signing`."""
        if self._keyring is None:
            return
        problem = gradient_signature_problem(header, self._keyring.get(header.client_id))
        if problem is None and body is not None:
            problem = gradient_payload_problem(header, body)
        if problem is not None:
            raise PayloadError("bad_signature", f"gradient for client {header.client_id!r} "
                                                f"step {header.step}: {problem}")

    # --- 2. the claimed update blob ------------------------------------------------------

    def claimed_blob(self, result: Result) -> BlobRef:
        """The update blob the result claims, checked before a byte of it is fetched."""
        if not _DIGEST.match(result.update_digest):
            raise UpdateRejected("bad_digest", f"update digest {result.update_digest[:80]!r}")
        limit = self.update_limit
        if not 0 < result.update_nbytes <= limit:
            raise UpdateRejected("too_large", f"update of {result.update_nbytes} bytes, "
                                              f"limit {limit}")
        if not 0 < result.num_examples <= MAX_NUM_EXAMPLES:
            raise UpdateRejected("bad_num_examples", f"num_examples={result.num_examples}")
        return BlobRef(result.update_digest, result.update_nbytes)

    # --- 3. the update's bytes -----------------------------------------------------------

    async def fetch(self, blobs: BlobReader, ref: BlobRef) -> bytes | bytearray | memoryview:
        """The claimed blob's bytes, exactly `ref.nbytes` of them; else rejected.

        The blob store reads no more than the claim: a blob stored with another length
        is rejected (``size_mismatch``) unread.
        """
        try:
            data = await blobs.get(ref)
        except BlobMissing as exc:
            raise _fetch_rejection(exc) from None
        return self._exact(data, ref)

    def fetch_segment(self, segment: SegmentReader, ref: BlobRef) -> Payload:
        """Blocking `fetch` of a handed-over update (from the thread that decodes it)."""
        try:
            data = segment.read(ref)
        except BlobMissing as exc:
            raise _fetch_rejection(exc) from None
        return self._exact(data, ref)

    @staticmethod
    def _exact(data: Payload, ref: BlobRef) -> Payload:
        if len(data) != ref.nbytes:
            raise UpdateRejected("truncated", f"blob is {len(data)} bytes, result says "
                                              f"{ref.nbytes}")
        return data

    def decode_update(self, data: Payload, digest: str) -> dict[str, torch.Tensor]:
        """Blocking (call from a thread): the bytes hash to their digest and decode to the
        slot's schema with finite values."""
        if self._verify_digests and hashlib.sha256(data).hexdigest() != digest:
            raise UpdateRejected("digest_mismatch", "blob bytes do not hash to their digest")
        try:
            state, _meta = decode(data, schema=self._schema, finite=True,
                                  max_bytes=self._max_update_bytes)
        except PayloadError as exc:
            raise UpdateRejected(exc.reason, exc.detail) from None
        return state

    @staticmethod
    def fold(strategy: Strategy, aggregate: Any, state: dict[str, torch.Tensor],
             num_examples: int, scale: float) -> None:
        """Blocking: fold into the aggregate; an update the strategy refuses is rejected."""
        try:
            strategy.fold(aggregate, state, num_examples, scale)
        except StrategyError as exc:
            raise UpdateRejected("bad_update", str(exc)) from None

    # --- 4. late updates -----------------------------------------------------------------

    def folds_late(self, result: Result, *, round_open: bool) -> bool:
        """Whether an update whose round has closed is folded into the open round."""
        return self._late_policy == "fold" and result.status == "ok" and round_open
