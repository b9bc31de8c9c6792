"""Which jobs are out, for which slot, round and client; and which were answered.

A job id is aggregated at most once: `answer` says whether this is the first
answer, whatever redelivery happens. A job answered for a lost client (it counted
as failed) can still be `recover`ed once, when its real result turns up after all:
the slot then treats that update as a late one.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

# Answered ids are remembered only to tell a replay ("duplicate") from a made-up id
# ("unknown_job"): a forgotten one is still rejected, since only outstanding jobs are
# accepted. So the memory can stay small (a few MB) however long the run.
_ANSWERED_MEMORY = 20_000


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    slot_id: int
    round: int
    client_id: str
    published_at: float = field(default_factory=time.time)


def new_job_id(slot_id: int, round_: int, client_id: str) -> str:
    return f"s{slot_id}-r{round_}-c{client_id}-{secrets.token_hex(4)}"


class JobTable:
    """Outstanding jobs by id and by client; a bounded memory of answered ids."""

    def __init__(self) -> None:
        self._outstanding: dict[str, JobRecord] = {}
        self._answered: OrderedDict[str, JobRecord] = OrderedDict()
        self._lost: OrderedDict[str, JobRecord] = OrderedDict()

    def add(self, record: JobRecord) -> None:
        self._outstanding[record.job_id] = record

    def get(self, job_id: str) -> JobRecord | None:
        return self._outstanding.get(job_id)

    def was_answered(self, job_id: str) -> bool:
        return job_id in self._answered

    def answer(self, job_id: str, *, lost: bool = False) -> JobRecord | None:
        """Mark answered; the record on the first answer, None if unknown or answered before.

        `lost`: answered on behalf of a lost client, so the real result may still come.
        """
        record = self._outstanding.pop(job_id, None)
        if record is None:
            return None
        for memory in (self._answered, self._lost) if lost else (self._answered,):
            memory[job_id] = record
            if len(memory) > _ANSWERED_MEMORY:
                memory.popitem(last=False)
        return record

    def lost(self, job_id: str) -> JobRecord | None:
        """The record of a job answered as lost whose real result has not come yet."""
        return self._lost.get(job_id)

    def recover(self, job_id: str) -> JobRecord | None:
        """The real result of a job answered as lost has come: its record, only the first time."""
        return self._lost.pop(job_id, None)

    def may_answer(self, slot_id: int, round_: int) -> bool:
        """Whether a job of this slot's round may still bring an update (outstanding or lost)."""
        records = itertools.chain(self._outstanding.values(), self._lost.values())
        return any(r.slot_id == slot_id and r.round == round_ for r in records)

    def of_client(self, client_id: str) -> list[JobRecord]:
        return [r for r in self._outstanding.values() if r.client_id == client_id]

    def outstanding(self) -> list[JobRecord]:
        return list(self._outstanding.values())
