"""Checkpoints of a run: each slot's model after each round, and the coordinator's state.

Models are stored in PWFL's own wire format (the very bytes published to the
clients, so nothing is encoded twice); the state is JSON. Every write goes to a
temporary file that is fsynced and renamed, so a crash never leaves half a file.
Only the newest `keep` model checkpoints of a slot are kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointStore:
    """Files under `run_dir`: state.json and checkpoints/slot{N}/round{R}.pwfl."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.run_dir = run_dir
        self.keep = max(1, keep)

    def model_path(self, slot_id: int, round_: int, kind: str = "model") -> Path:
        suffix = "" if kind == "model" else f".{kind}"
        return self.run_dir / "checkpoints" / f"slot{slot_id}" / f"round{round_:05d}{suffix}.pwfl"

    def write_model(self, slot_id: int, round_: int, payload: bytes | memoryview,
                    kind: str = "model") -> Path:
        """Write one payload (blocking: call from a thread); `prune` once the state points at it.

        Pruning here would delete the round the state file still names, and a crash
        before the state is rewritten would leave `--resume` nothing to read.
        """
        path = self.model_path(slot_id, round_, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, payload)
        return path

    def prune(self, slot_id: int) -> None:
        """Remove all but the newest `keep` rounds of the slot (blocking)."""
        folder = self.model_path(slot_id, 0).parent
        if folder.is_dir():
            for kind in ("model", "strategy"):
                self._prune(folder, kind)

    def read_model(self, slot_id: int, round_: int, kind: str = "model") -> bytes:
        return self.model_path(slot_id, round_, kind).read_bytes()

    def _prune(self, folder: Path, kind: str) -> None:
        pattern = "round*.pwfl" if kind == "model" else f"round*.{kind}.pwfl"
        paths = sorted(p for p in folder.glob(pattern) if p.name.count(".") == pattern.count("."))
        for old in paths[: -self.keep]:
            old.unlink(missing_ok=True)

    def write_state(self, state: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.run_dir / STATE_FILE, json.dumps(state, indent=2).encode())

    def read_state(self) -> dict[str, Any] | None:
        path = self.run_dir / STATE_FILE
        if not path.exists():
            return None
        state: dict[str, Any] = json.loads(path.read_text())
        return state


def json_safe(value: Any) -> Any:
    """Settings and metrics as plain JSON values (paths and the like as strings)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)
