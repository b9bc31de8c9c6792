"""Fetching, validating and folding one client update.

The bytes are fetched on the event loop (network I/O); hashing, decoding,
validation and the fold run in a worker thread (torch and hashlib release the
GIL), so the loop keeps heartbeats and leases on time meanwhile. What is
acceptable is `ResultValidator`'s decision; this module only orders the steps
and times them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bus.blobs import BlobRef
from coordinator.delivery import Delivery
from coordinator.results.validation import BlobReader, ResultValidator, SegmentReader
from coordinator.strategies import Strategy


async def fetch_and_fold(blobs: BlobReader, validator: ResultValidator, strategy: Strategy,
                         aggregate: Any, delivery: Delivery, scale: float) -> dict[str, Any]:
    """Fetch the update blob, validate it and fold it; its stats for `update_folded`.

    Raises UpdateRejected.
    """
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
