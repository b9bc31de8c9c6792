"""Slots that differ and cooperate, as the log tells: labels, ranking, lineage, trajectories.

- Labels name a slot by what differs between the slots' configurations
  (``run_started.slot_configs``), e.g. ``lr=0.03 strategy=fedadam``.
- The ranking orders slots by time to the target, then by final accuracy.
- The lineage lists PBT's exploits and explores and the merges (with the final merge's
  candidates as validated), in time order; each decision says which accuracy it was taken
  on (`selected_on`: the clients' validation splits, or in older logs the test set);
  each slot's hyperparameter trajectory starts at its configuration and follows
  its `pbt_explore` events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from replay.events import SlotId

POPULATION_EVENTS = frozenset({"pbt_exploit", "pbt_explore", "slots_merged", "merge_adopted",
                               "merge_evaluated", "final_candidate_validated", "final_merge"})
MERGED = "merged"  # the pseudo-slot whose evaluations are the merged models'
_SHOWN_LAST = ("seed", "clients_per_round")  # differ by default; shown after the rest


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose values are not the same in every configuration, in a stable order."""
    keys: list[str] = []
    for config in configs:
        keys.extend(k for k in config if k not in keys)
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    return sorted(differ, key=lambda k: (k in _SHOWN_LAST, keys.index(k)))


def slot_labels(configs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{slot id: label}``; the seed is named only when nothing else differs."""
    differ = differing_keys(configs)
    named = [k for k in differ if k != "seed"] or differ
    labels = {}
    for slot_id, config in enumerate(configs):
        text = " ".join(f"{k}={_text(config.get(k))}" for k in named)
        labels[str(slot_id)] = text or f"slot {slot_id}"
    return labels


@dataclass(frozen=True)
class LineageStep:
    """One population event: when (s since run start), what, and its fields."""

    t_s: float
    event: str
    slot_id: SlotId
    round: int
    text: str
    fields: dict[str, Any]


def describe(event: str, fields: Mapping[str, Any]) -> str:
    """One line a reader can follow: who copied whom, what changed, what a merge scored."""
    slot = fields.get("slot_id")
    if event == "pbt_exploit":
        kind = _kind(fields)
        return (f"slot {slot} ({kind} {_acc(fields.get('accuracy'))}"
                f"{_of_round(fields.get('validated_round'))}) <- copies slot "
                f"{fields.get('donor_slot_id')} round {fields.get('donor_round')} "
                f"({kind} {_acc(fields.get('donor_accuracy'))}"
                f"{_of_round(fields.get('donor_validated_round'))})")
    if event == "pbt_explore":
        changes = fields.get("changed") or {}
        moved = ", ".join(f"{k} {_text(v[0])}->{_text(v[1])}" for k, v in changes.items()
                          if isinstance(v, list) and len(v) == 2 and k != "seed")
        return f"slot {slot} explores: {moved or 'no change'}"
    if event == "slots_merged":
        return (f"merge {fields.get('epoch')}: slots {fields.get('slot_ids')} averaged, "
                f"weights {fields.get('weights')}")
    if event == "merge_adopted":
        return (f"slot {slot} goes on from merge {fields.get('epoch')} "
                f"(+{fields.get('rounds_since')} round(s) of its own)")
    if event == "merge_evaluated":
        return f"merge {fields.get('epoch')} evaluated: test {_acc(fields.get('accuracy'))}"
    if event == "final_candidate_validated":
        return (f"final candidate {fields.get('candidate')} validated: val "
                f"{_acc(fields.get('accuracy'))} over {fields.get('clients', '?')} client(s)")
    if fields.get("selected_on") == "validation":
        return (f"final merge keeps {fields.get('kept')}, chosen on validation (val "
                f"{_acc(fields.get('validation_accuracy'))}; its one test-set evaluation "
                f"{_acc(fields.get('accuracy'))})")
    return (f"final merge keeps {fields.get('kept')} (test {_acc(fields.get('accuracy'))}; "
            f"average {_acc(fields.get('average_accuracy'))}, soup "
            f"{_acc(fields.get('soup_accuracy'))} of slots {fields.get('soup_members')})")


def _acc(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, int | float) else "-"


def _kind(fields: Mapping[str, Any]) -> str:
    """Which accuracy a PBT decision used: "val" (the clients' validation splits), as the
    event says, or "acc" (a log from before `selected_on`: the test set's)."""
    selected = fields.get("selected_on")
    return "val" if selected == "validation" else str(selected or "acc")


def _of_round(value: Any) -> str:
    return f" of round {value}" if isinstance(value, int) else ""


def trajectories(configs: Sequence[Mapping[str, Any]], steps: Sequence[LineageStep]
                 ) -> dict[str, list[tuple[float, int, dict[str, Any]]]]:
    """Per slot: (t_s, round, configuration) at the start and after each explore."""
    paths = {str(i): [(0.0, 0, dict(c))] for i, c in enumerate(configs)}
    for step in steps:
        config = step.fields.get("config")
        if step.event == "pbt_explore" and isinstance(config, dict):
            paths.setdefault(str(step.slot_id), []).append((step.t_s, step.round, dict(config)))
    return paths
