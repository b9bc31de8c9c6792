"""Flower 1.41's simulation engine running a client_fn for one FedAvg round.

``python -m tests.flower_sim SPEC.json OUT.npz`` writes the first round's aggregate as
arrays ``arr_0 .. arr_N`` (get_parameters order). SPEC holds ``client_fn``, ``num_clients``,
``run_config`` (the task options PWFL's adapter passes as the run config), ``config`` (fit's
config), ``seeds`` (partition id -> the seed PWFL's job gave that client: a Flower strategy
sends one config to all, so the harness puts each client's seed into its own config) and
``initial_seed``. A subprocess of tests/test_flower_adapter.py, so Ray stays out of pytest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from flwr.common import ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

from trainer_worker.tasks.flower import FlowerTask, numpy_client


class SeededClient(NumPyClient):
    """The user's client, unchanged, with PWFL's per-client seed in fit's config."""

    def __init__(self, inner: Any, seed: int) -> None:
        self.inner, self.seed = inner, seed

    def get_parameters(self, config: dict[str, Any]) -> Any:
        return self.inner.get_parameters(config)

    def fit(self, parameters: Any, config: dict[str, Any]) -> Any:
        return self.inner.fit(parameters, {**config, "seed": self.seed})

    def evaluate(self, parameters: Any, config: dict[str, Any]) -> Any:
        return self.inner.evaluate(parameters, config)


def apps(spec: dict[str, Any], out: Path) -> tuple[ServerApp, ClientApp]:
    """A ServerApp running one FedAvg round from PWFL's initial model, and the ClientApp."""
    task = FlowerTask(spec["client_fn"], num_clients=spec["num_clients"], **spec["run_config"])
    initial = task.build_model(spec["initial_seed"]).arrays()  # type: ignore[operator]
    user_fn = task.client_fn

    def client_fn(context: Any) -> Any:
        # run_simulation passes no run config, and a Context's may not be changed: a copy
        given = Context(run_id=context.run_id, node_id=context.node_id,
                        node_config=context.node_config, state=context.state,
                        run_config=dict(spec["run_config"]))
        partition = str(context.node_config["partition-id"])
        return SeededClient(numpy_client(user_fn(given)), spec["seeds"][partition]).to_client()

    def evaluate_fn(server_round: int, parameters: Any, config: Any) -> None:
        if server_round == 1 and not all(np.array_equal(a, b) for a, b in
                                         zip(parameters, initial, strict=True)):
            np.savez(out, *parameters)

    def server_fn(context: Any) -> ServerAppComponents:
        n = spec["num_clients"]
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n,
                          min_available_clients=n, evaluate_fn=evaluate_fn,
                          initial_parameters=ndarrays_to_parameters(initial),
                          on_fit_config_fn=lambda _round: dict(spec["config"]))
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=1))

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    server_app, client_app = apps(spec, Path(argv[1]))
    run_simulation(server_app, client_app, num_supernodes=spec["num_clients"],
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return 0 if Path(argv[1]).exists() else 1  # no file: the round failed (see the log)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
