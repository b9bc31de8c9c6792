"""Task plugins used only by the end-to-end tests (imported by path in spawned trainers)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from trainer_worker.task import TrainConfig, TrainOutcome
from trainer_worker.tasks.synthetic import SyntheticTask


class SlowClientTask(SyntheticTask):
    """The synthetic task where every job takes `base_s`, and the listed clients `slow_s`."""

    def __init__(self, slow_clients: list[str] | None = None, slow_s: float = 0.0,
                 base_s: float = 0.0, **options: Any) -> None:
        super().__init__(**options)
        self._slow = set(slow_clients or [])
        self._slow_s = slow_s
        self._base_s = base_s

    def train(self, model: torch.nn.Module, client_id: str, config: TrainConfig,
              device: torch.device) -> TrainOutcome:
        time.sleep(self._slow_s if client_id in self._slow else self._base_s)
        return super().train(model, client_id, config, device)


class FlakyTask(SlowClientTask):
    """SlowClientTask whose user code raises for the listed clients, `raise_times` times per
    trainer process (the count restarts with the process)."""

    def __init__(self, raise_clients: list[str] | None = None, raise_times: int = 1,
                 **options: Any) -> None:
        super().__init__(**options)
        self._raise_clients = set(raise_clients or [])
        self._raises_left = raise_times

    def train(self, model: torch.nn.Module, client_id: str, config: TrainConfig,
              device: torch.device) -> TrainOutcome:
        if client_id in self._raise_clients and self._raises_left > 0:
            self._raises_left -= 1
            raise RuntimeError(f"injected failure in user code for client {client_id}")
        return super().train(model, client_id, config, device)


class DivergingTask(SyntheticTask):
    """The synthetic task whose training diverges (every weight NaN) when a job's learning
    rate is at least `diverge_lr`: a sweep point that blows up."""

    def __init__(self, diverge_lr: float = 1.0, **options: Any) -> None:
        super().__init__(**options)
        self._diverge_lr = diverge_lr

    def train(self, model: torch.nn.Module, client_id: str, config: TrainConfig,
              device: torch.device) -> TrainOutcome:
        outcome = super().train(model, client_id, config, device)
        if config.lr >= self._diverge_lr:
            with torch.no_grad():
                for tensor in model.parameters():
                    tensor.fill_(float("nan"))
        return outcome


class HangingTask(SlowClientTask):
    """SlowClientTask whose training call never returns (a stuck user call) on the listed
    clients' `hang_on_job`-th job in a trainer process; with `once_file`, only the first
    trainer to get there hangs (it creates the file), so a restarted trainer serves again."""

    def __init__(self, hang_clients: list[str] | None = None, hang_on_job: int = 2,
                 once_file: str = "", **options: Any) -> None:
        super().__init__(**options)
        self._hang_clients = set(hang_clients or [])
        self._hang_on_job = hang_on_job
        self._once_file = once_file
        self._jobs: dict[str, int] = {}

    def train(self, model: torch.nn.Module, client_id: str, config: TrainConfig,
              device: torch.device) -> TrainOutcome:
        if client_id in self._hang_clients:
            self._jobs[client_id] = self._jobs.get(client_id, 0) + 1
            if self._jobs[client_id] == self._hang_on_job and _first_to_create(self._once_file):
                threading.Event().wait()  # forever: only a kill ends this call
        return super().train(model, client_id, config, device)


class BrokenGradientTask(SyntheticTask):
    """The synthetic task whose listed clients' loss raises from gradient step `fail_at` on."""

    def __init__(self, fail_clients: list[str] | None = None, fail_at: int = 2,
                 **options: Any) -> None:
        super().__init__(**options)
        self._fail = set(fail_clients or [])
        self._fail_at = fail_at

    def gradient_batches(self, client_id: str, config: TrainConfig,
                         device: torch.device) -> Iterator[tuple[Any, int]]:
        for step, (batch, n) in enumerate(super().gradient_batches(client_id, config, device), 1):
            yield (batch, client_id in self._fail and step >= self._fail_at), n

    def batch_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        inner, broken = batch
        if broken:
            raise RuntimeError("injected failure in a gradient step")
        return super().batch_loss(model, inner)


class HangingGradientTask(SyntheticTask):
    """The synthetic task whose listed clients' gradient step `hang_at` (counted from the
    session's first batch) never returns (a stuck user call); with `once_file`, only the
    first trainer to get there hangs, so the client serves again after the restart. Every
    gradient step takes at least `step_s`."""

    def __init__(self, hang_clients: list[str] | None = None, hang_at: int = 2,
                 once_file: str = "", step_s: float = 0.0, **options: Any) -> None:
        super().__init__(**options)
        self._hang = set(hang_clients or [])
        self._hang_at = hang_at
        self._once_file = once_file
        self._step_s = step_s

    def gradient_batches(self, client_id: str, config: TrainConfig,
                         device: torch.device) -> Iterator[tuple[Any, int]]:
        for step, (batch, n) in enumerate(super().gradient_batches(client_id, config, device), 1):
            yield (batch, client_id in self._hang and step == self._hang_at), n

    def batch_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        inner, hang = batch
        if hang and _first_to_create(self._once_file):
            threading.Event().wait()  # forever: only a kill ends this call
        time.sleep(self._step_s)
        return super().batch_loss(model, inner)


def _first_to_create(path: str) -> bool:
    """True for the first caller (any process) to create the file at `path`; always True
    without a path."""
    if not path:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class SlowEvalTask(SyntheticTask):
    """The synthetic task whose evaluation (on the coordinator) takes `eval_s` longer."""

    def __init__(self, eval_s: float = 0.0, **options: Any) -> None:
        super().__init__(**options)
        self._eval_s = eval_s

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        time.sleep(self._eval_s)
        return super().evaluate(model, device)


class SlowGradientTask(SyntheticTask):
    """The synthetic task whose listed clients take `slow_s` over each gradient step from
    step `slow_at` on (a device that falls behind the step deadline)."""

    def __init__(self, slow_clients: list[str] | None = None, slow_at: int = 2,
                 slow_s: float = 0.0, **options: Any) -> None:
        super().__init__(**options)
        self._slow = set(slow_clients or [])
        self._slow_at = slow_at
        self._slow_s = slow_s

    def gradient_batches(self, client_id: str, config: TrainConfig,
                         device: torch.device) -> Iterator[tuple[Any, int]]:
        for step, (batch, n) in enumerate(super().gradient_batches(client_id, config, device), 1):
            yield (batch, client_id in self._slow and step >= self._slow_at), n

    def batch_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        inner, slow = batch
        if slow:
            time.sleep(self._slow_s)
        return super().batch_loss(model, inner)
