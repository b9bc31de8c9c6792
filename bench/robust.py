"""`python -m bench.robust`: do the aggregation rules resist Byzantine clients?

For every registered aggregation rule (or those named by `--rules`) and every attack
(none, sign flip x10, scaling x10, Gaussian noise, "A little is enough", and two that
lie about their weight: `count_lie`, an honest update claiming 10^9 examples, and
`scaled_claim`, a x10 update claiming as much; both declare 10^9 as their partition
size too, so only the job's bound caps them), one real run:
the coordinator, 2 local agents and their trainer processes, one slot, all 8 clients
every round, Fashion-MNIST split by Dirichlet(0.5) as the default job does, 2 of the
clients attackers. The attackers are a task plugin (`trainer_worker.tasks.attack`)
that wraps the real task, so the coordinator and the agents run unchanged. Local
training is capped (`--max-steps`) and the model is evaluated once, after the last
round, on the full test set.

Each rule is told the true number of attackers where it takes one (`num_byzantine`;
trimmed mean trims that many from each end; Bulyan gets the most its bound
n >= 4f + 3 allows). A run whose slot fails (every update non-finite: the model
diverged) counts at 10%, what a diverged model scores on the ten balanced classes.

Prints a table (rule x attack: test accuracy, and the gap in points to clean FedAvg),
then one JSON line with `best_rule` (the rule whose largest shortfall over the attacks
is smallest), `worst_gap_points` (that shortfall) and every cell. With several
`--seeds` (partition and model seed) cells show the mean and the spread (min..max).
`--results FILE` keeps every finished run (JSON lines) and reuses them on the next
call with the same settings, so a long grid can be run in parts.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bus.embedded import EmbeddedRedis
from coordinator.strategies import STRATEGIES, resolve_strategy

ROOT = Path(__file__).resolve().parents[1]
ATTACKS = ("none", "sign_flip", "scaling", "gaussian", "alie", "count_lie", "scaled_claim")
ATTACK_TASK = "trainer_worker.tasks.attack:AttackTask"
DIVERGED_ACCURACY = 0.10  # a NaN model predicts one class: 1 in 10 on the balanced test set


@dataclass(frozen=True)
class Settings:
    """What makes two runs comparable (the `--results` cache key, less rule/attack/seed)."""

    task: str
    clients: int
    attackers: int
    rounds: int
    max_steps: int
    alpha: float
    scale: float
    sigma: float


@dataclass(frozen=True)
class Outcome:
    rule: str
    attack: str
    seed: int
    accuracy: float
    diverged: bool
    rejected: int
    wall_s: float
    settings: Settings


def rule_options(rule: str, clients: int, attackers: int) -> dict[str, Any]:
    """The options that tell a rule how many attackers to expect, when it takes them."""
    params = inspect.signature(resolve_strategy(rule).__init__).parameters
    if "num_byzantine" in params:
        if rule == "bulyan":
            return {"num_byzantine": min(attackers, max((clients - 3) // 4, 0))}
        return {"num_byzantine": attackers}
    if "beta" in params and rule == "trimmed_mean":
        return {"beta": attackers / clients}
    return {}


def coordinator_argv(s: Settings, rule: str, attack: str, seed: int, redis_url: str,
                     runs_dir: Path, run_id: str) -> list[str]:
    attacker_ids = [str(s.clients - 1 - i) for i in range(s.attackers)]
    task_options = {"inner": s.task, "attackers": ",".join(attacker_ids), "attack": attack,
                    "scale": s.scale, "sigma": s.sigma}
    if s.task == "fashion_mnist":
        task_options |= {"alpha": s.alpha, "partition_seed": seed}
    else:
        task_options["seed"] = seed  # the synthetic task's data seed
    argv = [sys.executable, "-m", "coordinator", "--redis", redis_url, "--runs-dir",
            str(runs_dir), "--run-id", run_id, "--task", ATTACK_TASK, "--slots", "1",
            "--clients", str(s.clients), "--clients-per-round", str(s.clients),
            "--rounds", str(s.rounds), "--max-steps", str(s.max_steps), "--eval-every",
            str(s.rounds), "--seed", str(seed), "--strategy", rule, "--no-progress",
            "--http-port", "0"]
    for key, value in task_options.items():
        argv += ["--task-option", f"{key}={json.dumps(value)}"]
    for key, value in rule_options(rule, s.clients, s.attackers).items():
        argv += ["--strategy-option", f"{key}={json.dumps(value)}"]
    return argv


def run_one(s: Settings, rule: str, attack: str, seed: int, redis_url: str,
            runs_dir: Path) -> Outcome:
    run_id = f"robust-{rule}-{attack}-{seed}-{time.time_ns()}"
    started = time.monotonic()
    done = subprocess.run(coordinator_argv(s, rule, attack, seed, redis_url, runs_dir, run_id),
                          cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    events = _events(runs_dir / run_id / "events.jsonl")
    accuracy = [e["accuracy"] for e in events if e["event"] == "evaluation_finished"]
    rejected = sum(e["event"] == "update_rejected" for e in events)
    if not accuracy and done.returncode == 0:
        raise SystemExit(f"{run_id}: finished without an evaluation:\n{done.stderr[-2000:]}")
    if not accuracy and rejected == 0:
        raise SystemExit(f"{run_id} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    diverged = not accuracy
    return Outcome(rule, attack, seed, DIVERGED_ACCURACY if diverged else accuracy[-1],
                   diverged, rejected, time.monotonic() - started, s)


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_results(path: Path | None, s: Settings) -> dict[tuple[str, str, int], Outcome]:
    """Finished runs with these settings from a `--results` file."""
    if path is None or not path.exists():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.pop("settings") == asdict(s):
            outcome = Outcome(**row, settings=s)
            found[(outcome.rule, outcome.attack, outcome.seed)] = outcome
    return found


@dataclass(frozen=True)
class Cell:
    """One rule under one attack over the seeds, in percent."""

    mean: float
    low: float
    high: float
    diverged: int


def cells(outcomes: Sequence[Outcome]) -> dict[tuple[str, str], Cell]:
    grouped: dict[tuple[str, str], list[Outcome]] = {}
    for o in outcomes:
        grouped.setdefault((o.rule, o.attack), []).append(o)
    return {key: Cell(statistics.mean(o.accuracy for o in group) * 100,
                      min(o.accuracy for o in group) * 100, max(o.accuracy for o in group) * 100,
                      sum(o.diverged for o in group))
            for key, group in grouped.items()}


def summarise(table: dict[tuple[str, str], Cell], rules: Sequence[str],
              attacks: Sequence[str]) -> dict[str, Any]:
    """best_rule: the smallest largest shortfall to clean FedAvg over the attacks (not none)."""
    clean = table[("fedavg", "none")].mean
    hostile = [a for a in attacks if a != "none"] or list(attacks)
    worst = {rule: max(clean - table[(rule, a)].mean for a in hostile) for rule in rules}
    best = min(rules, key=lambda rule: worst[rule])
    return {
        "best_rule": best,
        "worst_gap_points": round(worst[best], 2),
        "clean_fedavg_accuracy": round(clean, 2),
        "fedavg_worst_gap_points": round(worst.get("fedavg", float("nan")), 2),
        "worst_gap_points_by_rule": {rule: round(gap, 2) for rule, gap in worst.items()},
        "accuracy": {f"{rule}/{attack}": round(table[(rule, attack)].mean, 2)
                     for rule in rules for attack in attacks},
    }


def render(table: dict[tuple[str, str], Cell], rules: Sequence[str], attacks: Sequence[str],
           title: str) -> Table:
    clean = table[("fedavg", "none")].mean
    out = Table(title=title)
    out.add_column("rule")
    for attack in attacks:
        out.add_column(attack, justify="right")
    for rule in rules:
        out.add_row(rule, *(_cell_text(table[(rule, a)], clean) for a in attacks))
    return out


def _cell_text(cell: Cell, clean: float) -> str:
    spread = f" [{cell.low:.1f}..{cell.high:.1f}]" if cell.high > cell.low else ""
    mark = f" {cell.diverged}x div" if cell.diverged else ""
    return f"{cell.mean:.1f}{spread} ({cell.mean - clean:+.1f}){mark}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.robust", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rules", default=",".join(STRATEGIES),
                   help="comma-separated rules (default: every registered rule; fedavg is "
                        "always added as the clean reference)")
    p.add_argument("--attacks", default=",".join(ATTACKS),
                   help=f"comma-separated attacks (default {','.join(ATTACKS)})")
    p.add_argument("--seeds", default="0",
                   help="comma-separated partition and model seeds (default 0)")
    p.add_argument("--rounds", type=int, default=8, help="rounds per run (default 8)")
    p.add_argument("--max-steps", type=int, default=30,
                   help="local steps per job (default 30, batch 16)")
    p.add_argument("--clients", type=int, default=8, help="clients (default 8)")
    p.add_argument("--attackers", type=int, default=2,
                   help="attackers among them, the highest ids (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha (default 0.5)")
    p.add_argument("--scale", type=float, default=10.0,
                   help="sign flip and scaling factor (default 10)")
    p.add_argument("--sigma", type=float, default=1.0,
                   help="Gaussian attack: std of the noise sent as the update (default 1)")
    p.add_argument("--task", default="fashion_mnist",
                   help="inner task: fashion_mnist or synthetic (tests) (default fashion_mnist)")
    p.add_argument("--results", type=Path,
                   help="JSON-lines file: finished runs are appended and reused (default none)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    asked = args.rules.split(",")
    rules = list(dict.fromkeys(["fedavg", *asked]))  # the table's order
    attacks = list(dict.fromkeys(["none", *args.attacks.split(",")]))
    seeds = [int(x) for x in args.seeds.split(",")]
    s = Settings(args.task, args.clients, args.attackers, args.rounds, args.max_steps,
                 args.alpha, args.scale, args.sigma)
    # Runs go in the order asked (the clean reference last when not asked for), so two
    # benches sharing --results split the work instead of both starting on FedAvg.
    outcomes = run_grid(s, list(dict.fromkeys([*asked, "fedavg"])), attacks, seeds,
                        args.results)
    table = cells(outcomes)
    title = (f"{s.clients} clients of which {s.attackers} attack, {s.rounds} "
             f"rounds x {s.max_steps} steps, seeds {args.seeds}: test accuracy % (gap to clean "
             f"FedAvg, points)")
    Console(width=max(100, 24 * (len(attacks) + 1))).print(render(table, rules, attacks, title))
    print(json.dumps({**summarise(table, rules, attacks), "settings": asdict(s),
                      "seeds": seeds}))
    return 0


def run_grid(s: Settings, rules: Sequence[str], attacks: Sequence[str], seeds: Sequence[int],
             results: Path | None) -> list[Outcome]:
    console = Console(stderr=True)
    outcomes = []
    with (EmbeddedRedis(unix_socket=True) as server, tempfile.TemporaryDirectory() as tmp,
          agents(server.url, s.clients, Path(tmp))):
        for seed in seeds:
            for rule in rules:
                for attack in attacks:
                    # Read before each run: another bench on the same file may have done it.
                    outcome = load_results(results, s).get((rule, attack, seed))
                    if outcome is None:
                        outcome = run_one(s, rule, attack, seed, server.url, Path(tmp))
                        _append(results, outcome)
                    console.print(f"{rule:14} {attack:10} seed {seed}: "
                                  f"{outcome.accuracy:.2%}{' diverged' if outcome.diverged else ''}"
                                  f" ({outcome.rejected} rejected, {outcome.wall_s:.0f} s)")
                    outcomes.append(outcome)
    return outcomes


@contextlib.contextmanager
def agents(redis_url: str, clients: int, log_dir: Path) -> Iterator[None]:
    """Two agents (half the clients each) that serve run after run: started once, they
    save each run their start-up (seconds of imports on a busy machine)."""
    ids = [str(i) for i in range(clients)]
    procs = []
    for index, share in enumerate((ids[: clients // 2], ids[clients // 2:])):
        argv = [sys.executable, "-m", "client_agent", "--redis", redis_url, "--clients",
                ",".join(share), "--agent-id", f"robust-{index}", "--allow-task", ATTACK_TASK,
                "--log-file",
                str(log_dir / f"agent-{index}.jsonl")]
        procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)}))
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _append(results: Path | None, outcome: Outcome) -> None:
    if results is not None:
        with results.open("a") as f:
            f.write(json.dumps(asdict(outcome)) + "\n")


if __name__ == "__main__":
    sys.exit(main())
