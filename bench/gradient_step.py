"""`python -m bench.gradient_step`: the time per step of batch-gradient federation.

Runs the real coordinator (`--mode gradient`), agents and trainer processes:
4 clients, the Fashion-MNIST CNN (582k parameters, 2.3 MB of float32), batch
32, one slot, on a redis-server over loopback TCP. For every step after the
first round's warm-up it takes the time between consecutive steps (one step:
the weights go down to every agent, each client's trainer takes one batch's
gradient, the gradients come up, the slot averages them and steps its
optimiser) and the slowest client's compute in that step (weights into the
model, forward and backward, gradient out).

In the same run, on the same Redis, just before and just after each layout's
run (averaged), it times the raw transfer of the same bytes
with plain redis-py, one command after another: XADD of the weights, one XREAD
of them per agent, one XADD per gradient and one XREAD of them all, as the floor
a hand-written exchange would pay. Last line: one JSON object with `step_ms`
(median, the default layout), `step_vs_raw_transfer`, `overhead_vs_raw_transfer` (step
minus the slowest client's compute, over the raw transfer), and more. On a
loaded machine the compute of four trainer processes dominates: read the
overhead ratio beside the step time.
"""

from __future__ import annotations

import argparse
import asyncio
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
from bus.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 4
CNN_BYTES = 582_026 * 4


@dataclass(frozen=True)
class Case:
    """A layout: how many agents host the 4 clients (each client has its own trainer)."""

    agents: int
    steps: int
    rounds: int = 2

    @property
    def name(self) -> str:
        return f"{CLIENTS} clients on {self.agents} agent(s)"


@dataclass(frozen=True)
class Outcome:
    case: Case
    step_ms: list[float]
    compute_ms: list[float]
    hop_ms: list[float]
    wall_s: float

    @property
    def median_step_ms(self) -> float:
        return statistics.median(self.step_ms)

    @property
    def median_compute_ms(self) -> float:
        return statistics.median(self.compute_ms)


