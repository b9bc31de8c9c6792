"""The report's figures as PNG bytes (matplotlib, Agg canvas, no pyplot global state).

- `timeline`: one row for the coordinator's work, one per slot with its rounds
  (start to aggregation), one per client with its leases (light) and the
  training inside them (solid); colour is the slot; downtime is shaded.
- `accuracy`: accuracy over wall time per slot, test set (solid) and validation (dashed,
  the clients' held-out splits, where the run has them), the target and when it was hit.
- `idle`: idle fractions of each client, all clients and the coordinator.
- `compare_accuracy`: best accuracy so far over time, one line per run.
- `whatif`: predicted wall time of each simulated setting.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from replay.events import SlotId
from replay.model import Run
from replay.summary import RunSummary
from replay.whatif import WhatIf

_PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3",
            "#8C8C8C", "#CCB974", "#64B5CD"]
_INK = "#2b2b2b"
_GRID = "#e6e6e6"


def _colour(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buffer.getvalue()


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.spines["left"].set_color("#999999")
    ax.spines["bottom"].set_color("#999999")
    ax.tick_params(colors=_INK, labelsize=9)
    ax.grid(axis="x", color=_GRID, linewidth=0.8)
    ax.set_axisbelow(True)


# -- timeline ------------------------------------------------------------------------------


def timeline(run: Run) -> bytes:
    """Who did what when: coordinator, slots' rounds, clients' leases and training."""
    slots = [s for s in run.slot_ids() if s in run.rounds]  # not the merged models' scores
    colour = {slot: _colour(i) for i, slot in enumerate(slots)}
    clients = sorted(run.clients, key=lambda c: (len(c), c))
    labels = ["coordinator", *(f"slot {s} rounds" for s in slots), *clients]
    fig = Figure(figsize=(14, 1.6 + 0.36 * len(labels)))
    ax = fig.add_subplot()
    rows = {label: len(labels) - 1 - i for i, label in enumerate(labels)}
    _draw_coordinator(ax, run, rows["coordinator"], colour)
    for slot in slots:
        _draw_rounds(ax, run, slot, rows[f"slot {slot} rounds"], colour[slot])
    for client_id in clients:
        _draw_client(ax, run, client_id, rows[client_id], colour)
    _draw_downtime(ax, run)
    ax.set_yticks(list(rows.values()), list(rows))
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.set_xlim(0, max(run.wall_s, 1e-6) * 1.01)
    ax.set_xlabel("seconds since run start", color=_INK)
    _style(ax)
    ax.legend(handles=_timeline_legend(slots, colour), loc="lower center", ncol=8, fontsize=8,
              frameon=False, bbox_to_anchor=(0.5, 1.0))
    return _png(fig)


def _draw_coordinator(ax: Any, run: Run, y: int, colour: dict[SlotId, str]) -> None:
    """One thin lane per slot inside the coordinator's row, so concurrent work shows."""
    lanes = {slot: i for i, slot in enumerate(colour)}
    height = 0.76 / max(len(lanes), 1)
    for span in run.coordinator_spans:
        lane = lanes.get(span.slot_id, 0)
        bottom = y + 0.38 - (lane + 1) * height
        ax.broken_barh([(span.start - run.start, span.end - span.start)], (bottom, height),
                       facecolors=colour.get(span.slot_id, "#888888"),
                       alpha=0.9 if span.category == "evaluation" else 0.5, linewidth=0)
    for slot, records in run.rounds.items():
        ends = [ready[1] - run.start for r in records
                if r.quorum_at is not None and r.aggregation_s > 0
                and (ready := r.span(run.end)) is not None]
        ax.scatter(ends, [y + 0.5] * len(ends), marker="v", s=22, color=colour[slot],
                   edgecolors=_INK, linewidths=0.5, zorder=3)


def _draw_rounds(ax: Any, run: Run, slot: SlotId, y: int, colour: str) -> None:
    span_s = max(run.wall_s, 1e-6)
    for index, record in enumerate(run.rounds.get(slot, [])):
        span = record.span(run.end)
        if span is None:
            continue
        start = span[0] - run.start
        width = span[1] - span[0]
        failed = record.status != "closed"
        ax.broken_barh([(start, width)], (y - 0.32, 0.64), facecolors=colour,
                       alpha=0.95 if index % 2 == 0 else 0.65, hatch="//" if failed else None,
                       edgecolor="white", linewidth=0.6)
        if width > span_s * 0.018:
            ax.text(start + width / 2, y, str(record.round), ha="center", va="center",
                    fontsize=7, color="white", fontweight="bold")


