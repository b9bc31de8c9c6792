"""The one error type of `serialization`.

    PayloadError(ValueError)      bytes or a message that cannot be accepted

Every rejection carries a short machine `reason` (used as a counter label and in
`update_rejected` events) and a human `detail`.
"""

from __future__ import annotations


class PayloadError(ValueError):
    """Untrusted bytes or a message failed validation."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
