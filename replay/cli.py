"""`python -m replay RUN.jsonl [MORE.jsonl ...]`: the command line of the replay tool.

Reads each log, prints a summary per run (or `--json`), compares several logs
side by side, writes an HTML report (`--report DIR`) and predicts other
schedules (`--simulate`). Any `ReplayError` is one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from replay.compare import compare
from replay.errors import ReplayError, UsageError
from replay.events import read_log
from replay.model import Run
from replay.simulate import DRAWS
from replay.summary import RunSummary, summarise
from replay.terminal import render_comparison, render_run, render_whatif
from replay.timeline import rebuild_runs
from replay.whatif import WhatIf, parse_grid, predict_grid

EXIT_ERROR = 2

_DESCRIPTION = """\
Rebuild PWFL runs from their JSON event logs (runs/RUN_ID/events.jsonl) and show
where the time went: per slot rounds (start, lease wait, quorum wait, aggregation,
evaluation, checkpoint) and accuracy over wall time; per client busy/idle time and
training time; the coordinator's busy time by kind of work (union of intervals)
and the time it waited with nothing to do; bytes moved; rejected updates; lease
violations. Several logs are also compared side by side (ratios to the first).
--trace writes the timeline as Chrome trace events for Perfetto's UI or chrome://tracing.
The log is the only input: this runs on any machine, without Redis or torch."""

_EPILOG = """\
examples:
  python -m replay runs/abc/events.jsonl
  python -m replay slots1.jsonl slots3.jsonl --target 0.85      compare two runs
  python -m replay run.jsonl --json | jq .slots                  machine-readable
  python -m replay run.jsonl --report out/                       HTML page + PNGs
  python -m replay run.jsonl --trace run.trace.json              open in Perfetto's UI
  python -m replay run.jsonl --simulate slots=1,2,3,4 quorum=1.0,0.5

