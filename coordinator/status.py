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
    rounds_done: int = 0  # rounds aggregated (counted when they close)
    evaluated_round: int = 0  # the newest round whose evaluate-and-checkpoint link finished
    state: str = "starting"
    clients: tuple[str, ...] = ()
    # (round, accuracy, elapsed s) of the latest evaluations
    accuracies: deque[tuple[int, float, float]] = field(
        default_factory=lambda: deque(maxlen=RECENT_ACCURACIES))
    best_accuracy: float | None = None
    evaluations: int = 0
    # (round of the model, accuracy, elapsed s) of the latest federated evaluations: the
    # clients' held-out validation splits (`validation_finished`)
    validations: deque[tuple[int, float, float]] = field(
        default_factory=lambda: deque(maxlen=RECENT_ACCURACIES))
    best_validation: float | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the slot's current configuration

    def record_accuracy(self, round_: int, accuracy: float, elapsed_s: float) -> None:
        self.accuracies.append((round_, accuracy, elapsed_s))
        self.evaluations += 1
        if self.best_accuracy is None or accuracy > self.best_accuracy:
            self.best_accuracy = accuracy

    def record_aggregated(self, round_: int) -> None:
        """Round `round_` closed (aggregated); its evaluation may come later."""
        self.rounds_done = max(self.rounds_done, round_)

    def record_evaluated(self, round_: int) -> None:
        """Round `round_`'s evaluate-and-checkpoint link finished."""
        self.evaluated_round = max(self.evaluated_round, round_)

    def record_validation(self, round_: int, accuracy: float, elapsed_s: float) -> None:
        self.validations.append((round_, accuracy, elapsed_s))
        if self.best_validation is None or accuracy > self.best_validation:
            self.best_validation = accuracy

    @property
    def last_accuracy(self) -> float | None:
        return self.accuracies[-1][1] if self.accuracies else None

    @property
    def last_validation(self) -> float | None:
        return self.validations[-1][1] if self.validations else None

    @property
    def evaluation_lag_rounds(self) -> int:
        """Rounds aggregated whose evaluate-and-checkpoint link has not finished."""
        return max(0, self.rounds_done - self.evaluated_round)

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot_id": self.slot_id, "round": self.round, "rounds": self.rounds,
            "rounds_done": self.rounds_done, "state": self.state, "clients": list(self.clients),
            "last_accuracy": self.last_accuracy, "best_accuracy": self.best_accuracy,
            "evaluations": self.evaluations, "config": dict(self.config),
            # the same figures under names that say which set they are on: rounds aggregated,
            # central accuracy on the test set (`last_accuracy`, `best_accuracy`, kept for
            # older readers)
            "rounds_aggregated": self.rounds_done,
            "last_test_accuracy": self.last_accuracy, "best_test_accuracy": self.best_accuracy,
            "evaluated_round": self.evaluated_round,
            "evaluation_lag_rounds": self.evaluation_lag_rounds,
            "last_validation_accuracy": self.last_validation,
            "best_validation_accuracy": self.best_validation,
            "accuracies": [{"round": r, "accuracy": a, "elapsed_s": t}
                           for r, a, t in self.accuracies],
            "validation_accuracies": [{"round": r, "accuracy": a, "elapsed_s": t}
                                      for r, a, t in self.validations],
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