def _run_coordinator(case: Case, redis_url: str, runs_dir: Path, task: list[str]) -> Path:
    run_id = f"bench-gradient-{case.agents}agents"
    devices = ",".join(["cpu"] * (CLIENTS // case.agents))
    argv = [sys.executable, "-m", "coordinator", "--redis", redis_url, "--runs-dir",
            str(runs_dir), "--run-id", run_id, *task, "--mode", "gradient", "--slots", "1",
            "--clients", str(CLIENTS), "--rounds", str(case.rounds), "--gradient-steps",
            str(case.steps), "--batch-size", "32", "--eval-every", "0", "--local-agents",
            str(case.agents), "--local-devices", devices, "--no-progress", "--http-port", "0"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"coordinator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return runs_dir / run_id / "events.jsonl"


def _steps(path: Path) -> tuple[list[float], list[float], list[float], float]:
    """Per step after round 1 (and after each round's first step): wall, the slowest client's
    compute and the largest agent-to-trainer hop, in ms."""
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steps, compute, hops, last_ts = [], [], [], None
    for e in events:
        if e["event"] != "gradient_step":
            continue
        if e["round"] > 1 and e["step"] > 1 and last_ts is not None:
            steps.append((e["ts"] - last_ts) * 1000)
            compute.append(e["compute_s"] * 1000)
            hops.append(e["hop_s"] * 1000)
        last_ts = e["ts"]
    wall = [e["wall_s"] for e in events if e["event"] == "run_finished"]
    return steps, compute, hops, wall[-1] if wall else float("nan")


async def raw_transfer_s(url: str, agents: int, reps: int) -> dict[str, float]:
    """Median seconds per step of plain redis-py moving the same bytes, one command at a time:
    streams (XADD/XREAD, as gradient mode) and keys (SET/GET)."""
    client = aioredis.Redis.from_url(url)
    payload = os.urandom(CNN_BYTES)

    async def streams() -> None:
        first = await client.xadd("raw:down", {b"b": payload})
        for _ in range(agents):
            await client.xread({"raw:down": "0-0"}, count=1)
        for _ in range(CLIENTS):
            await client.xadd("raw:up", {b"b": payload})
        await client.xread({"raw:up": "0-0"}, count=CLIENTS)
        await client.delete("raw:down", "raw:up")
        del first

    async def keys() -> None:
        await client.set("raw:w", payload)
        for _ in range(agents):
            await client.get("raw:w")
        for i in range(CLIENTS):
            await client.set(f"raw:g{i}", payload)
        for i in range(CLIENTS):
            await client.get(f"raw:g{i}")

    timing = await ameasure_all({"streams": streams, "keys": keys}, reps=reps, warmup=2)
    await client.aclose()
    return {name: t.median_s for name, t in timing.items()}


def _table(outcomes: list[Outcome], raw: dict[int, dict[str, float]]) -> Table:
    table = Table(title="Batch-gradient federation: time per step (CNN 2.3 MB, batch 32, "
                        "loopback Redis)")
    for col in ("layout", "steps", "step ms", "client compute ms", "agent-trainer hop ms",
                "step - compute ms",
                "raw XADD/XREAD ms", "raw SET/GET ms", "step / raw"):
        table.add_column(col, justify="right")
    for o in outcomes:
        r = raw[o.case.agents]
        table.add_row(o.case.name, str(len(o.step_ms)), f"{o.median_step_ms:.1f}",
                      f"{o.median_compute_ms:.1f}", f"{statistics.median(o.hop_ms):.2f}",
                      f"{o.median_step_ms - o.median_compute_ms:.1f}",
                      f"{r['streams'] * 1000:.1f}", f"{r['keys'] * 1000:.1f}",
                      f"{o.median_step_ms / (r['streams'] * 1000):.2f}x")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gradient_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="steps per round (default 200)")
    p.add_argument("--agents", type=int, action="append", choices=(1, 2, 4),
                   help="agents hosting the 4 clients; repeatable (default: 4, then 1)")
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic data with the same CNN (when Fashion-MNIST is not at hand)")
    args = p.parse_args(argv)
    task = (["--task", "synthetic", "--task-option", "model=cnn"] if args.synthetic
            else ["--task", "fashion_mnist"])
    cases = [Case(agents, args.steps) for agents in args.agents or (4, 1)]
    console = Console(stderr=True)
    with EmbeddedRedis(unix_socket=False) as server, tempfile.TemporaryDirectory() as tmp:
        outcomes, raw = [], {}
        for case in cases:
            # Raw transfer just before and just after the case, averaged: the load of a
            # shared machine drifts over minutes, and both sides should see the same.
            before = asyncio.run(raw_transfer_s(server.url, case.agents, 15))
            console.print(f"running {case.name}, {case.rounds} x {case.steps} steps")
            outcomes.append(Outcome(case, *_steps(_run_coordinator(case, server.url,
                                                                   Path(tmp), task))))
            after = asyncio.run(raw_transfer_s(server.url, case.agents, 15))
            raw[case.agents] = {k: (before[k] + after[k]) / 2 for k in before}
    Console(width=160).print(_table(outcomes, raw))
    print(json.dumps(_summary(outcomes, raw)))
    return 0


def _summary(outcomes: list[Outcome], raw: dict[int, dict[str, float]]) -> dict[str, Any]:
    head = outcomes[0]
    raw_ms = raw[head.case.agents]["streams"] * 1000
    out: dict[str, Any] = {
        "step_ms": round(head.median_step_ms, 2),
        "step_vs_raw_transfer": round(head.median_step_ms / raw_ms, 3),
        "raw_transfer_ms": round(raw_ms, 2),
        "client_compute_ms": round(head.median_compute_ms, 2),
        "agent_trainer_hop_ms": round(statistics.median(head.hop_ms), 3),
        # What the framework adds beyond the clients' compute, against the same raw transfer.
        "overhead_vs_raw_transfer": round(
            (head.median_step_ms - head.median_compute_ms) / raw_ms, 3),
        "layout": head.case.name, "bytes_per_step_up": CLIENTS * CNN_BYTES,
        "bytes_per_step_down": (1 + head.case.agents) * CNN_BYTES,
    }
    for o in outcomes[1:]:
        prefix = f"agents{o.case.agents}"
        out[f"{prefix}_step_ms"] = round(o.median_step_ms, 2)
        out[f"{prefix}_step_vs_raw_transfer"] = round(
            o.median_step_ms / (raw[o.case.agents]["streams"] * 1000), 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
