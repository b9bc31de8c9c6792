"""Round quorum: when a round closes, why, and whether it can be aggregated."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.quorum import (
    LATE_POLICIES,
    Closure,
    QuorumRule,
    RoundQuorum,
    staleness_weight,
)


def answer(q: RoundQuorum, succeeded: int, failed: int = 0) -> None:
    for i in range(succeeded):
        assert q.record(f"ok{i}", ok=True)
    for i in range(failed):
        assert q.record(f"bad{i}", ok=False)


@pytest.mark.parametrize(
    "kwargs",
    [{"fraction": 0.0}, {"fraction": 1.1}, {"min_updates": 0}, {"deadline_s": 0.0}],
)
def test_rule_rejects_out_of_range_values(kwargs: dict[str, float]) -> None:
    """A fraction outside (0, 1], min_updates < 1 or a non-positive deadline is refused."""
    with pytest.raises(ValueError):  # noqa: PT011 -- any of several messages
        QuorumRule(**kwargs)  # type: ignore[arg-type]


def test_round_needs_at_least_one_client() -> None:
    """A round that expects no client is refused."""
    with pytest.raises(ValueError, match="at least one"):
        RoundQuorum(QuorumRule(), expected=0, started_at=0.0)


@pytest.mark.parametrize(
    ("fraction", "min_updates", "expected", "needed"),
    [(0.7, 1, 10, 7), (0.5, 1, 3, 2), (0.1, 3, 10, 3), (0.5, 5, 2, 2), (1.0, 1, 4, 4)],
)
def test_needed_is_the_fraction_bounded_by_minimum_and_expected(
    fraction: float, min_updates: int, expected: int, needed: int
) -> None:
    """needed = ceil(fraction * expected), at least the minimum, at most expected."""
    q = RoundQuorum(QuorumRule(fraction, min_updates), expected=expected, started_at=0.0)
    assert q.needed == needed


def test_synchronous_quorum_waits_for_every_client() -> None:
    """With fraction 1.0 the round stays open until all succeed, then closes as 'all'."""
    q = RoundQuorum(QuorumRule(1.0), expected=3, started_at=0.0)
    answer(q, 2)
    assert q.closure(now=599.0) is None
    assert q.record("ok2", ok=True)
    assert q.closure(now=599.0) == Closure("all", 3, 0, 3, ok=True)


def test_synchronous_round_with_a_failure_closes_when_all_answered() -> None:
    """All answered with a failure: ok iff successes reach min_updates."""
    q = RoundQuorum(QuorumRule(1.0, min_updates=2), expected=3, started_at=0.0)
    answer(q, 2, failed=1)
    assert q.closure(now=1.0) == Closure("all", 2, 1, 3, ok=True)
    q = RoundQuorum(QuorumRule(1.0, min_updates=3), expected=3, started_at=0.0)
    answer(q, 2, failed=1)
    assert q.closure(now=1.0) == Closure("failed", 2, 1, 3, ok=False)


def test_quorum_closes_before_everyone_answers() -> None:
    """Half of four clients suffices with fraction 0.5."""
    q = RoundQuorum(QuorumRule(0.5), expected=4, started_at=0.0)
    answer(q, 1, failed=1)
    assert q.closure(now=1.0) is None
    assert q.record("late-but-ok", ok=True)
    assert q.closure(now=1.0) == Closure("quorum", 2, 1, 4, ok=True)


def test_duplicate_job_ids_are_counted_once() -> None:
    """A redelivered job id is ignored, whatever its status."""
    q = RoundQuorum(QuorumRule(1.0), expected=2, started_at=0.0)
    assert q.record("j1", ok=True)
    assert not q.record("j1", ok=True)
    assert not q.record("j1", ok=False)
    assert (q.succeeded, q.failed) == (1, 0)
    assert q.closure(now=1.0) is None


def test_deadline_with_the_minimum_is_ok() -> None:
    """At the deadline with min_updates successes the round closes ok as 'deadline'."""
    q = RoundQuorum(QuorumRule(1.0, min_updates=1, deadline_s=30.0), expected=3, started_at=100.0)
    answer(q, 1, failed=1)
    assert q.deadline_at == 130.0
    assert q.closure(now=129.9) is None
    assert q.closure(now=130.0) == Closure("deadline", 1, 1, 3, ok=True)


def test_deadline_without_the_minimum_fails() -> None:
    """At the deadline with fewer than min_updates successes the round fails."""
    q = RoundQuorum(QuorumRule(1.0, min_updates=2, deadline_s=30.0), expected=3, started_at=0.0)
    answer(q, 1)
    assert q.closure(now=31.0) == Closure("failed", 1, 0, 3, ok=False)


def test_closure_is_latched_and_later_answers_are_not_counted() -> None:
    """Once a closure is given it stays; answers after it are refused (they are late)."""
    q = RoundQuorum(QuorumRule(0.5), expected=2, started_at=0.0)
    answer(q, 1)
    first = q.closure(now=1.0)
    assert first is not None
    assert q.closed == first
    assert not q.record("another", ok=True)
    assert q.closure(now=1000.0) is first


@given(
    fraction=st.floats(0.01, 1.0),
    min_updates=st.integers(1, 12),
    expected=st.integers(1, 12),
    outcomes=st.lists(st.booleans(), max_size=12),
    past_deadline=st.booleans(),
)
def test_closure_decision_matches_the_rule(
    fraction: float, min_updates: int, expected: int, outcomes: list[bool], past_deadline: bool
) -> None:
    """A round is open iff below quorum, not all answered and before the deadline."""
    q = RoundQuorum(QuorumRule(fraction, min_updates, 10.0), expected, started_at=0.0)
    for i, ok in enumerate(outcomes[:expected]):
        q.record(f"j{i}", ok)
    closure = q.closure(now=10.0 if past_deadline else 5.0)
    succeeded = sum(outcomes[:expected])
    reached = succeeded >= min(expected, max(math.ceil(round(fraction * expected, 9)), min_updates))
    all_answered = len(outcomes) >= expected
    assert (closure is None) == (not reached and not all_answered and not past_deadline)
    if closure is not None:
        assert closure.ok == (reached or succeeded >= min(min_updates, expected))
        assert (closure.reason == "failed") == (not closure.ok)


def test_staleness_weights() -> None:
    """inverse 1/(1+s), constant 1, exp 0.5**s; negative staleness or unknown mode refused."""
    assert staleness_weight(0) == 1.0
    assert staleness_weight(3) == 0.25
    assert staleness_weight(5, "constant") == 1.0
    assert staleness_weight(2, "exp") == 0.25
    with pytest.raises(ValueError, match="non-negative"):
        staleness_weight(-1)
    with pytest.raises(ValueError, match="inverse, constant, exp"):
        staleness_weight(1, "linear")
    assert LATE_POLICIES == ("drop", "fold")
