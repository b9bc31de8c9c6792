"""A run into MLflow, from its event log: ``python -m replay --to-mlflow RUN_DIR``.

One MLflow parent run per PWFL run (run-level settings as parameters, wall time and the
best final accuracy as metrics, run.toml and the lineage as artifacts) and one child run
per slot: the slot's resolved configuration as parameters; per round (the MLflow step)
``test_accuracy`` and ``test_loss`` of the central evaluation (the test set),
``federated_validation_accuracy`` and ``federated_validation_loss`` of the federated one (the
clients' held-out validation splits, ``validation_finished``; the step is the round of the
model evaluated, 0 the initial one), and the example-weighted
mean of every numeric metric its clients reported with their updates (``train_loss``,
``train_accuracy``, and validation figures such as ``val_accuracy`` where a task sends
them); PBT exploits and explores and merges as tags ``event.RRRR.NAME`` with a readable
line (and ``pbt_exploits`` / ``merges`` counters); the slot's newest checkpoint as the
artifact ``model/``. Logging a run again replaces its earlier MLflow runs.

The store: ``MLFLOW_TRACKING_URI`` when set (MLflow reads it), else a SQLite file beside
the runs, ``RUNS_DIR/mlflow.db``, with artifacts in ``RUNS_DIR/mlartifacts`` (no server;
``mlflow ui --backend-store-uri sqlite:///RUNS_DIR/mlflow.db`` shows it). ``mlflow`` is an
optional extra (``pip install 'pwfl[mlflow]'``), imported only here.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from replay.errors import ReplayError, TrackingError
from replay.events import Event, read_log
from replay.model import Run
from replay.population import POPULATION_EVENTS, describe
from replay.summary import summarise
from replay.timeline import rebuild_runs

EXPERIMENT = "pwfl"
RUN_ID_TAG = "pwfl.run_id"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value (8000 since 2.x; kept below)


def tracking_uri(runs_dir: Path) -> str:
    """MLFLOW_TRACKING_URI, else a SQLite store in the runs directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir.resolve()}/mlflow.db"


def export(run_dir: Path, *, uri: str | None = None, experiment: str = EXPERIMENT) -> str:
    """Log the run in `run_dir` (or the log file given) to MLflow; the parent run's id."""
    log_path = run_dir / "events.jsonl" if run_dir.is_dir() else run_dir
    run_dir = log_path.parent
    runs = rebuild_runs(read_log(log_path))
    if not runs:
        raise TrackingError(f"{log_path}: no run in the log")
    client = _client(uri or tracking_uri(run_dir.parent))
    experiment_id = _experiment(client, experiment, run_dir.parent / "mlartifacts")
    events = read_log(log_path).events
    return _Exporter(client, experiment_id, runs[-1], run_dir, events).export()


def export_after_run(run_dir: Path) -> None:
    """`python -m coordinator --mlflow`: log the run, saying on stderr how it went; a
    failure is reported and leaves the run's exit status alone."""
    try:
        parent = export(run_dir)
    except (ReplayError, OSError) as exc:
        print(f"MLflow: not logged: {exc}", file=sys.stderr)  # noqa: T201 - the console
        return
    print(f"MLflow: logged as run {parent}", file=sys.stderr)  # noqa: T201 - the console


def _client(uri: str) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("MLflow is not installed: pip install 'pwfl[mlflow]'") from None
    return MlflowClient(tracking_uri=uri)


def _experiment(client: Any, name: str, artifacts: Path) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(client.create_experiment(name, artifact_location=artifacts.resolve().as_uri()))


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:MAX_PARAM_CHARS]


