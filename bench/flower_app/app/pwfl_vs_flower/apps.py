"""One definition of the benchmark job for both of Flower's engines.

`client_app` trains PWFL's Fashion-MNIST partition `partition-id` (from the node
config) with PWFL's own `task.train`; `server_app` runs FedAvg over all 6 clients,
evaluates the full test set centrally after each round (`evaluate_fn`) and writes
the run's `bench.flower_app.runs.Outcome` as JSON to the run config's `out`. Settings come
from the run config (`bench.flower_app.runs.FlowerRun`): `flwr run --run-config` on the
deployment engine, or `fixed` for `run_simulation`, which takes no run config.
Timing marks: a round starts when the previous evaluation ends (the model goes out)
and ends at aggregation; its training time is that of the busiest ClientApp process
(the sum over the clients it trained that round), data loading excluded: loading
counts as overhead, paid once per Ray actor in simulation and once per message in
deployment, where every message gets a fresh `flwr-clientapp` process.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from bench.flower_app.runs import ALPHA, CLIENTS, FlowerRun, Outcome

NODES_WAIT_S = 300.0  # the deployment engine's SuperNodes connect after the run starts


@functools.cache
def _task(seed: int) -> Any:
    """One task per process and seed: its data and partitions load once per process."""
    from trainer_worker.tasks.fashion_mnist import FashionMnistTask

    return FashionMnistTask(num_clients=CLIENTS, alpha=ALPHA, partition_seed=seed)


def client_app(fixed: dict[str, Any] | None = None) -> ClientApp:
    """A ClientApp training its node's partition with the run's settings."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run = FlowerRun.from_run_config(fixed or dict(context.run_config))
        torch.set_num_threads(1)
        partition = int(context.node_config["partition-id"])
        task = _task(run.seed)
        model = task.build_model(0)
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        server_round = msg.content.config_records["config"].get("server-round", 0)
        config = run.setting.train_config(int(server_round))  # type: ignore[arg-type]
        task.client_indices(partition)  # loading is not training: a cold process pays it
        began = time.perf_counter()
        outcome = task.train(model, str(partition), config, torch.device("cpu"))
        metrics = MetricRecord({"pid": os.getpid(), "num-examples": outcome.num_examples,
                                **_emulate(began, config, outcome.num_examples)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": metrics}), reply_to=msg)

    return app


def _emulate(began: float, config: Any, num_examples: int) -> dict[str, float]:
    """On the testbed, pad the training call to the node's emulated device time (as PWFL's
    trainers do); the metrics: train_s, and with emulation whether the compute overran."""
    from trainer_worker.emulation import EmulatedDevice, job_steps, pad

    device = EmulatedDevice.from_env(os.environ)
    ended = time.perf_counter()
    if device is None:
        return {"train_s": ended - began}
    overran = ended - began > device.nominal_s(job_steps(config, num_examples))
    ended = pad(device, began, ended, config, num_examples)
    return {"train_s": ended - began, "emulated": 1.0, "overran": float(overran)}


class _Marks:
    """The server's timing marks for one run, folded into an Outcome at the end."""

    def __init__(self, run: FlowerRun) -> None:
        self.out = Outcome(run.engine, run.setting.label, run.seed)
        self.eval_end: list[float] = []
        self.round_end: list[float] = []

    def slowest_train(self, records: list[RecordDict], weighting_key: str) -> MetricRecord:
        """FedAvg's train-metrics hook: note aggregation time and the busiest process."""
        per_process: dict[int, float] = {}
        for record in records:
            m = record.metric_records["metrics"]
            self.out.emulated_calls += int(m.get("emulated", 0))  # type: ignore[arg-type]
            self.out.emulated_overran += int(m.get("overran", 0))  # type: ignore[arg-type]
            pid = int(m["pid"])  # type: ignore[arg-type]
            per_process[pid] = per_process.get(pid, 0.0) + float(m["train_s"])  # type: ignore[arg-type]
        self.round_end.append(time.time())
        self.out.slowest_train_s.append(max(per_process.values()))
        return MetricRecord({"slowest_train_s": self.out.slowest_train_s[-1]})

    def evaluated(self, server_round: int, accuracy: float) -> None:
        now = time.time()
        if server_round == 0:
            self.out.start = now
        else:
            self.out.eval_end.append(now)
            self.out.accuracy.append(accuracy)
        self.eval_end.append(now)

    def outcome(self) -> Outcome:
        """Round r's wall: from the end of evaluation r-1 (the model goes out) to aggregation."""
        self.out.round_wall_s = [end - self.eval_end[i] for i, end in enumerate(self.round_end)]
        return self.out


def _wait_for_nodes(grid: Grid, count: int) -> None:
    """Block until `count` nodes are connected, so start-up is not charged to round 1."""
    deadline = time.monotonic() + NODES_WAIT_S
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} SuperNodes after {NODES_WAIT_S:.0f} s")
        time.sleep(0.2)  # the Grid offers no wait-for-nodes call


def server_app(fixed: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp running FedAvg with central evaluation; writes the Outcome to `out`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = FlowerRun.from_run_config(fixed or dict(context.run_config))
        torch.set_num_threads(1)
        marks = _Marks(run)
        task = _task(run.seed)
        model = task.build_model(0)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = task.evaluate(model, torch.device("cpu"))
            marks.evaluated(server_round, metrics["accuracy"])
            return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})

        _wait_for_nodes(grid, CLIENTS)
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=CLIENTS,
                          min_available_nodes=CLIENTS, train_metrics_aggr_fn=marks.slowest_train)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                       num_rounds=run.rounds, evaluate_fn=evaluate)
        if run.out:
            Path(run.out).write_text(json.dumps(asdict(marks.outcome())))

    return app
