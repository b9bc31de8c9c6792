"""rediss:// against a real TLS-only redis-server, with a CA the test makes with openssl."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from bus.connection import RedisSettings, connect, wait_ready
from bus.embedded import ServerTls
from bus.errors import RedisRefused
from tests.conftest import RedisFactory
from tests.security import make_tls


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> ServerTls:
    """A test CA and a server certificate for 127.0.0.1 signed by it."""
    return make_tls(tmp_path_factory.mktemp("tls"))


async def test_rediss_with_the_ca_file_connects(redis_factory: RedisFactory,
                                                tls: ServerTls) -> None:
    """bus.connect speaks TLS to a TLS-only server when given the CA that signed it."""
    server = redis_factory(tls=tls)
    assert server.url.startswith("rediss://127.0.0.1:")
    client = connect(RedisSettings(server.url, tls_ca_file=str(tls.ca_file)))
    try:
        await wait_ready(client, timeout_s=5)
        await client.set("k", b"v")
        assert await client.get("k") == b"v"
    finally:
        await client.aclose()


def test_the_tls_port_refuses_plain_connections(redis_factory: RedisFactory,
                                                tls: ServerTls) -> None:
    """Nothing listens in clear text: a redis:// client to the same port gets no answer."""
    server = redis_factory(tls=tls)
    plain = server.url.replace("rediss://", "redis://")
    with (redis.Redis.from_url(plain, socket_timeout=2, socket_connect_timeout=2) as client,
          pytest.raises(redis.ConnectionError)):
        client.ping()


async def test_a_server_signed_by_another_ca_is_not_trusted(redis_factory: RedisFactory,
                                                           tls: ServerTls,
                                                           tmp_path: Path) -> None:
    """Certificate verification is on: a client trusting another CA never gets through, and
    is refused at once (RedisRefused "tls"), not retried as an outage."""
    server = redis_factory(tls=tls)
    other = make_tls(tmp_path / "other")
    client = connect(RedisSettings(server.url, tls_ca_file=str(other.ca_file), retries=0))
    try:
        with pytest.raises(RedisRefused, match="certificate verify failed"):
            await wait_ready(client, timeout_s=2)
    finally:
        await client.aclose()


async def test_mutual_tls_needs_a_client_certificate(redis_factory: RedisFactory,
                                                     tmp_path: Path) -> None:
    """With client certificates required, only a client presenting one signed by the CA gets in
    (one without is refused at once)."""
    mutual = make_tls(tmp_path / "mutual", require_client_cert=True)
    server = redis_factory(tls=mutual)
    anonymous = connect(RedisSettings(server.url, tls_ca_file=str(mutual.ca_file), retries=0))
    known = connect(RedisSettings(server.url, tls_ca_file=str(mutual.ca_file),
                                  tls_cert_file=str(mutual.cert_file),
                                  tls_key_file=str(mutual.key_file)))
    try:
        with pytest.raises(RedisRefused, match="certificate required"):
            await wait_ready(anonymous, timeout_s=2)
        await wait_ready(known, timeout_s=5)
    finally:
        await anonymous.aclose()
        await known.aclose()
