"""The trainer's side of batch-gradient federation: one gradient session per leased client.

A session keeps the task's model in this process for the whole lease. Each step
the agent has written the slot's current weights (the parameters as one flat
float32 vector, `named_parameters` order) into a shared-memory segment it owns; the
trainer copies them into the model (copy 1), takes the gradient of the client's
next batch, and writes it into the session's own gradient segment (copy 2),
which the agent sends to Redis straight from shared memory. Protocol
(`trainer_worker.protocol`)::

    {"op": "grad_open", "job_id", "client_id", "task", "task_options", "config",
     "weights_shm", "weights_nbytes"}  -> {"op": "grad_opened", "job_id", "status",
                                           "grad_shm", "grad_nbytes", "layout", "error"}
    {"op": "grad_step", "job_id", "step"} -> {"op": "grad_done", "job_id", "step", "status",
                                              "num_examples", "loss", "timings", "error"}
    {"op": "grad_close", "job_id"}        -> {"op": "grad_closed", "job_id"}

The gradient segment is named after the trainer, so the agent can unlink it
even when the trainer dies; the agent unlinks it at close.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import shared_memory
from typing import Any

import torch
from torch import nn

from serialization.gradient import layout_digest
from serialization.tasks import TaskPlugin
from trainer_worker import shm
from trainer_worker.task import TaskError, TrainConfig, error_text


def layout_of(model: nn.Module) -> int:
    """The fingerprint of the model's flat parameter layout (`serialization.gradient`)."""
    return layout_digest((n, tuple(p.shape)) for n, p in model.named_parameters())


def float_buffers(model: nn.Module) -> list[str]:
    """Floating-point buffers (BatchNorm statistics): gradient mode cannot carry them."""
    return [n for n, b in model.named_buffers() if b.is_floating_point()]


def write_flat(params: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """Copy tensors (parameters or gradients) into one flat vector, in order."""
    offset = 0
    for t in params:
        n = t.numel()
        out[offset:offset + n].view(t.shape).copy_(t)
        offset += n


@torch.no_grad()
def read_flat(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Copy a flat vector into tensors (in place, whatever their memory format)."""
    offset = 0
    for t in params:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view(t.shape))
        offset += n


class GradientSession:
    """One client's lease in gradient mode: weights in, one batch's gradient out, per step."""

    def __init__(self, task: TaskPlugin, model: nn.Module, client_id: str, config: TrainConfig,
                 device: torch.device, weights_shm: str, shm_prefix: str) -> None:
        self.model = model
        batches, self.batch_loss = _gradient_methods(task)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.batches: Iterator[tuple[Any, int]] = batches(client_id, config, device)
        self._weights_mem = shm.attach(weights_shm)
        self._grad_mem = shm.create(self.numel * 4, prefix=shm_prefix)
        self.weights = torch.frombuffer(shm.buffer(self._weights_mem), dtype=torch.float32,
                                        count=self.numel)
        self.grads = torch.frombuffer(shm.buffer(self._grad_mem), dtype=torch.float32,
                                      count=self.numel)
        self._staging = self.grads if device.type == "cpu" else self.grads.to(device)

    @property
    def grad_shm(self) -> str:
        return self._grad_mem.name

    def step(self) -> dict[str, Any]:
        """Load the segment's weights, take the next batch's gradient into the gradient
        segment; the reply fields."""
        started = time.perf_counter()
        read_flat(self.weights, self.params)
        loaded = time.perf_counter()
        try:
            batch, num_examples = next(self.batches)
        except StopIteration:
            raise TaskError("the client has no examples") from None
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = self.batch_loss(self.model, batch)
        loss.backward()  # type: ignore[no-untyped-call]
        computed = time.perf_counter()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self._staging is self.grads:
            write_flat(grads, self.grads)
        else:
            write_flat(grads, self._staging)
            self.grads.copy_(self._staging)
        return {"num_examples": num_examples, "loss": float(loss.detach()),
                "timings": {"load_s": loaded - started, "grad_s": computed - loaded,
                            "write_s": time.perf_counter() - computed}}

    def close(self) -> None:
        """Drop the views and mappings (the agent unlinks the gradient segment)."""
        del self.weights, self.grads, self._staging
        for memory in (self._weights_mem, self._grad_mem):
            _close(memory)


def _close(memory: shared_memory.SharedMemory) -> None:
    shm.release(memory)


def _gradient_methods(task: TaskPlugin) -> tuple[Callable[..., Iterator[tuple[Any, int]]],
                                                 Callable[[nn.Module, Any], torch.Tensor]]:
    """The task's `gradient_batches` and `batch_loss` (optional methods of a task)."""
    batches = getattr(task, "gradient_batches", None)
    loss = getattr(task, "batch_loss", None)
    if not callable(batches) or not callable(loss):
        raise TaskError(f"{type(task).__name__} does not support gradient mode")
    return batches, loss


Loader = Callable[[str, dict[str, Any]], tuple[TaskPlugin, nn.Module]]


class GradientSessions:
    """A trainer's open gradient sessions by job id; answers the ``grad_*`` messages."""

    def __init__(self, device: torch.device, shm_prefix: str, load: Loader) -> None:
        self.device = device
        self.shm_prefix = shm_prefix
        self._load = load
        self._open: dict[str, GradientSession] = {}

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        """The reply to one ``grad_*`` message; task failures become failed replies."""
        op, job_id = str(message["op"]), str(message.get("job_id", ""))
        reply_op = {"grad_open": "grad_opened", "grad_step": "grad_done",
                    "grad_close": "grad_closed"}.get(op)
        if reply_op is None:
            return {"op": "error", "job_id": job_id, "status": "failed",
                    "error": f"unknown op {op!r}"}
        reply: dict[str, Any] = {"op": reply_op, "job_id": job_id, "status": "ok"}
        try:
            if op == "grad_open":
                reply |= self._open_session(job_id, message)
            elif op == "grad_step":
                reply |= {"step": message.get("step"), **self._open[job_id].step()}
            else:
                self._close(job_id)
        except Exception as exc:  # noqa: BLE001 - a task failure is reported, never fatal
            reply |= {"status": "failed", "error": error_text(exc)}
        return reply

    def _open_session(self, job_id: str, message: dict[str, Any]) -> dict[str, Any]:
        self._close(job_id)
        task, model = self._load(str(message["task"]), message.get("task_options") or {})
        buffers = float_buffers(model)
        if buffers:
            raise TaskError(f"gradient mode cannot carry the model's buffers {buffers[:3]}")
        config = TrainConfig.from_dict(message.get("config") or {})
        session = GradientSession(task, model, str(message["client_id"]), config, self.device,
                                  str(message["weights_shm"]), self.shm_prefix)
        self._open[job_id] = session
        return {"grad_shm": session.grad_shm, "grad_nbytes": session.numel * 4,
                "layout": layout_of(model)}

    def _close(self, job_id: str) -> None:
        session = self._open.pop(job_id, None)
        if session is not None:
            session.close()

    def close_all(self) -> None:
        for job_id in list(self._open):
            self._close(job_id)
