"""Shared-memory segments of a killed owner are swept; nobody else's are touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from trainer_worker import shm

SHM = Path(shm.SHM_DIR)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_the_segments_of_dead_owners_only() -> None:
    dead = _dead_pid()
    orphan = shm.create(64, prefix=shm.owned_prefix("m", owner_pid=dead))
    mine = shm.create(64, prefix=shm.owned_prefix("m"))
    foreign = shm.create(64, prefix="other-app")  # not ours to judge
    try:
        removed = shm.sweep_orphans()
        assert orphan.name in removed
        assert not (SHM / orphan.name).exists()
        assert (SHM / mine.name).exists()
        assert (SHM / foreign.name).exists()
        assert mine.name not in removed
        assert foreign.name not in removed
    finally:
        for segment in (orphan, mine, foreign):
            shm.release(segment, unlink=True)


def test_names_carry_the_owner_pid() -> None:
    """The trainers' segments name the agent (their parent) as owner, not themselves."""
    assert shm.owned_prefix("t1", owner_pid=4242).startswith("pwfl-4242-")
    segment = shm.create(8, prefix=shm.owned_prefix("x"))
    try:
        assert shm._OWNED.match(segment.name)
    finally:
        shm.release(segment, unlink=True)
