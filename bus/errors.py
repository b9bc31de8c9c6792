"""The error tree of `bus`.

    BusError                      anything the bus cannot do
    +-- RedisUnavailable          Redis cannot be reached (after retries)
    +-- RedisRefused              Redis turned us away; waiting will not help (never retried):
                                  reason "auth" (wrong user or password), "noperm" (the ACL
                                  denies a command or key), "tls" (certificate or handshake)
    +-- BlobMissing               a referenced blob is not (or no longer) stored
    |   +-- BlobSizeMismatch      it is stored with another length than claimed (not read)
    +-- EmbeddedRedisError        no redis-server binary, or it would not start
    +-- CredentialsError          a secret (password, key, token) is missing or unusable

redis-py's exceptions are mapped to these in one place (`bus.connection`).
"""

from __future__ import annotations


class BusError(Exception):
    """Base of every error raised by `bus`."""


class RedisUnavailable(BusError):
    """Redis could not be reached, even after reconnecting with backoff."""


class RedisRefused(BusError):
    """Redis refused us for a reason only a person can fix: login, ACL or TLS.

    `reason` is "auth", "noperm" or "tls"; the message says what to check. Entry
    points stop on it with that one line and `EXIT_REFUSED` instead of retrying.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# The exit status of a process that Redis refused (EX_CONFIG in sysexits.h): a service
# manager told not to restart on it (systemd's RestartPreventExitStatus) stops asking.
EXIT_REFUSED = 78


class BlobMissing(BusError):
    """A blob that a message references is not stored (expired, unlinked, never put)."""


class BlobSizeMismatch(BlobMissing):
    """A blob (or one of its chunks) is stored with another length than its reference
    claims; it was not read. A BlobMissing, so callers that only need the bytes treat
    it as absent."""


class EmbeddedRedisError(BusError):
    """The embedded redis-server could not be found or started."""


class CredentialsError(BusError):
    """A secret file or signing key is missing, unreadable or unusable."""
