"""`python -m bench.payoff`: do several slots pay off, at equal compute?

Runs, on identical partitions (the same `--task-option partition_seed`) and at
equal compute (the same number of client jobs: R rounds x 6 clients for one slot,
R rounds x 2 clients for each of three slots), the modes:

- ``one``: 1 slot with every client each round;
- ``independent``: 3 slots, the same configuration, seeds SEED+i;
- ``sweep``: 3 slots, ``--sweep lr=LR/2,LR,2LR``;
- ``pbt``: 3 slots with ``--population pbt``;
- ``merged``: 3 slots from one initial model, ``--merge every=K``;
- ``merged-async`` (not in the default list): ``merged`` whose slots close a round on
  half their clients and fold the late ones in (``--quorum 0.5 --late-policy fold
  --staleness inverse``), so that a slot's fast client does not wait for a slow partner;

and two one-slot baselines a practitioner would try first (``one`` above is the
synchronous one; the three-slot modes are judged against the better of the two):

- ``one-async``: 1 slot, every client each round, ``--quorum 0.5 --late-policy fold
  --staleness inverse`` (a round closes on half its clients; the rest fold in late).

With ``--testbed PROFILE`` (root) every run goes over emulated silos
(`bench/testbed`): six network namespaces behind shaped links with the profile's
delay, one agent per silo inside it, devices emulated by padding each training
call to the silo's nominal time (EMULATION: every table says how many calls
overran it). Each run also records the bytes its silos moved over their links.
``--model resnet18`` swaps the CNN for a ResNet-18-sized state dict (45 MB on the
links) with no-op compute padded to a nominal device step: no accuracy, only
throughput (client jobs per minute) and idle fractions.

Everything is read back from the runs' event logs with the replay code: per run,
the time (since the first round started) at which the best model so far (any slot,
or a merged model) first reaches each target accuracy, the best accuracy at equal
wall time (the shortest run of that seed), the final best accuracy and the busy
fractions of the clients and the coordinator once rounds run. Those accuracies are the
test set's (the coordinator's central evaluation).

Jobs to a target, twice: "jobs to T (test)" and "jobs to T (val)" count the client
updates the run had aggregated (every slot's, rounds past their quorum) when the first
model that reaches T was itself aggregated: judged by its test-set accuracy (central
evaluation) or by its accuracy on the clients' held-out validation splits (federated
evaluation: the next round's clients score it). Counting to the model's aggregation, not
to the moment its figure was logged, keeps evaluation lag (and the machine's load) out of
it: it is the compute the run spent to make a model that good. Each slot's validation
figure covers only that round's clients (2 of 6 with three slots, all 6 with one), so
with several slots the best-so-far over their noisy figures runs ahead of the test
set's. A run that logged no validation (one from before federated evaluation, or `--eval
central`) reads "n/a" there; "never": the target was not reached.

Over the partition seeds: mean and spread (population standard deviation), a table, and
one JSON line with `best_mode`, `best_time_to_85_vs_one_slot`,
`best_accuracy_gain_points` and `jobs_to_target` (per mode and target, the mean jobs to
it by test and by validation accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.testbed import Testbed, silos
from bench.testbed import tasks as testbed_tasks
from bench.testbed.profiles import PROFILES, STEP_S
from replay.events import read_log
from replay.model import Run
from replay.summary import RunSummary, summarise
from replay.timeline import rebuild_runs

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (0.80, 0.85, 0.88)
MODES = ("one", "one-async", "independent", "sweep", "pbt", "merged")
ALL_MODES = (*MODES, "merged-async")
ASYNC = ["--quorum", "0.5", "--late-policy", "fold", "--staleness", "inverse"]
BASELINES = ("one", "one-async")  # one slot: synchronous, asynchronous
GOAL_TIME_RATIO = 0.7
GOAL_GAIN_POINTS = 1.0
# The task option that fixes the clients' data, where it is not partition_seed.
PARTITION_OPTION = {"synthetic": "seed", "bench.testbed.tasks:PerturbedNoopTask": "seed"}


@dataclass(frozen=True)
class RunResult:
    mode: str
    seed: int
    wall_s: float  # first round started to the last evaluation (no evaluations: run end)
    time_to: dict[str, float | None]  # target -> seconds since the first round (test set)
    jobs_to: dict[str, int | None]  # target -> updates aggregated to make the first model that
    # reaches it, by the test set
    curve: list[tuple[float, float]]  # (s since first round, best accuracy so far)
    final_best: float | None
    client_busy: float
    coordinator_busy: float
    jobs: int
    status: str = "finished"  # the run's end as its log says; others are not a wall-time bound
    jobs_per_min: float = 0.0  # client jobs aggregated per minute once rounds run
    link: dict[str, int] | None = None  # testbed: bytes (and drops) over the silos' links
    emulation: dict[str, float] | None = None  # testbed: emulated training calls, overruns
    # the same by the clients' validation splits; None: the run logged no validation (n/a)
    jobs_to_val: dict[str, int | None] | None = None


def mode_args(mode: str, lr: float, merge_every: int, pbt_every: int) -> list[str]:
    """The coordinator options that make a mode (beyond the common ones)."""
    return {
        "one": ["--slots", "1", "--clients-per-round", "6"],
        "one-async": ["--slots", "1", "--clients-per-round", "6", *ASYNC],
        "independent": ["--slots", "3"],
        "sweep": ["--sweep", f"lr={lr / 2:g},{lr:g},{lr * 2:g}"],
        "pbt": ["--slots", "3", "--population", "pbt", "--pbt-every", str(pbt_every)],
        "merged": ["--slots", "3", "--shared-init", "--merge", f"every={merge_every}"],
        "merged-async": ["--slots", "3", "--shared-init", "--merge", f"every={merge_every}",
                         *ASYNC],
    }[mode]


def common_args(args: argparse.Namespace, seed: int) -> list[str]:
    # ResNet-18-sized: no-op compute whose updates still differ from the model (a plain
    # --noop-training update has the model's digest and is never uploaded).
    task = ["--task", args.task] if args.model == "cnn" else [
        "--task", testbed_tasks.SPEC, "--task-option", "model=resnet18", "--eval-every", "0"]
    option = PARTITION_OPTION.get(task[1], "partition_seed")
    agents = [] if args.testbed else ["--local-agents", "2", "--clients", "6"]
    return [*task, *agents, "--rounds", str(args.rounds),
            "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
            "--lr", f"{args.lr:g}", "--seed", str(seed), "--task-option", f"{option}={seed}",
            "--client-choice", args.client_choice, "--no-progress", "--http-port", "0"]


def run_mode(args: argparse.Namespace, mode: str, seed: int) -> Path:
    """Run one mode to the end; its event log."""
    run_id = f"{mode}-seed{seed}"
    coordinator_args = [*common_args(args, seed),
                        *mode_args(mode, args.lr, args.merge_every, args.pbt_every)]
    if args.bed is not None:
        return run_on_testbed(args, run_id, coordinator_args)
    argv = [sys.executable, "-m", "coordinator", "--runs-dir", str(args.out), "--run-id", run_id,
            *coordinator_args]
    log = (args.out / f"{run_id}.console.log").open("wb")
    started = time.monotonic()
    code = subprocess.call(argv, cwd=ROOT, stdout=log, stderr=log,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    log.close()
    print(f"  {run_id}: exit {code}, {time.monotonic() - started:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(f"{run_id} failed (exit {code}): see {log.name}")
    return args.out / run_id / "events.jsonl"


def run_on_testbed(args: argparse.Namespace, run_id: str, coordinator_args: list[str]) -> Path:
    """Run one mode over the testbed's silos; its event log (and `testbed.json` beside it)."""
    started = time.monotonic()
    run = silos.run_pwfl(args.bed, args.redis, ["--runs-dir", str(args.out), *coordinator_args],
                         run_id, args.out / run_id, args.step_s or STEP_S[args.model],
                         ("--allow-task", testbed_tasks.SPEC))
    (args.out / run_id / "testbed.json").write_text(json.dumps(
        {"profile": args.bed.profile.name, "link": run.link,
         "emulation": asdict(run.emulation)}))
    print(f"  {run_id}: exit {run.exit_code}, {time.monotonic() - started:.0f} s; "
          f"{run.emulation.line()}", flush=True)
    if run.exit_code != 0:
        raise SystemExit(f"{run_id} failed (exit {run.exit_code}): see {args.out / run_id}")
    return args.out / run_id / "events.jsonl"


