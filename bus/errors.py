"""The error tree of `bus`.

    BusError                      anything the bus cannot do
    +-- RedisUnavailable          Redis cannot be reached (after retries)
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
