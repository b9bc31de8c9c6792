"""Refusals that waiting cannot fix (wrong password, ACL NOPERM, TLS) stop agent and
coordinator at once with one clear line and EXIT_REFUSED; transient errors are retried."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis import exceptions as rex

from bus.connection import RedisSettings, bus_error, connect, refused, wait_ready
from bus.credentials import write_secret
from bus.embedded import EmbeddedRedis
from bus.errors import EXIT_REFUSED, BusError, RedisRefused, RedisUnavailable
from tests.conftest import RedisFactory
from tests.e2e import ROOT
from tests.security import account, make_tls, write_acl

PASSWORD = "the-right-password"


def _raised_while(cause: BaseException, exc: rex.RedisError) -> rex.RedisError:
    """`exc` as redis-py raises it inside `except OSError`: with `cause` as its context."""
    try:
        try:
            raise cause
        except OSError:
            raise exc from None
    except rex.RedisError as raised:
        raised.__context__ = cause
        return raised

@pytest.mark.parametrize(("raised", "reason"), [
    (rex.AuthenticationError("WRONGPASS invalid username-password pair"), "auth"),
    (rex.AuthenticationError("Authentication required."), "auth"),
    (rex.NoPermissionError("NOPERM User silo-a has no permissions to access a key"), "noperm"),
    (_raised_while(ssl.SSLCertVerificationError(1, "certificate verify failed"),
                   rex.ConnectionError("Error 1 connecting")), "tls"),
])
def test_permanent_errors_map_to_a_refusal(raised: rex.RedisError, reason: str) -> None:
    """Login, ACL and certificate failures become RedisRefused with the reason and a hint."""
    error = bus_error(raised)
    assert isinstance(error, RedisRefused)
    assert error.reason == reason
    assert "Check" in str(error) or "check" in str(error)

@pytest.mark.parametrize("raised", [
    rex.ConnectionError("Error 111 connecting. Connection refused."),
    rex.TimeoutError("Timeout reading from socket"),
    _raised_while(ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
                  rex.ConnectionError("Error 8 connecting")),
])
def test_transient_errors_stay_retryable(raised: rex.RedisError) -> None:
    """Refused connections, timeouts and a TLS stream cut short are an outage, not a refusal."""
    assert type(bus_error(raised)) is RedisUnavailable
    assert refused(raised) is None

def test_a_refusal_is_found_inside_an_exception_group() -> None:
    """An entry point finds the refusal a task group raised, mapped or still redis-py's."""
    group = ExceptionGroup("tasks", [ValueError("x"), rex.NoPermissionError("NOPERM no")])
    found = refused(group)
    assert found is not None
    assert found.reason == "noperm"
    assert refused(ExceptionGroup("tasks", [ValueError("x")])) is None

async def test_a_server_signed_by_another_ca_is_refused_at_once(
        redis_factory: RedisFactory, tmp_path: Path) -> None:
    """With the default outage budget, a certificate that does not verify is not retried."""
    server = redis_factory(tls=make_tls(tmp_path / "tls"))
    other = make_tls(tmp_path / "other")
    client = connect(RedisSettings(server.url, tls_ca_file=str(other.ca_file)))
    started = time.monotonic()
    try:
        with pytest.raises(RedisRefused, match="certificate verify failed") as info:
            await wait_ready(client, timeout_s=30)
    finally:
        await client.aclose()
    assert info.value.reason == "tls"
    assert time.monotonic() - started < 5

def _entry_point(argv: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=folder, capture_output=True,
                          text=True, timeout=90, check=False,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})

@pytest.fixture
def password_server(redis_factory: RedisFactory) -> EmbeddedRedis:
    """A real redis-server with requirepass."""
    return redis_factory(password=PASSWORD, extra_args=["--requirepass", PASSWORD])

@pytest.mark.slow
@pytest.mark.parametrize("program", ["client_agent", "coordinator"])
def test_a_wrong_password_stops_agent_and_coordinator_with_one_clear_line(
        password_server: EmbeddedRedis, tmp_path: Path, program: str) -> None:
    """Started with a wrong password, each exits EXIT_REFUSED within seconds, saying so."""
    wrong = tmp_path / "wrong.pw"
    write_secret(wrong, "not-the-password")
    args = {"client_agent": ["--clients", "0"],
            "coordinator": ["--task", "synthetic", "--clients", "1", "--slots", "1",
                            "--no-progress", "--http-port", "0", "--runs-dir", str(tmp_path)]}
    started = time.monotonic()
    done = _entry_point([program, "--redis", password_server.url, "--redis-password-file",
                         str(wrong), *args[program]], tmp_path)
    elapsed = time.monotonic() - started
    assert done.returncode == EXIT_REFUSED, done.stderr[-2000:]
    [line] = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: Redis refused the login: invalid username-password pair")
    assert "--redis-password-file" in line
    assert "Traceback" not in done.stderr
    assert elapsed < 60  # seconds of interpreter start-up, not a 300 s outage budget

@pytest.mark.slow
def test_an_agent_its_acl_does_not_cover_stops_on_noperm(redis_factory: RedisFactory,
                                                           tmp_path: Path) -> None:
    """An agent user for client 0 serving client 1 is denied by the ACL: it stops (NOPERM)."""
    admin, silo = account(tmp_path, "admin"), account(tmp_path, "silo")
    server = redis_factory(aclfile=write_acl(tmp_path, admin=admin, agents=((silo, ["0"]),)),
                           username=admin.name, password=admin.password)
    done = _entry_point(["client_agent", "--redis", server.url, "--redis-user", silo.name,
                         "--redis-password-file", str(silo.password_file), "--clients", "1",
                         "--run-id", "r1"], tmp_path)
    assert done.returncode == EXIT_REFUSED, done.stderr[-2000:]
    [line] = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: Redis denied a command by its ACL: ")
    assert "NOPERM" in line or "no permissions" in line

def test_redis_refused_is_a_bus_error() -> None:
    """Callers that handle BusError handle a refusal too."""
    assert issubclass(RedisRefused, BusError)
    assert not issubclass(RedisRefused, RedisUnavailable)
