"""`python -m bench.vs_flower`: PWFL against Flower 1.41's simulation engine, same machine.

Fashion-MNIST, 6 clients, Dirichlet(0.5) partitions made by PWFL's partitioner
(Flower's clients take the same index sets), the same CNN, the same local
training code (`TensorClassificationTask.train`, SGD with momentum 0.9, one
torch thread per client), FedAvg, and the full 10,000-image test set evaluated
centrally after every round. For each partition seed it runs, one after the other:

- Flower simulation (`flwr.simulation.run_simulation`, Ray backend, one CPU per
  client actor) with Flower's default-like settings: 1 epoch, batch 32, lr 0.05;
- PWFL, one slot, the same settings;
- PWFL's default job (`coordinator.settings.TrainingSettings`), labelled as such.

It reports time to 80/85/88% accuracy (from the start of round 1 to the end of the
evaluation that first reached it), seconds per round (evaluation included), and
framework overhead per round: the round's wall time (model sent out .. aggregate
made, evaluation excluded) minus the training time of the busiest trainer process
(the sum of the training times of the clients it ran that round). Both engines run
two trainers at a time on this 2-core machine: PWFL one per local agent (2 agents),
Flower one Ray actor per CPU; each trains its clients one after the other.

Flower is an optional extra: pip install 'pwfl[peer]' (flwr[simulation]==1.41.0).
Without it the benchmark says so and exits 0. Last line: one JSON object with
`time_to_85_vs_flower_sim` and `round_overhead_vs_flower_sim` (PWFL's default job
over Flower's), medians over seeds.
"""

from __future__ import annotations

import argparse
import importlib.util as importlib_util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 6
ALPHA = 0.5
TARGETS = (0.80, 0.85, 0.88)
INSTALL_PEER = "pip install 'pwfl[peer]'  (i.e. pip install 'flwr[simulation]==1.41.0')"


@dataclass(frozen=True)
class Setting:
    """Local training settings for one side of a comparison."""

    label: str
    epochs: int
    batch_size: int
    lr: float
    max_steps: int = 0
    momentum: float = 0.9


FLOWER_DEFAULTS = Setting("flower-default-like", epochs=1, batch_size=32, lr=0.05)


def pwfl_default_setting() -> Setting:
    """PWFL's default job, as `coordinator.settings.TrainingSettings` has it."""
    from coordinator.settings import TrainingSettings

    t = TrainingSettings()
    return Setting("pwfl-default-job", epochs=t.epochs, batch_size=t.batch_size, lr=t.lr,
                   max_steps=t.max_steps, momentum=t.momentum)


