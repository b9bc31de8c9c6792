"""The Redis Streams bus: connection, key names, streams, blobs, registry, embedded server.

Uses `serialization`; nothing else of ours.
"""

from bus.blobs import BlobRef, BlobStore, digest_of
from bus.connection import RedisSettings, connect, raise_if_cancelled, redis_errors, wait_ready
from bus.embedded import EmbeddedRedis, find_redis_server
from bus.errors import BlobMissing, BusError, EmbeddedRedisError, RedisRefused, RedisUnavailable
from bus.keys import Keys
from bus.registry import Registry, get_active_run, set_active_run
from bus.streams import Entry, ack, consume, ensure_group, publish, publish_many, reclaim, trim

__all__ = [
    "BlobMissing",
    "BlobRef",
    "BlobStore",
    "BusError",
    "EmbeddedRedis",
    "EmbeddedRedisError",
    "Entry",
    "Keys",
    "RedisRefused",
    "RedisSettings",
    "RedisUnavailable",
    "Registry",
    "ack",
    "connect",
    "consume",
    "digest_of",
    "ensure_group",
    "find_redis_server",
    "get_active_run",
    "publish",
    "publish_many",
    "raise_if_cancelled",
    "reclaim",
    "redis_errors",
    "set_active_run",
    "trim",
    "wait_ready",
]