Field meanings: docs/replay.md. Exit codes: 0 ok, 2 unreadable input or bad option."""


@dataclass(frozen=True)
class Settings:
    """What the command line asked for."""

    logs: list[Path]
    target: float
    as_json: bool
    report_dir: Path | None
    trace_path: Path | None
    simulate: list[str]
    sim_seed: int
    sim_rounds: int | None
    sim_draw: str
    show_rounds: bool
    to_mlflow: bool = False
    mlflow_uri: str | None = None
    mlflow_experiment: str = "pwfl"

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Settings:
        args = _parser().parse_args(argv)
        if not 0.0 < args.target <= 1.0:
            raise UsageError(f"--target must be an accuracy in (0, 1], got {args.target}")
        return cls(
            logs=[path / "events.jsonl" if path.is_dir() else path for path in args.logs],
            target=args.target,
            as_json=args.json,
            report_dir=args.report,
            trace_path=args.trace,
            simulate=args.simulate or [],
            sim_seed=args.seed,
            sim_rounds=args.sim_rounds,
            sim_draw=args.sim_draw,
            show_rounds=not args.no_rounds,
            to_mlflow=args.to_mlflow,
            mlflow_uri=args.mlflow_uri,
            mlflow_experiment=args.mlflow_experiment,
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m replay", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("logs", nargs="+", type=Path, metavar="RUN.jsonl",
                        help="coordinator event log(s), or run directories (their "
                             "events.jsonl); with several, the first is the baseline of the "
                             "comparison")
    parser.add_argument("--target", type=float, default=0.85, metavar="ACC",
                        help="accuracy whose first arrival is timed, per slot and per run "
                             "(default: 0.85)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout instead of tables (fields: "
                             "docs/replay.md); warnings still go to stderr")
    parser.add_argument("--report", type=Path, metavar="DIR",
                        help="write DIR/report.html (self-contained, figures embedded) and "
                             "the figures as PNG: timeline, accuracy over time, idle fractions")
    parser.add_argument("--trace", type=Path, metavar="OUT.json",
                        help="also write the run(s) as Chrome trace events (JSON Trace Event "
                             "Format; default: none): a track per slot (rounds, quorum "
                             "waits), per client (leases, training) and per slot for the "
                             "coordinator's work (publish, fold, aggregate, evaluate, "
                             "checkpoint), with slot, round and job id in each event's args; "
                             "rejected and late updates, failed jobs and lost clients as "
                             "instant events, accuracy as counters. Open it in Perfetto's UI "
                             "(ui.perfetto.dev, 'Open trace file'; loaded in the browser, "
                             "nothing uploaded) or at chrome://tracing ('Load')")
    parser.add_argument("--simulate", nargs="+", action="extend", metavar="KEY=V1,V2",
                        help="what-if: replay the recorded client and server durations "
                             "through coordinator.scheduling / coordinator.quorum for each "
                             "setting of the grid and predict wall time, idle fractions and "
                             "slot-rounds per hour; keys: slots, policy (partition, greedy), "
                             "quorum (fraction of leased clients), clients_per_round, rounds; "
                             "several keys combine; the recorded setting is always simulated "
                             "too and its prediction error printed")
    parser.add_argument("--sim-rounds", type=int, metavar="N",
                        help="rounds per slot in the what-if (default: the run's --rounds)")
    parser.add_argument("--sim-draw", choices=DRAWS, default="ordered",
                        help="how the what-if draws a client's job durations: ordered = its "
                             "k-th job replays its k-th recorded one (jobs that ran side by "
                             "side keep their shared slow-downs), random = seeded draws "
                             "(default: ordered)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the what-if's random draws (--sim-draw random, and "
                             "jobs beyond the recorded ones) (default: 0)")
    parser.add_argument("--to-mlflow", action="store_true",
                        help="log each run to MLflow instead of printing it: a parent run, a "
                             "child run per slot (its configuration as parameters, test "
                             "accuracy and loss and its clients' metrics per round, PBT and "
                             "merge events as tags, its final model as an artifact); needs "
                             "pip install 'pwfl[mlflow]' (default: off)")
    parser.add_argument("--mlflow-uri", metavar="URI",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///RUNS_DIR/mlflow.db beside the run, no server)")
    parser.add_argument("--mlflow-experiment", default="pwfl", metavar="NAME",
                        help="MLflow experiment (default: pwfl)")
    parser.add_argument("--no-rounds", action="store_true",
                        help="leave out the per-round tables of the terminal summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    try:
        settings = Settings.from_args(argv)
        return _run(settings)
    except ReplayError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _load(settings: Settings) -> list[Run]:
    runs: list[Run] = []
    for path in settings.logs:
        runs.extend(rebuild_runs(read_log(path)))
    return runs


def _run(settings: Settings) -> int:
    if settings.to_mlflow:
        return _to_mlflow(settings)
    runs = _load(settings)
    summaries = [summarise(run, settings.target) for run in runs]
    _print_warnings(summaries)
    whatifs = _whatifs(settings, runs)
    if settings.report_dir is not None:
        _write_report(settings.report_dir, runs, summaries, whatifs)
    if settings.trace_path is not None:
        _write_trace(settings.trace_path, runs)
    if settings.as_json:
        _print_json(summaries, whatifs)
    else:
        _print_tables(settings, summaries, whatifs)
    return 0


def _to_mlflow(settings: Settings) -> int:
    from replay.tracking import export

    for path in settings.logs:
        parent = export(path, uri=settings.mlflow_uri, experiment=settings.mlflow_experiment)
        print(f"replay: {path} logged to MLflow as run {parent}", file=sys.stderr)
    return 0


def _print_warnings(summaries: list[RunSummary]) -> None:
    seen: set[str] = set()
    for summary in summaries:
        for message in summary.warnings:
            if message not in seen:
                seen.add(message)
                print(f"replay: warning: {message}", file=sys.stderr)


def _whatifs(settings: Settings, runs: list[Run]) -> list[WhatIf]:
    if not settings.simulate:
        return []
    grid = parse_grid(settings.simulate)
    return [predict_grid(run, grid, seed=settings.sim_seed, rounds=settings.sim_rounds,
                         draw=settings.sim_draw) for run in runs]


def _write_report(directory: Path, runs: list[Run], summaries: list[RunSummary],
                  whatifs: list[WhatIf]) -> None:
    from replay.report import write_report

    page = write_report(directory, runs, summaries, whatifs)
    print(f"replay: report written to {page}", file=sys.stderr)


def _write_trace(path: Path, runs: list[Run]) -> None:
    from replay.trace import write_trace

    try:
        count = write_trace(path, runs)
    except OSError as exc:
        raise ReplayError(f"{path}: cannot write the trace ({exc.strerror or exc})") from exc
    print(f"replay: trace written to {path} ({count} events, {path.stat().st_size} bytes)",
          file=sys.stderr)


def _print_json(summaries: list[RunSummary], whatifs: list[WhatIf]) -> None:
    objects = [s.to_json() for s in summaries]
    for obj, whatif in zip(objects, whatifs, strict=False):
        obj["whatif"] = whatif.to_json()
    if len(objects) == 1:
        document: dict[str, Any] = objects[0]
    else:
        document = {"runs": objects, "comparison": compare(summaries).to_json()}
    json.dump(document, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _console() -> Console:
    """Full width on a terminal; 132 columns into a file or pipe, where nothing wraps (the
    widest table, a what-if grid over client choice, needs 129)."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=132)
    return console


def _print_tables(settings: Settings, summaries: list[RunSummary], whatifs: list[WhatIf]) -> None:
    console = _console()
    for index, summary in enumerate(summaries):
        render_run(console, summary, show_rounds=settings.show_rounds)
        if whatifs:
            render_whatif(console, whatifs[index])
    if len(summaries) > 1:
        render_comparison(console, compare(summaries))
