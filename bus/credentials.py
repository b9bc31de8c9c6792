"""Secrets an entry point reads: Redis passwords, per-client signing keys, API tokens.

Secrets come from files or the environment, never from the command line (a
process's argv is visible to every user of the machine) and never go to a log.
Entry points read them once into frozen values whose repr hides them:

    secret_from(path, environ, value_env, file_env)   a password or token
    Keyring.from_dir(DIR, client_ids)                 per-client HMAC keys, DIR/CLIENT_ID.key

Precedence for one secret: an explicit file (a command-line option naming a
path), then ``*_FILE`` in the environment, then the value in the environment.
Files this module writes (generated keys, tokens) are created 0600 in place.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bus.connection import DEFAULT_OUTAGE_S
from bus.errors import CredentialsError

log = structlog.get_logger(__name__)

# Names of environment variables, not secrets (hence the S105 exceptions).
REDIS_USERNAME_ENV = "PWFL_REDIS_USERNAME"
REDIS_PASSWORD_ENV = "PWFL_REDIS_PASSWORD"  # noqa: S105
REDIS_PASSWORD_FILE_ENV = "PWFL_REDIS_PASSWORD_FILE"  # noqa: S105
CLIENT_KEYS_ENV = "PWFL_CLIENT_KEYS"
API_TOKEN_ENV = "PWFL_API_TOKEN"  # noqa: S105
API_TOKEN_FILE_ENV = "PWFL_API_TOKEN_FILE"  # noqa: S105
# What a child process must not inherit: it gets its own secrets as files.
SECRET_ENV = (REDIS_PASSWORD_ENV, REDIS_PASSWORD_FILE_ENV, CLIENT_KEYS_ENV, API_TOKEN_ENV,
              API_TOKEN_FILE_ENV)

KEY_SUFFIX = ".key"
MIN_KEY_BYTES = 16
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def read_secret(path: Path) -> str:
    """The file's text without surrounding whitespace; CredentialsError if unreadable or empty.

    A file that group or others may read is used, with a warning.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"cannot read secret file {path}: {exc}") from None
    if not text:
        raise CredentialsError(f"secret file {path} is empty")
    if mode & 0o077:
        log.warning("secret_file_permissive", path=str(path), mode=oct(mode))
    return text


def secret_from(path: Path | None, environ: Mapping[str, str], value_env: str,
                file_env: str) -> str | None:
    """One secret: from `path`, else the file named by `file_env`, else `value_env`; or None."""
    if path is not None:
        return read_secret(path)
    if environ.get(file_env):
        return read_secret(Path(environ[file_env]))
    return environ.get(value_env) or None


def write_secret(path: Path, text: str) -> None:
    """Create `path` with mode 0600 (never replacing a file) holding `text`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def private_dir(path: Path) -> Path:
    """Create `path` (and parents) with the last level 0700; return it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def key_file_name(client_id: str) -> str:
    """DIR/NAME of a client's key; CredentialsError for ids that cannot name a file."""
    if not _KEY_NAME.fullmatch(client_id) or ".." in client_id:
        raise CredentialsError(f"client id {client_id!r} cannot name a key file "
                               "(use letters, digits, '.', '_', '-')")
    return client_id + KEY_SUFFIX


def _key_bytes(text: str, where: str) -> bytes:
    key = text.encode()
    if len(key) < MIN_KEY_BYTES:
        raise CredentialsError(f"{where}: a signing key needs at least {MIN_KEY_BYTES} bytes "
                               "(make one with: openssl rand -hex 32)")
    return key


@dataclass(frozen=True)
class Keyring:
    """Per-client HMAC keys (client id -> key); its repr names the clients, never the keys."""

    keys: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"Keyring(clients={sorted(self.keys)})"

    def get(self, client_id: str) -> bytes | None:
        return self.keys.get(client_id)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_dir(cls, path: Path, client_ids: Iterable[str] | None = None) -> Keyring:
        """Keys from DIR/CLIENT_ID.key: those of `client_ids` (each required), or every file."""
        if not path.is_dir():
            raise CredentialsError(f"client key directory {path} does not exist")
        if client_ids is None:
            files = {p.name[: -len(KEY_SUFFIX)]: p for p in path.glob("*" + KEY_SUFFIX)}
        else:
            files = {c: path / key_file_name(c) for c in client_ids}
        return cls({c: _key_bytes(read_secret(p), str(p)) for c, p in sorted(files.items())})

    def with_generated(self, client_ids: Iterable[str]) -> Keyring:
        """This keyring plus a fresh random key for each of `client_ids` it lacks."""
        fresh = {c: secrets.token_hex(32).encode() for c in client_ids if c not in self.keys}
        return Keyring({**self.keys, **fresh})

    def subset(self, client_ids: Iterable[str]) -> Keyring:
        """Only these clients' keys (an agent gets its own clients' keys and no others)."""
        return Keyring({c: self.keys[c] for c in client_ids if c in self.keys})

    def write_dir(self, path: Path) -> Path:
        """Write DIR/CLIENT_ID.key files, 0600, in a 0700 directory; return DIR."""
        private_dir(path)
        for client_id, key in self.keys.items():
            write_secret(path / key_file_name(client_id), key.decode())
        return path


def add_redis_options(g: argparse._ArgumentGroup) -> None:
    """The Redis login and TLS options every PWFL command line shares."""
    g.add_argument("--redis-user", metavar="NAME",
                   help=f"Redis ACL user (default ${REDIS_USERNAME_ENV}; none: the default user)")
    g.add_argument("--redis-password-file", type=Path, metavar="FILE",
                   help="file holding the Redis password")
    g.add_argument("--redis-ca-file", metavar="FILE",
                   help="rediss://: CA certificate (PEM) that signed the server's certificate")
    g.add_argument("--redis-cert-file", metavar="FILE",
                   help="rediss://: client certificate, for servers that require one")
    g.add_argument("--redis-key-file", metavar="FILE", help="rediss://: its private key")
    g.add_argument("--redis-outage-s", type=float, metavar="SECONDS",
                   help="while Redis is unreachable, retry with backoff this long before "
                        f"giving up (default {DEFAULT_OUTAGE_S:g}; a coordinator that gives up "
                        "can be resumed)")


def redis_option_values(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, Any]:
    """What `add_redis_options` gave, as settings fields (None where not given); not the
    password, a secret each entry point reads once with `secret_from`."""
    return {"redis_username": args.redis_user or environ.get(REDIS_USERNAME_ENV) or None,
            "redis_ca_file": args.redis_ca_file, "redis_cert_file": args.redis_cert_file,
            "redis_key_file": args.redis_key_file, "redis_outage_s": args.redis_outage_s}
