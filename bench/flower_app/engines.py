"""Flower's two engines as `bench.vs_flower` runs them, on the shared Flower App (`app/`).

`run_simulation`: `flwr.simulation.run_simulation` (Ray backend, one CPU per client
actor) in a child process (`python -m bench.vs_flower --flower-child RUN_CONFIG_JSON`),
so Ray starts and stops with it. `run_deployment`: a SuperLink, one SuperNode per
client and `flwr run` (`deployment.Federation`), stopped when the run ends or fails.
Either way the ServerApp writes the run's Outcome as JSON, read back here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.flower_app.deployment import Federation, FlowerProcessError, Plan, SiloNode
from bench.flower_app.runs import CLIENTS, ROOT, FlowerRun, Outcome, Setting
from bench.testbed.silos import link_bytes

if TYPE_CHECKING:
    from bench.testbed import Testbed


def run_simulation(setting: Setting, seed: int, rounds: int, workdir: Path) -> Outcome:
    """Flower's simulation engine in a child process (Ray starts and stops with it)."""
    out = workdir / f"flower-sim-{setting.label}-{seed}.json"
    run = FlowerRun("flower-sim", setting, seed, rounds, str(out))
    argv = [sys.executable, "-m", "bench.vs_flower", "--flower-child",
            json.dumps(run.run_config())]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0 or not Path(run.out).exists():
        raise SystemExit(f"Flower simulation failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return Outcome(**json.loads(Path(run.out).read_text()))


def simulation_child(run_config: dict[str, Any]) -> None:
    """Run the shared Flower App on the simulation engine; its ServerApp writes the Outcome."""
    from flwr.simulation import run_simulation as flower_run_simulation

    from bench.flower_app.app.pwfl_vs_flower.apps import client_app, server_app

    flower_run_simulation(
        server_app=server_app(run_config), client_app=client_app(run_config),
        num_supernodes=CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": os.cpu_count() or 2}})


def deployment_timeout_s(setting: Setting, rounds: int) -> float:
    """A generous bound on one deployment run (whole epochs cost ~10x a step budget)."""
    return 300.0 + rounds * (600.0 if not setting.local_steps else 120.0)


def run_deployment(setting: Setting, seed: int, rounds: int, workdir: Path,
                   bed: Testbed | None = None, step_s: float = 0.0) -> Outcome:
    """Flower's deployment engine: a SuperLink, 6 SuperNodes and `flwr run`, then all stopped;
    with a testbed, SuperNode i in silo i (its link, relay and emulated device)."""
    home = workdir / f"flower-deployment-{setting.label}-{seed}"
    run = FlowerRun("flower-deployment", setting, seed, rounds, str(home / "outcome.json"))
    plan = Plan.on_free_ports(CLIENTS, home)
    if bed is not None:
        plan = on_silos(plan, bed, step_s)
    before = bed.counters() if bed is not None else []
    try:
        with Federation(plan) as federation:
            log = federation.run(run.run_config(), deployment_timeout_s(setting, rounds))
            if not Path(run.out).exists():
                raise FlowerProcessError(federation.failure(
                    "flwr run ended without the ServerApp writing its outcome", log))
    except FlowerProcessError as exc:
        raise SystemExit(f"Flower deployment engine failed: {exc}") from exc
    outcome = Outcome(**json.loads(Path(run.out).read_text()))
    if bed is not None:
        outcome.link = link_bytes(before, bed.counters())
    return outcome


def on_silos(plan: Plan, bed: Testbed, step_s: float) -> Plan:
    """`plan` with partition p's SuperNode in the silo hosting client p, dialling the SuperLink
    through that silo's relay."""
    relayed = bed.expose(plan.superlink_port)
    nodes = tuple(SiloNode(silo.link.netns, address, silo.link.silo_address,
                           silo.emulate_device(step_s))
                  for silo, address in zip(bed.silos, relayed, strict=True)
                  for _ in silo.clients)  # partition p's node in the silo that hosts client p
    return dataclasses.replace(plan, silos=nodes)