def best_curve(summary: RunSummary, *, validation: bool = False) -> list[tuple[float, float]]:
    """(s since the first round, best accuracy so far over every slot and merged model): on
    the test set, or with `validation` on the clients' validation splits (each point when
    its event was logged)."""
    start = summary.first_round_s or 0.0
    points = sorted(p for slot in summary.slots
                    for p in (slot.validation_over_time if validation
                              else slot.accuracy_over_time))
    curve, best = [], 0.0
    for t, acc in points:
        best = max(best, acc)
        curve.append((t - start, best))
    return curve


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in curve if acc >= target), None)


def accuracy_at(curve: list[tuple[float, float]], t_s: float) -> float | None:
    reached = [acc for t, acc in curve if t <= t_s + 1e-9]
    return reached[-1] if reached else None


def aggregated_at(run: Run) -> dict[tuple[Any, int], tuple[float, int]]:
    """(slot, round) -> (when it was aggregated, its updates), for every aggregated round (a
    log without `aggregation_finished` falls back to a closed round's quorum)."""
    out = {}
    for slot_id, records in run.rounds.items():
        for r in records:
            at = r.aggregated_at if r.aggregated_at is not None else (
                r.quorum_at if r.status == "closed" else None)
            if at is not None:  # aggregated: the model exists, checkpointed or not
                out[(slot_id, r.round)] = (at, r.num_updates)
    return out