def _metric_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def client_metrics(events: Iterable[Event], slot_id: int) -> dict[int, dict[str, float]]:
    """Per round, the example-weighted mean of each numeric metric the slot's clients sent."""
    sums: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    weights: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in events:
        if event.name != "update_received" or event.slot_id != slot_id:
            continue
        if event.text("status") != "ok":
            continue
        weight = max(event.num("num_examples"), 0.0)
        for key, value in (event.fields.get("metrics") or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and weight:
                sums[event.round][key] += float(value) * weight
                weights[event.round][key] += weight
    return {rnd: {k: sums[rnd][k] / weights[rnd][k] for k in sums[rnd]} for rnd in sums}


class _Exporter:
    """Logs one rebuilt run: a parent run, then a child per slot."""

    def __init__(self, client: Any, experiment_id: str, run: Run, run_dir: Path,
                 events: list[Event]) -> None:
        self.client, self.experiment_id = client, experiment_id
        self.run, self.run_dir = run, run_dir
        self.events = [e for e in events if e.run_id == run.run_id]
        self.summary = summarise(run, 0.85)

    def export(self) -> str:
        self._forget_earlier()
        parent = self.client.create_run(self.experiment_id, run_name=self.run.run_id,
                                        start_time=self._ms(self.run.start),
                                        tags={RUN_ID_TAG: self.run.run_id,
                                              "pwfl.status": self.run.status})
        parent_id = parent.info.run_id
        self._log_parent(parent_id)
        for slot in self.summary.slots:
            if isinstance(slot.slot_id, int):
                self._log_slot(parent_id, slot.slot_id)
        self.client.set_terminated(parent_id, self._status(), end_time=self._ms(self.run.end))
        return str(parent_id)

    @staticmethod
    def _ms(ts: float) -> int:
        """MLflow's times: the PWFL run's own (ms since the epoch), not the export's."""
        return int(1000 * ts)

    def _forget_earlier(self) -> None:
        earlier = self.client.search_runs([self.experiment_id],
                                          f"tags.`{RUN_ID_TAG}` = '{self.run.run_id}'")
        for old in earlier:
            self.client.delete_run(old.info.run_id)

    def _status(self) -> str:
        return {"finished": "FINISHED", "interrupted": "KILLED"}.get(self.run.status, "FAILED")

    def _log_parent(self, run_id: str) -> None:
        settings = self._settings()
        self._params(run_id, {k: v for k, v in settings.items() if k not in ("slot", "bounds")})
        self.client.log_metric(run_id, "wall_s", self.run.wall_s)
        if self.summary.final_accuracy is not None:
            self.client.log_metric(run_id, "best_final_test_accuracy",
                                   self.summary.final_accuracy)
        if self.summary.final_validation_accuracy is not None:
            self.client.log_metric(run_id, "best_final_validation_accuracy",
                                   self.summary.final_validation_accuracy)
        if (self.run_dir / "run.toml").exists():
            self.client.log_artifact(run_id, str(self.run_dir / "run.toml"))
        merged = self.run_dir / "checkpoints" / "result.pwfl"  # --merge final's kept model
        if merged.exists():
            self.client.log_artifact(run_id, str(merged), "model")
        lineage = "\n".join(f"{s.t_s:9.2f}s {s.text}" for s in self.summary.lineage)
        if lineage:
            self.client.log_text(run_id, lineage + "\n", "lineage.txt")

    def _settings(self) -> dict[str, Any]:
        path = self.run_dir / "run.toml"
        if path.exists():
            return tomllib.loads(path.read_text())
        return {k: v for k, v in self.run.config.items() if k != "slot_configs"}

    def _params(self, run_id: str, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(_metric_name(str(k)), _text(v)) for k, v in sorted(values.items())]
        for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(run_id, params=params[start:start + 100])

    def _log_slot(self, parent_id: str, slot_id: int) -> None:
        label = self.summary.slot_labels.get(str(slot_id), f"slot {slot_id}")
        child = self.client.create_run(
            self.experiment_id, run_name=f"slot {slot_id}: {label}",
            start_time=self._ms(self.run.start),
            tags={"mlflow.parentRunId": parent_id, RUN_ID_TAG: self.run.run_id,
                  "pwfl.slot_id": str(slot_id), "pwfl.label": label})
        child_id = child.info.run_id
        configs = self.run.config.get("slot_configs") or []
        if slot_id < len(configs):
            self._params(child_id, dict(configs[slot_id]))
        self._log_rounds(child_id, slot_id)
        self._log_population(child_id, slot_id)
        self._log_model(child_id, slot_id)
        self.client.set_terminated(child_id, self._status(), end_time=self._ms(self.run.end))

    def _log_rounds(self, run_id: str, slot_id: int) -> None:
        from mlflow.entities import Metric

        metrics = []
        for record in self.run.rounds.get(slot_id, []):
            ts = int(1000 * (record.closed_at or self.run.end))
            for key, value in (("test_accuracy", record.accuracy), ("test_loss", record.loss),
                               ("federated_validation_loss", record.validation_loss)):
                if value is not None:
                    metrics.append(Metric(key, float(value), ts, record.round))
        for at, rnd, accuracy in self.run.validations.get(slot_id, []):
            metrics.append(Metric("federated_validation_accuracy", accuracy, int(1000 * at),
                                  max(rnd, 0)))
        for rnd, values in sorted(client_metrics(self.events, slot_id).items()):
            ts = int(1000 * self.run.end)
            metrics += [Metric(_metric_name(k), v, ts, rnd) for k, v in sorted(values.items())]
        for start in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])

    def _log_population(self, run_id: str, slot_id: int) -> None:
        counts: dict[str, int] = defaultdict(int)
        for event in self.events:
            if event.name not in POPULATION_EVENTS or event.slot_id != slot_id:
                continue
            line = describe(event.name, event.fields)
            self.client.set_tag(run_id, f"event.{max(event.round, 0):04d}.{event.name}", line)
            counts["pbt_exploits" if event.name == "pbt_exploit" else "merges"] += (
                event.name in ("pbt_exploit", "merge_adopted"))
            self.client.log_metric(run_id, f"event_{event.name}", 1.0,
                                   step=max(event.round, 0))
        for key, count in counts.items():
            self.client.set_tag(run_id, f"pwfl.{key}", str(count))

    def _log_model(self, run_id: str, slot_id: int) -> None:
        folder = self.run_dir / "checkpoints" / f"slot{slot_id}"
        models = sorted(p for p in folder.glob("round*.pwfl") if p.name.count(".") == 1)
        if models:
            self.client.log_artifact(run_id, str(models[-1]), "model")
