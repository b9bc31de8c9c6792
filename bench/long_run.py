"""`python -m bench.long_run --rounds 500`: long-run health of a real run.

Runs the real coordinator (3 slots, the synthetic task, 6 clients on 2 local
agents, evaluation and checkpoints every round) on a private Redis for
`--rounds` rounds per slot and samples, every `--sample-s` seconds:

- the resident memory (RSS) of the coordinator, of each agent and of each trainer
  (psutil when installed, else ``VmRSS`` from ``/proc/PID/status``);
- Redis: the number of keys (DBSIZE) and ``used_memory``;
- progress: the rounds every slot has closed (from the coordinator's ``/status``).

It prints the samples, then the figures and a verdict for each criterion (exit
status 1 if one fails): RSS growth after warm-up under `--max-rss-growth` percent
(the mean of the last tenth of the samples against the mean of the first tenth
after warm-up, per process; open file descriptors are shown too), and Redis
bounded (the troughs of the keys and memory in the last third of the run, once
streams are trimmed, no higher than in the first third after warm-up, with a small
allowance; each window spans at least 1.5 trim periods so that it holds a trim).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from bus.embedded import EmbeddedRedis
from coordinator.trimming import TRIM_EVERY_S

ROOT = Path(__file__).resolve().parents[1]
# A blob or two in flight and a few stream entries come and go even at a trough;
# "bounded" allows that much above the early troughs.
KEYS_ALLOWANCE = 8
MEMORY_ALLOWANCE = 0.10
MEMORY_SLACK_BYTES = 256 * 1024


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process, or None once it has gone."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    """How many file descriptors a process holds (Linux), or None."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


@dataclass
class Sample:
    t_s: float
    rounds: int  # the fewest rounds any slot has closed
    rss: dict[str, int]  # process label -> bytes
    fds: dict[str, int]  # process label -> open file descriptors
    redis_keys: int
    redis_used: int


