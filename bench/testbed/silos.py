"""PWFL on the testbed: one agent per silo, inside its namespace, and what they report.

Silo i hosts clients i*k .. i*k+k-1 (k clients per silo, one trainer each): its agent
reaches Redis through the silo's relay and link,
never through shared memory (`--no-local-handoff`: the namespaces share this host's
/dev/shm, which real silos do not), and its trainer pads every training call to the
silo's emulated device time (`--emulate-device`). `emulation_report` reads the
agents' logs back: how many training calls were emulated and how many overran
their nominal time (for those, the emulation failed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.testbed.bed import Testbed, wait


@dataclass(frozen=True)
class EmulationReport:
    """Training calls padded to an emulated device time, and those whose compute overran."""

    calls: int
    overran: int
    overran_first: int  # of `overran`, trainers' first calls (they also load the data)
    compute_s: float
    padded_s: float

    def line(self) -> str:
        return (f"EMULATION: {self.calls} training calls padded to their silo's nominal device "
                f"time; {self.overran} overran it ({self.overran_first} of them a trainer's "
                f"first call, which loads its data): for those the emulation failed; real "
                f"compute {self.compute_s:.0f} s, padding {self.padded_s:.0f} s")


def start_agents(bed: Testbed, silo_redis: list[str], run_id: str, log_dir: Path,
                 step_s: float, *extra: str) -> list[subprocess.Popen[bytes]]:
    """One agent per silo serving its clients of `run_id` (a trainer, i.e. an emulated device,
    per client), exiting when the run ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for silo, url in zip(bed.silos, silo_redis, strict=True):
        argv = [sys.executable, "-m", "client_agent", "--redis", url, "--run-id", run_id,
                "--clients", ",".join(map(str, silo.clients)),
                "--devices", ",".join("cpu" for _ in silo.clients),  # one device per client
                "--agent-id", f"silo-{silo.index}",
                "--exit-when-done", "--no-local-handoff", "--log-level", "warning",
                "--log-file", str(log_dir / f"silo-{silo.index}.jsonl"),
                "--emulate-device", silo.emulate_device(step_s), *extra]
        with (log_dir / f"silo-{silo.index}.console.log").open("ab") as console:
            procs.append(bed.popen(silo, argv, stdout=console, stderr=console,
                                   stdin=subprocess.DEVNULL))
    return procs


def _events(paths: Iterable[Path], name: str) -> list[dict[str, Any]]:
    found = []
    for path in paths:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if f'"{name}"' in line:
                    found.append(json.loads(line))
    return found


def emulation_report(log_dir: Path) -> EmulationReport:
    """What the silos' trainers logged about their emulated devices (`device_emulated`)."""
    events = _events(sorted(log_dir.glob("silo-*.jsonl")), "device_emulated")
    overran = [e for e in events if e["overran"]]
    return EmulationReport(calls=len(events), overran=len(overran),
                           overran_first=sum(e.get("call") == 1 for e in overran),
                           compute_s=sum(float(e["compute_s"]) for e in events),
                           padded_s=sum(float(e["padded_s"]) for e in events))


def link_bytes(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, int]:
    """Bytes over all the silos' links between two `Testbed.counters()` readings, and drops."""
    keys = ("download_bytes", "upload_bytes", "download_drops", "upload_drops")
    return {k: sum(int(a[k]) - int(b[k]) for a, b in zip(after, before, strict=True))
            for k in keys}


@dataclass(frozen=True)
class PwflRun:
    """One coordinator run on the testbed: its exit status, link bytes and emulation."""

    exit_code: int
    link: dict[str, int]
    emulation: EmulationReport


AGENTS_EXIT_S = 60.0


def run_pwfl(bed: Testbed, redis: tuple[str, list[str]], coordinator_args: list[str],
             run_id: str, run_dir: Path, step_s: float, agent_args: Sequence[str] = ()
             ) -> PwflRun:
    """The coordinator on the host (`coordinator_args` plus the bed's Redis, run id and
    `--no-local-handoff`) and one agent per silo (with `agent_args`), until the run ends;
    its figures. The bed's Redis is emptied afterwards."""
    host_url, silo_urls = redis
    run_dir.mkdir(parents=True, exist_ok=True)
    before = bed.counters()
    argv = [sys.executable, "-m", "coordinator", *coordinator_args, "--redis", host_url,
            "--run-id", run_id, "--no-local-handoff", "--clients", str(bed.clients)]
    with (run_dir / "coordinator.console.log").open("ab") as console:
        coordinator = bed.popen(None, argv, stdout=console, stderr=console,
                                stdin=subprocess.DEVNULL)
    agents = start_agents(bed, silo_urls, run_id, run_dir, step_s, *agent_args)
    code = wait(coordinator)
    for agent in agents:  # they leave once the run is over (--exit-when-done)
        try:
            agent.wait(AGENTS_EXIT_S)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    _flush(host_url)
    return PwflRun(code, link_bytes(before, bed.counters()), emulation_report(run_dir))


def _flush(url: str) -> None:
    """Empty the bed's Redis: runs are independent and keep what they need on disk, and a
    finished run's 45 MB blobs would otherwise stay for their TTL (30 min) under the next."""
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushall()
