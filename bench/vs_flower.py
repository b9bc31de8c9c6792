"""`python -m bench.vs_flower`: PWFL against Flower 1.41's simulation engine, same machine.

Fashion-MNIST, 6 clients, Dirichlet(0.5) partitions made by PWFL's partitioner
(Flower's clients take the same index sets), the same CNN, the same local
training code (`TensorClassificationTask.train`, SGD with momentum 0.9, one
torch thread per client), FedAvg, and the full 10,000-image test set evaluated
centrally after every round. For each partition seed it runs, one after the other:

- Flower simulation (`flwr.simulation.run_simulation`, Ray backend, one CPU per
  client actor) with Flower's default-like settings: 1 epoch, batch 32, lr 0.05;
- PWFL, one slot, the same settings;
- PWFL's default job (`coordinator.settings.TrainingSettings`: a step budget per
  job), labelled as such;
- Flower simulation with PWFL's default job's settings: what the settings are worth
  apart from the framework.

Whole-epoch jobs run `--epoch-rounds` rounds (default 8), step-budget jobs
`--rounds` (default 20): about the same wall time, enough for 85% on every seed.
It reports time to 80/85/88% accuracy (from the start of round 1 to the end of the
evaluation that first reached it), seconds per round (evaluation included), and
framework overhead per round: the round's wall time (model sent out .. aggregate
made, evaluation excluded) minus the training time of the busiest trainer process
(the sum of the training times of the clients it ran that round), as mean±sd over
seeds. Both engines run
two trainers at a time on this 2-core machine: PWFL one per local agent (2 agents),
Flower one Ray actor per CPU; each trains its clients one after the other. PWFL
evaluates off the round's path (the next round does not wait); Flower's server
evaluates between rounds.

With `--flower-engines sim,deployment` it also runs Flower's deployment engine as a
Flower user runs it on one machine (`bench/flower_app/deployment.py`): `flower-superlink
--insecure`, 6 `flower-supernode --insecure` with `--node-config "partition-id=N
num-partitions=6"`, and `flwr run bench/flower_app/app <connection> --run-config ...`,
all on free loopback ports, with Flower's default-like job (row `flower-deployment`).
It keeps Flower's default isolation (`subprocess`: each SuperNode's SuperExec starts a
fresh `flwr-clientapp` process for every message, so every client pays Python, torch
and data start-up every round; that start-up counts as overhead, except torch's warm-up
of the first training call, which falls inside the measured training time, so the
deployment overhead shown is a lower bound) and turns off only the SuperLink's runtime
dependency installation (`uv sync`, which needs a package index; this runs offline).
Both engines run the same Flower App (`bench/flower_app/app`, settings via run config).
Its ServerApp waits until all 6 SuperNodes are connected before round 0's evaluation,
so node start-up is not charged to round 1. Every Flower process is stopped when the
run ends, fails, or the bench is interrupted or sent SIGTERM (process groups, plus a
parent-death signal if the bench is killed).

Flower is an optional extra: pip install 'pwfl[peer]' (flwr[simulation]==1.41.0).
Without it the benchmark says so and exits 0. Last line: one JSON object with
`time_to_85_vs_flower_sim` and `round_overhead_vs_flower_sim` (PWFL's default job
over Flower's default-like job), ratios of the means over seeds; with the deployment
engine also `time_to_85_vs_flower_deployment` and `round_overhead_vs_flower_deployment`.
"""

from __future__ import annotations

import argparse
import importlib.util as importlib_util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.flower_app import engines, on_testbed
from bench.flower_app.runs import (
    ALPHA,
    CLIENTS,
    FLOWER_DEFAULTS,
    ROOT,
    Outcome,
    Setting,
    pwfl_default_setting,
)
from bench.testbed import PROFILES, Testbed
from bench.testbed.profiles import STEP_S

