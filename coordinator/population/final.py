"""``--merge final``: at the end, the plain average and a greedy soup of the slots.

Each candidate (every slot's last model, the average, the soup) is evaluated on
the task's evaluation set, the best is written to ``checkpoints/result.pwfl`` and
one `final_merge` event says what was tried and kept. The soup chooses its members
on that same evaluation set (the task has no separate validation split), so its
accuracy is an optimistic estimate; the event says so with ``selected_on``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog
import torch

from coordinator.checkpoints import CheckpointStore
from coordinator.population import merge
from serialization import encode

log = structlog.get_logger()
State = dict[str, torch.Tensor]


def _accuracy(evaluate: Callable[[State], dict[str, float]], state: State) -> float:
    return float(evaluate(state).get("accuracy", 0.0))


def merge_final(slots: dict[int, tuple[State, float]],
                evaluate: Callable[[State], dict[str, float]]
                ) -> tuple[str, State, dict[str, object]]:
    """(name of the kept model, its state, the event's fields); blocking."""
    states = [slots[s][0] for s in sorted(slots)]
    average = merge.weighted_average(states, [1.0] * len(states))
    average_accuracy = _accuracy(evaluate, average)
    soup = merge.greedy_soup(slots, lambda state: _accuracy(evaluate, state))
    best_slot = max(sorted(slots), key=lambda s: slots[s][1])
    candidates: dict[str, tuple[State, float]] = {
        f"slot {best_slot}": slots[best_slot], "average": (average, average_accuracy),
        "soup": (soup.state, soup.accuracy)}
    kept = max(candidates, key=lambda k: candidates[k][1])
    fields: dict[str, object] = {
        "kept": kept, "accuracy": candidates[kept][1], "average_accuracy": average_accuracy,
        "soup_accuracy": soup.accuracy, "soup_members": list(soup.members),
        "soup_tried": [[s, a] for s, a in soup.tried], "best_slot_id": best_slot,
        "best_slot_accuracy": slots[best_slot][1], "selected_on": "evaluation set"}
    return kept, candidates[kept][0], fields


async def run_final_merge(slots: dict[int, tuple[State, float]],
                          evaluate: Callable[[State], dict[str, float]],
                          checkpoints: CheckpointStore) -> Path | None:
    """Merge, evaluate, keep the best as the run's result; None with fewer than 2 slots."""
    if len(slots) < 2:
        return None
    _kept, state, fields = await asyncio.to_thread(merge_final, slots, evaluate)
    path = checkpoints.run_dir / "checkpoints" / "result.pwfl"
    payload = await asyncio.to_thread(encode, state)
    await asyncio.to_thread(_write, path, payload)
    log.info("final_merge", slot_id="merged", path=str(path), **fields)
    return path


def _write(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(payload)
    tmp.replace(path)
