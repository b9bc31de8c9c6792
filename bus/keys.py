"""Every Redis key and stream name PWFL uses, built here and nowhere else.

Run-scoped names live under ``{namespace}:{run_id}:``; the only global name is
the pointer to the active run, which long-lived agents follow.
"""

from __future__ import annotations

from dataclasses import dataclass

JOBS_GROUP = "agents"
RESULTS_GROUP = "coordinator"
REGISTRATIONS_GROUP = "coordinator"
DEFAULT_NAMESPACE = "pwfl"


@dataclass(frozen=True)
class Keys:
    """Key names of one run."""

    run_id: str
    namespace: str = DEFAULT_NAMESPACE

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:{self.run_id}"

    @staticmethod
    def active_run(namespace: str = DEFAULT_NAMESPACE) -> str:
        """String key holding the id of the run agents should serve."""
        return f"{namespace}:active_run"

    def jobs(self, client_id: str) -> str:
        """Stream of jobs for one client (group JOBS_GROUP)."""
        return f"{self.prefix}:jobs:{client_id}"

    def results(self, slot_id: int) -> str:
        """Stream of results for one slot (group RESULTS_GROUP)."""
        return f"{self.prefix}:results:{slot_id}"

    def gradient_down(self, slot_id: int) -> str:
        """Gradient mode: the slot's current weights, one entry per step (all agents read)."""
        return f"{self.prefix}:gradient:{slot_id}:down"

    def gradient_up(self, slot_id: int) -> str:
        """Gradient mode: one entry per client per step carrying its batch's gradient."""
        return f"{self.prefix}:gradient:{slot_id}:up"

    def registrations(self) -> str:
        """Stream of agent registrations (group REGISTRATIONS_GROUP)."""
        return f"{self.prefix}:registrations"

    def dead_letter(self, stream: str) -> str:
        """Where poison entries of `stream` go after too many deliveries."""
        return f"{stream}:dead"

    def blob(self, digest: str) -> str:
        """A content-addressed blob (or, when chunked, its first chunk's base name)."""
        return f"{self.prefix}:blob:{digest}"

    def blob_chunk(self, digest: str, index: int) -> str:
        return f"{self.prefix}:blob:{digest}:{index}"

    def clients(self) -> str:
        """Hash client_id -> msgpack Registration of the agent hosting it."""
        return f"{self.prefix}:clients"

    def alive(self, client_id: str) -> str:
        """Heartbeat key of a client; it expires when its agent stops beating."""
        return f"{self.prefix}:alive:{client_id}"

    def state(self) -> str:
        """Hash with the coordinator's resumable state (status, per-slot rounds)."""
        return f"{self.prefix}:state"

    def pattern(self) -> str:
        """SCAN pattern matching every key of this run."""
        return f"{self.prefix}:*"
