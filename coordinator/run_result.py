"""A finished (or stopped) run as Python objects: `load(run_dir)`, and what `api.run` returns.

Everything comes from the run directory alone: the event log (rebuilt by the replay
tool, `replay.timeline` and `replay.summary`), the resolved ``run.toml`` and the
checkpoints. The replay's tables are pandas DataFrames when pandas is installed
(``pip install 'pwfl[notebook]'``), else lists of dicts with the same columns:
``rounds`` (one row per slot round), ``clients``, ``leases``, ``evaluations`` and
``lineage`` (PBT and merge events).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from replay.events import read_log
from replay.model import Run
from replay.summary import RunSummary, summarise
from replay.timeline import rebuild_runs
from serialization import decode

TARGET_ACCURACY = 0.85  # the replay's default target, for time_to_target_s
StateDict = dict[str, torch.Tensor]


class RunNotFound(FileNotFoundError):
    """The directory holds no run (no events.jsonl), or its log holds none."""


@dataclass(frozen=True)
class SlotResult:
    """One slot: its configuration, label, accuracy and its final model's checkpoint."""

    slot_id: int
    label: str
    config: dict[str, Any]
    rounds: int
    accuracy: float | None  # its last evaluation's
    best_accuracy: float | None
    model_path: Path | None  # the newest checkpoint, None if it has none

    def model(self) -> StateDict:
        """The slot's final model as a state dict (decoded from its newest checkpoint)."""
        if self.model_path is None:
            raise FileNotFoundError(f"slot {self.slot_id} has no checkpoint")
        state, _ = decode(self.model_path.read_bytes())
        return {name: tensor.clone() for name, tensor in state.items()}


@dataclass(frozen=True)
class RunResult:
    """A run: where it lives, how it ended, its slots, its settings and the replay's tables."""

    run_id: str
    run_dir: Path
    status: str
    wall_s: float
    slots: list[SlotResult]
    settings: dict[str, Any]  # the resolved run.toml ({} for runs that predate it)
    summary: RunSummary = field(repr=False)
    replay_run: Run = field(repr=False)

    @property
    def accuracies(self) -> dict[int, float | None]:
        """Each slot's final accuracy."""
        return {slot.slot_id: slot.accuracy for slot in self.slots}

    @property
    def best(self) -> SlotResult:
        """The slot with the highest final accuracy."""
        return max(self.slots, key=lambda s: -1.0 if s.accuracy is None else s.accuracy)

    @property
    def models(self) -> dict[int, StateDict]:
        """Every slot's final model, decoded from its newest checkpoint."""
        return {s.slot_id: s.model() for s in self.slots if s.model_path is not None}

    @property
    def rounds(self) -> Any:
        return frame(round_rows(self.summary))

    @property
    def clients(self) -> Any:
        return frame([dataclasses.asdict(c) for c in self.summary.clients])

    @property
    def leases(self) -> Any:
        return frame(lease_rows(self.replay_run))

    @property
    def evaluations(self) -> Any:
        return frame(evaluation_rows(self.replay_run))

    @property
    def lineage(self) -> Any:
        return frame([{**dataclasses.asdict(step), "slot_id": str(step.slot_id)}
                      for step in self.summary.lineage])


def frame(rows: list[dict[str, Any]]) -> Any:
    """A pandas DataFrame of the rows when pandas is installed, else the rows."""
    try:
        import pandas as pd
    except ImportError:
        return rows
    return pd.DataFrame(rows)


def round_rows(summary: RunSummary) -> list[dict[str, Any]]:
    rows = []
    for slot in summary.slots:
        label = summary.slot_labels.get(str(slot.slot_id), "")
        for detail in slot.round_details:
            rows.append({"slot_id": str(slot.slot_id), "label": label,
                         **dataclasses.asdict(detail)})
    return rows


def lease_rows(run: Run) -> list[dict[str, Any]]:
    return [{"client_id": lease.client_id, "slot_id": str(lease.slot_id), "round": lease.round,
             "start_s": lease.start - run.start,
             "end_s": None if lease.end is None else lease.end - run.start,
             "reason": lease.reason}
            for client in run.clients.values() for lease in client.leases]


def evaluation_rows(run: Run) -> list[dict[str, Any]]:
    return [{"slot_id": str(slot_id), "t_s": ts - run.start, "round": round_,
             "accuracy": accuracy}
            for slot_id, evaluations in run.evaluations.items()
            for ts, round_, accuracy in evaluations]


def newest_checkpoint(run_dir: Path, slot_id: int) -> Path | None:
    """The slot's newest model checkpoint (not its strategy state)."""
    folder = run_dir / "checkpoints" / f"slot{slot_id}"
    paths = sorted(p for p in folder.glob("round*.pwfl") if p.name.count(".") == 1)
    return paths[-1] if paths else None


def read_settings(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.toml"
    return tomllib.loads(path.read_text()) if path.exists() else {}


def load(run_dir: str | Path) -> RunResult:
    """The result of a finished or stopped run, from its directory alone."""
    run_dir = Path(run_dir)
    events = run_dir / "events.jsonl"
    if not events.exists():
        raise RunNotFound(f"{run_dir}: no events.jsonl (is it a run directory?)")
    runs = rebuild_runs(read_log(events))
    if not runs:
        raise RunNotFound(f"{events}: no run in the log")
    run = runs[-1]
    summary = summarise(run, TARGET_ACCURACY)
    return RunResult(run_id=run.run_id, run_dir=run_dir, status=run.status, wall_s=run.wall_s,
                     slots=slot_results(run_dir, run, summary),
                     settings=read_settings(run_dir), summary=summary, replay_run=run)


def slot_results(run_dir: Path, run: Run, summary: RunSummary) -> list[SlotResult]:
    configs = run.config.get("slot_configs") or []
    results = []
    for slot in summary.slots:
        if not isinstance(slot.slot_id, int):
            continue  # the merged pseudo-slot: its model is checkpoints/result.pwfl
        config = configs[slot.slot_id] if slot.slot_id < len(configs) else {}
        results.append(SlotResult(
            slot_id=slot.slot_id, label=summary.slot_labels.get(str(slot.slot_id), ""),
            config=dict(config), rounds=slot.rounds, accuracy=slot.final_accuracy,
            best_accuracy=slot.best_accuracy,
            model_path=newest_checkpoint(run_dir, slot.slot_id)))
    return results
