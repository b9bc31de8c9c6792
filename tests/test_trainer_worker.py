"""The trainer's job handling, in this process: shared memory in, shared memory out."""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch

from client_agent.model_cache import ModelCache, ModelSegment
from serialization import decode, encode
from trainer_worker import protocol, shm
from trainer_worker.task import load_task
from trainer_worker.worker import Trainer, serve

SPEC = "trainer_worker.tasks.synthetic:SyntheticTask"
OPTIONS = {"num_clients": 2, "examples_per_client": 32}


@pytest.fixture
def cache() -> Iterator[ModelCache]:
    models = ModelCache()
    yield models
    models.close()


@pytest.fixture
def blob() -> bytes:
    return encode(load_task(SPEC, OPTIONS).build_model(seed=1).state_dict(), {"round": 3})


def _message(segment: ModelSegment, job_id: str = "job-1", **fields: Any) -> protocol.TrainJob:
    message = protocol.TrainJob(job_id=job_id, client_id="0", task=SPEC, task_options=OPTIONS,
                                config={"epochs": 1, "batch_size": 32}, model_shm=segment.name,
                                model_nbytes=segment.nbytes, model_digest=segment.digest)
    return dataclasses.replace(message, **fields)


def _take_update(reply: protocol.Message) -> bytes:
    """The update's bytes; the segment is unlinked, as the agent would."""
    assert isinstance(reply, protocol.TrainDone)
    memory = shm.attach(reply.update_shm)
    try:
        return bytes(shm.buffer(memory)[: reply.update_nbytes])
    finally:
        shm.release(memory, unlink=True)


def test_train_job_round_trip(cache: ModelCache, blob: bytes) -> None:
    """A job trains the received weights and returns a decodable, different update."""
    reply = Trainer(torch.device("cpu")).train(_message(cache.put("m", blob)))
    assert reply.status == "ok", reply
    assert reply.num_examples == 29  # 32 less the 10% validation split
    assert set(reply.timings) == {"load_s", "train_s", "encode_s"}
    assert reply.metrics["steps"] == 1
    update, meta = decode(_take_update(reply))
    received, _ = decode(blob)
    assert meta == {"round": 3}
    assert update.keys() == received.keys()
    assert any(not torch.equal(update[k], received[k]) for k in update)


def test_noop_returns_the_received_bytes(cache: ModelCache, blob: bytes) -> None:
    """With noop the update is byte for byte the model it was given."""
    message = _message(cache.put("m", blob), config={"noop": True}, task="no.such:Task")
    reply = Trainer(torch.device("cpu")).train(message)
    assert reply.status == "ok", reply
    assert _take_update(reply) == blob


def test_task_failure_is_a_reply_and_the_trainer_goes_on(cache: ModelCache, blob: bytes) -> None:
    """An exception in task code becomes a failed reply; the next job still runs."""
    trainer = Trainer(torch.device("cpu"))
    segment = cache.put("m", blob)
    failed = trainer.train(_message(segment, "bad", client_id="9"))
    assert failed == protocol.TrainDone(job_id="bad", status="failed",
                                        error="TaskError: client id '9' is outside 0..1")
    good = trainer.train(_message(segment, "good"))
    _take_update(good)
    assert good.status == "ok"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"task": "no_such_module:Task"}, "TaskError: cannot import task"),
        ({"model_shm": "pwfl-missing-segment"}, "FileNotFoundError"),
        ({"config": {"epochs": "two"}}, "TypeError"),
    ],
)
def test_broken_jobs_fail_cleanly(cache: ModelCache, blob: bytes, fields: dict[str, Any],
                                  error: str) -> None:
    """A missing task, a missing segment or a bad config gives a failed reply."""
    reply = Trainer(torch.device("cpu")).train(_message(cache.put("m", blob), **fields))
    assert reply.status == "failed"
    assert reply.error.startswith(error)


