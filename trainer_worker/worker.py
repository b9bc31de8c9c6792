"""The trainer process: one per device, spawned by the agent's `TrainerPool`.

`run` is the spawn target. It says `Ready`, then answers requests one at a
time (`TrainJob`, the gradient session's; see `trainer_worker.protocol`) until
`Stop` or until the agent is gone. Per job the bytes move like this:

1. The model payload sits in the agent's shared-memory segment; decoding makes
   views over it (no copy).
2. `load_state_dict` copies it into the cached model (copy 1). With
   ``noop`` there is no model: the views go straight to step 3.
3. `encode_into` writes the trained state into a new segment sized by
   `encoded_size` (copy 2), which is handed to the agent with the `TrainDone` reply.

With ``validate`` in the job's config the received model is first scored on the
client's validation split (`Task.validate`; the figures join the reply's metrics as
``val_accuracy``, ``val_loss``, ``val_examples``); with ``validate_only`` that is all
the job does: an ok reply without update segment.

A failing task is reported as a failed job and the process keeps serving. The
model segment is only closed here (the agent owns it); the update segment
belongs to the agent once the reply is sent.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog
import torch
from torch import nn

from serialization import TensorSpec, decode, encode_into, encoded_size, schema_of
from serialization.errors import PayloadError
from serialization.events import configure_events
from serialization.messages import Message
from serialization.tasks import TaskPlugin, allow_tasks, load_task
from trainer_worker import emulation, protocol, shm
from trainer_worker.gradient import GradientSessions
from trainer_worker.task import (
    TrainConfig,
    TrainOutcome,
    error_text,
    outcome_of,
    partition_size_of,
    validation_metrics,
)

log = structlog.get_logger()

MAX_CACHED_TASKS = 2
StateDict = dict[str, torch.Tensor]


def run(conn: Connection, device: str, threads: int, log_file: str | None, run_id: str,
        agent_id: str, shm_prefix: str = "pwfl",
        allowed_tasks: tuple[str, ...] | None = None) -> None:
    """Trainer process entry point: serve jobs on `conn` until told to stop, then exit.
    `allowed_tasks`: the agent's allowlist, which every task load here obeys (None: none)."""
    allow_tasks(allowed_tasks)
    configure_events("trainer", log_file=log_file)
    structlog.contextvars.bind_contextvars(run_id=run_id, agent_id=agent_id, device=device)
    torch.set_num_threads(threads)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)  # stray allocations go to our GPU, not cuda:0
    trainer = Trainer(torch.device(device), shm_prefix=shm_prefix,
                      emulated=emulation.EmulatedDevice.from_env(os.environ))
    _exit_with_parent(trainer)
    _warm_up()
    conn.send_bytes(protocol.pack(protocol.Ready(device=device, pid=os.getpid())))
    serve(conn, trainer)
    # Skip the interpreter's teardown of torch's thousands of modules (1-2 s): nothing
    # is left to clean up once serving ends (log lines are written as they come).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve(conn: Connection, trainer: Trainer) -> None:
    """Answer requests (`trainer_worker.protocol`) until `Stop` or end of file on the pipe."""
    while True:
        try:
            message = protocol.unpack(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the agent is gone
        except PayloadError as exc:
            log.error("trainer_bad_message", reason=exc.reason, error=exc.detail)
            continue
        if isinstance(message, protocol.Stop):
            return
        if not _answer(conn, trainer, message):
            return


def _answer(conn: Connection, trainer: Trainer, message: Message) -> bool:
    """Send the reply to one request; False once the pipe is gone."""
    reply: Message
    if isinstance(message, protocol.GradOpen | protocol.GradStep | protocol.GradClose):
        reply = trainer.gradients.handle(message)  # batch-gradient federation
    elif isinstance(message, protocol.TrainJob):
        reply = trainer.train(message)
    elif isinstance(message, protocol.Describe):  # the agent declares its clients' sizes
        reply = trainer.describe(message)
    else:
        log.error("trainer_bad_message", reason="unexpected_message",
                  error=f"a trainer takes no {message.kind!r} message")
        return True
    try:
        conn.send_bytes(protocol.pack(reply))
    except OSError:
        if isinstance(reply, protocol.TrainDone):
            trainer.discard_pending()
        return False
    if isinstance(reply, protocol.TrainDone):
        trainer.handed_over()
    return True


def _warm_up() -> None:
    # The first optimizer imports torch._dynamo (about a second): pay it before "ready".
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def _exit_with_parent(trainer: Trainer) -> None:
    """Leave at once if the agent dies, even in the middle of a long job."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        trainer.discard_pending()
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclass
class _Loaded:
    """A task built in this process, with its model on the trainer's device."""

    task: TaskPlugin
    model: nn.Module
    schema: dict[str, TensorSpec]


class Trainer:
    """Runs jobs: decode the model, train it, encode the update into a new segment."""

    def __init__(self, device: torch.device, *, shm_prefix: str = "pwfl",
                 emulated: emulation.EmulatedDevice | None = None) -> None:
        self.device = device
        self.emulated = emulated  # benchmarks only: pad each job to a nominal device time
        self.shm_prefix = shm_prefix
        self._tasks: OrderedDict[str, _Loaded] = OrderedDict()
        self._pending: str | None = None  # update segment made but not yet handed over
        self._lock = threading.Lock()
        self.gradients = GradientSessions(device, shm_prefix, self._task_and_model)

    def _task_and_model(self, spec: str,
                        options: dict[str, Any]) -> tuple[TaskPlugin, nn.Module]:
        loaded = self._loaded(spec, options)
        return loaded.task, loaded.model

    def train(self, message: protocol.TrainJob) -> protocol.TrainDone:
        """The reply to one `TrainJob`; task failures become failed replies."""
        try:
            return self._run(message)
        except Exception as exc:  # any task failure is reported, never fatal
            error = error_text(exc)
            log.warning("trainer_job_failed", job_id=message.job_id, error=error, exc_info=True)
            return protocol.TrainDone(job_id=message.job_id, status="failed", error=error)

    def describe(self, message: protocol.Describe) -> protocol.Described:
        """Each listed client's partition size as the task reports it (clients it reports
        none for are left out); the task stays loaded for the jobs."""
        try:
            task = self._loaded(message.task, message.task_options).task
            sizes = {c: partition_size_of(task, c) for c in message.client_ids}
        except Exception as exc:  # noqa: BLE001 - any task failure is reported, never fatal
            error = error_text(exc)
            log.warning("trainer_describe_failed", error=error)
            return protocol.Described(status="failed", error=error)
        return protocol.Described(status="ok", num_examples={
            c: n for c, n in sizes.items() if n is not None})

    def handed_over(self) -> None:
        """The agent has the update segment now (it unlinks it)."""
        self._set_pending(None)

    def discard_pending(self) -> None:
        """Remove an update segment that can no longer be handed over."""
        with self._lock:
            name, self._pending = self._pending, None
        if name is not None:
            shm.remove(name)

    def _run(self, message: protocol.TrainJob) -> protocol.TrainDone:
        started = time.perf_counter()
        segment = shm.attach(message.model_shm)
        try:
            # Released on the way out even when a traceback keeps the frames (and
            # the views made from it) alive, so the mapping can always be closed.
            with shm.buffer(segment)[: message.model_nbytes] as payload:
                return self._run_on(payload, message, started)
        finally:
            shm.release(segment)

    def _run_on(self, payload: memoryview, message: protocol.TrainJob,
                started: float) -> protocol.TrainDone:
        config = TrainConfig.from_dict(message.config)
        validation: dict[str, float] = {}  # the received model on the validation split
        validate_s: dict[str, float] = {}
        if config.noop:
            state, meta = decode(payload)
            outcome, loaded_at = TrainOutcome(num_examples=1), time.perf_counter()
            ready_at = trained_at = loaded_at
        else:
            loaded = self._loaded(message.task, message.task_options)
            received, meta = decode(payload, schema=loaded.schema)
            loaded.model.load_state_dict(received)
            del received  # views over the agent's segment: drop them before it is closed
            ready_at = loaded_at = time.perf_counter()
            if config.validate or config.validate_only:  # before training touches the model
                validation = validation_metrics(loaded.task, loaded.model, message.client_id,
                                                self.device)
                ready_at = time.perf_counter()
                validate_s = {"validate_s": ready_at - loaded_at}
            if config.validate_only:  # federated evaluation only: no training, no update
                return protocol.TrainDone(job_id=message.job_id, status="ok", num_examples=0,
                                          metrics=validation,
                                          timings={"load_s": loaded_at - started, **validate_s})
            outcome = outcome_of(loaded.task.train(loaded.model, message.client_id, config,
                                                   self.device))
            trained_at = time.perf_counter()
            state = loaded.model.state_dict()
        # The emulated device pads training only (validation is not part of its step time).
        trained_at = emulation.pad(self.emulated, ready_at, trained_at, config,
                                   outcome.num_examples)
        name, nbytes = self._encode(state, meta)
        timings = {"load_s": loaded_at - started, **validate_s, "train_s": trained_at - ready_at,
                   "encode_s": time.perf_counter() - trained_at}
        return protocol.TrainDone(job_id=message.job_id, status="ok", update_shm=name,
                                  update_nbytes=nbytes, num_examples=outcome.num_examples,
                                  metrics={**outcome.metrics, **validation}, timings=timings)

    def _encode(self, state: StateDict, meta: dict[str, Any]) -> tuple[str, int]:
        nbytes = encoded_size(state, meta)
        segment = shm.create(nbytes, prefix=self.shm_prefix)
        self._set_pending(segment.name)
        try:
            encode_into(state, shm.buffer(segment), meta)
        except BaseException:
            self._set_pending(None)
            shm.release(segment, unlink=True)
            raise
        shm.release(segment)
        return segment.name, nbytes

    def _set_pending(self, name: str | None) -> None:
        with self._lock:
            self._pending = name

    def _loaded(self, spec: str, options: dict[str, Any]) -> _Loaded:
        key = spec + json.dumps(options, sort_keys=True, default=repr)
        if key in self._tasks:
            self._tasks.move_to_end(key)
            return self._tasks[key]
        task = load_task(spec, options)
        model = task.build_model(seed=0).to(self.device)
        self._tasks[key] = _Loaded(task, model, schema_of(model.state_dict()))
        while len(self._tasks) > MAX_CACHED_TASKS:
            self._tasks.popitem(last=False)
        return self._tasks[key]

