"""Batch-gradient federation's pure parts: averaging, the server optimiser, the flat layout,
the trainer's session, the wire helpers and the command line."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
import structlog
import torch
from torch import nn

from bus import gradient as gstreams
from coordinator.cli import build_parser, settings_from_args
from coordinator.gradient.optimizer import (
    FlatModel,
    OptimizerError,
    ServerOptimizer,
    weighted_mean,
)
from serialization import PayloadError, decode, encode
from serialization.gradient import StepGradient, StepWeights, flat_view, layout_digest
from trainer_worker import models, protocol, shm
from trainer_worker.gradient import GradientSessions, read_flat, write_flat
from trainer_worker.task import TrainConfig
from trainer_worker.tasks import batch_order
from trainer_worker.tasks.synthetic import SyntheticTask


def _shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def test_weighted_mean_of_one_gradient_is_itself() -> None:
    """One client's gradient comes out bit for bit (SGD on one client must be exact)."""
    g = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert np.array_equal(weighted_mean([(g, 7)]), g)


def test_weighted_mean_weights_by_batch_size() -> None:
    """Gradients count in proportion to their batch sizes (float64 reference)."""
    rng = np.random.default_rng(1)
    grads = [(rng.standard_normal(100).astype(np.float32), n) for n in (32, 32, 5)]
    want = sum(g.astype(np.float64) * n for g, n in grads) / 69
    assert np.allclose(weighted_mean(grads), want, atol=1e-6)


def test_weighted_mean_needs_examples() -> None:
    """No gradient (or no example) is an error, not a zero step."""
    with pytest.raises(ValueError, match="no examples"):
        weighted_mean([])


