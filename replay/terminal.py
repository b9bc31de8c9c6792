"""The terminal summary: rich tables for one run, and a side-by-side comparison."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from replay import fmt
from replay.compare import COMPARED, Comparison
from replay.model import CATEGORIES
from replay.summary import RunSummary, SlotSummary
from replay.whatif import WhatIf

_CATEGORY_LABELS = {
    "aggregation": "aggregation (folds + finalise)",
    "evaluation": "evaluation",
    "checkpoint": "checkpoint",
    "io": "I/O (model_published)",
}


def _table(title: str, *columns: str, left: int = 1) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  header_style="bold cyan", pad_edge=False)
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index < left else "right", no_wrap=True)
    return table


def render_run(console: Console, summary: RunSummary, *, show_rounds: bool) -> None:
    """Everything about one run, top to bottom: headline, slots, rounds, clients, server."""
    console.rule(f"[bold]{summary.file}[/]  run {summary.run_id}  [{_status_style(summary)}]"
                 f"{summary.status}[/]")
    console.print(_headline(summary))
    console.print(_slots_table(summary))
    if summary.ranking and any(" " in label or "=" in label
                               for label in summary.slot_labels.values()):
        console.print(_ranking_table(summary))
    if summary.lineage:
        console.print(_lineage_table(summary))
    console.print(_phases_table(summary))
    if show_rounds:
        for slot in summary.slots:
            console.print(_rounds_table(slot))
    console.print(_clients_table(summary))
    console.print(_coordinator_table(summary))
    console.print(_integrity_table(summary))


def _status_style(summary: RunSummary) -> str:
    return "green" if summary.status == "finished" else "yellow"


def _headline(summary: RunSummary) -> Text:
    config = summary.config
    parts = [
        f"{config.get('slots', len(summary.slots))} slot(s)",
        f"{config.get('rounds', '?')} rounds each",
        f"policy {config.get('policy', '?')}",
        f"quorum {config.get('quorum', '?')}",
        f"{config.get('strategy', '?')} on {fmt.task(config.get('task', '?'))}",
        f"{len(summary.clients)} clients",
    ]
    lines = Text(" · ".join(parts) + "\n", style="dim")
    lines.append(f"wall {fmt.seconds(summary.wall_s)}", style="bold")
    if summary.restarts:
        lines.append(f" ({summary.restarts} restart(s), down {fmt.seconds(summary.downtime_s)})")
    lines.append(f" · first round at {fmt.seconds(summary.first_round_s)}")
    lines.append(f" · {summary.slot_rounds} slot-rounds ({summary.slot_rounds_per_hour:.0f}/h)")
    lines.append(f" · test accuracy {summary.target_accuracy:g} ")
    _reached(lines, summary.time_to_target_s)
    if summary.final_validation_accuracy is not None:
        lines.append(f" · validation accuracy {summary.target_accuracy:g} ")
        _reached(lines, summary.validation_time_to_target_s)
    return lines


def _reached(lines: Text, at_s: float | None) -> None:
    if at_s is None:
        lines.append("not reached", style="yellow")
    else:
        lines.append(f"reached at {fmt.seconds(at_s)}", style="green")


def _validated(summary: RunSummary) -> bool:
    """Whether the log has federated evaluation (validation_finished) at all."""
    return any(s.validation_over_time for s in summary.slots)


def _slots_table(summary: RunSummary) -> Table:
    target = f"{summary.target_accuracy:g}"
    validated = _validated(summary)
    extra = ("final\nvalidation", "best\nvalidation", f"val. time\nto {target}") \
        if validated else ()
    table = _table("Slots (rounds aggregated; test: the coordinator's test set"
                   + ("; validation: the clients' held-out splits)" if validated else ")"),
                   "slot", "rounds", "failed", "final\ntest", "best\ntest",
                   f"time to\n{target}", f"rounds\nto {target}", *extra,
                   "test accuracy over rounds")
    table.columns[-1].justify = "left"
    for slot in summary.slots:
        validation = (fmt.accuracy(slot.final_validation_accuracy),
                      fmt.accuracy(slot.best_validation_accuracy),
                      fmt.seconds(slot.validation_time_to_target_s)) if validated else ()
        table.add_row(
            str(slot.slot_id), str(slot.rounds), _failed(slot),
            fmt.accuracy(slot.final_accuracy), fmt.accuracy(slot.best_accuracy),
            fmt.seconds(slot.time_to_target_s),
            "-" if slot.rounds_to_target is None else str(slot.rounds_to_target), *validation,
            fmt.sparkline([acc for _t, acc in slot.accuracy_over_time], 0.0, 1.0),
        )
    return table


def _ranking_table(summary: RunSummary) -> Table:
    target = f"{summary.target_accuracy:g}"
    table = _table("Slots by configuration (ranked by time to test target, then final test "
                   "accuracy)",
                   "rank", "slot", "configuration (what differs)", f"time to\n{target}",
                   "final\ntest", "best\ntest", "final\nvalidation", left=3)
    for r in summary.ranking:
        table.add_row(str(r.rank), str(r.slot_id), r.label, fmt.seconds(r.time_to_target_s),
                      fmt.accuracy(r.final_accuracy), fmt.accuracy(r.best_accuracy),
                      fmt.accuracy(r.final_validation_accuracy))
    return table


def _lineage_table(summary: RunSummary) -> Table:
    table = _table("Lineage: PBT exploits/explores and merges (t: since run start)", "t",
                   "round", "event", "what happened", left=4)
    for step in summary.lineage:
        table.add_row(fmt.seconds(step.t_s), str(step.round), step.event, step.text)
    return table


def _phases_table(summary: RunSummary) -> Table:
    table = _table("Where a round's time goes (mean over aggregated rounds; to aggregated: "
                   "round start to aggregate; closed: to round_closed, evaluation and "
                   "checkpoint included)", "slot", "to aggre-\ngated", "to\nclosed",
                   "lease\nwait", "quorum\nwait", "aggre-\ngation", "evalu-\nation",
                   "check-\npoint")
    for slot in summary.slots:
        table.add_row(
            str(slot.slot_id), fmt.seconds(slot.mean_aggregated_s),
            fmt.seconds(slot.mean_round_s),
            fmt.seconds(slot.mean_lease_wait_s), fmt.seconds(slot.mean_quorum_wait_s),
            fmt.seconds(slot.mean_aggregation_s), fmt.seconds(slot.mean_evaluation_s),
            fmt.seconds(slot.mean_checkpoint_s),
        )
    return table


def _failed(slot: SlotSummary) -> str:
    text = str(slot.rounds_failed)
    return text + (f" +{slot.rounds_interrupted} cut" if slot.rounds_interrupted else "")


_STATUS_MARK = {"closed": "", "failed": " failed", "interrupted": " cut", "open": " open"}


def _rounds_table(slot: SlotSummary) -> Table:
    table = _table(f"Slot {slot.slot_id}: rounds (start: since run start)", "round", "start",
                   "quorum\nwait", "aggre-\ngation", "evalu-\nation", "check-\npoint",
                   "duration", "test\naccuracy", "val.\naccuracy", "updates", "bytes\nmoved")
    for r in slot.round_details:
        table.add_row(
            f"{r.round}{_STATUS_MARK.get(r.status, r.status)}", fmt.seconds(r.start_s),
            fmt.seconds(r.quorum_wait_s), fmt.seconds(r.aggregation_s),
            fmt.seconds(r.evaluation_s), fmt.seconds(r.checkpoint_s),
            fmt.seconds(r.duration_s), fmt.accuracy(r.accuracy),
            fmt.accuracy(r.validation_accuracy),
            f"{r.num_updates}/{r.clients}", fmt.nbytes(r.bytes_down + r.bytes_up),
        )
    return table


def _clients_table(summary: RunSummary) -> Table:
    table = _table("Clients (busy = leased to a slot)", "client", "jobs", "failed/\nlost/rej",
                   "busy", "idle", "idle", "idle once\nrounds run", "training", "train\nper job",
                   "transfer")
    for c in summary.clients:
        table.add_row(
            c.client_id, str(c.jobs_done), f"{c.failures}/{c.lost}/{c.rejected}",
            fmt.seconds(c.busy_s), fmt.seconds(c.idle_s),
            fmt.percent(c.idle_fraction), fmt.percent(c.idle_fraction_after_first_round),
            fmt.seconds(c.train_s), fmt.seconds(c.mean_train_s), fmt.seconds(c.transfer_s),
        )
    table.add_section()
    table.add_row(
        "all", str(sum(c.jobs_done for c in summary.clients)),
        f"{sum(c.failures for c in summary.clients)}/{sum(c.lost for c in summary.clients)}/"
        f"{sum(c.rejected for c in summary.clients)}",
        fmt.seconds(sum(c.busy_s for c in summary.clients)),
        fmt.seconds(sum(c.idle_s for c in summary.clients)),
        fmt.percent(summary.client_idle_fraction),
        fmt.percent(summary.client_idle_fraction_after_first_round),
        fmt.seconds(sum(c.train_s for c in summary.clients)), "", "", style="bold",
    )
    return table


def _coordinator_table(summary: RunSummary) -> Table:
    coordinator = summary.coordinator
    table = _table("Coordinator (union of intervals; categories may overlap)", "work", "time",
                   "of up time")
    for category in CATEGORIES:
        busy = coordinator.categories[category]
        table.add_row(_CATEGORY_LABELS[category], fmt.seconds(busy.busy_s),
                      fmt.percent(busy.fraction))
    table.add_section()
    table.add_row("busy, any work", fmt.seconds(coordinator.busy_s),
                  fmt.percent(coordinator.busy_fraction), style="bold")
    table.add_row("waited with nothing to do", fmt.seconds(coordinator.idle_s),
                  fmt.percent(1.0 - coordinator.busy_fraction))
    table.add_row("busy once the first round started", "",
                  fmt.percent(coordinator.busy_fraction_after_first_round))
    return table


def _integrity_table(summary: RunSummary) -> Table:
    traffic = summary.traffic
    table = _table("Traffic and integrity", "what", "value")
    table.add_row("model down (nbytes x clients)", fmt.nbytes(traffic.bytes_down))
    table.add_row("updates up", fmt.nbytes(traffic.bytes_up))
    table.add_row("per round (mean)", fmt.nbytes(traffic.mean_bytes_per_round))
    rejected = ", ".join(f"{k} {v}" for k, v in summary.rejected_updates.items()) or "none"
    table.add_row("rejected updates", rejected)
    late = ", ".join(f"{k} {v}" for k, v in summary.late_updates.items()) or "none"
    table.add_row("late updates", late)
    style = "green" if summary.lease_violations == 0 else "bold red"
    table.add_row("lease violations", Text(str(summary.lease_violations), style=style))
    for v in summary.lease_violation_details:
        table.add_row("", Text(f"{v.client_id} at {fmt.seconds(v.at_s)}: held by slot "
                               f"{v.held_slot} r{v.held_round}, leased to slot {v.new_slot} "
                               f"r{v.new_round}", style="red"))
    return table


def render_comparison(console: Console, comparison: Comparison) -> None:
    """The runs side by side, each later run's ratio to the first."""
    names = [s.label for s in comparison.runs]
    headers = ["metric", *names, *(f"{n}\n÷ {names[0]}" for n in names[1:])]
    table = _table("Side by side (ratios against the first log)", *headers)
    for key, label, kind in COMPARED:
        values = comparison.values[key]
        cells = [fmt.cell(v, kind) for v in values]
        ratios = [fmt.ratio(v, values[0]) if kind != "text" else "" for v in values[1:]]
        table.add_row(label, *cells, *ratios)
    console.rule("[bold]Comparison")
    console.print(table)


