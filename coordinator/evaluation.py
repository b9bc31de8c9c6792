"""The task plugin on the coordinator's side: initial models and evaluation.

The task is loaded by its import path (``module:factory``), exactly as trainers
load it; the coordinator package itself never imports `trainer_worker`. Every
method here is blocking (model building, data loading, a forward pass over the
test set) and is called from a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
from typing import Any, Protocol

import structlog
import torch

from serialization import TensorSpec, schema_of

log = structlog.get_logger()


class TaskLike(Protocol):
    def build_model(self, seed: int) -> torch.nn.Module: ...
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]: ...


class TaskLoadError(Exception):
    """The task named on the command line cannot be imported or built."""


def load_task(spec: str, options: dict[str, Any]) -> TaskLike:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise TaskLoadError(f"cannot import task {spec!r}: {exc}") from exc
    task = factory(**options)
    if not (hasattr(task, "build_model") and hasattr(task, "evaluate")):
        raise TaskLoadError(f"{spec!r} did not return a task (no build_model/evaluate)")
    return task  # type: ignore[no-any-return]


class Evaluator:
    """Builds each slot's initial model and evaluates new global models."""

    def __init__(self, task: TaskLike, device: str = "cpu") -> None:
        self._task = task
        self._device = torch.device(device)
        self._models: dict[int, torch.nn.Module] = {}
        self._lock = threading.Lock()

    def initial_state(self, seed: int) -> dict[str, torch.Tensor]:
        model = self._task.build_model(seed)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The model's parameters (name, shape) in `named_parameters` order (gradient mode)."""
        model = self._task.build_model(0)
        return [(name, tuple(p.shape)) for name, p in model.named_parameters()]

    def float_buffers(self) -> list[str]:
        """Names of the model's floating-point buffers, which gradient mode cannot carry."""
        model = self._task.build_model(0)
        return [name for name, b in model.named_buffers() if b.is_floating_point()]

    def schema(self, state: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
        return schema_of(state)

    def evaluate(self, slot_id: int, state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Load `state` into this slot's model and run the task's evaluation."""
        model = self._model_for(slot_id)
        model.load_state_dict(state)
        return self._task.evaluate(model, self._device)

    def _model_for(self, slot_id: int) -> torch.nn.Module:
        with self._lock:
            if slot_id not in self._models:
                self._models[slot_id] = self._task.build_model(0).to(self._device)
            return self._models[slot_id]


async def evaluate_round(evaluator: Evaluator, slot_id: int, round_: int,
                         state: dict[str, torch.Tensor], *, eval_every: int,
                         last_round: int) -> dict[str, float]:
    """A slot's round-`round_` model on the full test set, in a worker thread, when the
    round is due (every `eval_every` rounds and the last; never when `eval_every` <= 0);
    logs `evaluation_finished`. {} when not due."""
    if eval_every <= 0 or (round_ % eval_every and round_ != last_round):
        return {}
    start = time.perf_counter()
    metrics = await asyncio.to_thread(evaluator.evaluate, slot_id, state)
    log.info("evaluation_finished", slot_id=slot_id, round=round_,
             accuracy=metrics.get("accuracy"), loss=metrics.get("loss"),
             num_examples=metrics.get("num_examples"),
             duration_s=round(time.perf_counter() - start, 6))
    return metrics
