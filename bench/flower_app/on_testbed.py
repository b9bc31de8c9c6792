"""`bench.vs_flower --testbed PROFILE`: PWFL and Flower's deployment engine on the same silos.

PWFL: the coordinator and Redis on the host, one agent per silo inside its namespace
(`bench.testbed.silos.run_pwfl`). Flower: the SuperLink on the host, SuperNode i inside
silo i (`engines.run_deployment(bed=...)`). Both cross the same shaped links and relays,
and both pad each training call to the silo's emulated device time. Each outcome carries
the bytes its run moved over the links (`Outcome.link`) and its emulated calls.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.flower_app import engines
from bench.flower_app.runs import CLIENTS, Outcome, Setting
from bench.testbed import Testbed, silos

Runner = Callable[[Setting, int, int, Path], Outcome]


def runners(bed: Testbed, redis: tuple[str, list[str]], step_s: float,
            pwfl_args: Callable[[Setting, int, int], list[str]],
            pwfl_outcome: Callable[[list[dict[str, Any]], str, int, str], Outcome]
            ) -> dict[str, Runner]:
    """The runs `bench.vs_flower` makes, by engine name, on `bed`'s silos."""

    def pwfl(setting: Setting, seed: int, rounds: int, runs_dir: Path) -> Outcome:
        run_id = f"vs-flower-{setting.label}-{seed}"
        run = silos.run_pwfl(bed, redis, ["--runs-dir", str(runs_dir),
                                          *pwfl_args(setting, seed, rounds)],
                             run_id, runs_dir / run_id, step_s)
        if run.exit_code != 0:
            raise SystemExit(f"PWFL coordinator failed ({run.exit_code}): see "
                             f"{runs_dir / run_id / 'coordinator.console.log'}")
        path = runs_dir / run_id / "events.jsonl"
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out = pwfl_outcome(events, setting.label, seed, "client_id")  # a trainer per client
        out.link = run.link
        out.emulated_calls, out.emulated_overran = run.emulation.calls, run.emulation.overran
        return out

    assert bed.clients == CLIENTS, f"the silos host {bed.clients} clients, not {CLIENTS}"
    return {"pwfl": pwfl, "flower-deployment": functools.partial(
        engines.run_deployment, bed=bed, step_s=step_s)}


def link_lines(outcomes: list[Outcome]) -> list[str]:
    """Per run: MB per round over the silos' links each way, drops, and emulation overruns."""
    lines = ["run                                      seed  MB/round down  MB/round up  "
             "drops  emulated calls  overran"]
    for o in outcomes:
        if o.link is None:
            continue
        rounds = max(len(o.eval_end), 1)
        lines.append(f"{o.engine + ':' + o.setting:40} {o.seed:>4}  "
                     f"{o.link['download_bytes'] / 1e6 / rounds:>13.1f}  "
                     f"{o.link['upload_bytes'] / 1e6 / rounds:>11.1f}  "
                     f"{o.link['download_drops'] + o.link['upload_drops']:>5}  "
                     f"{o.emulated_calls:>14}  {o.emulated_overran:>7}")
    return lines
