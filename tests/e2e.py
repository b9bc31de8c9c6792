"""Helpers for end-to-end tests: run the real coordinator (with real agents and
trainers) as a subprocess and read back its event log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    run_id: str
    runs_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def events_path(self) -> Path:
        return self.runs_dir / self.run_id / "events.jsonl"

    def checkpoint(self, round_: int, slot_id: int = 0) -> dict[str, Any]:
        """The state dict (tensors) of a slot's checkpoint of `round_`."""
        from serialization import decode

        path = self.runs_dir / self.run_id / "checkpoints" / f"slot{slot_id}" / \
            f"round{round_:05d}.pwfl"
        return {k: v.clone() for k, v in decode(path.read_bytes())[0].items()}

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in read_events(self.events_path) if name is None or e["event"] == name]

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill the coordinator if it is still running (its agents see the run end)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def wait(self, timeout_s: float = 120) -> int:
        """The coordinator's exit code; past `timeout_s` it is killed and the test fails
        with its last events and console lines, so a hang in CI can be read afterwards."""
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        try:
            last = "\n".join(json.dumps(e)[:300] for e in self.events()[-20:])
        except (OSError, ValueError) as exc:
            last = f"(no events: {exc})"
        raise AssertionError(f"the coordinator had not exited after {timeout_s:g} s (killed); "
                             f"its last events:\n{last}\nits console:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return (self.runs_dir / f"{self.run_id}.console.log").read_text(errors="replace")

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout_s: float = 60) -> list[dict[str, Any]]:
        """Poll the event log until `predicate(events)` holds; the events then."""
        return wait_for_events(self.events, self.proc, predicate, timeout_s, "coordinator",
                               self.output)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.wait(60)


def wait_for_events(read: Callable[[], list[dict[str, Any]]], proc: subprocess.Popen[bytes],
                    predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float,
                    who: str, output: Callable[[], str]) -> list[dict[str, Any]]:
    """Poll a process's JSON log (`read`) until `predicate(events)` holds; the events then.
    Fails at once, with the end of its console output, if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = read()
        if predicate(events):
            return events
        if proc.poll() is not None:
            raise AssertionError(f"{who} exited early:\n{output()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{who}: condition not reached in time")


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written right now
    return events


def start_coordinator(redis_url: str, runs_dir: Path, run_id: str, *args: str) -> Run:
    argv = [sys.executable, "-m", "coordinator", "--redis", redis_url, "--runs-dir",
            str(runs_dir), "--no-progress", "--http-port", "0", *args]
    if "--resume" not in args:
        argv += ["--run-id", run_id]
    runs_dir.mkdir(parents=True, exist_ok=True)
    console = (runs_dir / f"{run_id}.console.log").open("ab")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=console, stderr=console, env=env,
                            preexec_fn=_default_sigint)
    console.close()
    return Run(run_id, runs_dir, proc)


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A shell starting pytest in the
    background (`make test &`) ignores SIGINT, the ignore is inherited through exec, and
    Python then leaves Ctrl-C ignored: `Run.interrupt` would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def lease_violations(events: list[dict[str, Any]]) -> list[str]:
    """Replay lease_taken / lease_returned in log order; a client held twice is a violation."""
    holder: dict[str, int] = {}
    problems = []
    for e in events:
        if e["event"] == "lease_taken":
            if e["client_id"] in holder:
                problems.append(f"{e['client_id']} taken by {e['slot_id']} while held by "
                                f"{holder[e['client_id']]}")
            holder[e["client_id"]] = e["slot_id"]
        elif e["event"] == "lease_returned":
            holder.pop(e["client_id"], None)
    return problems


def by_slot_round(events: list[dict[str, Any]], name: str) -> Iterator[tuple[int, int]]:
    for e in events:
        if e["event"] == name:
            yield e["slot_id"], e["round"]


def retrained_mean(events: list[dict[str, Any]], slot_id: int, round_: int,
                   previous: dict[str, Any], num_clients: int) -> dict[str, Any]:
    """The example-weighted mean (float64) of a round's client models, retrained here from the
    previous round's model with each job's seed on one thread, as the trainers do."""
    import torch

    from coordinator.settings import TrainingSettings
    from trainer_worker.task import TrainConfig
    from trainer_worker.tasks.synthetic import SyntheticTask

    jobs = [e for e in events
            if e["event"] == "job_published" and (e["slot_id"], e["round"]) == (slot_id, round_)]
    examples = {e["job_id"]: e["num_examples"] for e in events if e["event"] == "update_received"}
    task = SyntheticTask(num_clients=num_clients)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the trainers: same kernels, same sums
    try:
        states, weights = [], []
        for job in jobs:
            model = task.build_model(0)
            model.load_state_dict(previous)
            config = TrainConfig.from_dict(TrainingSettings().job_config(job["seed"]))
            outcome = task.train(model, job["client_id"], config, torch.device("cpu"))
            assert outcome.num_examples == examples[job["job_id"]]
            states.append(model.state_dict())
            weights.append(outcome.num_examples)
    finally:
        torch.set_num_threads(threads)
    assert states, f"slot {slot_id} round {round_} published no jobs"
    total = sum(weights)
    return {name: sum(s[name].double() * w for s, w in zip(states, weights, strict=True)) / total
            for name in states[0]}