def jobs_to(run: Run, figures: dict[Any, list[tuple[float, int, float]]],
            target: float) -> int | None:
    """Client updates the run had aggregated when the first model whose figure reaches
    `target` was aggregated (see the module docstring); None: never."""
    rounds = aggregated_at(run)
    reached = [rounds[(slot_id, round_)][0] for slot_id, points in figures.items()
               for _ts, round_, acc in points if acc >= target and (slot_id, round_) in rounds]
    if not reached:
        return None
    return sum(n for at, n in rounds.values() if at <= min(reached) + 1e-9)


def result_of(mode: str, seed: int, path: Path) -> RunResult:
    run = rebuild_runs(read_log(path))[0]
    summary = summarise(run, 0.85)
    curve = best_curve(summary)
    val_curve = best_curve(summary, validation=True)
    times = {f"{t:g}": time_to(curve, t) for t in TARGETS}
    jobs_to_val = ({f"{t:g}": jobs_to(run, run.validations, t) for t in TARGETS}
                   if val_curve else None)
    finals = [s.final_accuracy for s in summary.slots if s.final_accuracy is not None]
    jobs = sum(c.jobs_done for c in summary.clients)
    rounds_s = summary.wall_s - (summary.first_round_s or 0.0)
    testbed = path.parent / "testbed.json"
    extra = json.loads(testbed.read_text()) if testbed.exists() else {}
    return RunResult(
        mode=mode, seed=seed, wall_s=curve[-1][0] if curve else rounds_s,
        time_to=times, jobs_to={f"{t:g}": jobs_to(run, run.evaluations, t) for t in TARGETS},
        jobs_to_val=jobs_to_val, curve=curve,
        final_best=max(finals, default=None),
        client_busy=1.0 - summary.client_idle_fraction_after_first_round,
        coordinator_busy=summary.coordinator_busy_fraction_after_first_round,
        jobs=jobs, status=summary.status, jobs_per_min=60.0 * jobs / max(rounds_s, 1e-9),
        link=extra.get("link"), emulation=extra.get("emulation"))


# -- aggregation ---------------------------------------------------------------------------