def render_whatif(console: Console, whatif: WhatIf) -> None:
    """Predicted wall time, throughput and idle fractions for each simulated setting."""
    choices = sorted({p.setting["client_choice"] for p in whatif.predictions})
    by_choice = len(choices) > 1  # a column only when the grid varies it (the table is wide)
    table = _table(
        f"What-if for {whatif.label} (* = recorded setting; mean of {whatif.repeats} replays"
        + ("" if by_choice else f"; client choice {choices[0]}") + ")",
        "slots", "policy", *(["client\nchoice"] if by_choice else []), "quorum",
        "clients\n/round", "rounds", "wall", "wall\nrange", "slot-\nrounds/h", "coord.\nbusy",
        "client\nidle", "mean\nround", "failed\nrounds", left=3 if by_choice else 2,
    )
    for p in whatif.predictions:
        s = p.setting
        table.add_row(
            f"{s['slots']}{' *' if p.recorded_setting else ''}", s["policy"],
            *([s["client_choice"]] if by_choice else []),
            f"{s['quorum']:g}", str(s["clients_per_round"]), str(s["rounds"]),
            fmt.seconds(p.wall_s) + ("" if p.finished else " stalled"),
            fmt.span(p.wall_s_min, p.wall_s_max),
            f"{p.slot_rounds_per_hour:.0f}", fmt.percent(p.coordinator_busy_fraction),
            fmt.percent(p.client_idle_fraction), fmt.seconds(p.mean_round_s),
            f"{p.failed_rounds:g}",
            style="bold" if p.recorded_setting else None,
        )
    console.print(table)
    console.print(_validation_line(whatif))


def _validation_line(whatif: WhatIf) -> Text:
    predicted = whatif.predictions[0].wall_s
    line = Text(f"recorded setting: recorded wall {fmt.seconds(whatif.recorded_wall_s)}, "
                f"predicted {fmt.seconds(predicted)}, prediction error ")
    if whatif.recorded_error is None:
        line.append(f"n/a ({whatif.recorded_note})", style="yellow")
    else:
        ok = abs(whatif.recorded_error) <= 0.10
        line.append(f"{whatif.recorded_error * 100:+.1f}%", style="green" if ok else "bold red")
    trainers = ", ".join(f"{agent} {n}" for agent, n in sorted(whatif.trainers.items()))
    line.append(f"\ntrainers per agent: {trainers}; per-job latency "
                f"{fmt.seconds(whatif.latency_s)}. Busy/idle fractions are over the simulated "
                "rounds (first lease to last round).", style="dim")
    return line
