"""The task plugin on the coordinator's side: initial models and evaluation.

The task is loaded by its import path (``module:factory``) with the one
`serialization.tasks.load_task` the trainers use, so both sides accept the same
plugins; the coordinator package itself never imports `trainer_worker`. Every
method here is blocking (model building, data loading, a forward pass over the
test set) and is called from a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import structlog
import torch

from serialization import TensorSpec, schema_of
from serialization.slot_events import EvaluationFinished, EvaluationSkipped, emit
from serialization.tasks import TaskPlugin

log = structlog.get_logger()


def lower_thread_priority(increment: int) -> bool:
    """Add `increment` to the calling thread's nice value (Linux keeps one per thread);
    False where the platform has no per-thread priority or refuses."""
    if increment <= 0 or not hasattr(os, "setpriority") or not hasattr(os, "PRIO_PROCESS"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError:
        return False
    return True


class Evaluator:
    """Builds each slot's initial model and evaluates new global models.

    Round evaluations run one at a time on a thread of their own, `nice` steps below the
    coordinator's priority: on a machine whose cores the trainers share (local agents),
    evaluation takes the CPU they leave instead of slowing them down, and all slots'
    evaluations together use at most one core (with one torch thread).
    """

    def __init__(self, task: TaskPlugin, device: str = "cpu", *, nice: int = 0) -> None:
        self._task = task
        self._device = torch.device(device)
        self._models: dict[int, torch.nn.Module] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pwfl-eval",
                                            initializer=lower_thread_priority,
                                            initargs=(nice,))

    async def evaluate_in_background(self, slot_id: int,
                                     state: dict[str, torch.Tensor]) -> dict[str, float]:
        """`evaluate` on the evaluation thread (queued behind other slots' evaluations)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.evaluate, slot_id, state)

    def close(self) -> None:
        """Stop the evaluation thread once queued work is done (nothing new is taken)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

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


# How far a slot's evaluate-and-checkpoint chain may fall behind before the slot waits
# for it: each queued round holds its model twice (state and encoded payload), so at
# most this many bytes of them (the CNN: 55 rounds; ResNet-18: 2), and at least 2 rounds.
MAX_BEHIND_BYTES = 256 * 2**20


def max_behind(payload_bytes: int) -> int:
    """Rounds a slot's chain may have queued for a model of `payload_bytes`."""
    return max(2, MAX_BEHIND_BYTES // max(1, 2 * payload_bytes))


async def evaluate_round(evaluator: Evaluator, slot_id: int, round_: int,
                         state: dict[str, torch.Tensor], *, eval_every: int,
                         last_round: int, newest_round: int = 0) -> dict[str, float]:
    """A slot's round-`round_` model on the full test set, on the evaluation thread, when
    the round is due (every `eval_every` rounds and the last; never when `eval_every` <= 0)
    and no newer due round of the slot has closed meanwhile (`newest_round`: then it logs
    `evaluation_skipped`, and the newer model is evaluated instead); logs
    `evaluation_finished`. {} when not evaluated."""
    if eval_every <= 0 or (round_ % eval_every and round_ != last_round):
        return {}
    next_due = min((round_ // eval_every + 1) * eval_every, last_round)
    if round_ != last_round and newest_round >= next_due:
        emit(log, EvaluationSkipped(slot_id, round=round_, newer_round=newest_round))
        return {}
    start = time.perf_counter()
    metrics = await evaluator.evaluate_in_background(slot_id, state)
    emit(log, EvaluationFinished(slot_id, round=round_, accuracy=metrics.get("accuracy"),
                                 loss=metrics.get("loss"),
                                 num_examples=metrics.get("num_examples"),
                                 duration_s=round(time.perf_counter() - start, 6)))
    return metrics
