"""Fetching, validating and folding one client update.

The bytes are fetched on the event loop (network I/O); hashing, decoding,
validation and the fold run in a worker thread (torch and hashlib release the
GIL), so the loop keeps heartbeats and leases on time meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bus.blobs import BlobRef
from bus.errors import BlobMissing
from coordinator.strategies import StrategyError
from serialization import DTYPES, PayloadError, TensorSpec, decode
from serialization.tensors import ALIGN

if TYPE_CHECKING:
    from coordinator.context import Delivery, RunContext
    from coordinator.strategies import Strategy

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
MAX_NUM_EXAMPLES = 10**9
HEADER_ALLOWANCE = 1024 * 1024


class UpdateRejected(Exception):
    """This update is not folded; `reason` labels the counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def payload_bound(schema: Mapping[str, TensorSpec]) -> int:
    """The most bytes an encoded state dict of this schema can take: its tensors, each
    aligned, and a header allowance far above what names, shapes and meta need."""
    tensors = sum(math.prod(spec.shape) * DTYPES[spec.dtype].itemsize + ALIGN
                  for spec in schema.values())
    return tensors + HEADER_ALLOWANCE + 512 * len(schema)


def _check_result(ctx: RunContext, delivery: Delivery) -> BlobRef:
    result = delivery.result
    if not _DIGEST.match(result.update_digest):
        raise UpdateRejected("bad_digest", f"update digest {result.update_digest[:80]!r}")
    limit = min(ctx.settings.max_update_bytes, payload_bound(ctx.schema))
    if not 0 < result.update_nbytes <= limit:  # checked before a byte is fetched
        raise UpdateRejected("too_large", f"update of {result.update_nbytes} bytes, "
                                          f"limit {limit}")
    if not 0 < result.num_examples <= MAX_NUM_EXAMPLES:
        raise UpdateRejected("bad_num_examples", f"num_examples={result.num_examples}")
    return BlobRef(result.update_digest, result.update_nbytes)


async def fetch_and_fold(ctx: RunContext, strategy: Strategy, aggregate: Any,
                         delivery: Delivery, scale: float) -> dict[str, Any]:
    """Fetch the update blob, validate it and fold it; raises UpdateRejected."""
    ref = _check_result(ctx, delivery)
    start = time.perf_counter()
    try:
        data = await ctx.blobs.get(ref)
    except BlobMissing as exc:
        raise UpdateRejected("missing_blob", str(exc)) from None
    get_s = time.perf_counter() - start
    if len(data) != ref.nbytes:
        raise UpdateRejected("truncated", f"blob is {len(data)} bytes, result says {ref.nbytes}")
    num_examples = delivery.result.num_examples
    decode_s, fold_s = await asyncio.to_thread(_decode_and_fold, ctx, strategy, aggregate,
                                               data, ref.digest, num_examples, scale)
    ctx.status.counters["bytes_received"] += ref.nbytes
    ctx.status.counters["updates_folded"] += 1
    return {"nbytes": ref.nbytes, "get_s": round(get_s, 6), "decode_s": round(decode_s, 6),
            "fold_s": round(fold_s, 6), "duration_s": round(time.perf_counter() - start, 6),
            "weight": num_examples * scale}


def _decode_and_fold(ctx: RunContext, strategy: Strategy, aggregate: Any, data: bytes | bytearray,
                     digest: str, num_examples: int, scale: float) -> tuple[float, float]:
    """Blocking part (worker thread): verify, decode with validation, fold."""
    start = time.perf_counter()
    if ctx.settings.verify_digests and hashlib.sha256(data).hexdigest() != digest:
        raise UpdateRejected("digest_mismatch", "blob bytes do not hash to their digest")
    try:
        state, _meta = decode(data, schema=ctx.schema, finite=True,
                              max_bytes=ctx.settings.max_update_bytes)
    except PayloadError as exc:
        raise UpdateRejected(exc.reason, exc.detail) from None
    decoded = time.perf_counter()
    try:
        strategy.fold(aggregate, state, num_examples, scale)
    except StrategyError as exc:
        raise UpdateRejected("bad_update", str(exc)) from None
    return decoded - start, time.perf_counter() - decoded