@pytest.mark.parametrize(("name", "options"), [
    ("sgd", {"lr": 0.1, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    ("adam", {"lr": 0.01, "beta1": 0.8, "weight_decay": 1e-4}),
])
def test_flat_optimizer_steps_as_torch_on_the_model(name: str, options: dict) -> None:
    """Stepping the flat vector gives the weights torch's optimiser gives the model itself."""
    model = models.build("cnn", seed=3)  # channels_last conv weights: layout matters
    flat = FlatModel(dict(model.state_dict()), _shapes(model), ServerOptimizer(name, options))
    torch_options = {k: v for k, v in options.items() if k not in ("beta1",)}
    if "beta1" in options:
        torch_options["betas"] = (options["beta1"], 0.999)
    reference = (torch.optim.SGD if name == "sgd" else torch.optim.Adam)(
        model.parameters(), **torch_options)
    numel = sum(p.numel() for p in model.parameters())
    for step in range(3):
        g = torch.randn(numel, generator=torch.Generator().manual_seed(step))
        offset = 0
        for p in model.parameters():
            p.grad = g[offset:offset + p.numel()].view(p.shape).clone()
            offset += p.numel()
        reference.step()
        flat.step(g.numpy().copy())
    got = flat.state_dict()
    assert max(float((got[k] - v).abs().max()) for k, v in model.state_dict().items()) == 0.0


def test_flat_model_state_dict_round_trips() -> None:
    """Before any step the flat model gives back the state it was built from."""
    model = models.build("cnn", seed=1)
    state = dict(model.state_dict())
    flat = FlatModel(state, _shapes(model), ServerOptimizer())
    assert all(torch.equal(flat.state_dict()[k], v) for k, v in state.items())
    assert len(flat.weights_bytes()) == models.CNN_PARAMS * 4


@pytest.mark.parametrize("spec", [ServerOptimizer("sgd", {"lr": 0.1, "momentum": 0.9}),
                                  ServerOptimizer("adam", {"lr": 0.1})])
def test_optimizer_state_survives_a_restart(spec: ServerOptimizer) -> None:
    """The momentum (or Adam's moments and step) saved with a checkpoint, through the wire
    format, makes the next step what it would have been."""
    model = models.build("mlp", seed=0, features=4)
    a = FlatModel(dict(model.state_dict()), _shapes(model), spec)
    g = np.ones(a.numel, dtype=np.float32)
    a.step(g.copy())
    b = FlatModel(a.state_dict(), _shapes(model), spec)
    saved = decode(encode(a.optimizer_state()))[0]
    b.load_optimizer_state({k: v.clone() for k, v in saved.items()})
    a.step(g.copy())
    b.step(g.copy())
    assert torch.equal(a.flat, b.flat)


def test_unknown_optimizer_or_option_is_refused() -> None:
    """A typo in --server-option is an error that names the known options."""
    with pytest.raises(OptimizerError, match="momentum"):
        ServerOptimizer("sgd", {"momentun": 0.9})
    with pytest.raises(OptimizerError, match="one of"):
        ServerOptimizer("lamb")


def test_flat_vector_copies_keep_memory_format() -> None:
    """write_flat / read_flat move values in logical order into channels_last tensors."""
    model = models.build("cnn", seed=2)
    params = list(model.parameters())
    flat = torch.empty(sum(p.numel() for p in params))
    write_flat([p.detach() for p in params], flat)
    other = models.build("cnn", seed=5)
    read_flat(flat, list(other.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(),
                                                 strict=True))


def test_flat_view_checks_size_and_values() -> None:
    """A body of the wrong size or with NaN is rejected before anyone uses it."""
    ok = np.ones(4, dtype=np.float32).tobytes()
    assert flat_view(ok, 4).tolist() == [1.0] * 4
    with pytest.raises(PayloadError, match="bytes"):
        flat_view(ok, 5)
    with pytest.raises(PayloadError) as bad:
        flat_view(np.array([1, np.nan], dtype=np.float32).tobytes(), 2)
    assert bad.value.reason == "not_finite"


def test_layout_digest_tells_layouts_apart() -> None:
    """Names and shapes both count, and order too."""
    a = [("w", (2, 3)), ("b", (3,))]
    assert layout_digest(a) == layout_digest(list(a))
    assert layout_digest(a) != layout_digest([("w", (3, 2)), ("b", (3,))])
    assert layout_digest(a) != layout_digest(a[::-1])


def test_batch_order_matches_local_training() -> None:
    """Each epoch is a fresh permutation of the client's examples from the seeded
    generator, in batch_size pieces (the last one short), epoch after epoch."""
    indices = torch.arange(10)
    batches = list(itertools.islice(batch_order(indices, 4, seed=9), 6))
    order = torch.Generator().manual_seed(9)
    want = [*torch.split(torch.randperm(10, generator=order), 4),
            *torch.split(torch.randperm(10, generator=order), 4)]
    assert [b.tolist() for b in batches] == [b.tolist() for b in want]


def _weights_in_a_segment(task: SyntheticTask) -> tuple[torch.nn.Module, torch.nn.Module,
                                                         Any, int]:
    """The trainer's own model, a reference model of other weights, those weights written
    flat into a new shared-memory segment (the caller removes it), and their count."""
    model = task.build_model(seed=0)
    numel = sum(p.numel() for p in model.parameters())
    weights = shm.create(numel * 4, prefix="pwfl-test")
    reference = task.build_model(seed=4)
    write_flat([p.detach() for p in reference.parameters()],
               torch.frombuffer(shm.buffer(weights), dtype=torch.float32, count=numel))
    return model, reference, weights, numel


def test_trainer_session_returns_the_batch_gradient() -> None:
    """A trainer's gradient session loads the weights from shared memory and writes the
    autograd gradient of the client's next batch into its own segment."""
    task = SyntheticTask(num_clients=2, examples_per_client=12)
    model, reference, weights, numel = _weights_in_a_segment(task)
    sessions = GradientSessions(torch.device("cpu"), "pwfl-test", lambda _s, _o: (task, model))
    config = {"batch_size": 5, "seed": 11}
    try:
        opened = sessions.handle(protocol.GradOpen(job_id="j", client_id="1", task="x:y",
                                                   config=config, weights_shm=weights.name))
        assert isinstance(opened, protocol.GradOpened)
        assert opened.status == "ok", opened
        done = sessions.handle(protocol.GradStep(job_id="j", step=1))
        assert isinstance(done, protocol.GradDone)
        assert (done.status, done.num_examples) == ("ok", 5)
        grads = shm.attach(opened.grad_shm)
        got = torch.frombuffer(shm.buffer(grads), dtype=torch.float32, count=numel).clone()
        shm.release(grads)
        batch, _ = next(task.gradient_batches("1", TrainConfig.from_dict(config),
                                              torch.device("cpu")))
        reference.zero_grad()
        task.batch_loss(reference, batch).backward()
        want = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
        assert torch.equal(got, want)
        assert sessions.handle(protocol.GradClose(job_id="j")).status == "ok"
    finally:
        shm.release(weights, unlink=True)
        if "opened" in locals():
            shm.remove(opened.grad_shm)


def test_a_validate_session_scores_the_weights_it_opens_on() -> None:
    """With validate in the session's config, the open scores the weights in the segment
    (the slot's, not the trainer's own model) on the client's validation split and returns
    val_accuracy, val_loss, val_examples with validate_s; a reopen (batches already taken)
    does not score again; without validate nothing is scored."""
    task = SyntheticTask(num_clients=2, examples_per_client=20)
    model, reference, weights, _numel = _weights_in_a_segment(task)
    want = task.validate(reference, "1", torch.device("cpu"))
    assert want is not None
    sessions = GradientSessions(torch.device("cpu"), "pwfl-test", lambda _s, _o: (task, model))
    opened: list[protocol.GradOpened] = []
    try:
        for job_id, config, skip in (("v", {"validate": True}, 0), ("r", {"validate": True}, 1),
                                     ("n", {}, 0)):
            reply = sessions.handle(protocol.GradOpen(job_id=job_id, client_id="1", task="x:y",
                                                      config={"batch_size": 5, **config},
                                                      weights_shm=weights.name,
                                                      skip_batches=skip))
            assert isinstance(reply, protocol.GradOpened)
            assert reply.status == "ok", reply
            opened.append(reply)
        first, reopened, plain = opened
        assert first.metrics == {"val_accuracy": want["accuracy"], "val_loss": want["loss"],
                                 "val_examples": 2.0}
        assert set(first.timings) == {"validate_s"}
        assert (reopened.metrics, plain.metrics, plain.timings) == ({}, {}, {})
        done = sessions.handle(protocol.GradStep(job_id="v", step=1))
        assert (done.status, done.num_examples) == ("ok", 5)
        assert protocol.unpack(protocol.pack(first)) == first
    finally:
        sessions.close_all()
        shm.release(weights, unlink=True)
        for reply in opened:
            shm.remove(reply.grad_shm)


def test_trainer_session_failures_are_replies() -> None:
    """A step for a session that is not open is a failed reply, not a crash."""
    sessions = GradientSessions(torch.device("cpu"), "pwfl-test", lambda _s, _o: (None, None))
    reply = sessions.handle(protocol.GradStep(job_id="nope", step=1))
    assert reply.status == "failed"


async def test_tensor_entries_round_trip(redis_client: aioredis.Redis) -> None:
    """A header and a MB-sized body travel in one entry; deleted entries are gone."""
    body = np.arange(300_000, dtype=np.float32).tobytes()
    header = StepWeights(session="s", step=2, numel=300_000, layout=7).to_bytes()
    first = await gstreams.add(redis_client, "t:down", header, memoryview(body))
    [entry] = await gstreams.read(redis_client, "t:down", "0-0", block_ms=0)
    assert (entry.entry_id, entry.body) == (first, body)
    assert StepWeights.from_bytes(entry.header).step == 2
    up = StepGradient(session="s", step=2, job_id="j", client_id="0", num_examples=3,
                      numel=1).to_bytes()
    await gstreams.add_after_trim(redis_client, "t:down", up, b"\0" * 4,
                                  delete=[("t:down", [first])])
    entries = await gstreams.read(redis_client, "t:down", "0-0", block_ms=0)
    assert [StepGradient.from_bytes(e.header).num_examples for e in entries] == [3]


def test_cli_gradient_options() -> None:
    """--mode gradient and its options reach the settings; --lr and --momentum seed the
    server SGD unless --server-option overrides them."""
    args = build_parser().parse_args([
        "--mode", "gradient", "--gradient-steps", "9", "--lr", "0.2", "--momentum", "0.5",
        "--server-option", "nesterov=true"])
    s = settings_from_args(args)
    assert (s.mode, s.gradient_steps, s.server_optimizer) == ("gradient", 9, "sgd")
    assert s.server_optimizer_options() == {"lr": 0.2, "momentum": 0.5, "weight_decay": 0.0,
                                            "nesterov": True}
    assert s.is_gradient_slot(2)
    with pytest.raises(SystemExit, match="server-option"):
        settings_from_args(build_parser().parse_args(
            ["--mode", "gradient", "--server-optimizer", "adam", "--server-option", "x=1"]))


def test_gradient_slots_sit_beside_weight_slots() -> None:
    """--gradient-slots N puts the first N slots in gradient mode, the rest in weight mode."""
    s = settings_from_args(build_parser().parse_args(["--slots", "3", "--gradient-slots", "1"]))
    assert [s.is_gradient_slot(i) for i in range(3)] == [True, False, False]


async def test_a_dead_weights_reader_fails_its_sessions_at_once(redis_server: Any) -> None:
    """When the agent's reader of a slot's weights stream fails (here the key holds a string:
    WRONGTYPE), waiting sessions fail with the reason instead of waiting out their deadline."""
    from client_agent.gradient import Downlink, SessionFailed

    client = aioredis.Redis.from_url(redis_server.url)
    try:
        await client.set("dead-downlink", b"not a stream")
        downlink = Downlink(client, "dead-downlink", "pwfl-test-dead")
        with structlog.testing.capture_logs() as logs:
            downlink.start()
            async with asyncio.timeout(10):
                with pytest.raises(SessionFailed, match="weights stream failed"):
                    await downlink.wait("s", 1)
        await downlink.stop()
        assert [e["event"] for e in logs] == ["gradient_downlink_failed"]
    finally:
        await client.delete("dead-downlink")
        await client.aclose()



class _CancelSwallowingRedis:
    """A Redis client whose blocking XREAD swallows a cancel and returns nothing, as
    redis-py's did now and then in a real agent (its task kept reading, `cancelling()` 1)."""

    async def xread(self, streams: dict[str, str], count: int, block: int | None) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep((block or 0) / 1000)


async def test_a_weights_reader_stops_even_when_its_read_swallows_the_cancel() -> None:
    """Stopping a slot's weights reader ends it even when the cancel is lost in its blocking
    read: a reader that went on reading held its session's end, and the session's result,
    for ever (seen as tests/test_gradient_e2e.py hanging now and then)."""
    from client_agent.gradient import Downlink

    downlink = Downlink(_CancelSwallowingRedis(), "swallowing-downlink", "pwfl-test-quiet")
    downlink.start()
    await asyncio.sleep(0.05)  # the reader is in its read
    async with asyncio.timeout(5):
        await downlink.stop()
