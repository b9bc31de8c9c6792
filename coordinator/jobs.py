"""Which jobs are out, for which slot, round and client; and which were answered.

A job id is aggregated at most once: `answer` says whether this is the first
answer, whatever redelivery happens.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

_ANSWERED_MEMORY = 200_000


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

    def add(self, record: JobRecord) -> None:
        self._outstanding[record.job_id] = record

    def get(self, job_id: str) -> JobRecord | None:
        return self._outstanding.get(job_id)

    def was_answered(self, job_id: str) -> bool:
        return job_id in self._answered

    def answer(self, job_id: str) -> JobRecord | None:
        """Mark answered; the record on the first answer, None if unknown or answered before."""
        record = self._outstanding.pop(job_id, None)
        if record is None:
            return None
        self._answered[job_id] = record
        if len(self._answered) > _ANSWERED_MEMORY:
            self._answered.popitem(last=False)
        return record

    def of_client(self, client_id: str) -> list[JobRecord]:
        return [r for r in self._outstanding.values() if r.client_id == client_id]

    def outstanding(self) -> list[JobRecord]:
        return list(self._outstanding.values())
