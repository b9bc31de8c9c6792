"""Live state of a run, for the HTTP API and the terminal progress: read-only views."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

# /status shows this many recent evaluations per slot; the whole curve is in the event
# log (`evaluation_finished`). An unbounded list grew the coordinator by 150 bytes per
# slot-round and /status by 60 bytes per point (measured over 10,000 rounds).
RECENT_ACCURACIES = 100


@dataclass
class SlotStatus:
    slot_id: int
    rounds: int
    round: int = 0  # the round in progress (or the last one, once finished)
    rounds_done: int = 0
    state: str = "starting"
    clients: tuple[str, ...] = ()
    # (round, accuracy, elapsed s) of the latest evaluations
    accuracies: deque[tuple[int, float, float]] = field(
        default_factory=lambda: deque(maxlen=RECENT_ACCURACIES))
    best_accuracy: float | None = None
    evaluations: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the slot's current configuration

    def record_accuracy(self, round_: int, accuracy: float, elapsed_s: float) -> None:
        self.accuracies.append((round_, accuracy, elapsed_s))
        self.evaluations += 1
        if self.best_accuracy is None or accuracy > self.best_accuracy:
            self.best_accuracy = accuracy

    @property
    def last_accuracy(self) -> float | None:
        return self.accuracies[-1][1] if self.accuracies else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot_id": self.slot_id, "round": self.round, "rounds": self.rounds,
            "rounds_done": self.rounds_done, "state": self.state, "clients": list(self.clients),
            "last_accuracy": self.last_accuracy, "best_accuracy": self.best_accuracy,
            "evaluations": self.evaluations, "config": dict(self.config),
            "accuracies": [{"round": r, "accuracy": a, "elapsed_s": t}
                           for r, a, t in self.accuracies],
        }


@dataclass
class RunStatus:
    run_id: str
    started_at: float = field(default_factory=time.time)
    state: str = "starting"
    slots: dict[int, SlotStatus] = field(default_factory=dict)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    counters: Counter[str] = field(default_factory=Counter)

    @property
    def elapsed_s(self) -> float:
        return time.time() - self.started_at

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def as_dict(self, leases: dict[str, int]) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "state": self.state, "elapsed_s": round(self.elapsed_s, 3),
            "slots": [s.as_dict() for s in self.slots.values()],
            "clients": [
                {"client_id": cid, **info, "lease": leases.get(cid)}
                for cid, info in sorted(self.clients.items())
            ],
            "rejected": dict(self.rejected),
            "rejected_total": sum(self.rejected.values()),
            "counters": dict(self.counters),
        }
