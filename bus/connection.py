"""Connecting to Redis: one place for URLs, credentials, retries and error mapping.

`connect` builds a redis-py asyncio client whose connections retry
ConnectionError / TimeoutError with exponential backoff, so a command issued
while Redis restarts waits for it instead of failing. redis-py (>= 5) drops a
connection whose command was cancelled mid-flight (its `read_response`
disconnects on any BaseException), so a cancelled blocking XREADGROUP never
leaves its reply for the next caller; `tests/test_bus_connection.py` pins that.

But a cancellation can be lost: redis-py writes every command under
`asyncio.wait_for`, which on Python 3.11 returns normally (dropping the cancel) when
the task is cancelled just as the write completes. A loop that awaits Redis calls
`raise_if_cancelled` once per turn, so a lost cancel still ends it a turn later.

A client logs `redis_unreachable` when its first command fails for want of Redis
and `redis_reconnected` (with the outage's length) once one succeeds again: one
pair per outage, not one line per retried command.

redis-py's exceptions become ours here and nowhere else (`redis_errors`, and
`refused` for whatever reaches an entry point unmapped):

    redis.AuthenticationError, AuthorizationError  -> RedisRefused "auth"   (never retried)
    redis.NoPermissionError (NOPERM)               -> RedisRefused "noperm"
    a TLS failure (an ssl.SSLError behind a
      redis.ConnectionError: bad CA, wrong host
      name, no client certificate)                 -> RedisRefused "tls"    (never retried)
    redis.MaxConnectionsError                      -> BusError (never retried)
    redis.ConnectionError, redis.TimeoutError      -> RedisUnavailable (after the retries)
    any other redis.RedisError                     -> BusError

A refusal is permanent: retrying a wrong password or an ACL denial for the whole
outage budget would only make a misconfigured process look like a run that never
ends. Connection refused, resets and timeouts are transient and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import structlog
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from bus.errors import BusError, RedisRefused, RedisUnavailable

_RETRIED = (rex.ConnectionError, rex.TimeoutError)
# ConnectionError subclasses that waiting cannot fix: fail at once, as BusError.
_NOT_RETRIED = (rex.AuthenticationError, rex.AuthorizationError, rex.MaxConnectionsError)
# TLS errors that a restart or a dropped connection causes: not the configuration's fault.
_SSL_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError,
                  ssl.SSLWantReadError, ssl.SSLWantWriteError)
_REFUSED = {
    "auth": ("Redis refused the login", "Check --redis-user and the password "
             "(--redis-password-file, $PWFL_REDIS_PASSWORD_FILE or $PWFL_REDIS_PASSWORD)"),
    "noperm": ("Redis denied a command by its ACL", "The Redis user may not do this: check "
               "--redis-user, and that its ACL (python -m bus.acl) covers --clients"),
    "tls": ("TLS with Redis failed", "Check --redis-ca-file (the CA that signed the server's "
            "certificate), that the URL's host name is in the certificate, and "
            "--redis-cert-file/--redis-key-file if the server requires client certificates"),
}
T = TypeVar("T")
# A Redis restart loading a large AOF, or a managed failover, takes minutes, not seconds.
DEFAULT_OUTAGE_S = 300.0
log = structlog.get_logger("bus.connection")


class _Retry(Retry):
    """redis-py's Retry, except for bad credentials and a full pool (no use waiting),
    and logging an outage once at its start and once at its end (one per client)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._down_since: float | None = None
        self._failures = 0

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        def retryable(exc: Exception) -> bool:
            if isinstance(exc, _NOT_RETRIED) or refusal_reason(exc) is not None:
                return False
            return is_retryable is None or is_retryable(exc)

        async def noted(error: Exception, *count: int) -> None:
            self._failures += 1
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("redis_unreachable", error=str(error) or type(error).__name__)
            await fail(error, *count)

        result = await super().call_with_retry(do, noted, retryable, with_failure_count)
        if self._down_since is not None:
            log.warning("redis_reconnected", down_s=round(time.monotonic() - self._down_since, 3),
                     retries=self._failures)
            self._down_since, self._failures = None, 0
        return result


@dataclass(frozen=True)
class RedisSettings:
    """How to reach Redis. `url` is redis://, rediss:// or unix://."""

    url: str
    username: str | None = None
    # Read from a file or the environment by the entry point; never in a repr or a log.
    password: str | None = field(default=None, repr=False)
    socket_timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    # How long a command keeps retrying while Redis is unreachable (at least: connect
    # timeouts add to it) before RedisUnavailable; `retries` overrides it with a count.
    outage_s: float = DEFAULT_OUTAGE_S
    retries: int | None = None
    backoff_base_s: float = 0.05
    backoff_cap_s: float = 2.0
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


def retries_for(outage_s: float, base_s: float, cap_s: float) -> int:
    """How many retries with redis-py's ExponentialBackoff(cap, base) (the n-th sleeps
    min(cap, base * 2**n)) it takes for the sleeps to add up to `outage_s`."""
    retries, slept = 0, 0.0
    while slept < outage_s:
        retries += 1
        slept += min(cap_s, base_s * 2**retries)
    return retries