def _draw_client(ax: Any, run: Run, client_id: str, y: int, colour: dict[SlotId, str]) -> None:
    client = run.clients[client_id]
    for lease in client.leases:
        start, end = lease.span(run.end)
        ax.broken_barh([(start - run.start, end - start)], (y - 0.34, 0.68),
                       facecolors=colour.get(lease.slot_id, "#888888"), alpha=0.28, linewidth=0)
    for job in client.jobs:
        start, end = job.training_span
        ax.broken_barh([(start - run.start, end - start)], (y - 0.22, 0.44),
                       facecolors=colour.get(job.slot_id, "#888888"),
                       edgecolor="#C0392B" if not job.ok else "none",
                       linewidth=1.2 if not job.ok else 0)


def _draw_downtime(ax: Any, run: Run) -> None:
    for before, after in zip(run.segments, run.segments[1:], strict=False):
        ax.axvspan(before.end - run.start, after.start - run.start, color="#bbbbbb", alpha=0.35)
        ax.text((before.end + after.start) / 2 - run.start, 0, "coordinator down",
                ha="center", va="bottom", fontsize=8, color=_INK, rotation=90)


def _timeline_legend(slots: list[SlotId], colour: dict[SlotId, str]) -> list[Any]:
    handles: list[Any] = [Patch(facecolor=colour[s], label=f"slot {s}") for s in slots]
    handles += [
        Patch(facecolor="#777777", alpha=0.28, label="client leased (waiting)"),
        Patch(facecolor="#777777", label="client training"),
        Patch(facecolor="#777777", alpha=0.9, label="coordinator: evaluation (others lighter)"),
        Patch(facecolor="#bbbbbb", hatch="///", edgecolor="white", label="round failed or cut"),
    ]
    return handles


# -- accuracy and idle ---------------------------------------------------------------------


def accuracy(summary: RunSummary) -> bytes:
    """Accuracy over wall time, per slot a test line (solid) and a validation line (dashed),
    with the target."""
    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot()
    for index, slot in enumerate(summary.slots):
        label = summary.slot_labels.get(str(slot.slot_id))
        name = f"slot {slot.slot_id}" + (f": {label}" if label and "=" in label else "")
        if slot.validation_over_time:
            xs, ys = zip(*slot.validation_over_time, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.3, linestyle="--",
                    markerfacecolor="white", color=_colour(index), label=f"{name} validation")
        if not slot.accuracy_over_time:
            continue
        xs, ys = zip(*slot.accuracy_over_time, strict=True)
        validated = any(s.validation_over_time for s in summary.slots)
        ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.8, color=_colour(index),
                label=f"{name} test" if validated else name)
        if slot.time_to_target_s is not None:
            ax.axvline(slot.time_to_target_s, color=_colour(index), linestyle=":", linewidth=1)
    ax.axhline(summary.target_accuracy, color=_INK, linestyle="--", linewidth=1,
               label=f"target {summary.target_accuracy:g}")
    _draw_exploits(ax, summary)
    ax.set_xlim(0, max(summary.wall_s, 1e-6) * 1.03)
    ax.set_xlabel("seconds since run start", color=_INK)
    ax.set_ylabel("accuracy (test set; dashed: validation)"
                  if any(s.validation_over_time for s in summary.slots) else "test accuracy",
                  color=_INK)
    _style(ax)
    ax.grid(axis="y", color=_GRID, linewidth=0.8)
    ax.legend(fontsize=8, frameon=False, loc="best")
    return _png(fig)


def _draw_exploits(ax: Any, summary: RunSummary) -> None:
    """A PBT exploit: an arrow from the donor's score to the slot's, labelled with the donor."""
    index = {str(s.slot_id): i for i, s in enumerate(summary.slots)}
    exploits = [s for s in summary.lineage if s.event == "pbt_exploit"]
    for step in exploits:
        donor, mine = step.fields.get("donor_accuracy"), step.fields.get("accuracy")
        if not isinstance(donor, int | float) or not isinstance(mine, int | float):
            continue
        colour = _colour(index.get(str(step.slot_id), 0))
        ax.annotate(f"{step.slot_id}←{step.fields.get('donor_slot_id')}", (step.t_s, donor),
                    xytext=(step.t_s, mine), fontsize=7, color=colour, ha="center",
                    arrowprops={"arrowstyle": "->", "color": colour, "linewidth": 0.9})
    if exploits:
        ax.plot([], [], color=_INK, linewidth=0.9, label="PBT exploit (slot←donor)")


