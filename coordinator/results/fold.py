"""Fetching, validating and folding one client update, to a verdict.

The bytes are fetched on the event loop (network I/O); hashing, decoding,
validation and the fold run in a worker thread (torch and hashlib release the
GIL), so the loop keeps heartbeats and leases on time meanwhile. What is
acceptable is `ResultValidator`'s decision; this module orders the steps, times
them and returns a `Verdict`: the caller reports a rejection, it is never raised.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from bus.blobs import BlobRef
from coordinator.delivery import Delivery
from coordinator.results.validation import (
    BlobReader,
    ResultValidator,
    SegmentReader,
    UpdateRejected,
)
from coordinator.strategies import Strategy


@dataclass(frozen=True)
class Verdict:
    """An update folded (with what `update_folded` logs: bytes, timings, weight), or
    rejected with the reason that labels its counter."""

    accepted: bool
    stats: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    detail: str = ""
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def rejected(cls, exc: UpdateRejected) -> Verdict:
        return cls(False, reason=exc.reason, detail=exc.detail, fields=exc.fields)


async def fetch_and_fold(blobs: BlobReader, validator: ResultValidator, strategy: Strategy,
                         aggregate: Any, delivery: Delivery, scale: float) -> Verdict:
    """Fetch the update, validate it and fold it into `aggregate` with weight
    ``num_examples * scale``."""
    try:
        return Verdict(True, await _fetch_and_fold(blobs, validator, strategy, aggregate,
                                                   delivery, scale))
    except UpdateRejected as exc:
        return Verdict.rejected(exc)


async def _fetch_and_fold(blobs: BlobReader, validator: ResultValidator, strategy: Strategy,
                          aggregate: Any, delivery: Delivery, scale: float) -> dict[str, Any]:
    ref = validator.claimed_blob(delivery.result)
    start = time.perf_counter()
    num_examples = delivery.result.num_examples
    if isinstance(blobs, SegmentReader):  # a copy at memory speed: in the same thread trip
        get_s, decode_s, fold_s = await asyncio.to_thread(
            _read_decode_and_fold, validator, strategy, aggregate, blobs, ref, num_examples,
            scale)
    else:
        data = await validator.fetch(blobs, ref)
        get_s = time.perf_counter() - start
        decode_s, fold_s = await asyncio.to_thread(_decode_and_fold, validator, strategy,
                                                   aggregate, data, ref.digest, num_examples,
                                                   scale)
    return {"nbytes": ref.nbytes, "get_s": round(get_s, 6), "decode_s": round(decode_s, 6),
            "fold_s": round(fold_s, 6), "duration_s": round(time.perf_counter() - start, 6),
            "weight": num_examples * scale}


def _read_decode_and_fold(validator: ResultValidator, strategy: Strategy, aggregate: Any,
                          segment: SegmentReader, ref: BlobRef, num_examples: int,
                          scale: float) -> tuple[float, float, float]:
    """Blocking part for a handed-over update: read the segment, then as below."""
    start = time.perf_counter()
    data = validator.fetch_segment(segment, ref)
    read_s = time.perf_counter() - start
    return (read_s, *_decode_and_fold(validator, strategy, aggregate, data, ref.digest,
                                      num_examples, scale))


def _decode_and_fold(validator: ResultValidator, strategy: Strategy, aggregate: Any,
                     data: bytes | bytearray | memoryview, digest: str, num_examples: int,
                     scale: float) -> tuple[float, float]:
    """Blocking part (worker thread): verify, decode with validation, fold."""
    start = time.perf_counter()
    state = validator.decode_update(data, digest)
    decoded = time.perf_counter()
    validator.fold(strategy, aggregate, state, num_examples, scale)
    return decoded - start, time.perf_counter() - decoded