def test_model_of_another_shape_is_rejected(cache: ModelCache) -> None:
    """Weights that do not fit the task's model fail with the payload's reason."""
    other = encode(load_task(SPEC, {"features": 3}).build_model(seed=0).state_dict())
    reply = Trainer(torch.device("cpu")).train(_message(cache.put("x", other)))
    assert reply.status == "failed"
    assert reply.error.startswith("PayloadError: wrong_schema")


def test_task_and_model_are_built_once_per_spec(cache: ModelCache, blob: bytes) -> None:
    """Jobs of the same task and options share one task instance and one model."""
    trainer = Trainer(torch.device("cpu"))
    segment = cache.put("m", blob)
    for job in ("a", "b"):
        _take_update(trainer.train(_message(segment, job)))
    assert len(trainer._tasks) == 1


def _serve_in_thread(trainer: Trainer) -> tuple[Any, threading.Thread]:
    ours, theirs = multiprocessing.Pipe()
    thread = threading.Thread(target=serve, args=(theirs, trainer), daemon=True)
    thread.start()
    return ours, thread


def test_serve_answers_until_stop(cache: ModelCache, blob: bytes) -> None:
    """serve() answers train messages, skips unknown ones, and returns on "stop"."""
    conn, thread = _serve_in_thread(Trainer(torch.device("cpu")))
    conn.send_bytes(msgpack.packb({"v": 1, "k": "dance"}))
    conn.send_bytes(b"\xc1 not msgpack")
    conn.send_bytes(protocol.pack(protocol.Ready(device="cpu", pid=1)))  # not a request
    conn.send_bytes(protocol.pack(_message(cache.put("m", blob), config={"noop": True})))
    reply = protocol.unpack(conn.recv_bytes())
    assert isinstance(reply, protocol.TrainDone)
    assert reply.status == "ok"
    _take_update(reply)
    conn.send_bytes(protocol.pack(protocol.Stop()))
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_returns_when_the_agent_is_gone() -> None:
    """End of file on the pipe (the agent closed it or died) ends serve()."""
    conn, thread = _serve_in_thread(Trainer(torch.device("cpu")))
    conn.close()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\xc1", "malformed"),
    (msgpack.packb([1, 2]), "malformed"),
    (msgpack.packb({"v": 1, "k": "dance"}), "unknown_message"),
    (msgpack.packb({"v": 1, "k": "grad_step", "job_id": "j"}), "missing_field"),
    (msgpack.packb({"v": 1, "k": "grad_step", "job_id": "j", "step": "one"}), "bad_field"),
])
def test_the_pipe_names_what_is_wrong_with_a_message(raw: bytes, reason: str) -> None:
    """Bytes that are no message, an unknown kind, or a known kind with a missing or
    mistyped field: PayloadError with that reason, never a half-read message."""
    with pytest.raises(protocol.PayloadError) as info:
        protocol.unpack(raw)
    assert info.value.reason == reason


def test_an_emulated_device_pads_training_but_not_validation(cache: ModelCache,
                                                             blob: bytes) -> None:
    """On an emulated device (benchmarks) a validate_only job is not padded to a training
    time: it trains nothing. A validate job pads its training alone, after validation."""
    from structlog.testing import capture_logs

    from trainer_worker.emulation import EmulatedDevice

    trainer = Trainer(torch.device("cpu"), emulated=EmulatedDevice(step_s=0.2))
    segment = cache.put("m", blob)
    with capture_logs() as logs:
        only = trainer.train(_message(segment, "only", config={"validate_only": True}))
    assert only.status == "ok", only
    assert (only.update_shm, only.update_nbytes, only.num_examples) == ("", 0, 0)
    assert set(only.metrics) == {"val_accuracy", "val_loss", "val_examples"}
    assert not [e for e in logs if e["event"] == "device_emulated"]
    with capture_logs() as logs:
        both = trainer.train(_message(segment, "both", config={"validate": True,
                                                               "batch_size": 32}))
    _take_update(both)
    [padded] = [e for e in logs if e["event"] == "device_emulated"]
    assert padded["nominal_s"] == pytest.approx(0.2)  # one step of 29 examples
    assert both.timings["train_s"] >= 0.2
    assert list(both.timings) == ["load_s", "validate_s", "train_s", "encode_s"]
