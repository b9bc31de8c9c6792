"""`python -m bench.round_overhead`: what a round costs beyond the clients' compute.

Runs the real coordinator, agents and trainer processes with no-op training, 6
clients on 2 local agents, with 1 and with 3 slots, for the ~580k-parameter CNN and
a ResNet-18-sized state dict. The no-op "training" changes one value of the model
(`bench.testbed.tasks:PerturbedNoopTask`), so every update is a new blob that moves
and is checked like a trained one. With plain `--noop-training` an update has the
model's digest and the content-addressed blob store finds it stored: a blob above its
4 MiB chunk size (the ResNet's) only has its chunks' TTL refreshed, so no update
crossed Redis, while the raw baseline below paid for each. Each case also
reports what Redis read and sent per round (its INFO counters), so the bytes a round
moves are counted, not assumed. Evaluation is off: what remains is the framework.
For each round:

    overhead = round wall time (model published .. aggregation finished)
               - the slowest client's compute (load + train + encode in its trainer)

Each case runs twice, one after the other: with the default local handoff (the
agents share this host, so models and updates go through shared memory) and
with `--no-local-handoff` (everything through Redis, as agents on other hosts
do). In the same run, on the same Redis, it times raw redis-py SET+GET of the
bytes a round moves (the model once up and once down per agent, each update up
and down) as the baseline a hand-written transfer would pay, and prints ratios.
Last line: one JSON object (`cnn_round_overhead_ms`, `resnet18_round_overhead_ms`,
`resnet18_vs_raw_transfer`: the default path; the same keys ending in
`_redis_only`: through Redis only; and more).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from bench._measure import ameasure_all
from bench.testbed import tasks as testbed_tasks
from bus.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 6
AGENTS = 2


@dataclass(frozen=True)
class Case:
    model: str
    slots: int
    rounds: int
    handoff: bool = True  # False: --no-local-handoff (every byte through Redis)

    @property
    def path(self) -> str:
        return "shm handoff" if self.handoff else "redis only"


@dataclass(frozen=True)
class Outcome:
    case: Case
    nbytes: int
    overhead_ms: list[float]
    round_ms: list[float]
    client_idle_fraction: float | None
    wall_s: float
    redis_in_bytes: int  # what Redis read from its clients during the run (uploads)
    redis_out_bytes: int  # and what it sent them (downloads)
    rounds_closed: int

    @property
    def redis_in_mb_per_round(self) -> float:
        return self.redis_in_bytes / 1e6 / max(self.rounds_closed, 1)

    @property
    def redis_out_mb_per_round(self) -> float:
        return self.redis_out_bytes / 1e6 / max(self.rounds_closed, 1)

    @property
    def median_overhead_ms(self) -> float:
        return statistics.median(self.overhead_ms)


def _run_coordinator(case: Case, redis_url: str, runs_dir: Path) -> Path:
    run_id = f"bench-{case.model}-{case.slots}slots-{'shm' if case.handoff else 'redis'}"
    argv = [sys.executable, "-m", "coordinator", "--redis", redis_url, "--runs-dir",
            str(runs_dir), "--run-id", run_id, "--task", testbed_tasks.SPEC, "--task-option",
            f"model={case.model}", "--eval-every", "0", "--slots",
            str(case.slots), "--rounds", str(case.rounds), "--clients", str(CLIENTS),
            "--local-agents", str(AGENTS), "--no-progress", "--http-port", "0",
            *([] if case.handoff else ["--no-local-handoff"])]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"coordinator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return runs_dir / run_id / "events.jsonl"


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _round_overheads(events: list[dict[str, Any]]) -> tuple[list[float], list[float], int]:
    """Per closed round (the first of each slot left out as warm-up): overhead, wall (ms)."""
    start: dict[tuple[int, int], float] = {}
    compute: dict[tuple[int, int], float] = {}
    overhead, wall, nbytes = [], [], 0
    for e in events:
        key = (e.get("slot_id"), e.get("round"))
        if e["event"] == "model_published":
            start.setdefault(key, e["ts"] - e["duration_s"])  # type: ignore[arg-type]
            nbytes = e["nbytes"]
        elif e["event"] == "update_received":
            t = e.get("timings") or {}
            spent = sum(t.get(k, 0.0) for k in ("load_s", "train_s", "encode_s"))
            compute[key] = max(compute.get(key, 0.0), spent)  # type: ignore[index]
        elif e["event"] == "aggregation_finished" and e["round"] > 1:
            round_s = e["ts"] - start[key]  # type: ignore[index]
            wall.append(round_s * 1000)
            overhead.append((round_s - compute.get(key, 0.0)) * 1000)  # type: ignore[call-overload]
    return overhead, wall, nbytes


def _client_idle(path: Path) -> float | None:
    out = subprocess.run([sys.executable, "-m", "replay", str(path), "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return None
    body = json.loads(out.stdout)
    run = body["runs"][0] if "runs" in body else body
    value = run.get("client_idle_fraction_after_first_round", run.get("client_idle_fraction"))
    return float(value) if value is not None else None


def _redis_net_bytes(url: str) -> tuple[int, int]:
    """Bytes Redis has read from and written to its clients since it started (INFO)."""
    import redis

    with redis.Redis.from_url(url) as client:
        stats = client.info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


def run_case(case: Case, redis_url: str, runs_dir: Path) -> Outcome:
    before = _redis_net_bytes(redis_url)
    path = _run_coordinator(case, redis_url, runs_dir)
    after = _redis_net_bytes(redis_url)
    events = _events(path)
    overhead, wall, nbytes = _round_overheads(events)
    finished = [e for e in events if e["event"] == "run_finished"]
    closed = sum(e["event"] == "aggregation_finished" for e in events)
    return Outcome(case, nbytes, overhead, wall, _client_idle(path),
                   finished[-1]["wall_s"] if finished else float("nan"),
                   after[0] - before[0], after[1] - before[1], closed)


async def raw_transfer_s(url: str, nbytes: int, reps: int) -> float:
    """Median seconds of plain redis-py SET+GET for what one round moves (sequentially)."""
    client = aioredis.Redis.from_url(url)
    payload = os.urandom(nbytes)
    transfers = 1 + CLIENTS  # the model up once, each update up once
    downloads = AGENTS + CLIENTS  # the model down once per agent, each update down once

    async def one_round() -> None:
        for i in range(transfers):
            await client.set(f"raw:{i}", payload)
        for i in range(downloads):
            await client.get(f"raw:{i % transfers}")

    timing = await ameasure_all({"raw": one_round}, reps=reps, warmup=1)
    await client.aclose()
    return timing["raw"].median_s


def _table(outcomes: list[Outcome], raw_s: dict[str, float]) -> Table:
    table = Table(title="Framework overhead per round (no-op training, 6 clients, 2 agents)")
    for col in ("model", "MB", "slots", "path", "rounds", "Redis MB/round in, out",
                "round ms", "overhead ms", "raw SET+GET ms", "overhead / raw", "client idle"):
        table.add_column(col, justify="right")
    for o in outcomes:
        raw_ms = raw_s[o.case.model] * 1000
        idle = "-" if o.client_idle_fraction is None else f"{o.client_idle_fraction:.1%}"
        table.add_row(o.case.model, f"{o.nbytes / 1e6:.1f}", str(o.case.slots), o.case.path,
                      str(len(o.overhead_ms)),
                      f"{o.redis_in_mb_per_round:.1f}, {o.redis_out_mb_per_round:.1f}",
                      f"{statistics.median(o.round_ms):.1f}",
                      f"{o.median_overhead_ms:.1f}", f"{raw_ms:.1f}",
                      f"{o.median_overhead_ms / raw_ms:.2f}x", idle)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.round_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few rounds, CNN only (smoke test)")
    p.add_argument("--model", choices=("cnn", "resnet18"),
                   help="run the cases of this model only (default: both)")
    p.add_argument("--no-redis-only", action="store_true",
                   help="run only the default path (local handoff), not also every case "
                        "through Redis only (default: both, one after the other)")
    args = p.parse_args(argv)
    shapes = [Case("cnn", 1, 4), Case("cnn", 3, 4)] if args.quick else [
        Case("cnn", 1, 21), Case("cnn", 3, 11), Case("resnet18", 1, 9), Case("resnet18", 3, 5)]
    if args.model:
        shapes = [c for c in shapes if c.model == args.model]
    paths = [True] if args.no_redis_only else [True, False]
    cases = [dataclasses.replace(c, handoff=h) for c in shapes for h in paths]
    console = Console(stderr=True)
    with EmbeddedRedis(unix_socket=True) as server, tempfile.TemporaryDirectory() as tmp:
        outcomes = []
        for case in cases:
            console.print(f"running {case.model} with {case.slots} slot(s), {case.rounds} rounds")
            outcomes.append(run_case(case, server.url, Path(tmp)))
        sizes = {o.case.model: o.nbytes for o in outcomes}
        raw_s = {model: asyncio.run(raw_transfer_s(server.url, nbytes, 5))
                 for model, nbytes in sizes.items()}
    Console(width=160).print(_table(outcomes, raw_s))
    print(json.dumps(_summary(outcomes, raw_s)))
    return 0


def _summary(outcomes: list[Outcome], raw_s: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in outcomes:
        prefix, suffix = f"{o.case.model}_{o.case.slots}slot", _suffix(o.case)
        out[f"{prefix}_round_overhead_ms{suffix}"] = round(o.median_overhead_ms, 2)
        out[f"{prefix}_client_idle_fraction{suffix}"] = o.client_idle_fraction
        out[f"{prefix}_redis_mb_per_round_in{suffix}"] = round(o.redis_in_mb_per_round, 2)
        out[f"{prefix}_redis_mb_per_round_out{suffix}"] = round(o.redis_out_mb_per_round, 2)
        out[f"{prefix}_vs_raw_transfer{suffix}"] = _ratio(o, raw_s)
    for model in raw_s:
        out[f"{model}_raw_transfer_ms"] = round(raw_s[model] * 1000, 2)
        for one_slot in (o for o in outcomes if o.case.model == model and o.case.slots == 1):
            suffix = _suffix(one_slot.case)
            out[f"{model}_round_overhead_ms{suffix}"] = round(one_slot.median_overhead_ms, 2)
            out[f"{model}_vs_raw_transfer{suffix}"] = _ratio(one_slot, raw_s)
    return out


def _suffix(case: Case) -> str:
    """JSON keys without a suffix are the default path (local handoff)."""
    return "" if case.handoff else "_redis_only"


def _ratio(outcome: Outcome, raw_s: dict[str, float]) -> float:
    return round(outcome.median_overhead_ms / 1000 / raw_s[outcome.case.model], 3)


if __name__ == "__main__":
    sys.exit(main())
