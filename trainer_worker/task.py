"""The task plugin interface: what a learning problem gives PWFL.

A task is named by import path ``module:factory``; the factory is called with
the task options (a msgpack-able dict that travels in every job) and returns a
`Task`. It is imported inside the process that uses it (a spawned trainer, or
the coordinator for the initial model and evaluation), so user code never has
to be importable by anyone else. Both load it with the one
`serialization.tasks.load_task` (re-exported here), which also enforces the
trainer's allowlist; `TaskError` is `serialization`'s.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from serialization.errors import TaskError, TaskNotAllowed
from serialization.tasks import load_task

__all__ = ["VALIDATION_KEYS", "Task", "TaskError", "TaskNotAllowed", "TrainConfig", "TrainOutcome",
           "error_text", "load_task", "outcome_of", "partition_size_of", "validation_metrics"]

# The keys under which a result's `metrics` carry a federated evaluation: the model the job
# received, scored on the client's held-out validation split before training.
VAL_ACCURACY, VAL_LOSS, VAL_EXAMPLES = "val_accuracy", "val_loss", "val_examples"
VALIDATION_KEYS = (VAL_ACCURACY, VAL_LOSS, VAL_EXAMPLES)


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings for one job (from the job message's `config`)."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx; 0 is plain local SGD
    max_steps: int = 0  # 0: no limit
    # > 0: exactly this many steps, cycling through the client's data as often as needed
    # (every client the same work, so no round waits on the biggest partition); epochs and
    # max_steps then do not apply. 0: whole epochs.
    local_steps: int = 0
    seed: int = 0
    noop: bool = False  # return the received weights untouched (framework benchmarks)
    # Federated evaluation: score the received model on the client's validation split
    # (`Task.validate`) before training; the figures go into the result's metrics under
    # `VALIDATION_KEYS`. A task without a validation split reports none and trains as usual.
    validate: bool = False
    # Evaluate only (implies validate): no training, no update.
    validate_only: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Known keys only; unknown keys are ignored so newer coordinators can add some."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class TrainOutcome:
    """What local training reports: examples seen (the FedAvg weight) and metrics."""

    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """A learning problem: its model, each client's data, training and evaluation."""

    @abstractmethod
    def build_model(self, seed: int) -> torch.nn.Module:
        """A freshly initialised model; the same seed gives the same weights."""

    @abstractmethod
    def train(self, model: torch.nn.Module, client_id: str, config: TrainConfig,
              device: torch.device) -> TrainOutcome:
        """Train `model` in place on this client's partition."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Metrics on the held-out test set: at least `accuracy`, `loss`, `num_examples`."""

    def validate(self, model: torch.nn.Module, client_id: str,
                 device: torch.device) -> dict[str, float] | None:
        """Metrics of `model` on this client's held-out validation split: `accuracy`,
        `loss` and `num_examples` (None: the task keeps no validation split for it).

        The split must never be trained on: `train` and `gradient_batches` use the rest of
        the client's data only, and `partition_size` counts that rest."""
        return None

    def partition_size(self, client_id: str) -> int | None:
        """How many training examples this client holds (None: the task does not say).

        The agent declares it when it registers the client, and the coordinator counts a
        result's `num_examples` only up to it: a task that says nothing leaves its clients'
        counts bounded only by what each job could train."""
        return None

    # Batch-gradient federation (`--mode gradient`); optional for a task.

    def gradient_batches(self, client_id: str, config: TrainConfig,
                         device: torch.device) -> Iterator[tuple[Any, int]]:
        """This client's batches, endlessly, in the order local training would use them
        (seeded by `config.seed`): (batch, number of examples) pairs for `batch_loss`."""
        raise TaskError(f"{type(self).__name__} does not support gradient mode")

    def batch_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss of `model` on one batch from `gradient_batches` (autograd on)."""
        raise TaskError(f"{type(self).__name__} does not support gradient mode")


def outcome_of(value: object) -> TrainOutcome:
    """A plugin's `train` result, checked: it must be a `TrainOutcome`."""
    if not isinstance(value, TrainOutcome):
        raise TaskError(f"train returned {type(value).__name__}, not a TrainOutcome")
    return value


def partition_size_of(task: object, client_id: str) -> int | None:
    """The client's partition size as a plugin reports it (`Task.partition_size`, optional
    for a structural plugin): a positive int, else None (nothing declared)."""
    method = getattr(task, "partition_size", None)
    size = method(client_id) if callable(method) else None
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        return None
    return size


def validation_metrics(task: object, model: torch.nn.Module, client_id: str,
                       device: torch.device) -> dict[str, float]:
    """The received model's figures on the client's validation split as a result carries
    them (`val_accuracy`, `val_loss`, `val_examples`); empty when the plugin has no
    `validate` (optional for a structural plugin) or it returns None (no split).

    `loss` and `num_examples` are required of a split's metrics, `accuracy` where the task
    measures it (a Flower client's `evaluate` may not); TaskError when they are missing,
    not numbers, or not finite."""
    method = getattr(task, "validate", None)
    figures = method(model, client_id, device) if callable(method) else None
    if figures is None:
        return {}
    if not isinstance(figures, dict):
        raise TaskError(f"validate returned {type(figures).__name__}, not a dict or None")
    wanted = {"accuracy": VAL_ACCURACY, "loss": VAL_LOSS, "num_examples": VAL_EXAMPLES}
    out: dict[str, float] = {}
    for name, key in wanted.items():
        value = figures.get(name)
        if value is None and name == "accuracy":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            raise TaskError(f"validate's {name!r} is {value!r}, not a finite number")
        out[key] = float(value)
    if out[VAL_EXAMPLES] < 0:
        raise TaskError(f"validate's 'num_examples' is {out[VAL_EXAMPLES]}")
    return out


def error_text(exc: BaseException) -> str:
    """A failed job's error for a task failure: a refusal by the allowlist under its
    reason (as the agent reports one), anything else as ``Type: message``."""
    if isinstance(exc, TaskNotAllowed):
        return f"{exc.reason}: {exc}"
    return f"{type(exc).__name__}: {exc}"