@dataclass
class Watch:
    """What the sampler knows: the coordinator's log, URL and the processes to follow."""

    events_path: Path
    coordinator_pid: int
    labels: dict[int, str] = field(default_factory=dict)
    url: str = ""
    _offset: int = 0

    def refresh(self) -> None:
        """Read the new lines of the coordinator's and agents' logs for URLs and pids."""
        for event in self._new_events(self.events_path):
            if event["event"] == "http_listening":
                self.url = event["url"]
            elif event["event"] == "local_agent_started":
                self.labels[event["agent_pid"]] = event["agent_id"]
        for log in sorted(self.events_path.parent.glob("agent-*.jsonl")):
            for event in _read(log):
                if event["event"] == "trainer_started":
                    self.labels.setdefault(event["trainer_pid"],
                                           f"trainer-{log.stem.split('-')[1]}")

    def _new_events(self, path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        with path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def rounds_done(self) -> int:
        if not self.url:
            return 0
        try:
            with urllib.request.urlopen(self.url + "/status", timeout=5) as reply:  # noqa: S310
                slots = json.loads(reply.read())["slots"]
        except OSError:
            return -1
        return min((s["rounds_done"] for s in slots), default=0)


def _read(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def start_run(args: argparse.Namespace, redis_url: str, runs_dir: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "coordinator", "--redis", redis_url, "--runs-dir",
            str(runs_dir), "--run-id", "long-run", "--no-progress", "--http-port", "0",
            "--task", "synthetic", "--slots", str(args.slots), "--clients", str(args.clients),
            "--rounds", str(args.rounds), "--local-agents", str(args.agents)]
    console = (runs_dir / "console.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, cwd=ROOT, stdout=console, stderr=console, env=env)


def sample(watch: Watch, client: redis.Redis, started: float) -> Sample | None:
    watch.refresh()
    rounds = watch.rounds_done()
    if rounds < 0:
        return None
    pids = {watch.coordinator_pid: "coordinator", **watch.labels}
    rss = {label: value for pid, label in pids.items() if (value := rss_bytes(pid)) is not None}
    fds = {label: value for pid, label in pids.items() if (value := open_fds(pid)) is not None}
    info = client.info("memory")
    return Sample(time.monotonic() - started, rounds, rss, fds, int(client.dbsize()),
                  int(info["used_memory"]))


def collect(args: argparse.Namespace, redis_url: str, runs_dir: Path) -> tuple[list[Sample], int]:
    proc = start_run(args, redis_url, runs_dir)
    watch = Watch(runs_dir / "long-run" / "events.jsonl", proc.pid)
    samples: list[Sample] = []
    started = time.monotonic()
    with redis.Redis.from_url(redis_url) as client:
        try:
            while proc.poll() is None:
                if (s := sample(watch, client, started)) is not None:
                    samples.append(s)
                    print(_row(s), flush=True)
                time.sleep(args.sample_s)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return samples, int(proc.returncode)


def _mb(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def _row(s: Sample) -> str:
    procs = " ".join(f"{k}={_mb(v).strip()}/{s.fds.get(k, '?')}"
                     for k, v in sorted(s.rss.items()))
    return (f"t={s.t_s:7.1f}s rounds={s.rounds:4d} keys={s.redis_keys:4d} "
            f"redis_used={_mb(s.redis_used).strip()}MB rss_MB/fds: {procs}")


@dataclass(frozen=True)
class Verdict:
    name: str
    ok: bool
    detail: str


def rss_verdicts(after: list[Sample], max_growth_pct: float) -> list[Verdict]:
    """Per process: mean RSS of the last tenth of the samples vs the first tenth."""
    tenth = max(1, len(after) // 10)
    verdicts = []
    labels = sorted({k for s in after for k in s.rss})
    for label in labels:
        first = [s.rss[label] for s in after[:tenth] if label in s.rss]
        last = [s.rss[label] for s in after[-tenth:] if label in s.rss]
        if not first or not last:
            continue
        base, end = statistics.mean(first), statistics.mean(last)
        growth = (end - base) / base * 100
        peak = max(s.rss.get(label, 0) for s in after)
        fds = [s.fds[label] for s in after if label in s.fds]
        verdicts.append(Verdict(f"rss {label}", growth < max_growth_pct,
                                f"{_mb(base)} MB -> {_mb(end)} MB ({growth:+.2f}%), "
                                f"peak {_mb(peak).strip()} MB; fds {min(fds)}..{max(fds)}"))
    return verdicts


def redis_verdicts(after: list[Sample], trim_every_s: float = TRIM_EVERY_S) -> list[Verdict]:
    """Keys and used_memory do not grow with the rounds.

    Streams are trimmed every `trim_every_s`, so both follow a sawtooth whose peaks
    depend on where the trims fall; the troughs (what stays once trimmed) show a leak.
    The trough of the last window may exceed that of the first by the allowance. Each
    window spans a third of the run but at least one and a half trim periods, so it
    holds a trim: a window between two trims has no trough, only a rising edge.
    """
    span = after[-1].t_s - after[0].t_s
    window_s = max(span / 3, 1.5 * trim_every_s)
    early = [s for s in after if s.t_s - after[0].t_s <= window_s]
    late = [s for s in after if after[-1].t_s - s.t_s <= window_s]
    keys_early, keys_late = min(s.redis_keys for s in early), min(s.redis_keys for s in late)
    mem_early, mem_late = min(s.redis_used for s in early), min(s.redis_used for s in late)
    peak_keys, peak_mem = max(s.redis_keys for s in after), max(s.redis_used for s in after)
    windows = f"first and last {window_s:.0f} s"
    if span < 2 * window_s:
        windows += f" (overlapping: {span:.0f} s measured; more --rounds separates them)"
    return [
        Verdict("redis keys bounded", keys_late <= keys_early + KEYS_ALLOWANCE,
                f"trough {keys_early} -> {keys_late} over the {windows}; peak {peak_keys}"),
        Verdict("redis memory bounded",
                mem_late <= mem_early * (1 + MEMORY_ALLOWANCE) + MEMORY_SLACK_BYTES,
                f"trough {_mb(mem_early).strip()} MB -> {_mb(mem_late).strip()} MB; "
                f"peak {_mb(peak_mem).strip()} MB"),
    ]


def report(samples: list[Sample], args: argparse.Namespace, returncode: int) -> int:
    warmup_rounds = max(1, int(args.rounds * args.warmup))
    # Measured: after warm-up and before the last round (agents then leave one by one).
    after = [s for s in samples if warmup_rounds <= s.rounds < args.rounds]
    verdicts = [Verdict("run finished", returncode == 0, f"coordinator exit status {returncode}")]
    if len(after) < 6:
        verdicts.append(Verdict("enough samples", False,
                                f"{len(after)} samples after warm-up; lower --sample-s"))
    else:
        verdicts += rss_verdicts(after, args.max_rss_growth) + redis_verdicts(after)
    last = samples[-1] if samples else None
    print(f"\nlong run: {args.rounds} rounds x {args.slots} slots, {args.clients} clients on "
          f"{args.agents} agents; {len(samples)} samples, {len(after)} after warm-up "
          f"({warmup_rounds} rounds); wall {last.t_s if last else 0:.0f} s")
    for v in verdicts:
        print(f"  {'PASS' if v.ok else 'FAIL'}  {v.name:24} {v.detail}")
    summary = {v.name: v.detail for v in verdicts} | {"ok": all(v.ok for v in verdicts)}
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.long_run",
                                description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=500, help="rounds per slot (default 500)")
    p.add_argument("--slots", type=int, default=3)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--sample-s", type=float, default=2.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="fraction of the rounds before measuring growth (default 0.2)")
    p.add_argument("--max-rss-growth", type=float, default=5.0, help="percent (default 5)")
    p.add_argument("--redis", help="an empty Redis to use (default: a private one)")
    p.add_argument("--keep", type=Path, help="keep the run's files here (default: temporary)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pwfl-long-") as tmp:
        runs_dir = args.keep or Path(tmp)
        runs_dir.mkdir(parents=True, exist_ok=True)
        if args.redis:
            samples, code = collect(args, args.redis, runs_dir)
        else:
            with EmbeddedRedis(unix_socket=True) as server:
                samples, code = collect(args, server.url, runs_dir)
    return report(samples, args, code)


if __name__ == "__main__":
    sys.exit(main())