def _stats(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and spread of the values present, and how many were missing."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, len(values)
    return statistics.fmean(present), statistics.pstdev(present), len(values) - len(present)


def _num(value: int | None) -> float | None:
    return None if value is None else float(value)


def _link_mb(r: RunResult) -> float | None:
    """MB over the silos' links, both ways (testbed runs only)."""
    return None if r.link is None else (r.link["download_bytes"] + r.link["upload_bytes"]) / 1e6


NOT_APPLICABLE = {"mean": None, "spread": None, "missing": 0, "n/a": True}


def _jobs_to(mine: list[RunResult]) -> dict[str, dict[str, Any]]:
    """jobs_to_T_test and jobs_to_T_val per target T: test over every run, validation over
    the runs that logged validation (none: n/a)."""
    out: dict[str, dict[str, Any]] = {}
    validated = [r for r in mine if r.jobs_to_val is not None]
    for key in mine[0].jobs_to:
        out[f"jobs_to_{key}_test"] = _stat([_num(r.jobs_to[key]) for r in mine])
    for key in mine[0].jobs_to:
        out[f"jobs_to_{key}_val"] = (_stat([_num((r.jobs_to_val or {}).get(key))
                                            for r in validated])
                                     if validated else dict(NOT_APPLICABLE))
    return out


def _stat(values: Sequence[float | None]) -> dict[str, Any]:
    return dict(zip(("mean", "spread", "missing"), _stats(values), strict=True))


def table(results: list[RunResult]) -> dict[str, dict[str, Any]]:
    """Per mode: each metric's mean, spread and missing count over the seeds."""
    seeds = sorted({r.seed for r in results})
    equal_t = {s: min((r.wall_s for r in results if r.seed == s and r.status == "finished"),
                      default=0.0) for s in seeds}
    rows: dict[str, dict[str, Any]] = {}
    for mode in dict.fromkeys(r.mode for r in results):
        mine = [r for r in results if r.mode == mode]
        metrics: dict[str, list[float | None]] = {
            **{f"time_to_{k}": [r.time_to[k] for r in mine] for k in mine[0].time_to},
            "accuracy_at_equal_time": [accuracy_at(r.curve, equal_t[r.seed]) for r in mine],
            "final_best_accuracy": [r.final_best for r in mine],
            "client_busy": [r.client_busy for r in mine],
            "client_idle": [1.0 - r.client_busy for r in mine],
            "jobs_per_min": [r.jobs_per_min for r in mine],
            "link_mb": [_link_mb(r) for r in mine],
            "overran": [_num(int(r.emulation["overran"])) if r.emulation else None
                        for r in mine],
            "coordinator_busy": [r.coordinator_busy for r in mine],
            "wall_s": [r.wall_s for r in mine], "jobs": [float(r.jobs) for r in mine]}
        rows[mode] = {k: _stat(v) for k, v in metrics.items()}
        jobs = _jobs_to(mine)
        at = list(rows[mode]).index("accuracy_at_equal_time")  # the columns' order
        items = list(rows[mode].items())
        rows[mode] = dict(items[:at] + list(jobs.items()) + items[at:])
    return rows


def jobs_to_target(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per mode and target: mean jobs to it by test and by validation accuracy (None:
    never reached; "n/a": no validation logged)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for mode, row in rows.items():
        for key, stat in row.items():
            if key.startswith("jobs_to_"):
                target, kind = key[len("jobs_to_"):].rsplit("_", 1)
                value = "n/a" if stat.get("n/a") else stat["mean"]
                out.setdefault(mode, {}).setdefault(target, {})[kind] = value
    return out


def _speed_key(row: dict[str, Any]) -> tuple[float, float, float]:
    """Sort key, fastest first: time to 85% (never: last), accuracy at equal time, then
    throughput (runs without accuracy)."""
    t = row["time_to_0.85"]
    missing = t["missing"] or t["mean"] is None
    return (float("inf") if missing else t["mean"],
            -(row["accuracy_at_equal_time"]["mean"] or 0.0), -(row["jobs_per_min"]["mean"] or 0))


def recovered(rows: dict[str, dict[str, Any]], baseline: str) -> dict[str, float | None]:
    """Per mode, the share of the baseline's client idle fraction that the mode turned into
    work: (idle_baseline - idle_mode) / idle_baseline."""
    idle = rows[baseline]["client_idle"]["mean"]
    return {m: (idle - r["client_idle"]["mean"]) / idle if idle and r["client_idle"]["mean"]
            is not None else None for m, r in rows.items()}


def verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The best multi-slot mode against the best one-slot baseline, and whether the issue's
    goal is met."""
    bases = {m: r for m, r in rows.items() if m in BASELINES}
    others = {m: r for m, r in rows.items() if m not in BASELINES}
    if not bases or not others:
        return {"best_mode": None}
    base = min(bases, key=lambda m: _speed_key(bases[m]))
    best = min(others, key=lambda m: _speed_key(others[m]))
    t_best, t_one = others[best]["time_to_0.85"], bases[base]["time_to_0.85"]
    ratio = (t_best["mean"] / t_one["mean"]
             if t_best["mean"] and t_one["mean"] and not t_best["missing"]
             and not t_one["missing"] else None)
    a_best = others[best]["accuracy_at_equal_time"]["mean"]
    a_one = bases[base]["accuracy_at_equal_time"]["mean"]
    gain = (a_best - a_one) * 100 if a_best is not None and a_one is not None else None
    j_best, j_one = others[best]["jobs_per_min"]["mean"], bases[base]["jobs_per_min"]["mean"]
    return {"best_mode": best, "baseline": base, "best_time_to_85_vs_one_slot": ratio,
            "best_accuracy_gain_points": gain,
            "best_jobs_per_min_vs_one_slot": j_best / j_one if j_best and j_one else None,
            "one_slot_client_idle": bases[base]["client_idle"]["mean"],
            "best_recovered_idle": recovered(rows, base)[best],
            "goal_met": bool(ratio is not None and ratio <= GOAL_TIME_RATIO
                             and gain is not None and gain >= GOAL_GAIN_POINTS)}


def _cell(stat: dict[str, Any], scale: float = 1.0, unit: str = "", absent: str = "never"
          ) -> str:
    if stat.get("n/a"):
        return "n/a"
    if stat["mean"] is None:
        return absent
    text = f"{stat['mean'] * scale:.1f}±{stat['spread'] * scale:.1f}{unit}"
    return text + (f" ({stat['missing']} never)" if stat["missing"] else "")


def render(rows: dict[str, dict[str, Any]]) -> str:
    first = rows[next(iter(rows))]
    header = ["mode", *(f"to {k[8:]}" for k in first if k.startswith("time_to")),
              *(f"jobs to {k[8:].rsplit('_', 1)[0]} ({k.rsplit('_', 1)[1]})"
                for k in first if k.startswith("jobs_to")),
              "acc @ equal t", "final best", "client idle", "idle recovered", "jobs/min",
              "coord busy", "link MB", "overran", "wall", "jobs"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    base = verdict(rows).get("baseline")
    back = recovered(rows, base) if base else {}
    for mode, row in rows.items():
        times = [_cell(v, unit="s") for k, v in row.items() if k.startswith("time_to")]
        jobs = [_cell(v) for k, v in row.items() if k.startswith("jobs_to")]
        share = back.get(mode)
        lines.append(" | ".join([
            mode, *times, *jobs, _cell(row["accuracy_at_equal_time"], 100, "%"),
            _cell(row["final_best_accuracy"], 100, "%"), _cell(row["client_idle"], 100, "%"),
            "-" if share is None else f"{share * 100:.0f}%",
            _cell(row["jobs_per_min"]),
            _cell(row["coordinator_busy"], 100, "%"), _cell(row["link_mb"], absent="-"),
            _cell(row["overran"], absent="-"), _cell(row["wall_s"], unit="s"), _cell(row["jobs"])]))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.payoff", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=16, help="rounds per slot (default 16)")
    p.add_argument("--seeds", default="0,1,2", help="partition and run seeds (default 0,1,2)")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"default {','.join(MODES)}; also merged-async")
    p.add_argument("--task", default="fashion_mnist", help="default fashion_mnist")
    p.add_argument("--model", choices=tuple(STEP_S), default="cnn",
                   help="cnn: the task's CNN, trained (accuracy); resnet18: a ResNet-18-sized "
                        "state dict with no-op compute, evaluation off (throughput and idle "
                        "fractions only) (default cnn)")
    p.add_argument("--testbed", choices=tuple(PROFILES), metavar="PROFILE",
                   help="run every mode over the emulated silos of this profile (root; see "
                        "python -m bench.testbed --help): one agent per silo behind its shaped, "
                        "delayed link, devices EMULATED by padding (default: 2 local agents)")
    p.add_argument("--step-s", type=float, default=None, metavar="SECONDS",
                   help="with --testbed: nominal seconds per training step at speed 1 (default "
                        f"{', '.join(f'{k} {v:g}' for k, v in STEP_S.items())}); raise it when "
                        "the tables count overruns beyond the first calls")
    p.add_argument("--max-steps", type=int, default=40, help="local steps per job (default 40)")
    p.add_argument("--batch-size", type=int, default=32, help="default 32")
    p.add_argument("--lr", type=float, default=0.05, help="client lr; the sweep's middle point "
                                                          "(default 0.05)")
    p.add_argument("--merge-every", type=int, default=2, help="merged mode's K (default 2)")
    p.add_argument("--pbt-every", type=int, default=2, help="pbt mode's K (default 2)")
    p.add_argument("--client-choice", choices=("least-used", "rotate", "policy-order"),
                   default="least-used",
                   help="the coordinator's --client-choice for every mode (rotate: slots swap "
                        "clients instead of keeping their own round after round) "
                        "(default least-used)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the runs go (default runs/payoff, or runs/payoff-PROFILE[-MODEL] "
                        "with --testbed)")
    p.add_argument("--reuse", action="store_true",
                   help="read runs already in --out instead of running them again")
    return p


def _planned(args: argparse.Namespace) -> list[tuple[str, int, Path]]:
    """(mode, seed, its event log) for every run the arguments ask for, in running order."""
    return [(mode, seed, args.out / f"{mode}-seed{seed}" / "events.jsonl")
            for seed in (int(s) for s in args.seeds.split(","))
            for mode in args.modes.split(",")]


def _runs_missing(args: argparse.Namespace) -> bool:
    """Whether some run must be made (not `--reuse`, or a planned run has no log yet)."""
    return not args.reuse or any(not path.exists() for _, _, path in _planned(args))


def _run_all(args: argparse.Namespace) -> list[RunResult]:
    results = []
    for mode, seed, path in _planned(args):
        if not (args.reuse and path.exists()):
            path = run_mode(args, mode, seed)
        results.append(result_of(mode, seed, path))
        _save(args.out, results)  # what is done so far survives a stopped benchmark
    return results


def _default_out(args: argparse.Namespace) -> Path:
    if not args.testbed:
        return Path("runs/payoff")
    return Path(f"runs/payoff-{args.testbed}" + ("" if args.model == "cnn" else f"-{args.model}"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    unknown = [m for m in args.modes.split(",") if m not in ALL_MODES]
    if unknown:
        parser.error(f"unknown mode(s) {','.join(unknown)}: choose from {','.join(ALL_MODES)}")
    args.out = args.out or _default_out(args)
    args.out.mkdir(parents=True, exist_ok=True)
    args.bed = None
    if args.testbed and _runs_missing(args):
        with Testbed(PROFILES[args.testbed]) as args.bed:
            print(f"testbed: {args.bed.profile.describe()}", flush=True)
            args.redis = args.bed.start_redis(args.out / "redis")
            results = _run_all(args)
    else:
        results = _run_all(args)
    rows = table(results)
    print(render(rows))
    for r in results:
        if r.status != "finished":
            print(f"note: {r.mode}-seed{r.seed} ended {r.status} after {r.wall_s:.0f} s; its "
                  "numbers are up to then (see its log)")
    if args.testbed:
        print(f"EMULATION: {PROFILES[args.testbed].describe()}; 'overran' counts training "
              "calls whose real compute exceeded their nominal time (emulation failed)")
    print(json.dumps({**verdict(rows), "jobs_to_target": jobs_to_target(rows),
                      "seeds": args.seeds, "rounds": args.rounds,
                      "max_steps": args.max_steps, "testbed": args.testbed,
                      "model": args.model}))
    return 0


def _save(out: Path, results: list[RunResult]) -> None:
    (out / "results.json").write_text(json.dumps(
        {"rows": table(results), "runs": [asdict(r) for r in results]}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
