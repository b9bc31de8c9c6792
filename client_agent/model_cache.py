"""Model blobs in shared memory, by digest: fetched once per machine, read by every trainer.

A model blob is copied once into its own segment (`put`); trainers attach to
it by name and decode views over it. A job pins its model (`acquire` /
`release`) for as long as a trainer may read it, so a pinned segment is never
unlinked. Beyond `max_bytes` or `max_entries`, the least recently used unpinned
segments go; the cache may stay over budget while everything in it is pinned.
The entry cap matters for small models: each segment holds a file descriptor and
a mapping, and a run publishes a new model every round, so a byte budget alone
would let a long run of a small model exhaust the descriptors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory

from trainer_worker import shm

DEFAULT_MAX_BYTES = 2 * 1024**3
# A model is fetched for the rounds in progress (one per slot) and, rarely, by a
# straggler of an earlier round: a few dozen entries are plenty.
DEFAULT_MAX_ENTRIES = 32
Data = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ModelSegment:
    """Where a cached model blob lies: segment name, payload size, digest."""

    name: str
    nbytes: int
    digest: str


@dataclass
class _Entry:
    segment: ModelSegment
    memory: shared_memory.SharedMemory
    pins: int = 0


class ModelCache:
    """Digest -> shared-memory segment holding the blob; LRU over unpinned entries."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max(1, max_entries)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # `put` may run in a worker thread

    @property
    def nbytes(self) -> int:
        """Bytes held in all segments together."""
        with self._lock:
            return sum(e.segment.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: object) -> bool:
        return digest in self._entries

    def put(self, digest: str, data: Data) -> ModelSegment:
        """The segment for `digest`, copying `data` into a new one if it is not cached."""
        raw = memoryview(data).cast("B")

        def copy(out: memoryview) -> None:
            out[:] = raw

        return self.put_filled(digest, raw.nbytes, copy)

    def put_filled(self, digest: str, nbytes: int,
                   fill: Callable[[memoryview], None]) -> ModelSegment:
        """The segment for `digest`; if it is not cached, a new one of `nbytes` that
        `fill` writes (a segment `fill` raises for is unlinked, the error re-raised)."""
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return self._entries[digest].segment
        entry = _filled(digest, nbytes, fill)  # outside the lock: a big copy takes a while
        with self._lock:
            if digest in self._entries:  # another thread won the race
                shm.release(entry.memory, unlink=True)
                return self._entries[digest].segment
            self._entries[digest] = entry
            self._evict(keep=digest)
        return entry.segment

    def get(self, digest: str) -> ModelSegment | None:
        """The cached segment (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            self._entries.move_to_end(digest)
            return entry.segment

    def view(self, digest: str) -> memoryview:
        """The blob's bytes (valid while the entry is pinned or cached)."""
        with self._lock:
            entry = self._entries[digest]
            return shm.buffer(entry.memory)[: entry.segment.nbytes]

    def acquire(self, digest: str) -> ModelSegment:
        """Pin the entry: it stays until a matching `release`. KeyError if absent."""
        with self._lock:
            entry = self._entries[digest]
            entry.pins += 1
            self._entries.move_to_end(digest)
            return entry.segment

    def release(self, digest: str) -> None:
        """Unpin once; the entry may now be evicted."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or entry.pins == 0:
                raise KeyError(f"model {digest} is not pinned")
            entry.pins -= 1
            self._evict()

    def close(self) -> None:
        """Unlink every segment, pinned or not."""
        with self._lock:
            entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            shm.release(entry.memory, unlink=True)

    def _evict(self, keep: str | None = None) -> None:
        total = sum(e.segment.nbytes for e in self._entries.values())
        for digest in list(self._entries):
            if total <= self.max_bytes and len(self._entries) <= self.max_entries:
                return
            entry = self._entries[digest]
            if entry.pins or digest == keep:
                continue
            del self._entries[digest]
            shm.release(entry.memory, unlink=True)
            total -= entry.segment.nbytes


def _filled(digest: str, nbytes: int, fill: Callable[[memoryview], None]) -> _Entry:
    memory = shm.create(nbytes, prefix=shm.owned_prefix("m"))
    try:
        with shm.buffer(memory)[:nbytes] as out:
            fill(out)
    except BaseException:
        shm.release(memory, unlink=True)
        raise
    return _Entry(ModelSegment(memory.name, nbytes, digest), memory)
