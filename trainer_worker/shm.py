"""Shared-memory segments for handing state dicts between agent and trainers.

Python 3.11's `SharedMemory` registers every segment it creates *or attaches*
with the resource tracker, which then unlinks segments still in use and warns
at exit. PWFL manages lifetimes explicitly (the creator names the owner, the
owner unlinks), so these helpers take segments out of the tracker's hands.

An owner that is SIGKILLed unlinks nothing, and its segments would hold shared
memory until reboot. Every name therefore starts with ``pwfl-<owner pid>-``
(`owned_prefix`; the owner is the agent, also for the segments its trainers
create), and an agent starting up removes the segments of owners no longer alive
(`sweep_orphans`).
"""

from __future__ import annotations

import _posixshmem  # POSIX only, as PWFL's agents are
import contextlib
import os
import re
import secrets
from multiprocessing import resource_tracker, shared_memory

SHM_DIR = "/dev/shm"  # noqa: S108 - where Linux keeps POSIX shared memory
_OWNED = re.compile(r"^pwfl-(\d+)-")


def owned_prefix(tag: str, owner_pid: int | None = None) -> str:
    """A name prefix marking segments as owned by `owner_pid` (default: this process)."""
    return f"pwfl-{owner_pid if owner_pid is not None else os.getpid()}-{tag}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_orphans(directory: str = SHM_DIR) -> list[str]:
    """Remove the segments whose owning process has died; their names.

    Only names this module made (``pwfl-<pid>-``) are touched, and only when no
    process has that pid (a pid reused since keeps its segments: harmless, and
    swept once that process is gone too). Segments live per IPC namespace, as pids
    do per pid namespace: in a container both are the container's own.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed = []
    for name in names:
        match = _OWNED.match(name)
        if match and not _alive(int(match.group(1))):
            remove(name)
            removed.append(name)
    return removed


def _untrack(shm: shared_memory.SharedMemory) -> shared_memory.SharedMemory:
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


def create(nbytes: int, prefix: str = "pwfl") -> shared_memory.SharedMemory:
    """A new segment of at least `nbytes` (the caller owns it and must unlink it)."""
    name = f"{prefix}-{secrets.token_hex(8)}"
    size = max(nbytes, 1)
    shm = _untrack(shared_memory.SharedMemory(name=name, create=True, size=size))
    try:
        _reserve(shm, size)
    except OSError:
        release(shm, unlink=True)
        raise
    return shm


def _reserve(shm: shared_memory.SharedMemory, size: int) -> None:
    """Allocate the pages now: a full /dev/shm (Docker's default is 64 MB) then raises
    OSError(ENOSPC) here instead of killing the writer with SIGBUS later. Not slower:
    the copy that follows takes no page faults."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(shm._fd, 0, size)  # type: ignore[attr-defined]


def attach(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment by name (close it; its owner unlinks it)."""
    return _untrack(shared_memory.SharedMemory(name=name, create=False))


def release(shm: shared_memory.SharedMemory, *, unlink: bool = False) -> None:
    """Close this process's mapping and, for the owner, remove the segment."""
    # BufferError: a view over the buffer is still alive somewhere; the mapping
    # goes when the last view does (SharedMemory.__del__ closes it).
    with contextlib.suppress(BufferError):
        shm.close()
    if unlink:
        # Not `shm.unlink()`: it also unregisters the (already untracked) name, and
        # the tracker process then prints a KeyError traceback for every segment.
        remove(shm.name)


def remove(name: str) -> None:
    """Remove a segment by name; nothing happens if it is already gone."""
    with contextlib.suppress(FileNotFoundError):
        _posixshmem.shm_unlink(f"/{name}")


def buffer(shm: shared_memory.SharedMemory) -> memoryview:
    """The segment's bytes (typed: `SharedMemory.buf` is Optional in the stubs)."""
    if shm.buf is None:
        raise ValueError(f"shared memory segment {shm.name} is closed")
    return shm.buf
