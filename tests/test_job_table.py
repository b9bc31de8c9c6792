"""The coordinator's job table: each job answered once, a lost job's real result recovered once."""

from __future__ import annotations

from coordinator.job_table import JobRecord, JobTable


def _table(*records: JobRecord) -> JobTable:
    table = JobTable()
    for record in records:
        table.add(record)
    return table


def test_a_job_is_answered_once() -> None:
    """The first answer returns the record; a second, or an unknown id, returns None."""
    record = JobRecord("j1", 0, 1, "c1")
    table = _table(record)
    assert table.answer("j1") == record
    assert table.answer("j1") is None
    assert table.answer("nope") is None
    assert table.was_answered("j1")
    assert table.lost("j1") is None


def test_a_job_answered_for_a_lost_client_is_recovered_once() -> None:
    """A job answered as lost can be recovered by its real result exactly once."""
    record = JobRecord("j1", 0, 1, "c1")
    table = _table(record)
    table.answer("j1", lost=True)
    assert table.was_answered("j1")
    assert table.lost("j1") == record
    assert table.recover("j1") == record
    assert table.recover("j1") is None
    assert table.lost("j1") is None


def test_may_answer_covers_outstanding_and_lost_jobs_of_that_round_only() -> None:
    """A round's model is still needed while one of its jobs is outstanding or was lost."""
    table = _table(JobRecord("a", 0, 1, "c1"), JobRecord("b", 0, 2, "c2"),
                   JobRecord("c", 1, 2, "c3"))
    assert table.may_answer(0, 1)
    table.answer("a")
    assert not table.may_answer(0, 1)
    table.answer("b", lost=True)
    assert table.may_answer(0, 2)
    table.recover("b")
    assert not table.may_answer(0, 2)
    assert table.may_answer(1, 2)
