"""When a round closes: quorum, deadline and minimum, as pure bookkeeping.

A round expects one answer per leased client. It closes as soon as enough updates
succeeded (the quorum), or every job answered, or its deadline passed; the closure
says why and whether the round is good enough to aggregate (`ok`). With
``fraction=1.0`` a round waits for every client: the synchronous parameter server.

A late update (its round already closed) is either dropped or folded into the
slot's current round with a staleness weight (`LATE_POLICIES`, `staleness_weight`).
Time is passed in (``now``), never read, so the replay tool reuses this as is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LATE_POLICIES = ("drop", "fold")
STALENESS_MODES = ("inverse", "constant", "exp")
CLOSURE_REASONS = ("quorum", "all", "deadline", "failed")


@dataclass(frozen=True)
class QuorumRule:
    """A round needs `fraction` of its clients, at least `min_updates`, by `deadline_s`."""

    fraction: float = 1.0
    min_updates: int = 1
    deadline_s: float = 600.0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"quorum fraction must be in (0, 1], got {self.fraction}")
        if self.min_updates < 1:
            raise ValueError(f"min_updates must be at least 1, got {self.min_updates}")
        if not self.deadline_s > 0.0:
            raise ValueError(f"deadline_s must be positive, got {self.deadline_s}")


@dataclass(frozen=True)
class Closure:
    """Why a round closed, what it had, and whether it can be aggregated."""

    reason: str  # one of CLOSURE_REASONS
    succeeded: int
    failed: int
    expected: int
    ok: bool


class RoundQuorum:
    """The answers of one round so far, and the decision to close it."""

    def __init__(self, rule: QuorumRule, expected: int, started_at: float) -> None:
        if expected < 1:
            raise ValueError(f"a round expects at least one client, got {expected}")
        self.rule = rule
        self.expected = expected
        self.started_at = started_at
        self.deadline_at = started_at + rule.deadline_s
        # The minimum can never exceed what the round can deliver.
        self.minimum = min(rule.min_updates, expected)
        # round(): 0.7 * 10 is 7.000000000000001, and must need 7, not 8.
        by_fraction = math.ceil(round(rule.fraction * expected, 9))
        self.needed = min(expected, max(by_fraction, self.minimum))
        self.succeeded = 0
        self.failed = 0
        self._seen: set[str] = set()
        self._closed: Closure | None = None

    @property
    def answered(self) -> int:
        return self.succeeded + self.failed

    @property
    def closed(self) -> Closure | None:
        """The closure once `closure` has returned one, else None."""
        return self._closed

    def record(self, job_id: str, ok: bool) -> bool:
        """Count one job's answer; False (not counted) for a repeat or once closed."""
        if job_id in self._seen or self._closed is not None:
            return False
        self._seen.add(job_id)
        if ok:
            self.succeeded += 1
        else:
            self.failed += 1
        return True

    def closure(self, now: float) -> Closure | None:
        """The closure if the round should close at `now`, else None; latched once given."""
        if self._closed is None:
            self._closed = self._decide(now)
        return self._closed

    def _decide(self, now: float) -> Closure | None:
        all_answered = self.answered >= self.expected
        if self.succeeded >= self.needed:
            return self._close("all" if all_answered else "quorum", ok=True)
        enough = self.succeeded >= self.minimum
        if all_answered:
            return self._close("all" if enough else "failed", ok=enough)
        if now >= self.deadline_at:
            return self._close("deadline" if enough else "failed", ok=enough)
        return None

    def _close(self, reason: str, *, ok: bool) -> Closure:
        return Closure(reason, self.succeeded, self.failed, self.expected, ok)


def staleness_weight(staleness: int, mode: str = "inverse") -> float:
    """The weight factor of an update `staleness` rounds late: 1/(1+s), 1, or 0.5**s."""
    if staleness < 0:
        raise ValueError(f"staleness must be non-negative, got {staleness}")
    if mode == "inverse":
        return 1.0 / (1.0 + staleness)
    if mode == "constant":
        return 1.0
    if mode == "exp":
        return float(0.5**staleness)
    raise ValueError(f"unknown staleness mode {mode!r}: choose one of {', '.join(STALENESS_MODES)}")
