"""A Flower client run unchanged: the `NumPyClient` behind a ``client_fn`` as a PWFL task.

``--task flower:mypkg.client:client_fn`` loads this adapter with the client_fn as its
``client_fn`` option (`serialization.tasks.loadable`). The client's own code does the
learning; the adapter only translates:

- **Model**: the client's parameters in the order ``get_parameters`` gives them become a
  state dict of buffers ``p000``, ``p001``, ... (`ArrayModel`). The initial model of a
  slot is what ``get_parameters`` returns from the client of partition 0 with torch's
  seed set to the slot's seed (Flower's server likewise asks one client when no initial
  parameters are given).
- **Context**: ``node_config`` holds ``partition-id`` (the PWFL client id, an integer)
  and ``num-partitions`` (the run's ``--clients``); ``run_config`` holds every other task
  option (``--task-option KEY=VALUE``).
- **fit**: ``config`` is the job's training settings (`TrainConfig`'s fields: ``lr``,
  ``batch_size``, ``epochs``, ``local_steps``, ``momentum``, ``seed`` ...); the example
  count and the scalar metrics fit returns are the update's.
- **Evaluation** (on the coordinator): ``evaluate_fn=module:function`` with the signature
  of a Flower strategy's ``evaluate_fn`` ``(server_round, parameters, config) -> (loss,
  metrics)`` (``server_round`` is 0: the coordinator evaluates a model, not a round;
  ``config`` is the run config),
  else the client's own ``evaluate`` on partition ``evaluate_partition`` (default 0).
  Either must report ``accuracy`` in its metrics.
- **Federated evaluation** (`validate`, on the clients): each client's own ``evaluate``
  on its partition, with the model the job received, before ``fit``.

``flwr`` (``pip install 'pwfl[flower]'``) is imported only when a client is made, for its
``Context``: importing this module needs no Flower.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer_worker.task import Task, TaskError, TrainConfig, TrainOutcome
from trainer_worker.tasks import partition_index

Arrays = list[np.ndarray]


class ArrayModel(nn.Module):
    """A Flower client's parameter list as a module: one buffer per array, in order."""

    def __init__(self, arrays: Sequence[np.ndarray]) -> None:
        super().__init__()
        for index, array in enumerate(arrays):
            self.register_buffer(f"p{index:03d}", torch.from_numpy(np.array(array, copy=True)))

    def arrays(self) -> Arrays:
        """The buffers as numpy arrays (copies on the CPU), in get_parameters order."""
        return [t.detach().cpu().numpy().copy() for t in self.state_dict().values()]

    def load_arrays(self, arrays: Sequence[np.ndarray]) -> None:
        """Copy a client's returned arrays into the buffers (count and shapes must match)."""
        buffers = list(self.state_dict().values())
        if len(arrays) != len(buffers):
            raise TaskError(f"the client returned {len(arrays)} arrays, not {len(buffers)}")
        with torch.no_grad():
            for buffer, array in zip(buffers, arrays, strict=True):
                value = torch.from_numpy(np.asarray(array))
                if value.shape != buffer.shape:
                    raise TaskError(f"the client returned an array of shape "
                                    f"{tuple(value.shape)} for one of {tuple(buffer.shape)}")
                buffer.copy_(value)


def _import(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TaskError(f"{spec!r} is not of the form 'module:function'")
    try:
        function: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise TaskError(f"cannot import {spec!r}: {exc}") from exc
    return function


def numpy_client(client: Any) -> Any:
    """The NumPyClient behind what a client_fn returned (``NumPyClient(...).to_client()``
    wraps it; a bare NumPyClient is taken as is)."""
    inner = getattr(client, "numpy_client", client)
    if not all(callable(getattr(inner, name, None))
               for name in ("get_parameters", "fit", "evaluate")):
        raise TaskError(f"the client_fn returned {type(client).__name__}, not a NumPyClient "
                        "(PWFL runs NumPyClient's get_parameters, fit and evaluate)")
    return inner


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics a client returned (bools and strings are left out)."""
    return {str(k): float(v) for k, v in metrics.items()
            if isinstance(v, int | float | np.number) and not isinstance(v, bool)}


def flower_config(config: TrainConfig) -> dict[str, bool | int | float | str]:
    """The job's training settings as fit's ``config`` (Flower Scalars only)."""
    return dict(dataclasses.asdict(config))


class FlowerTask(Task):
    """Runs a Flower NumPyClient's get_parameters, fit and evaluate (see module doc)."""

    def __init__(self, client_fn: str, num_clients: int = 1, evaluate_fn: str = "",
                 evaluate_partition: int = 0, **run_config: Any) -> None:
        if num_clients < 1 or not 0 <= evaluate_partition < num_clients:
            raise TaskError(f"bad options: num_clients={num_clients}, "
                            f"evaluate_partition={evaluate_partition}")
        self.client_fn = _import(client_fn)
        self.num_clients = num_clients
        self.evaluate_fn = evaluate_fn
        self.evaluate_partition = evaluate_partition
        self.run_config = run_config

    def client(self, partition: int) -> Any:
        """A fresh client of one partition, as Flower's engines make one per message."""
        from flwr.app import Context, RecordDict

        node_config: dict[str, Any] = {"partition-id": partition,
                                       "num-partitions": self.num_clients}
        context = Context(run_id=0, node_id=partition, node_config=node_config,
                          state=RecordDict(), run_config=dict(self.run_config))
        return numpy_client(self.client_fn(context))

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)  # clients may draw from numpy's global RNG
        return ArrayModel(self.client(0).get_parameters(config={}))

    def train(self, model: nn.Module, client_id: str, config: TrainConfig,
              device: torch.device) -> TrainOutcome:
        array_model = _array_model(model)
        client = self.client(partition_index(client_id, self.num_clients))
        arrays, num_examples, metrics = client.fit(array_model.arrays(), flower_config(config))
        array_model.load_arrays(arrays)
        return TrainOutcome(num_examples=int(num_examples), metrics=scalars(metrics or {}))

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        arrays = _array_model(model).arrays()
        if self.evaluate_fn:
            reply = _import(self.evaluate_fn)(0, arrays, dict(self.run_config))
            if reply is None:
                raise TaskError(f"evaluate_fn {self.evaluate_fn!r} returned None")
            loss, metrics = reply
            num_examples = float(metrics.get("num_examples", 0))
        else:
            loss, count, metrics = self.client(self.evaluate_partition).evaluate(arrays, {})
            num_examples = float(count)
        if "accuracy" not in metrics:
            raise TaskError("evaluation metrics carry no 'accuracy'")
        return {**scalars(metrics), "loss": float(loss), "num_examples": num_examples}

    def validate(self, model: nn.Module, client_id: str,
                 device: torch.device) -> dict[str, float] | None:
        """The client's own ``evaluate`` on its partition (whatever data its client_fn gives
        evaluate, usually the partition's validation set): loss, example count, and
        ``accuracy`` when its metrics carry one."""
        client = self.client(partition_index(client_id, self.num_clients))
        loss, count, metrics = client.evaluate(_array_model(model).arrays(), {})
        figures = {"loss": float(loss), "num_examples": float(count)}
        accuracy = scalars(metrics or {}).get("accuracy")
        return figures if accuracy is None else {**figures, "accuracy": accuracy}


def _array_model(model: nn.Module) -> ArrayModel:
    if not isinstance(model, ArrayModel):
        raise TaskError(f"expected the adapter's ArrayModel, got {type(model).__name__}")
    return model
