"""Timing helpers shared by the benchmarks: warm up, repeat, keep the median.

Several operations are timed round-robin (one repetition of each in turn), so
that a burst of load from another process on a shared machine falls on all of
them alike rather than on whichever ran at the time. With `warm_each`, every
timed call follows an untimed one of the same operation, so each finds its own
data in cache as it would in a loop (and not its predecessor's): without it, a
2 MB memcpy that re-reads the source the previous operation just read would
race an encode whose tensors have gone cold. The garbage collector is
off while a repetition runs (as in `timeit`), and an optional untimed `setup`
runs before each one (deleting the key a SET is about to write, say).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Seconds per call over `reps` repetitions."""

    median_s: float
    min_s: float
    reps: int

    def gbps(self, nbytes: int) -> float:
        """Throughput of the median call, in GB/s (10**9 bytes)."""
        return nbytes / self.median_s / 1e9


def _timing(samples: list[float]) -> Timing:
    return Timing(statistics.median(samples), min(samples), len(samples))


def _timed(fn: Callable[[], Any]) -> float:
    # No gc.collect() first: walking every object evicts the caches and makes a
    # 1 us call take 50 us. Disabling the collector only keeps it out of the timing.
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()


def measure_all(
    fns: Mapping[str, Callable[[], Any]],
    *,
    reps: int,
    warmup: int = 2,
    setup: Callable[[], Any] | None = None,
    warm_each: bool = False,
) -> dict[str, Timing]:
    """Time each `fn()` round-robin: `warmup` untimed rounds, then `reps` timed ones."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            if warm_each and i >= warmup:
                fn()
            if setup is not None:
                setup()
            elapsed = _timed(fn)
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: _timing(s) for name, s in samples.items()}


async def ameasure_all(
    fns: Mapping[str, Callable[[], Awaitable[Any]]],
    *,
    reps: int,
    warmup: int = 1,
    setup: Callable[[], Awaitable[Any]] | None = None,
) -> dict[str, Timing]:
    """`measure_all` for coroutine functions: `await fn()` timed, `await setup()` not."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            if setup is not None:
                await setup()
            gc.disable()
            try:
                start = time.perf_counter()
                await fn()
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            if i >= warmup:
                samples[name].append(elapsed)
    return {name: _timing(s) for name, s in samples.items()}
