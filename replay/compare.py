"""Several runs side by side, e.g. `--slots 1` against `--slots 3` on the same clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from replay.summary import RunSummary

Value = float | str | None

# (key, label, kind): kind picks the formatting; "text" rows get no ratio.
COMPARED: list[tuple[str, str, str]] = [
    ("slots", "slots", "text"),
    ("policy", "policy", "text"),
    ("client_choice", "client choice", "text"),
    ("quorum", "quorum", "text"),
    ("wall_s", "wall time", "s"),
    ("time_to_target_s", "time to target (test)", "s"),
    ("final_accuracy", "best final test accuracy", "acc"),
    ("validation_time_to_target_s", "time to target (validation)", "s"),
    ("final_validation_accuracy", "best final validation accuracy", "acc"),
    ("slot_rounds", "slot-rounds", "int"),
    ("slot_rounds_per_hour", "slot-rounds per hour", "rate"),
    ("coordinator_busy_fraction", "coordinator busy", "pct"),
    ("coordinator_idle_fraction", "coordinator idle", "pct"),
    ("client_idle_fraction", "client idle", "pct"),
    ("client_idle_fraction_after_first_round", "client idle (rounds)", "pct"),
    ("bytes_total", "bytes moved", "bytes"),
]


@dataclass(frozen=True)
class Comparison:
    runs: list[RunSummary]
    values: dict[str, list[Value]]

    def to_json(self) -> dict[str, Any]:
        """Each metric's values in log order, and each later log's ratio to the first."""
        metrics: dict[str, Any] = {}
        for key, _label, kind in COMPARED:
            values = self.values[key]
            entry: dict[str, Any] = {"values": values}
            if kind != "text":
                entry["ratios"] = [_ratio(v, values[0]) for v in values[1:]]
            metrics[key] = entry
        return {"baseline": self.runs[0].file, "files": [r.file for r in self.runs],
                "metrics": metrics}


def _ratio(value: Value, base: Value) -> float | None:
    if not isinstance(value, float | int) or not isinstance(base, float | int) or base == 0:
        return None
    return value / base


def _metric(summary: RunSummary, key: str) -> Value:
    if key in ("slots", "policy", "client_choice", "quorum"):
        value = summary.config.get(key)
        return None if value is None else str(value)
    if key == "coordinator_idle_fraction":
        return 1.0 - summary.coordinator_busy_fraction
    if key == "bytes_total":
        return float(summary.traffic.bytes_total)
    value = getattr(summary, key)
    return None if value is None else float(value)


def compare(runs: list[RunSummary]) -> Comparison:
    """The compared metrics of each run, in the order given (the first is the baseline)."""
    return Comparison(runs, {key: [_metric(r, key) for r in runs] for key, _l, _k in COMPARED})
