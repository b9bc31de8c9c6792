"""Redis ACL users for PWFL: the coordinator's, the agents', an administrator's.

Each role gets only the commands its code issues and only the keys of one
namespace (`bus.keys`), with read (``%R~``) and write (``%W~``) kept apart where
the role needs only one of them:

    coordinator  every key of the namespace; the stream, string and hash commands it uses
    agent        reads the active-run pointer, run state and blobs; writes blobs, result
                 and registration entries and the clients hash; for its own clients only,
                 reads and acks the job streams and sets the heartbeat keys
    admin        everything (operators, the embedded server's own PING / SHUTDOWN)
    default      switched off: a connection must log in

So an agent cannot read another client's jobs, write a run's state or the
active-run pointer, read the results streams (update digests stay unknown to
other silos), list keys, or run FLUSHALL / CONFIG / KEYS / DEBUG / SHUTDOWN. It
can still write to any slot's results stream; per-client signatures
(`serialization.signing`) stop it from answering for another client. Key
patterns match any run id, so long-lived agents follow new runs unchanged.

`acl_file` writes a file for ``redis-server --aclfile`` (passwords as sha256
hashes, so the file holds no password); `setuser_commands` gives the same
users as ``ACL SETUSER`` commands for a running server. From the shell:

    python -m bus.acl --coordinator coordinator secrets/coordinator.pw \\
        --agent silo-a secrets/silo-a.pw 0,1,2 --agent silo-b secrets/silo-b.pw 3,4,5 \\
        --admin admin secrets/admin.pw --out users.acl
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bus.credentials import read_secret, write_secret
from bus.errors import CredentialsError
from bus.keys import DEFAULT_NAMESPACE

# Connection housekeeping (PING, HELLO, CLIENT SETNAME/SETINFO, ...) without CLIENT
# KILL / LIST / PAUSE and the like, which are @admin or @dangerous.
_CONNECTION = ("+@connection", "-@admin", "-@dangerous")
_TRANSACTIONS = ("multi", "exec", "discard")
_STREAM_CONSUMER = ("xreadgroup", "xack", "xautoclaim", "xpending", "xgroup|create")
# Blobs are read as STRLEN + GETRANGE (bounded by their claimed size: `bus.blobs`).
AGENT_COMMANDS = ("get", "strlen", "getrange", "set", "pexpire", "hget", "hset", "unlink", "xadd",
                  *_STREAM_CONSUMER, *_TRANSACTIONS)
COORDINATOR_COMMANDS = (*AGENT_COMMANDS, "hgetall", "mget", "xinfo|groups",
                        "xtrim")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def glob_escape(text: str) -> str:
    """`text` matched literally inside a Redis key pattern."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def _checked_name(text: str, what: str) -> str:
    if not _NAME.fullmatch(text):
        raise CredentialsError(f"{what} {text!r}: use letters, digits, '.', '_', '@', '-'")
    return text


def _commands(names: Sequence[str]) -> list[str]:
    return ["-@all", *_CONNECTION, *(f"+{n}" for n in names)]


def coordinator_rules(namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """Permissions of the coordinator: its commands on every key of the namespace."""
    ns = glob_escape(_checked_name(namespace, "namespace"))
    return ["resetkeys", "resetchannels", f"~{ns}:*", *_commands(COORDINATOR_COMMANDS)]


def agent_rules(client_ids: Sequence[str] | None,
                namespace: str = DEFAULT_NAMESPACE) -> list[str]:
    """Permissions of an agent hosting `client_ids` (None: any client, a shared agents' user)."""
    ns = glob_escape(_checked_name(namespace, "namespace"))
    clients = ["*"] if client_ids is None else [
        glob_escape(_checked_name(c, "client id")) for c in client_ids]
    keys = [f"%R~{ns}:active_run", f"%R~{ns}:*:state", f"~{ns}:*:blob:*",
            f"%W~{ns}:*:results:*", f"%W~{ns}:*:registrations", f"%W~{ns}:*:clients"]
    for c in clients:
        keys += [f"~{ns}:*:jobs:{c}", f"%W~{ns}:*:jobs:{c}:dead", f"%W~{ns}:*:alive:{c}"]
    return ["resetkeys", "resetchannels", *keys, *_commands(AGENT_COMMANDS)]


def admin_rules() -> list[str]:
    return ["~*", "&*", "+@all"]


@dataclass(frozen=True)
class AclUser:
    """One Redis user: its name, its password (never printed) and its permission rules."""

    name: str
    password: str = field(repr=False)
    rules: tuple[str, ...]

    def tokens(self) -> list[str]:
        """The user's full rule list, starting from nothing; the password as its sha256."""
        digest = hashlib.sha256(self.password.encode()).hexdigest()
        return ["reset", "on", f"#{digest}", *self.rules]


def users(*, coordinator: tuple[str, str] | None = None,
          agents: Sequence[tuple[str, str, Sequence[str] | None]] = (),
          admin: tuple[str, str] | None = None,
          namespace: str = DEFAULT_NAMESPACE) -> list[AclUser]:
    """The users of a deployment: (name, password) pairs; agents also list their clients."""
    out = []
    if admin is not None:
        out.append(AclUser(_checked_name(admin[0], "user"), admin[1], tuple(admin_rules())))
    if coordinator is not None:
        out.append(AclUser(_checked_name(coordinator[0], "user"), coordinator[1],
                           tuple(coordinator_rules(namespace))))
    for name, password, clients in agents:
        out.append(AclUser(_checked_name(name, "user"), password,
                           tuple(agent_rules(clients, namespace))))
    return out


def acl_file(acl_users: Sequence[AclUser]) -> str:
    """An ``--aclfile`` for redis-server: the default user off, then one line per user."""
    lines = ["user default reset off"]
    lines += ["user " + " ".join([u.name, *u.tokens()]) for u in acl_users]
    return "\n".join(lines) + "\n"


def setuser_commands(acl_users: Sequence[AclUser]) -> list[list[str]]:
    """The same users as ``ACL SETUSER`` argument lists, for a running server."""
    return [["ACL", "SETUSER", u.name, *u.tokens()] for u in acl_users]


# --- command line -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bus.acl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--coordinator", nargs=2, metavar=("USER", "PASSWORD_FILE"))
    p.add_argument("--agent", nargs=3, action="append", default=[],
                   metavar=("USER", "PASSWORD_FILE", "CLIENTS"),
                   help="an agents' user; CLIENTS is 0,1,2 or '*' for any client (repeatable)")
    p.add_argument("--admin", nargs=2, metavar=("USER", "PASSWORD_FILE"))
    p.add_argument("--out", type=Path, help="write a new file (mode 0600) instead of stdout")
    return p


def _pair(option: list[str] | None) -> tuple[str, str] | None:
    return None if option is None else (option[0], read_secret(Path(option[1])))


def _clients(text: str) -> list[str] | None:
    return None if text.strip() == "*" else [c.strip() for c in text.split(",") if c.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        agents = [(n, read_secret(Path(f)), _clients(c)) for n, f, c in args.agent]
        text = acl_file(users(coordinator=_pair(args.coordinator), agents=agents,
                              admin=_pair(args.admin), namespace=args.namespace))
    except CredentialsError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201 - a command-line tool
        return 2
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_secret(args.out, text.rstrip("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