@dataclass
class Outcome:
    """One run: per-round eval times and accuracies, round walls and client train times."""

    engine: str
    setting: str
    seed: int
    start: float = 0.0  # round 1 begins
    eval_end: list[float] = field(default_factory=list)  # after round r (index r-1)
    accuracy: list[float] = field(default_factory=list)
    round_wall_s: list[float] = field(default_factory=list)  # sent out .. aggregated
    slowest_train_s: list[float] = field(default_factory=list)  # busiest trainer

    def time_to(self, target: float) -> float | None:
        for t, acc in zip(self.eval_end, self.accuracy, strict=True):
            if acc >= target:
                return t - self.start
        return None

    def seconds_per_round(self) -> float:
        return (self.eval_end[-1] - self.start) / max(len(self.eval_end), 1)

    def overhead_s(self) -> float:
        """Median over rounds after the first (warm-up) of wall minus slowest training."""
        pairs = list(zip(self.round_wall_s, self.slowest_train_s, strict=True))
        later = pairs[1:] or pairs
        return statistics.median(w - t for w, t in later)


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; rejects empty and repeated seeds."""
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds wants distinct integers, not {text!r}")
    return seeds


def parse_candidate(text: str) -> Setting:
    """'1,32,0.05,80' -> a Setting labelled pwfl-candidate-e1-b32-lr0.05-s80."""
    try:
        epochs, batch, lr, steps = text.split(",")
        setting = Setting(f"pwfl-candidate-e{epochs}-b{batch}-lr{lr}-s{steps}", int(epochs),
                          int(batch), float(lr), int(steps))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--candidate wants EPOCHS,BATCH,LR,MAX_STEPS, not {text!r}") from None
    return setting


def partition_indices(seed: int) -> list[list[int]]:
    """Each client's training indices as PWFL's task makes them (what Flower's clients use)."""
    from trainer_worker.tasks.fashion_mnist import FashionMnistTask

    task = FashionMnistTask(num_clients=CLIENTS, alpha=ALPHA, partition_seed=seed)
    return [task.client_indices(p).tolist() for p in range(CLIENTS)]


# --- PWFL -----------------------------------------------------------------------------


def run_pwfl(setting: Setting, seed: int, rounds: int, runs_dir: Path) -> Outcome:
    run_id = f"vs-flower-{setting.label}-{seed}"
    argv = [sys.executable, "-m", "coordinator", "--runs-dir", str(runs_dir), "--run-id",
            run_id, "--task", "fashion_mnist", "--task-option", f"partition_seed={seed}",
            "--task-option", f"alpha={ALPHA}", "--slots", "1", "--rounds", str(rounds),
            "--clients", str(CLIENTS), "--local-agents", "2", "--no-progress", "--http-port",
            "0", "--epochs", str(setting.epochs), "--batch-size", str(setting.batch_size),
            "--lr", str(setting.lr), "--momentum", str(setting.momentum), "--max-steps",
            str(setting.max_steps)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"PWFL coordinator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    path = runs_dir / run_id / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return pwfl_outcome(events, setting.label, seed)


def pwfl_outcome(events: list[dict[str, Any]], label: str, seed: int) -> Outcome:
    """Per-round times from a PWFL event log (one slot)."""
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
            per_agent[e["agent_id"]] = per_agent.get(e["agent_id"], 0.0) + train_s
        elif e["event"] == "aggregation_finished":
            out.round_wall_s.append(e["ts"] - start[r])
            out.slowest_train_s.append(max(busy.get(r, {}).values(), default=0.0))
        elif e["event"] == "evaluation_finished" and r:
            out.eval_end.append(e["ts"])
            out.accuracy.append(e["accuracy"])
    out.start = start[min(start)]
    return out


# --- Flower ---------------------------------------------------------------------------


def run_flower(setting: Setting, seed: int, rounds: int, workdir: Path) -> Outcome:
    """Flower in a child process (Ray starts and stops with it)."""
    result = workdir / f"flower-{seed}.json"
    argv = [sys.executable, "-m", "bench.vs_flower", "--flower-child", json.dumps(
        {"setting": asdict(setting), "seed": seed, "rounds": rounds, "out": str(result)})]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0 or not result.exists():
        raise SystemExit(f"Flower simulation failed ({done.returncode}):\n{done.stderr[-3000:]}")
    body = json.loads(result.read_text())
    return Outcome(**body)


def _flower_child(spec: dict[str, Any]) -> None:
    """Run one Flower simulation and write its Outcome as JSON."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from trainer_worker.task import TrainConfig
    from trainer_worker.tasks.fashion_mnist import FashionMnistTask

    setting = Setting(**spec["setting"])
    seed, rounds = int(spec["seed"]), int(spec["rounds"])
    out = Outcome("flower-sim", setting.label, seed)
    marks: dict[str, Any] = {"round_end": [], "slowest": []}
    torch.set_num_threads(1)

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        partition = int(context.node_config["partition-id"])
        task = FashionMnistTask(num_clients=CLIENTS, alpha=ALPHA, partition_seed=seed)
        model = task.build_model(0)
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        config = TrainConfig(epochs=setting.epochs, batch_size=setting.batch_size,
                             lr=setting.lr, momentum=setting.momentum,
                             max_steps=setting.max_steps, seed=int(
                                 msg.content.config_records["config"].get("server-round", 0)))  # type: ignore[arg-type]
        began = time.perf_counter()
        outcome = task.train(model, str(partition), config, torch.device("cpu"))
        train_s = time.perf_counter() - began
        metrics = MetricRecord({"train_s": train_s, "pid": os.getpid(),
                                "num-examples": outcome.num_examples})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": metrics}), reply_to=msg)

    def slowest_train(records: list[RecordDict], weighting_key: str) -> MetricRecord:
        per_actor: dict[int, float] = {}
        for record in records:
            m = record.metric_records["metrics"]
            pid = int(m["pid"])  # type: ignore[arg-type]
            per_actor[pid] = per_actor.get(pid, 0.0) + float(m["train_s"])  # type: ignore[arg-type]
        slowest = max(per_actor.values())
        marks["round_end"].append(time.time())
        marks["slowest"].append(slowest)
        return MetricRecord({"slowest_train_s": slowest})

    eval_task = FashionMnistTask(num_clients=CLIENTS, alpha=ALPHA, partition_seed=seed)
    eval_model = eval_task.build_model(0)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        eval_model.load_state_dict(arrays.to_torch_state_dict())
        metrics = eval_task.evaluate(eval_model, torch.device("cpu"))
        now = time.time()
        if server_round == 0:
            out.start = now
        else:
            out.eval_end.append(now)
            out.accuracy.append(metrics["accuracy"])
        marks.setdefault("eval_end", []).append(now)
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                          min_train_nodes=CLIENTS, min_available_nodes=CLIENTS,
                          train_metrics_aggr_fn=slowest_train)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(eval_model.state_dict()),
                       num_rounds=rounds, evaluate_fn=evaluate)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": os.cpu_count() or 2}})
    # Round r's wall: from the end of evaluation r-1 (the model goes out) to aggregation.
    evals = marks["eval_end"]
    out.round_wall_s = [end - evals[i] for i, end in enumerate(marks["round_end"])]
    out.slowest_train_s = marks["slowest"]
    Path(spec["out"]).write_text(json.dumps(asdict(out)))


# --- report ---------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) == len(values) and got else None


def summarise(outcomes: list[Outcome]) -> dict[str, dict[str, float | None]]:
    """Per (engine, setting): medians over seeds of the reported quantities."""
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault(f"{o.engine}:{o.setting}", []).append(o)
    rows: dict[str, dict[str, float | None]] = {}
    for name, group in groups.items():
        row: dict[str, float | None] = {
            f"time_to_{int(t * 100)}_s": _median([o.time_to(t) for o in group])
            for t in TARGETS}
        row["seconds_per_round"] = statistics.median(o.seconds_per_round() for o in group)
        row["round_overhead_s"] = statistics.median(o.overhead_s() for o in group)
        row["final_accuracy"] = statistics.median(o.accuracy[-1] for o in group)
        rows[name] = row
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def report(rows: dict[str, dict[str, float | None]], default_label: str) -> dict[str, Any]:
    flower = rows.get(f"flower-sim:{FLOWER_DEFAULTS.label}", {})
    lines = [f"{'run':48} {'t80 s':>8} {'t85 s':>8} {'t88 s':>8} {'s/round':>8} "
             f"{'ovh ms':>8} {'final':>6} {'t85 x':>7} {'ovh x':>7}"]

    def fmt(v: float | None, scale: float = 1.0, digits: int = 1) -> str:
        return "-" if v is None else f"{v * scale:.{digits}f}"

    for name, row in rows.items():
        lines.append(
            f"{name:48} {fmt(row['time_to_80_s']):>8} {fmt(row['time_to_85_s']):>8} "
            f"{fmt(row['time_to_88_s']):>8} {fmt(row['seconds_per_round']):>8} "
            f"{fmt(row['round_overhead_s'], 1000):>8} {fmt(row['final_accuracy'], 1, 3):>6} "
            f"{fmt(_ratio(row['time_to_85_s'], flower.get('time_to_85_s')), 1, 2):>7} "
            f"{fmt(_ratio(row['round_overhead_s'], flower.get('round_overhead_s')), 1, 2):>7}")
    print("\n".join(lines))
    print("(x columns: over Flower simulation with Flower's default-like settings; "
          "medians over seeds)")
    mine = rows.get(f"pwfl:{default_label}", {})
    same = rows.get(f"pwfl:{FLOWER_DEFAULTS.label}", {})
    summary: dict[str, Any] = {
        "time_to_85_vs_flower_sim": _ratio(mine.get("time_to_85_s"), flower.get("time_to_85_s")),
        "round_overhead_vs_flower_sim": _ratio(mine.get("round_overhead_s"),
                                               flower.get("round_overhead_s")),
        "same_settings_time_to_85_vs_flower_sim": _ratio(same.get("time_to_85_s"),
                                                         flower.get("time_to_85_s")),
        "same_settings_round_overhead_vs_flower_sim": _ratio(same.get("round_overhead_s"),
                                                             flower.get("round_overhead_s")),
    }
    for name, row in rows.items():
        for key, value in row.items():
            summary[f"{name}:{key}"] = None if value is None else round(value, 4)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vs_flower", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10,
                   help="rounds per run (default 10; 5 with --quick)")
    p.add_argument("--seeds", type=parse_seeds, default=None,
                   help="partition seeds, comma-separated (default 0,1,2; 0 with --quick)")
    p.add_argument("--quick", action="store_true", help="one seed, 5 rounds (smoke run)")
    p.add_argument("--candidate", type=parse_candidate, default=None,
                   metavar="EPOCHS,BATCH,LR,MAX_STEPS",
                   help="also run PWFL with this job (a candidate default), e.g. 1,32,0.05,80")
    p.add_argument("--flower-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flower_child:
        _flower_child(json.loads(args.flower_child))
        return 0
    if importlib_util.find_spec("flwr") is None:
        print(f"bench.vs_flower skipped: Flower is not installed. Install it with {INSTALL_PEER}")
        return 0
    rounds = 5 if args.quick and args.rounds == 10 else args.rounds
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    default = pwfl_default_setting()
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            plan: list[tuple[str, Setting]] = [("flower-sim", FLOWER_DEFAULTS),
                                               ("pwfl", FLOWER_DEFAULTS), ("pwfl", default)]
            if args.candidate:
                plan.append(("pwfl", args.candidate))
            for name, setting in plan:
                began = time.perf_counter()
                run = run_flower if name == "flower-sim" else run_pwfl
                outcomes.append(run(setting, seed, rounds, Path(tmp)))
                print(f"seed {seed}: {name} {outcomes[-1].setting} done in "
                      f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    print(f"Fashion-MNIST, {CLIENTS} clients, Dirichlet({ALPHA}), {rounds} rounds, seeds "
          f"{seeds}; PWFL default job: {asdict(default)}; Flower default-like: "
          f"{asdict(FLOWER_DEFAULTS)}")
    print(json.dumps(report(summarise(outcomes), default.label)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
