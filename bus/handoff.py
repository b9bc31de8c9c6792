"""Local handoff: models and updates through shared memory between processes of one host.

An agent on the coordinator's host need not move megabytes through Redis: the
coordinator writes each round's model into a shared-memory segment as well as
the Redis blob, and a local agent copies it from there into its model cache; a
local agent hands its trainer's update segment over to the coordinator (a
rename, no copy) and its result names that segment instead of a blob. Everyone
else (agents on other hosts, or with `--no-local-handoff`) uses Redis exactly as
before.

Same host is proven, not assumed. The coordinator writes 32 random bytes into
a token segment (mode 0600) and advertises its name and sha256 in every job; an
agent that can read that segment and finds the same digest shares the
coordinator's /dev/shm (the same host, or a container sharing its IPC
namespace) and runs as its user. A remote agent finds no such segment (the name
is random) and goes on through Redis.

Names and owners. Every segment here is named ``pwfl-<coordinator pid>-...``
(as `trainer_worker.shm` names its own), so a coordinator that is SIGKILLed
leaves only names that the next coordinator or agent on the host removes
(`sweep_orphans`); a running coordinator unlinks everything of its prefix when
it stops (`HostHandoff.close`). An update segment renamed into the coordinator's
prefix belongs to the coordinator from then on: it unlinks it once the result is
handled (folded, rejected, late or dropped), and an agent that dies after the
rename leaves nothing for its successor to clean.

What the coordinator reads is bounded and checked like a Redis blob: only
names of its own update prefix (a result cannot make it open or unlink any
other file), exactly the claimed size (`BlobSizeMismatch` otherwise, unread), a
missing segment is `BlobMissing`. It maps the bytes read-only instead of copying
them (a 45 MB copy costs more than its hash here) and unlinks the name at once:
after the rename the agent and its trainer have closed the segment, so from then
on no process can open it; one of the same user that opened it in that moment
could still write it, as such a process could write the coordinator's own files.
The sha256 against the claimed digest, the decode checks and the finite checks
all run on the mapped bytes, as on a fetched blob.
Linux only (the whole shared-memory design is); elsewhere the handoff is off.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass

from bus.errors import BlobMissing, BlobSizeMismatch

SHM_DIR = "/dev/shm"  # noqa: S108 - where Linux keeps POSIX shared memory
TOKEN_BYTES = 32
_TOKEN_NAME = re.compile(r"^pwfl-(\d+)-h[0-9a-f]{32}$")
_OWNED = re.compile(r"^pwfl-(\d+)-")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page now: no fault per page later
# Model segments kept for stragglers beyond the live ones; older ones fall back to Redis.
SPARE_MODELS = 4


@dataclass(frozen=True)
class Advert:
    """What a job carries so an agent can tell it shares the coordinator's host."""

    name: str  # the token segment
    digest: str  # sha256 hex of the token's bytes


def available(directory: str = SHM_DIR) -> bool:
    """Whether this host has a writable POSIX shared-memory directory."""
    return os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(directory: str = SHM_DIR) -> list[str]:
    """Remove ``pwfl-<pid>-`` segments whose owner process has died; their names."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _OWNED.match(name)
        if match and not pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
                removed.append(name)
    return removed


def _write_new(path: str, data: bytes | bytearray | memoryview) -> None:
    """Create `path` (0600, must not exist) holding `data`."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data).cast("B")
        written = 0
        while written < view.nbytes:
            written += os.write(fd, view[written:])
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)


def _read_exact(path: str, nbytes: int, what: str) -> bytearray:
    """Exactly `nbytes` from the regular file `path`; BlobMissing / BlobSizeMismatch."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise BlobMissing(f"{what}: segment {os.path.basename(path)} cannot be opened "
                          f"({type(exc).__name__})") from None
    try:
        return _read_fd(fd, nbytes, what)
    finally:
        os.close(fd)


def _read_fd(fd: int, nbytes: int, what: str, out: memoryview | None = None) -> bytearray:
    """Exactly `nbytes` of a regular file, into `out` when given (else a new bytearray)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise BlobMissing(f"{what}: not a regular segment")
    if info.st_size != nbytes:
        raise BlobSizeMismatch(f"{what}: segment holds {info.st_size} bytes, not {nbytes}")
    owned = bytearray(nbytes) if out is None else bytearray()
    view = memoryview(owned) if out is None else out
    got = 0
    while got < nbytes:
        n = os.readv(fd, [view[got:nbytes]])
        if n == 0:
            raise BlobSizeMismatch(f"{what}: segment ended after {got} of {nbytes} bytes")
        got += n
    return owned