def idle(summary: RunSummary) -> bytes:
    """Idle fractions: each client, all clients pooled, the coordinator."""
    rows = [(c.client_id, c.idle_fraction, c.idle_fraction_after_first_round)
            for c in summary.clients]
    rows.append(("all clients", summary.client_idle_fraction,
                 summary.client_idle_fraction_after_first_round))
    rows.append(("coordinator", 1.0 - summary.coordinator_busy_fraction,
                 1.0 - summary.coordinator_busy_fraction_after_first_round))
    fig = Figure(figsize=(9, 0.9 + 0.42 * len(rows)))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))[::-1]
    ax.barh([y + 0.19 for y in ys], [r[1] for r in rows], height=0.36, color="#9AA5B1",
            label="whole run")
    ax.barh([y - 0.19 for y in ys], [r[2] for r in rows], height=0.36, color="#4C72B0",
            label="once the first round started")
    for y, (_name, whole, late) in zip(ys, rows, strict=True):
        ax.text(whole + 0.01, y + 0.19, f"{whole:.0%}", va="center", fontsize=8, color=_INK)
        ax.text(late + 0.01, y - 0.19, f"{late:.0%}", va="center", fontsize=8, color=_INK)
    ax.set_yticks(ys, [r[0] for r in rows])
    ax.set_xlim(0, 1.08)
    ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.set_xlabel("idle fraction", color=_INK)
    _style(ax)
    ax.legend(fontsize=8, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    return _png(fig)


# -- several runs, what-if -----------------------------------------------------------------


def compare_accuracy(summaries: list[RunSummary]) -> bytes:
    """Best accuracy so far over wall time, one line per run."""
    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot()
    for index, summary in enumerate(summaries):
        points = sorted(p for slot in summary.slots for p in slot.accuracy_over_time)
        best, xs, ys = 0.0, [], []
        for t, acc in points:
            best = max(best, acc)
            xs.append(t)
            ys.append(best)
        ax.step(xs, ys, where="post", linewidth=2, color=_colour(index),
                label=f"{summary.label} ({summary.config.get('slots', '?')} slot(s))")
    ax.axhline(summaries[0].target_accuracy, color=_INK, linestyle="--", linewidth=1,
               label=f"target {summaries[0].target_accuracy:g}")
    ax.set_xlabel("seconds since run start", color=_INK)
    ax.set_ylabel("best test accuracy so far (any slot)", color=_INK)
    _style(ax)
    ax.grid(axis="y", color=_GRID, linewidth=0.8)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return _png(fig)


def whatif(result: WhatIf) -> bytes:
    """Predicted wall time per setting, the recorded one marked, the recorded wall drawn."""
    preds = result.predictions
    fig = Figure(figsize=(8, 0.9 + 0.3 * len(preds)))
    ax = fig.add_subplot()
    ys = list(range(len(preds)))[::-1]
    colours = ["#C44E52" if p.recorded_setting else "#4C72B0" for p in preds]
    ax.barh(ys, [p.wall_s for p in preds], color=colours, height=0.62,
            xerr=[[p.wall_s - p.wall_s_min for p in preds],
                  [p.wall_s_max - p.wall_s for p in preds]],
            error_kw={"ecolor": _INK, "elinewidth": 0.8, "capsize": 2})
    ax.axvline(result.recorded_wall_s, color=_INK, linestyle="--", linewidth=1,
               label="recorded wall time")
    ax.set_yticks(ys, [_setting_label(p.setting) + (" (recorded)" if p.recorded_setting else "")
                       for p in preds], fontsize=8)
    ax.set_xlabel("predicted wall time (s)", color=_INK)
    _style(ax)
    ax.legend(fontsize=8, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return _png(fig)


def _setting_label(setting: dict[str, Any]) -> str:
    return (f"{setting['slots']} slot(s), {setting['policy']}, {setting['client_choice']}, "
            f"quorum {setting['quorum']:g}, {setting['clients_per_round']}/round")
