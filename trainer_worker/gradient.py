"""The trainer's side of batch-gradient federation: one gradient session per leased client.

A session keeps the task's model in this process for the whole lease. Each step
the agent has written the slot's current weights (the parameters as one flat
float32 vector, `named_parameters` order) into a shared-memory segment it owns; the
trainer copies them into the model (copy 1), takes the gradient of the client's
next batch, and writes it into the session's own gradient segment (copy 2),
which the agent sends to Redis straight from shared memory. Protocol
(`trainer_worker.protocol`): `GradOpen` -> `GradOpened`, `GradStep` -> `GradDone`,
`GradClose` -> `GradClosed`. A session reopened on a replacement trainer (its
first trainer was killed while serving another session) skips the batches it
took already, so the client's batch order goes on where it was. With ``validate``
in the session's config, the open scores the weights in the segment (the session's
first step's) on the client's validation split and returns the figures with
`GradOpened` (federated evaluation; a reopen does not score again).

The gradient segment is named after the trainer, so the agent can unlink it
even when the trainer dies; the agent unlinks it at close.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing import shared_memory
from typing import Any

import torch
from torch import nn

from serialization.gradient import layout_digest
from serialization.tasks import TaskPlugin
from trainer_worker import protocol, shm
from trainer_worker.task import TaskError, TrainConfig, error_text, validation_metrics


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
                 device: torch.device, weights_shm: str, shm_prefix: str,
                 skip_batches: int = 0) -> None:
        self.model = model
        batches, self.batch_loss = _gradient_methods(task)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(p.numel() for p in self.params)
        self.batches: Iterator[tuple[Any, int]] = itertools.islice(
            batches(client_id, config, device), max(skip_batches, 0), None)
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

    def validate(self, task: TaskPlugin, client_id: str,
                 device: torch.device) -> dict[str, float]:
        """The segment's weights (those the session opens on) scored on the client's
        validation split (`validation_metrics`; empty when the task keeps none)."""
        read_flat(self.weights, self.params)
        return validation_metrics(task, self.model, client_id, device)

    def step(self, job_id: str, step: int) -> protocol.GradDone:
        """Load the segment's weights, take the next batch's gradient into the gradient
        segment; the reply."""
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
        timings = {"load_s": loaded - started, "grad_s": computed - loaded,
                   "write_s": time.perf_counter() - computed}
        return protocol.GradDone(job_id=job_id, status="ok", step=step,
                                 num_examples=int(num_examples), loss=float(loss.detach()),
                                 timings=timings)

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


def _failed(message: protocol.GradRequest, error: str) -> protocol.GradReply:
    """The failed reply of a request's kind."""
    kind: type[protocol.GradReply] = {
        protocol.GradOpen: protocol.GradOpened, protocol.GradStep: protocol.GradDone,
        protocol.GradClose: protocol.GradClosed}[type(message)]
    return kind(job_id=message.job_id, status="failed", error=error)


Loader = Callable[[str, dict[str, Any]], tuple[TaskPlugin, nn.Module]]


class GradientSessions:
    """A trainer's open gradient sessions by job id; answers the session requests."""

    def __init__(self, device: torch.device, shm_prefix: str, load: Loader) -> None:
        self.device = device
        self.shm_prefix = shm_prefix
        self._load = load
        self._open: dict[str, GradientSession] = {}

    def handle(self, message: protocol.GradRequest) -> protocol.GradReply:
        """The reply to one session request; task failures become failed replies."""
        try:
            if isinstance(message, protocol.GradOpen):
                return self._open_session(message)
            if isinstance(message, protocol.GradStep):
                session = self._open.get(message.job_id)
                if session is None:
                    raise TaskError(f"no gradient session {message.job_id!r} is open")
                return session.step(message.job_id, message.step)
            self._close(message.job_id)
            return protocol.GradClosed(job_id=message.job_id)
        except Exception as exc:  # noqa: BLE001 - a task failure is reported, never fatal
            return _failed(message, error_text(exc))

    def _open_session(self, message: protocol.GradOpen) -> protocol.GradOpened:
        self._close(message.job_id)
        task, model = self._load(message.task, message.task_options)
        buffers = float_buffers(model)
        if buffers:
            raise TaskError(f"gradient mode cannot carry the model's buffers {buffers[:3]}")
        config = TrainConfig.from_dict(message.config)
        session = GradientSession(task, model, message.client_id, config, self.device,
                                  message.weights_shm, self.shm_prefix, message.skip_batches)
        metrics: dict[str, float] = {}
        timings: dict[str, float] = {}
        if config.validate and message.skip_batches == 0:  # not again on a reopen
            started = time.perf_counter()
            try:
                metrics = session.validate(task, message.client_id, self.device)
            except BaseException:
                grad_shm = session.grad_shm  # the agent never hears of it: unlink it here
                session.close()
                shm.remove(grad_shm)
                raise
            timings["validate_s"] = time.perf_counter() - started
        self._open[message.job_id] = session
        return protocol.GradOpened(job_id=message.job_id, status="ok", grad_shm=session.grad_shm,
                                   grad_nbytes=session.numel * 4, layout=layout_of(model),
                                   metrics=metrics, timings=timings)

    def _close(self, job_id: str) -> None:
        session = self._open.pop(job_id, None)
        if session is not None:
            session.close()

    def close_all(self) -> None:
        for job_id in list(self._open):
            self._close(job_id)