class HostHandoff:
    """The coordinator's side: the token, the round models, the updates handed over."""

    def __init__(self, directory: str = SHM_DIR, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self.prefix = f"pwfl-{self.pid}-"
        self._update = re.compile(rf"^pwfl-{self.pid}-u[0-9a-f]{{32}}$")
        token = secrets.token_bytes(TOKEN_BYTES)
        name = f"{self.prefix}h{secrets.token_hex(16)}"
        _write_new(self._path(name), token)
        self.advert = Advert(name, hashlib.sha256(token).hexdigest())
        self._models: OrderedDict[str, str] = OrderedDict()  # digest -> segment name
        self._lock = threading.Lock()  # models are written from worker threads

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    # --- models ---------------------------------------------------------------------------

    def write_model(self, digest: str, payload: bytes | bytearray | memoryview,
                    live: set[str] | frozenset[str] = frozenset()) -> str:
        """Blocking: the segment holding the model `digest` (written once); older models
        beyond the `live` ones and SPARE_MODELS are unlinked."""
        with self._lock:
            name = self._models.get(digest)
            if name is not None:
                self._models.move_to_end(digest)
                return name
        name = f"{self.prefix}m{secrets.token_hex(16)}"
        _write_new(self._path(name), payload)
        with self._lock:
            self._models[digest] = name
            spare = [d for d in self._models if d not in live and d != digest]
            stale = spare[: max(0, len(spare) - SPARE_MODELS)]
            names = [self._models.pop(d) for d in stale]
        for old in names:
            self._remove(old)
        return name

    def model_segment(self, digest: str) -> str | None:
        with self._lock:
            return self._models.get(digest)

    def drop_model(self, digest: str) -> None:
        """Unlink the model's segment (an agent that still needs it falls back to Redis)."""
        with self._lock:
            name = self._models.pop(digest, None)
        if name is not None:
            self._remove(name)

    # --- updates --------------------------------------------------------------------------

    def owns_update(self, name: str) -> bool:
        """Whether `name` is an update segment handed over to this coordinator."""
        return bool(self._update.match(name))

    def take_update(self, name: str, nbytes: int) -> memoryview:
        """Blocking: the update's `nbytes` bytes, mapped read-only (no copy), and its name
        unlinked, so no process can open it any more; the memory goes with the last view.
        BlobMissing / BlobSizeMismatch as for a Redis blob (the segment then stays until
        `discard_update`)."""
        what = f"update segment {name[:80]!r}"
        if not self.owns_update(name):
            raise BlobMissing(f"{what} is not one handed over to this coordinator")
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise BlobMissing(f"{what} cannot be opened ({type(exc).__name__})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BlobMissing(f"{what}: not a regular segment")
            if info.st_size != nbytes:
                raise BlobSizeMismatch(f"{what} holds {info.st_size} bytes, not {nbytes}")
            mapped = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _POPULATE,
                               prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._remove(name)
        return memoryview(mapped)

    def discard_update(self, name: str) -> None:
        """Unlink a handled update's segment (names of other owners are left alone)."""
        if self.owns_update(name):
            self._remove(name)

    # --- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Unlink every segment of this coordinator: token, models, updates left over."""
        with self._lock:
            self._models.clear()
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.startswith(self.prefix):
                self._remove(name)

    def _remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))


class AgentHandoff:
    """An agent's side: is this job's coordinator local, copy its model, hand over updates."""

    def __init__(self, *, enabled: bool = True, directory: str = SHM_DIR) -> None:
        self.enabled = enabled and available(directory)
        self.directory = directory
        self._checked: dict[tuple[str, str], int | None] = {}

    def coordinator_pid(self, advert: Advert) -> int | None:
        """The pid of the coordinator advertising `advert` when it shares this host (its
        token segment is here, readable, with the advertised digest); else None. Blocking
        (a small read), cached per advert."""
        if not self.enabled or not advert.name:
            return None
        key = (advert.name, advert.digest)
        if key not in self._checked:
            self._checked[key] = self._check(advert)
        return self._checked[key]

    def _check(self, advert: Advert) -> int | None:
        match = _TOKEN_NAME.match(advert.name)
        if match is None:
            return None
        try:
            token = _read_exact(os.path.join(self.directory, advert.name), TOKEN_BYTES, "token")
        except BlobMissing:
            return None
        if not secrets.compare_digest(hashlib.sha256(token).hexdigest(), advert.digest):
            return None
        return int(match.group(1))

    def model_path(self, pid: int, name: str) -> str | None:
        """The path of the coordinator's model segment `name` (None: not one of its names)."""
        if not re.fullmatch(rf"pwfl-{pid}-m[0-9a-f]{{32}}", name):
            return None
        return os.path.join(self.directory, name)

    def hand_over(self, segment: str, pid: int) -> str:
        """Blocking: rename our update segment into the coordinator's update prefix; the
        new name (the coordinator owns and unlinks it from now on). OSError if it fails."""
        name = f"pwfl-{pid}-u{secrets.token_hex(16)}"
        os.rename(os.path.join(self.directory, segment), os.path.join(self.directory, name))
        return name


def read_into(path: str, out: memoryview, nbytes: int, what: str) -> None:
    """Blocking: copy exactly `nbytes` from the segment at `path` into `out`;
    BlobMissing / BlobSizeMismatch as for a Redis blob."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise BlobMissing(f"{what}: segment cannot be opened ({type(exc).__name__})") from None
    try:
        _read_fd(fd, nbytes, what, out)
    finally:
        os.close(fd)