def _client_kwargs(settings: RedisSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        # RESP2 pinned: the reply shapes the bus parses do not then depend on
        # redis-py's RESP3 / legacy-shape defaults, and no HELLO is needed.
        "protocol": 2,
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "retry": _Retry(
            ExponentialBackoff(cap=settings.backoff_cap_s, base=settings.backoff_base_s),
            settings.retries if settings.retries is not None else retries_for(
                settings.outage_s, settings.backoff_base_s, settings.backoff_cap_s),
            supported_errors=_RETRIED,
        ),
        "retry_on_error": list(_RETRIED),
    }
    if settings.username is not None:
        kwargs["username"] = settings.username
    if settings.password is not None:
        kwargs["password"] = settings.password
    if urlsplit(settings.url).scheme == "rediss":
        kwargs |= _tls_kwargs(settings)
    return kwargs


def _tls_kwargs(settings: RedisSettings) -> dict[str, Any]:
    tls = {
        "ssl_ca_certs": settings.tls_ca_file,
        "ssl_certfile": settings.tls_cert_file,
        "ssl_keyfile": settings.tls_key_file,
    }
    return {k: v for k, v in tls.items() if v is not None}


def connect(settings: RedisSettings | str, *, max_connections: int | None = None) -> aioredis.Redis:
    """An asyncio client (bytes replies) that reconnects with exponential backoff.

    `max_connections` caps the pool (a command beyond it raises instead of opening one more).
    """
    if isinstance(settings, str):
        settings = RedisSettings(url=settings)
    kwargs = _client_kwargs(settings)
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    try:
        return aioredis.Redis.from_url(settings.url, **kwargs)
    except ValueError as exc:  # redis-py's URL parser
        raise BusError(f"bad Redis URL {settings.url!r}: {exc}") from exc


async def wait_ready(client: aioredis.Redis, timeout_s: float = 10.0) -> None:
    """Return once PING answers; raise RedisUnavailable after `timeout_s`."""
    errors: list[BaseException] = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if await _pinged(client, errors):
                    return
                await asyncio.sleep(0.05)
    except TimeoutError as exc:
        last = errors[-1] if errors else exc
        raise RedisUnavailable(f"Redis did not answer PING within {timeout_s} s: {last}") from last


async def _pinged(client: aioredis.Redis, errors: list[BaseException]) -> bool:
    """One PING: True if answered, False (error noted) if Redis is not there yet."""
    with redis_errors():
        try:
            return bool(await client.ping())
        except _RETRIED as exc:  # BusyLoadingError (Redis loading its AOF) is one too
            if isinstance(exc, _NOT_RETRIED) or refusal_reason(exc) is not None:
                raise
            errors.append(exc)
            return False


def raise_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop and the request got lost.

    Measured: cancelling a task that loops on SETs lost about half the cancels, and
    a lost one left a task group (the coordinator's services, an agent's heartbeat)
    waiting for that task forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def as_bytes(value: bytes | str) -> bytes:
    """A reply as bytes: our clients decode nothing, but redis-py's types allow str."""
    return value if isinstance(value, bytes) else value.encode()


def as_text(value: bytes | str) -> str:
    """A reply (id, name) as str."""
    return value.decode() if isinstance(value, bytes) else value


def refusal_reason(exc: BaseException) -> str | None:
    """"auth", "noperm" or "tls" when `exc`, or an exception it was raised from or while
    handling, is a refusal that waiting cannot fix; None for anything else."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RedisRefused):
            return current.reason
        if isinstance(current, rex.AuthenticationError | rex.AuthorizationError):
            return "auth"
        if isinstance(current, rex.NoPermissionError):
            return "noperm"
        if isinstance(current, ssl.SSLError) and not isinstance(current, _SSL_TRANSIENT):
            return "tls"
        current = current.__cause__ or current.__context__
    return None


def refused(exc: BaseException) -> RedisRefused | None:
    """The refusal that `exc` is or holds (mapped or still redis-py's, maybe inside an
    exception group), for an entry point to stop on; None if it holds none."""
    if isinstance(exc, BaseExceptionGroup):
        return next((r for r in map(refused, exc.exceptions) if r is not None), None)
    if isinstance(exc, RedisRefused):
        return exc
    reason = refusal_reason(exc)
    return None if reason is None else _refusal(reason, exc)


def _refusal(reason: str, exc: BaseException) -> RedisRefused:
    what, check = _REFUSED[reason]
    detail = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    return RedisRefused(f"{what}: {detail}. {check}.", reason)


def bus_error(exc: rex.RedisError) -> BusError:
    """The bus's exception for one of redis-py's (see the module docstring)."""
    reason = refusal_reason(exc)
    if reason is not None:
        return _refusal(reason, exc)
    if isinstance(exc, _RETRIED) and not isinstance(exc, _NOT_RETRIED):
        return RedisUnavailable(str(exc))
    return BusError(str(exc))


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Re-raise redis-py's exceptions as the bus's (see the module docstring)."""
    try:
        yield
    except rex.RedisError as exc:
        raise bus_error(exc) from exc
