"""PWFL from Python: ``from coordinator import api as pwfl``.

``pwfl.run(local_agents=2, sweep={"lr": [0.01, 0.03, 0.1]}, rounds=5)`` starts a run and
returns its `RunResult` (the slots' final models and accuracies, the run directory, the
replay's tables); ``pwfl.load("runs/ID")`` returns the same for a finished run.

Keyword arguments are the command line's options, named as run-file keys (``local_agents``
for ``--local-agents``, ``task_option={"alpha": 0.5}``, ``no_local_handoff=True``);
``config="run.toml"`` reads a run file first and the keywords override it. The run is
``python -m coordinator --config FILE`` in a child process, so Python, a run file and the
command line resolve options by one code path and write the same ``run.toml``; the child
also keeps the coordinator's event loop, signals and logging out of the caller's process
(a notebook's kernel has its own loop). Progress is one live line per run: a display in a
notebook, a line on stderr in a terminal.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator import runfile
from coordinator.cli import build_parser
from coordinator.run_result import RunResult, load
from coordinator.settings import new_run_id

__all__ = ["RunError", "RunResult", "load", "run"]
POLL_S = 0.5  # how often progress reads the event log while the run goes on
# Rounds count when aggregated; accuracy is shown per kind: validation (the clients' held-out
# splits, `validation_finished`) and test (the coordinator's test set, `evaluation_finished`).
SHOWN_EVENTS = frozenset({"run_started", "run_resumed", "aggregation_finished",
                          "validation_finished", "evaluation_finished", "slot_finished",
                          "slot_failed", "run_finished"})


SLOT_SOURCES = frozenset({"slot", "sweep", "slot_config"})


class RunError(RuntimeError):
    """The run did not start or stopped with an error (the message has its console's end)."""


def run(config: str | Path | None = None, *, progress: bool = True,
        **options: Any) -> RunResult:
    """Run PWFL to the end and return its result (exit status 0 or 1: finished, or stopped
    with the status in the result); `RunError` for an error the coordinator reported."""
    document = request(config, options)
    run_id = str(document.pop("run_id", None) or new_run_id())
    run_dir = Path(str(document.get("runs_dir", "runs"))) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pwfl-run-") as folder:
        path = Path(folder) / "request.toml"
        path.write_text(runfile.dumps(document))
        argv = [sys.executable, "-m", "coordinator", "--config", str(path), "--run-id", run_id,
                "--no-progress"]
        code = _supervise(argv, run_dir, _Progress(run_id) if progress else None)
    if code not in (0, 1):
        console = (run_dir / "console.log").read_text(errors="replace")[-3000:]
        raise RunError(f"run {run_id} exited with status {code}:\n{console}")
    return load(run_dir)


def request(config: str | Path | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """The run file's keys and tables (`config`'s, then `options` over them), keys checked."""
    document = runfile.read_document(Path(config)) if config is not None else {}
    actions = runfile.option_actions(build_parser())
    known = sorted([*actions, *runfile.TABLES])
    given = {}
    for key, value in options.items():
        name = runfile.normal_key(key)
        if name not in known:
            raise runfile.unknown_key_error(key, known, "pwfl.run")
        given[name] = _plain(name, value)
    if SLOT_SOURCES & set(given):  # the keywords' slots replace the file's
        document = {k: v for k, v in document.items() if runfile.normal_key(k) not in
                    SLOT_SOURCES}
    return {**{runfile.normal_key(k): v for k, v in document.items()}, **given}


def _plain(key: str, value: Any) -> Any:
    """A keyword's value as a run file holds it (sweep={"lr": [..]} -> ["lr=.."])."""
    if key == "sweep" and isinstance(value, Mapping):
        return [f"{k}={','.join(json.dumps(v) for v in values)}" for k, values in value.items()]
    if key == "sweep" and isinstance(value, str):
        return [value]
    if isinstance(value, Path):
        return str(value)
    return value


def _supervise(argv: list[str], run_dir: Path, shown: _Progress | None) -> int:
    """Run the coordinator, showing progress from its event log; its exit status."""
    with (run_dir / "console.log").open("ab") as console:
        proc = subprocess.Popen(argv, stdout=console, stderr=console)
    reader = _EventTail(run_dir / "events.jsonl")
    try:
        while True:
            try:
                code = proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                code = None
            if shown is not None:
                shown.update(reader.new_events())
            if code is not None:
                return code
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)  # the coordinator's graceful stop
        proc.wait()
        raise
    finally:
        if shown is not None:
            shown.close()


class _EventTail:
    """The complete lines added to a JSON log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_events(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        events = []
        for line in complete.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") in SHOWN_EVENTS:
                events.append(event)
        return events


def _percent(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, int | float) else "-"


class _Progress:
    """One line per run: each slot's rounds aggregated and its latest validation and test
    accuracy, redrawn as events come."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.rounds = 0
        # slot -> {"round": rounds aggregated, "val": accuracy, "test": accuracy}
        self.slots: dict[int, dict[str, Any]] = {}
        self.state = "starting"
        self.handle = _notebook_handle()

    def update(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            name = event["event"]
            if name in ("run_started", "run_resumed"):
                self.rounds, self.state = int(event.get("rounds", 0)), "running"
            elif name == "run_finished":
                self.state = str(event.get("status", "finished"))
            elif isinstance(event.get("slot_id"), int):
                self._slot_event(name, event)
        if events:
            self._show()

    def _slot_event(self, name: str, event: dict[str, Any]) -> None:
        slot = self.slots.setdefault(int(event["slot_id"]), {"round": 0})
        if name == "aggregation_finished" and isinstance(event.get("round"), int):
            slot["round"] = max(slot["round"], event["round"])
        elif name == "validation_finished" and event.get("accuracy") is not None:
            slot["val"] = event["accuracy"]
        elif name == "evaluation_finished" and event.get("accuracy") is not None:
            slot["test"] = event["accuracy"]

    def text(self) -> str:
        slots = "  ".join(f"slot {i}: {v['round']}/{self.rounds} val {_percent(v.get('val'))} "
                          f"test {_percent(v.get('test'))}" for i, v in sorted(self.slots.items()))
        return f"PWFL run {self.run_id} [{self.state}] {slots}".rstrip()

    def _show(self) -> None:
        if self.handle is not None:
            self.handle.update({"text/plain": self.text()}, raw=True)
        else:
            sys.stderr.write("\r" + self.text())
            sys.stderr.flush()

    def close(self) -> None:
        if self.handle is None:
            sys.stderr.write("\n")


def _notebook_handle() -> Any:
    """A display handle when running in a Jupyter kernel, else None (a terminal)."""
    if "ipykernel" not in sys.modules:
        return None
    from IPython.display import display

    return display({"text/plain": "PWFL run starting"}, raw=True,  # type: ignore[no-untyped-call]
                   display_id=True)
