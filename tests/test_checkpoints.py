"""Checkpoint files: a round is pruned only once the state no longer names it."""

from __future__ import annotations

from pathlib import Path

from coordinator.checkpoints import CheckpointStore


def _rounds(store: CheckpointStore, slot_id: int) -> list[str]:
    folder = store.model_path(slot_id, 0).parent
    return sorted(p.name for p in folder.iterdir())


def test_writing_a_round_deletes_nothing_until_pruned(tmp_path: Path) -> None:
    """write_model keeps every round (the state may still name the older one); prune then
    keeps the newest `keep` rounds of models and strategy states alike."""
    store = CheckpointStore(tmp_path, keep=1)
    for round_ in (1, 2):
        store.write_model(0, round_, b"model")
        store.write_model(0, round_, b"state", "strategy")
    assert _rounds(store, 0) == ["round00001.pwfl", "round00001.strategy.pwfl",
                                 "round00002.pwfl", "round00002.strategy.pwfl"]
    store.prune(0)
    assert _rounds(store, 0) == ["round00002.pwfl", "round00002.strategy.pwfl"]
    store.prune(1)  # a slot with no checkpoint yet: nothing to do