TARGETS = (0.80, 0.85, 0.88)
INSTALL_PEER = "pip install 'pwfl[peer]'  (i.e. pip install 'flwr[simulation]==1.41.0')"


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; rejects empty and repeated seeds."""
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds wants distinct integers, not {text!r}")
    return seeds


def parse_candidate(text: str) -> Setting:
    """'1,32,0.05,80' (EPOCHS,BATCH,LR,MAX_STEPS) or 'local_steps=80,batch_size=32,lr=0.05'
    (Setting's fields; the rest from PWFL's default job) -> a labelled Setting."""
    try:
        if "=" in text:
            pairs = dict(part.split("=", 1) for part in text.split(","))
            base = asdict(pwfl_default_setting())
            unknown = set(pairs) - set(base) - {"label"}
            if unknown:
                raise ValueError(unknown)
            values = {k: type(base[k])(v) for k, v in pairs.items()}
            tag = "-".join(f"{k}{v}" for k, v in pairs.items())
            return Setting(**{**base, **values, "label": f"pwfl-candidate-{tag}"})
        epochs, batch, lr, steps = text.split(",")
        setting = Setting(f"pwfl-candidate-e{epochs}-b{batch}-lr{lr}-s{steps}", int(epochs),
                          int(batch), float(lr), int(steps))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--candidate wants EPOCHS,BATCH,LR,MAX_STEPS or KEY=VALUE,... (keys: epochs, "
            f"batch_size, lr, max_steps, momentum, local_steps), not {text!r}") from None
    return setting


def partition_indices(seed: int) -> list[list[int]]:
    """Each client's training indices as PWFL's task makes them (what Flower's clients use)."""
    from trainer_worker.tasks.fashion_mnist import FashionMnistTask

    task = FashionMnistTask(num_clients=CLIENTS, alpha=ALPHA, partition_seed=seed)
    return [task.training_indices(p).tolist() for p in range(CLIENTS)]  # less the validation split


# --- PWFL -----------------------------------------------------------------------------


def pwfl_args(setting: Setting, seed: int, rounds: int) -> list[str]:
    """The coordinator's options for one slot with `setting` (agents and Redis not included)."""
    return ["--task", "fashion_mnist", "--task-option", f"partition_seed={seed}",
            "--task-option", f"alpha={ALPHA}", "--slots", "1", "--rounds", str(rounds),
            "--no-progress", "--http-port", "0", "--epochs", str(setting.epochs),
            "--batch-size", str(setting.batch_size), "--lr", str(setting.lr), "--momentum",
            str(setting.momentum), "--max-steps", str(setting.max_steps), "--local-steps",
            str(setting.local_steps)]


def run_pwfl(setting: Setting, seed: int, rounds: int, runs_dir: Path) -> Outcome:
    run_id = f"vs-flower-{setting.label}-{seed}"
    argv = [sys.executable, "-m", "coordinator", "--runs-dir", str(runs_dir), "--run-id",
            run_id, "--clients", str(CLIENTS), "--local-agents", "2",
            *pwfl_args(setting, seed, rounds)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"PWFL coordinator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    path = runs_dir / run_id / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pwfl_outcome(events, setting.label, seed)


def pwfl_outcome(events: list[dict[str, Any]], label: str, seed: int,
                 trainer_key: str = "agent_id") -> Outcome:
    """Per-round times from a PWFL event log (one slot). A round's slowest trainer is the
    busiest `trainer_key` (an agent: local agents have one trainer each; on the testbed
    every client has its own trainer, so "client_id")."""
    out = Outcome("pwfl", label, seed)
    start: dict[int, float] = {}
    busy: dict[int, dict[str, float]] = {}
    for e in events:
        r = int(e.get("round") or 0)
        if e["event"] == "model_published":
            start.setdefault(r, e["ts"] - e["duration_s"])
        elif e["event"] == "update_received":
            train_s = (e.get("timings") or {}).get("train_s", 0.0)
            per_agent = busy.setdefault(r, {})
            per_agent[e[trainer_key]] = per_agent.get(e[trainer_key], 0.0) + train_s
        elif e["event"] == "aggregation_finished":
            out.round_wall_s.append(e["ts"] - start[r])
            out.slowest_train_s.append(max(busy.get(r, {}).values(), default=0.0))
        elif e["event"] == "evaluation_finished" and r:
            out.eval_end.append(e["ts"])
            out.accuracy.append(e["accuracy"])
    out.start = start[min(start)]
    return out


# --- Flower ---------------------------------------------------------------------------


# --- report ---------------------------------------------------------------------------


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard deviation over seeds; (None, None) unless every seed has a value
    (a target some seed never reached has no time)."""
    got = [v for v in values if v is not None]
    if not got or len(got) != len(values):
        return None, None
    return statistics.fmean(got), statistics.stdev(got) if len(got) > 1 else 0.0


def summarise(outcomes: list[Outcome]) -> dict[str, dict[str, float | None]]:
    """Per (engine, setting): mean and standard deviation (`KEY_sd`) over seeds."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(f"{o.engine}:{o.setting}", []).append(o)
    rows: dict[str, dict[str, float | None]] = {}
    for name, group in groups.items():
        columns: dict[str, list[float | None]] = {
            f"time_to_{int(t * 100)}_s": [o.time_to(t) for o in group] for t in TARGETS}
        columns["seconds_per_round"] = [o.seconds_per_round() for o in group]
        columns["round_overhead_s"] = [o.overhead_s() for o in group]
        columns["final_accuracy"] = [o.accuracy[-1] for o in group]
        row: dict[str, float | None] = {"seeds": float(len(group))}
        for key, values in columns.items():
            row[key], row[f"{key}_sd"] = _mean_sd(values)
        row["reached_85"] = float(sum(o.time_to(0.85) is not None for o in group))
        rows[name] = row
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


Rows = dict[str, dict[str, float | None]]
# The x columns' baselines: Flower's default-like job on each engine, when it ran.
BASELINES = (("x", f"flower-sim:{FLOWER_DEFAULTS.label}"),
             ("xd", f"flower-deployment:{FLOWER_DEFAULTS.label}"))


def _cell(row: dict[str, float | None], key: str, scale: float = 1.0, digits: int = 1) -> str:
    mean, sd = row.get(key), row.get(f"{key}_sd")
    if mean is None:
        return "-"
    return f"{mean * scale:.{digits}f}±{(sd or 0.0) * scale:.{digits}f}"


def _times(row: dict[str, float | None], key: str) -> str:
    if row.get(key) is None:  # some seed never got there
        return "never" if key != "time_to_85_s" else (
            f"{int(row.get('reached_85') or 0)}/{int(row.get('seeds') or 0)} seeds")
    return _cell(row, key)


def table(rows: Rows) -> list[str]:
    """The printed table: one line per (engine, setting), ratios over each baseline that ran
    (x: Flower simulation, xd: Flower deployment, both with Flower's default-like job)."""
    baselines = [(tag, rows[name]) for tag, name in BASELINES if name in rows]
    head = "".join(f" {'t85 ' + tag:>7} {'ovh ' + tag:>7}" for tag, _ in baselines)
    lines = [f"{'run':40} {'t80 s':>11} {'t85 s':>11} {'t88 s':>11} {'s/round':>10} "
             f"{'ovh ms':>9} {'final %':>10}{head}"]

    def ratio(row: dict[str, float | None], base: dict[str, float | None], key: str) -> str:
        value = _ratio(row.get(key), base.get(key))
        return "-" if value is None else f"{value:.2f}"

    for name, row in rows.items():
        ratios = "".join(f" {ratio(row, base, 'time_to_85_s'):>7} "
                         f"{ratio(row, base, 'round_overhead_s'):>7}" for _, base in baselines)
        lines.append(
            f"{name:40} {_times(row, 'time_to_80_s'):>11} {_times(row, 'time_to_85_s'):>11} "
            f"{_times(row, 'time_to_88_s'):>11} {_cell(row, 'seconds_per_round'):>10} "
            f"{_cell(row, 'round_overhead_s', 1000, 0):>9} "
            f"{_cell(row, 'final_accuracy', 100):>10}{ratios}")
    return lines


def summary(rows: Rows, default_label: str) -> dict[str, Any]:
    """The JSON line: PWFL's default job over Flower's default-like job on each engine,
    then every row's numbers."""
    flower = rows.get(BASELINES[0][1], {})
    deployment = rows.get(BASELINES[1][1], {})
    mine = rows.get(f"pwfl:{default_label}", {})
    same = rows.get(f"pwfl:{FLOWER_DEFAULTS.label}", {})
    flower_mine = rows.get(f"flower-sim:{default_label}", {})
    t85, ovh = "time_to_85_s", "round_overhead_s"
    out: dict[str, Any] = {
        "time_to_85_vs_flower_sim": _ratio(mine.get(t85), flower.get(t85)),
        "round_overhead_vs_flower_sim": _ratio(mine.get(ovh), flower.get(ovh)),
        "same_settings_time_to_85_vs_flower_sim": _ratio(same.get(t85), flower.get(t85)),
        "same_settings_round_overhead_vs_flower_sim": _ratio(same.get(ovh), flower.get(ovh)),
        "default_job_time_to_85_vs_flower_sim_same_job": _ratio(mine.get(t85),
                                                                flower_mine.get(t85)),
    }
    if deployment:
        out["time_to_85_vs_flower_deployment"] = _ratio(mine.get(t85), deployment.get(t85))
        out["round_overhead_vs_flower_deployment"] = _ratio(mine.get(ovh), deployment.get(ovh))
    for name, row in rows.items():
        for key, value in row.items():
            out[f"{name}:{key}"] = None if value is None else round(value, 4)
    return out


def report(rows: Rows, default_label: str) -> dict[str, Any]:
    """Print the table; return the JSON line's object."""
    print("\n".join(table(rows)))
    print("(mean±sd over seeds; time from the start of round 1 to the end of the evaluation "
          "that first reached the accuracy, '-' or 'k/n seeds' where some seed never did; "
          "x columns: over Flower simulation, xd columns: over Flower deployment, both with "
          "Flower's default-like settings)")
    return summary(rows, default_label)


ENGINES = ("sim", "deployment")


def parse_engines(text: str) -> tuple[str, ...]:
    """'sim,deployment' -> ('sim', 'deployment'); unknown, repeated or no engines refused."""
    engines = tuple(e.strip() for e in text.split(",") if e.strip())
    if not engines or len(set(engines)) != len(engines) or set(engines) - set(ENGINES):
        raise argparse.ArgumentTypeError(
            f"--flower-engines wants a comma-separated subset of {','.join(ENGINES)}, "
            f"not {text!r}")
    return engines


def build_plan(engines: tuple[str, ...], default: Setting, candidate: Setting | None = None,
               deployment_default_job: bool = False) -> list[tuple[str, Setting]]:
    """The runs for one seed, in order: (engine, setting)."""
    plan: list[tuple[str, Setting]] = []
    if "sim" in engines:
        plan.append(("flower-sim", FLOWER_DEFAULTS))
    plan += [("pwfl", FLOWER_DEFAULTS), ("pwfl", default)]
    if "sim" in engines:
        # Flower with PWFL's default job too: what the recipe is worth apart from the framework.
        plan.append(("flower-sim", default))
    if "deployment" in engines:
        plan.append(("flower-deployment", FLOWER_DEFAULTS))
        if deployment_default_job:
            plan.append(("flower-deployment", default))
    if candidate:
        plan.append(("pwfl", candidate))
    return plan


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.vs_flower", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20,
                   help="rounds per run of a step-budget job, e.g. PWFL's default (default 20; "
                        "6 with --quick)")
    p.add_argument("--epoch-rounds", type=int, default=8,
                   help="rounds per run of a whole-epoch job, e.g. Flower's default-like "
                        "(default 8, about as much wall time; 3 with --quick)")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="partition seeds, comma-separated (default 0,1,2; 0 with --quick)")
    p.add_argument("--quick", action="store_true", help="one seed, few rounds (smoke run)")
    p.add_argument("--candidate", type=parse_candidate, default=None,
                   metavar="EPOCHS,BATCH,LR,MAX_STEPS|KEY=VALUE,...",
                   help="also run PWFL with this job (a candidate default), e.g. 1,32,0.05,80 "
                        "or local_steps=40,lr=0.03")
    p.add_argument("--flower-engines", type=parse_engines, default=("sim",),
                   metavar="sim,deployment",
                   help="which of Flower's engines to measure (default: sim). 'deployment' "
                        "adds a flower-deployment row: a SuperLink, 6 SuperNodes and `flwr run` "
                        "on loopback, Flower's default-like job; each of its rounds starts a "
                        "fresh ClientApp process per client, so it takes about 10 minutes per "
                        "seed on 2 cores (8 rounds), on top of the ~15 of the other rows")
    p.add_argument("--deployment-default-job", action="store_true",
                   help="with 'deployment', also run Flower's deployment engine with PWFL's "
                        "default job (about 10 more minutes per seed; default off)")
    p.add_argument("--testbed", metavar="PROFILE", choices=tuple(PROFILES),
                   help="run PWFL (one agent per silo) and Flower's deployment engine (one "
                        "SuperNode per silo) over the same emulated silos of this profile "
                        "(root; python -m bench.testbed --help), devices EMULATED by padding; "
                        "the simulation engine is left out (it has no network); reports the "
                        "MB each moves per round over the links")
    p.add_argument("--step-s", type=float, default=STEP_S["cnn"], metavar="SECONDS",
                   help="with --testbed: nominal seconds per training step at speed 1 "
                        f"(default {STEP_S['cnn']:g}); raise it when the link table counts "
                        "overruns beyond the first calls")
    p.add_argument("--flower-child", help=argparse.SUPPRESS)
    return p


