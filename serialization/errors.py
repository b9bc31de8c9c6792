"""The error types of `serialization`.

    PayloadError(ValueError)      bytes or a message that cannot be accepted
    TaskError(Exception)          a task plugin that cannot be loaded or run
     +-- TaskNotAllowed           a task (or a task a task loads) off this process's allowlist

Every rejection carries a short machine `reason` (used as a counter label, in
`update_rejected` events and as the prefix of a failed job's error) and a human
`detail`.
"""

from __future__ import annotations


class PayloadError(ValueError):
    """Untrusted bytes or a message failed validation."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class TaskError(Exception):
    """A task could not be loaded (bad spec, import failure, not a task), or its data or
    options are unusable. Task plugins raise it for their own errors too."""

    reason = "task_error"


class TaskNotAllowed(TaskError):
    """A task spec that this process's allowlist does not name; nothing of it was imported."""

    reason = "task_not_allowed"
