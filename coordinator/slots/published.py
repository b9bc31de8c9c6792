"""The registry of published models: which blob digests slots are serving right now.

A slot publishes its global model once per round (its blob is what every job of
the round points at) and withdraws it when the round's aggregate replaces it.
A blob that is a live model is never unlinked, even when it was also an update
(a client that sends the model back unchanged) or another round's model: `retire`
asks the registry, not every slot.
"""

from __future__ import annotations

from typing import Protocol

from bus.blobs import BlobRef


class BlobDeleter(Protocol):
    async def delete(self, ref: BlobRef) -> None: ...


class ModelSegments(Protocol):
    def drop_model(self, digest: str) -> None: ...


class PublishedModels:
    """Each slot's published model (at most one per slot), and retiring blobs around them
    (with their shared-memory copies, `segments`, when the run hands models over locally)."""

    def __init__(self, blobs: BlobDeleter, segments: ModelSegments | None = None) -> None:
        self._blobs = blobs
        self._segments = segments
        self._by_slot: dict[int, BlobRef] = {}

    def publish(self, slot_id: int, ref: BlobRef) -> None:
        self._by_slot[slot_id] = ref

    def withdraw(self, slot_id: int) -> None:
        self._by_slot.pop(slot_id, None)

    def of_slot(self, slot_id: int) -> BlobRef | None:
        return self._by_slot.get(slot_id)

    def live_digests(self) -> set[str]:
        return {ref.digest for ref in self._by_slot.values()}

    async def retire(self, ref: BlobRef) -> None:
        """Unlink a blob nobody needs any more, unless it is a live model (TTL covers the rest)."""
        if ref.digest not in self.live_digests():
            await self._blobs.delete(ref)
            if self._segments is not None:
                self._segments.drop_model(ref.digest)