Runners = dict[str, Callable[[Setting, int, int, Path], Outcome]]
RUNNERS: Runners = {"flower-sim": engines.run_simulation,
                    "flower-deployment": engines.run_deployment, "pwfl": run_pwfl}


def _run_all(plan: list[tuple[str, Setting]], seeds: list[int], step_rounds: int,
             epoch_rounds: int, runners: Runners = RUNNERS) -> list[Outcome]:
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for name, setting in plan:
                rounds = step_rounds if setting.local_steps else epoch_rounds
                began = time.perf_counter()
                outcomes.append(runners[name](setting, seed, rounds, Path(tmp)))
                print(f"seed {seed}: {name} {outcomes[-1].setting} ({rounds} rounds) done in "
                      f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return outcomes


def _exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so Flower's processes are stopped on the way out."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.flower_child:

        engines.simulation_child(json.loads(args.flower_child))
        return 0
    if importlib_util.find_spec("flwr") is None:
        print(f"bench.vs_flower skipped: Flower is not installed. Install it with {INSTALL_PEER}")
        return 0
    _exit_on_sigterm()
    step_rounds = 6 if args.quick else args.rounds
    epoch_rounds = 3 if args.quick else args.epoch_rounds
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    default = pwfl_default_setting()
    engines_run = ("deployment",) if args.testbed else args.flower_engines
    plan = build_plan(engines_run, default, args.candidate, args.deployment_default_job)
    outcomes = (_on_testbed(args.testbed, args.step_s, plan, seeds, step_rounds, epoch_rounds)
                if args.testbed else _run_all(plan, seeds, step_rounds, epoch_rounds))
    print(f"Fashion-MNIST, {CLIENTS} clients, Dirichlet({ALPHA}), seeds {seeds}; "
          f"{step_rounds} rounds of step-budget jobs, {epoch_rounds} of whole-epoch jobs")
    for setting in {s.label: s for _, s in plan}.values():
        print(f"  {setting.label}: {setting.describe()}")
    if args.testbed:
        print(f"testbed {args.testbed} (EMULATION: devices padded to nominal step times; "
              "'overran': calls whose real compute was longer); bytes over the silos' links:")
        print("\n".join(on_testbed.link_lines(outcomes)))
    print(json.dumps(report(summarise(outcomes), default.label)))
    return 0


def _on_testbed(name: str, step_s: float, plan: list[tuple[str, Setting]], seeds: list[int],
                step_rounds: int, epoch_rounds: int) -> list[Outcome]:
    """The plan's runs over the testbed's silos (PWFL's agents, Flower's SuperNodes)."""
    with Testbed(PROFILES[name]) as bed, tempfile.TemporaryDirectory() as tmp:
        print(f"testbed: {bed.profile.describe()}", file=sys.stderr, flush=True)
        redis = bed.start_redis(Path(tmp) / "redis")
        runners = on_testbed.runners(bed, redis, step_s, pwfl_args, pwfl_outcome)
        return _run_all(plan, seeds, step_rounds, epoch_rounds, runners)


if __name__ == "__main__":
    sys.exit(main())
