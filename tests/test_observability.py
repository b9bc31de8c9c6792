"""Metrics, dashboard stream and model routes, fed the events a coordinator logs (no run)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load as load_safetensors

from client_agent.metrics import AgentMetrics
from coordinator.http import StatusServer
from coordinator.observability import STATIC_FILES, LatestModel, Observability, static_file
from coordinator.observability.dashboard import DashboardState, IntervalUnion, PoolBusy
from coordinator.observability.metrics import CoordinatorMetrics
from coordinator.status import RunStatus, SlotStatus
from serialization import decode
from serialization.events import observe
from trainer_worker import shm

TOKEN = "t0ken-" + "z" * 30
RUN: list[dict[str, Any]] = [
    {"event": "run_started", "slots": 1, "strategy": "fedavg", "policy": "partition",
     "task": "synthetic", "late_policy": "drop"},
    {"event": "model_published", "slot_id": 0, "round": 1, "nbytes": 1000, "duration_s": 0.01},
    {"event": "round_started", "slot_id": 0, "round": 1, "clients": ["0", "1"], "ts": 10.0},
    {"event": "lease_taken", "slot_id": 0, "round": 1, "client_id": "0", "ts": 10.0},
    {"event": "lease_taken", "slot_id": 0, "round": 1, "client_id": "1", "ts": 10.0},
    {"event": "job_published", "slot_id": 0, "round": 1, "client_id": "0", "job_id": "j0"},
    {"event": "job_published", "slot_id": 0, "round": 1, "client_id": "1", "job_id": "j1"},
    {"event": "update_received", "slot_id": 0, "round": 1, "client_id": "0", "nbytes": 400},
    {"event": "lease_returned", "slot_id": 0, "round": 1, "client_id": "0", "reason": "result",
     "ts": 12.5},
    {"event": "update_folded", "slot_id": 0, "round": 1, "duration_s": 0.02, "ts": 12.6},
    {"event": "lease_returned", "slot_id": None, "round": 1, "client_id": "1", "reason": "lost",
     "ts": 13.0},
    {"event": "update_rejected", "reason": "bad_signature", "job_id": "jx"},
    {"event": "update_late", "slot_id": 0, "round": 0, "action": "dropped"},
    {"event": "validation_finished", "slot_id": 0, "round": 0, "during_round": 1,
     "accuracy": 0.3, "loss": 2.0, "num_examples": 40, "clients": 1, "ts": 12.7},
    {"event": "quorum_reached", "slot_id": 0, "round": 1, "wait_s": 1.5},
    {"event": "aggregation_finished", "slot_id": 0, "round": 1, "duration_s": 0.2, "ts": 13.2},
    {"event": "evaluation_finished", "slot_id": 0, "round": 1, "accuracy": 0.5,
     "duration_s": 0.3, "ts": 13.5},
    {"event": "round_closed", "slot_id": 0, "round": 1, "duration_s": 3.5, "accuracy": 0.5},
    {"event": "redis_reconnected", "down_s": 2.0, "retries": 3},
    {"event": "http_unauthorized", "route": "/slots/{slot_id}/model", "path": "/slots/0/model"},
]


AGGREGATED = next(e for e in RUN if e["event"] == "aggregation_finished")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_events_become_metrics_with_units_and_bounded_labels() -> None:
    """Each event moves its metric; counters end in _total, durations in _seconds, and no
    label carries a job id."""
    metrics = CoordinatorMetrics(RunStatus("r1"))
    for event in RUN:
        metrics.observe(event)
    got = samples(metrics.render().decode())
    slot = (("slot", "0"),)
    assert got[("pwfl_slot_rounds_completed_total", slot)] == 1
    assert got[("pwfl_round_duration_seconds_sum", slot)] == pytest.approx(3.2)  # to aggregated
    assert got[("pwfl_quorum_wait_seconds_count", slot)] == 1
    assert got[("pwfl_client_jobs_total", (("client", "0"), ("outcome", "done")))] == 1
    assert got[("pwfl_client_jobs_total", (("client", "1"), ("outcome", "lost")))] == 1
    assert got[("pwfl_client_busy_seconds_total", (("client", "0"),))] == 2.5
    assert got[("pwfl_client_busy_seconds_total", (("client", "1"),))] == 3.0
    assert got[("pwfl_transfer_bytes_total", (("direction", "down"),))] == 2000
    assert got[("pwfl_transfer_bytes_total", (("direction", "up"),))] == 400
    assert got[("pwfl_updates_rejected_total", (("reason", "bad_signature"),))] == 1
    assert got[("pwfl_updates_late_total", (("outcome", "dropped"), ("slot", "0")))] == 1
    assert got[("pwfl_coordinator_busy_seconds_total", (("kind", "evaluate"),))] == 0.3
    assert got[("pwfl_redis_reconnections_total", ())] == 1
    assert got[("pwfl_http_unauthorized_total", (("route", "/slots/{slot_id}/model"),))] == 1
    families = list(text_string_to_metric_families(metrics.render().decode()))
    assert all(f.name.startswith("pwfl_") for f in families)
    assert not any("job" in label for f in families for s in f.samples for label in s.labels)


def test_status_is_read_at_scrape_time() -> None:
    """Rounds, accuracy and the run's settings come from RunStatus when scraped."""
    status = RunStatus("r2")
    metrics = CoordinatorMetrics(status)
    metrics.observe(RUN[0])
    status.slots[0] = SlotStatus(0, rounds=5, round=3)
    status.slots[0].record_accuracy(2, 0.75, 1.0)
    status.clients["0"] = {"alive": True}
    got = samples(metrics.render().decode())
    assert got[("pwfl_slot_accuracy_ratio", (("slot", "0"),))] == 0.75
    assert got[("pwfl_slot_round", (("slot", "0"),))] == 3
    assert got[("pwfl_clients_alive", ())] == 1
    info = next(k for k in got if k[0] == "pwfl_run_info")
    assert ("run_id", "r2") in info[1]
    assert ("strategy", "fedavg") in info[1]


def test_each_coordinator_has_its_own_registry() -> None:
    """Two coordinators in one process never share a metric."""
    one, two = CoordinatorMetrics(RunStatus("a")), CoordinatorMetrics(RunStatus("b"))
    one.observe(AGGREGATED)
    assert ("pwfl_slot_rounds_completed_total", (("slot", "0"),)) not in samples(
        two.render().decode())


@pytest.fixture
def structlog_config() -> Iterator[None]:
    """Leaves structlog as it found it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def test_observer_sees_each_logged_event_with_its_context(structlog_config: None) -> None:
    """observe() gets every event with bound context and a time stamp; a failing observer
    breaks nothing; after the stop it gets no more."""
    seen: list[dict[str, Any]] = []
    stop_broken = observe(lambda _e: 1 / 0)  # type: ignore[func-returns-value]
    stop = observe(lambda e: seen.append(dict(e)))
    with structlog.contextvars.bound_contextvars(run_id="ctx"):
        structlog.get_logger().info("round_closed", slot_id=0)
    stop()
    stop_broken()
    structlog.get_logger().info("round_closed", slot_id=1)
    assert [(e["event"], e["run_id"], e["slot_id"]) for e in seen] == [("round_closed", "ctx", 0)]


def test_observability_follows_only_its_own_run() -> None:
    """Events bound to another run's id leave this coordinator's metrics alone."""
    status = RunStatus("mine")
    obs = Observability(status, lambda: status.as_dict({}))
    obs._observe({**AGGREGATED, "run_id": "other"})
    obs._observe({**AGGREGATED, "run_id": "mine"})
    got = samples(obs.metrics.render().decode())
    assert got[("pwfl_slot_rounds_completed_total", (("slot", "0"),))] == 1


def test_interval_union_counts_overlaps_once() -> None:
    """Overlapping and out-of-order intervals add up to their union."""
    union = IntervalUnion()
    for start, end in [(0, 2), (1, 3), (5, 6), (2.5, 4), (10, 11)]:
        union.add(start, end)
    assert union.length_s == pytest.approx(4 + 1 + 1)


def test_interval_union_matches_a_sort_and_sweep() -> None:
    """Random overlapping intervals, ending in order: the union equals a plain sweep's."""
    rng = random.Random(7)
    for _ in range(200):
        union, spans, end = IntervalUnion(), [], 0.0
        for _ in range(rng.randint(1, 50)):
            end += rng.random() * 3
            spans.append((end - rng.random() * 5, end))
            union.add(*spans[-1])
        total, (low, high) = 0.0, sorted(spans)[0]
        for a, b in sorted(spans)[1:]:
            if a > high:
                total, low = total + high - low, a
            high = max(high, b)
        assert union.length_s == pytest.approx(total + high - low)


def test_dashboard_state_draws_leases_and_accuracy() -> None:
    """Leases become timeline segments (closed by their return, a lost client's too) and
    evaluations accuracy points; busy time is what the leases lasted."""
    state = DashboardState("r", started_at=0.0)
    for event in RUN:
        state.apply(event)
    assert [(s["slot"], s["start"], s["end"], s["outcome"]) for s in state.timeline["1"]] == [
        ("0", 10.0, 13.0, "lost")]
    assert list(state.accuracy["0"]) == [[13.5, 0.5, 1]]
    assert state.client_busy_s == {"0": 2.5, "1": 3.0}
    assert state.late["dropped"] == 1
    assert state.active_t == 10.0


def test_rounds_count_when_aggregated_and_durations_end_there() -> None:
    """pwfl_slot_rounds_completed_total counts aggregation_finished, not round_closed (which
    may lag rounds behind); a round's duration runs from round_started to its aggregate."""
    metrics = CoordinatorMetrics(RunStatus("agg"))
    for r in (1, 2, 3):
        metrics.observe({"event": "round_started", "slot_id": 0, "round": r, "ts": 10.0 * r})
        metrics.observe({"event": "aggregation_finished", "slot_id": 0, "round": r,
                         "duration_s": 0.1, "ts": 10.0 * r + 4})
    metrics.observe({"event": "round_closed", "slot_id": 0, "round": 1, "duration_s": 99.0,
                     "accuracy": 0.5, "ts": 35.0})  # the first round's link, finished late
    got = samples(metrics.render().decode())
    slot = (("slot", "0"),)
    assert got[("pwfl_slot_rounds_completed_total", slot)] == 3
    assert got[("pwfl_round_duration_seconds_count", slot)] == 3
    assert got[("pwfl_round_duration_seconds_sum", slot)] == pytest.approx(12.0)


def test_validation_test_accuracy_and_evaluation_lag_are_scraped_apart() -> None:
    """Validation (the clients' splits) and test-set accuracy are separate gauges whose help
    says which; the evaluation lag is rounds aggregated minus the newest evaluated round."""
    status = RunStatus("val")
    metrics = CoordinatorMetrics(status)
    status.slots[0] = SlotStatus(0, rounds=10)
    status.slots[1] = SlotStatus(1, rounds=10)
    slot = status.slots[0]
    for r in range(1, 6):
        slot.record_aggregated(r)
    slot.record_evaluated(2)
    slot.record_accuracy(2, 0.71, 1.0)
    slot.record_validation(3, 0.82, 1.5)
    slot.record_validation(4, 0.80, 2.0)
    text = metrics.render().decode()
    got = samples(text)
    zero, one = (("slot", "0"),), (("slot", "1"),)
    assert got[("pwfl_slot_accuracy_ratio", zero)] == 0.71
    assert got[("pwfl_slot_validation_accuracy_ratio", zero)] == 0.80
    assert got[("pwfl_slot_best_validation_accuracy_ratio", zero)] == 0.82
    assert got[("pwfl_slot_evaluation_lag_rounds", zero)] == 3
    assert got[("pwfl_slot_evaluation_lag_rounds", one)] == 0
    assert ("pwfl_slot_validation_accuracy_ratio", one) not in got  # nothing validated yet
    helps = {f.name: f.documentation for f in text_string_to_metric_families(text)}
    assert "Test-set" in helps["pwfl_slot_accuracy_ratio"]
    assert "validation" in helps["pwfl_slot_validation_accuracy_ratio"].lower()
    assert "not the test set" in helps["pwfl_slot_validation_accuracy_ratio"]
    assert "aggregated" in helps["pwfl_round_duration_seconds"]


def test_dashboard_state_keeps_validation_and_test_points_apart() -> None:
    """validation_finished becomes a validation point (its model's round and the round that
    evaluated it), evaluation_finished a test point; both reach a page as ops and in the
    snapshot; /status's point lists stay out of the flushed summary."""
    state = DashboardState("r", started_at=0.0)
    ops = [op for event in RUN for op in state.apply(event)]
    assert list(state.validation["0"]) == [[12.7, 0.3, 0, 1]]
    assert list(state.accuracy["0"]) == [[13.5, 0.5, 1]]
    assert ["val", "0", 12.7, 0.3, 0, 1] in ops
    assert ["acc", "0", 13.5, 0.5, 1] in ops
    assert state.apply({"event": "validation_finished", "slot_id": 0, "round": 1}) == []
    status = RunStatus("r")
    status.slots[0] = SlotStatus(0, rounds=3)
    status.slots[0].record_validation(0, 0.3, 12.7)
    snapshot = state.snapshot(status.as_dict({}))
    assert snapshot["validation"] == {"0": [[12.7, 0.3, 0, 1]]}
    assert "validation_accuracies" not in snapshot["status"]["slots"][0]
    assert snapshot["status"]["slots"][0]["last_validation_accuracy"] == 0.3


def _every_fraction(busy: dict[str, Any]) -> list[float]:
    f = busy["busy_fractions"]
    return [f["round_work"], f["evaluation"], *f["kinds"].values(), *f["clients"].values()]


def test_busy_fractions_never_pass_one_with_overlapping_evaluation_and_aggregation() -> None:
    """Three slots' evaluations queue on the one evaluation thread (each duration_s includes
    its wait) while folds and aggregations of the three overlap on the loop: summed, the
    evaluate kind alone came to 180% and the kinds to far more; each fraction is now a share
    of its own capacity, so none passes 1, and a thread busy the whole time is at 1."""
    state = DashboardState("r", started_at=0.0)
    state.apply({"event": "lease_taken", "slot_id": 0, "round": 1, "client_id": "a", "ts": 0.0})
    for slot in range(3):
        # evaluations of the three slots queued at t=7, run one after the other to t=10
        state.apply({"event": "evaluation_finished", "slot_id": slot, "round": 1,
                     "accuracy": 0.5, "duration_s": 1.0 + slot, "ts": 8.0 + slot})
        state.apply({"event": "evaluation_finished", "slot_id": slot, "round": 0,
                     "accuracy": 0.1, "duration_s": 4.0, "ts": 4.0})
        for k in range(4):  # folds and aggregations of every slot, all overlapping
            state.apply({"event": "update_folded", "slot_id": slot, "round": 1,
                         "duration_s": 3.0, "ts": 3.0 + k * 0.5})
            state.apply({"event": "aggregation_finished", "slot_id": slot, "round": 1,
                         "duration_s": 6.0, "ts": 6.5 + k * 0.1})
    busy = state.busy(now_t=10.0)
    assert all(0.0 <= f <= 1.0 for f in _every_fraction(busy)), busy
    assert busy["busy_fractions"]["evaluation"] == pytest.approx(0.7)  # [0,4] and [7,10]
    assert busy["evaluation_busy_s"] == pytest.approx(7.0)
    assert busy["round_work_s"] == pytest.approx(6.8)  # folds [0,4.5], aggregations [0.5,6.8]
    assert busy["busy_fractions"]["clients"] == {"a": pytest.approx(1.0)}  # leased throughout
    summary = state.summary({"slots": []}, now_t=10.0)
    assert summary["busy_fractions"] == busy["busy_fractions"]


def test_pool_busy_counts_busy_threads_of_queued_work() -> None:
    """While n pieces of queued work are in flight, min(n, workers) threads are busy; spans
    pushed past the horizon keep their total."""
    one, two = PoolBusy(1), PoolBusy(2)
    for span in [(0.0, 1.0), (0.0, 2.0), (0.0, 3.0), (5.0, 6.0)]:
        one.add(*span)
        two.add(*span)
    assert one.busy_s == pytest.approx(4.0)
    assert two.busy_s == pytest.approx(2 * 2.0 + 1.0 + 1.0)  # [0,2] both, [2,3] one, [5,6]
    rng = random.Random(3)
    pool, spans, end = PoolBusy(2), [], 0.0
    for _ in range(400):
        end += rng.random() * 5
        spans.append((end - rng.random() * 8, end))
        pool.add(*spans[-1])
    assert pool.busy_s == pytest.approx(PoolBusy(2)._busy_s(sorted(spans)))


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, Observability, RunStatus]]:
    """A StatusServer with an Observability whose slot 0 holds a small model at round 3."""
    status = RunStatus("unit")
    status.slots[0] = SlotStatus(0, rounds=5)
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}
    models = {0: LatestModel(3, state, None)}
    obs = Observability(status, lambda: status.as_dict({}), models=models.get)
    server = StatusServer(lambda: status.as_dict({}), "127.0.0.1", 0, token=TOKEN,
                          observability=obs)
    obs.attach()  # as the coordinator does for its run
    url = await server.start()
    yield url, obs, status
    await server.stop()
    obs.detach()


async def _next_message(response: aiohttp.ClientResponse) -> tuple[str, dict[str, Any]]:
    kind, data = "", ""
    async with asyncio.timeout(10):
        while True:
            line = (await response.content.readline()).decode()
            if line.startswith("event: "):
                kind = line[7:].strip()
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "\n" and kind:
                return kind, json.loads(data)


async def test_stream_sends_a_snapshot_then_deltas_and_a_fresh_snapshot_on_reconnect(
        served: tuple[str, Observability, RunStatus]) -> None:
    """A page gets the whole state on connect, new points as deltas, the whole state again
    after a drop, and a final snapshot when the run ends; the server's stop ends the stream."""
    url, obs, _ = served
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/events") as response:
            assert response.headers["Content-Type"] == "text/event-stream"
            kind, first = await _next_message(response)
            assert (kind, first["accuracy"], first["final"]) == ("snapshot", {}, False)
            obs._observe(RUN[-4])  # an evaluation
            kind, delta = await _next_message(response)
            while not delta["ops"]:
                kind, delta = await _next_message(response)
            seq, kind, slot, t, accuracy, round_ = delta["ops"][0]
            assert (seq, kind, slot, accuracy, round_) == (first["seq"] + 1, "acc", "0", 0.5, 1)
            assert t == pytest.approx(13.5 - obs.dashboard.state.t0, abs=1e-3)
        async with session.get(url + "/events") as response:  # the page reconnects
            kind, again = await _next_message(response)
            assert kind == "snapshot"
            assert [p[1] for p in again["accuracy"]["0"]] == [0.5]
            assert again["seq"] == seq  # ops still pending at this point are skipped by it
            obs._observe({"event": "run_finished", "status": "finished"})
            kind, last = await _next_message(response)
            while not last["final"]:
                kind, last = await _next_message(response)


async def test_server_stop_ends_open_streams_at_once(
        served: tuple[str, Observability, RunStatus]) -> None:
    """Stopping the server closes the event streams instead of waiting for them."""
    url, obs, _ = served
    session = aiohttp.ClientSession()
    response = await session.get(url + "/events")
    await _next_message(response)
    server_stop = asyncio.get_running_loop().time()
    await obs.dashboard.close(None)  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        while await response.content.readline():
            pass
    assert asyncio.get_running_loop().time() - server_stop < 5
    response.close()
    await session.close()


async def test_model_route_serves_safetensors_and_pwfl_with_round_and_digest(
        served: tuple[str, Observability, RunStatus]) -> None:
    """With the token: safetensors by default, the wire format on request, round in headers."""
    url, _, _ = served
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as session:
        async with session.get(url + "/slots/0/model") as response:
            assert response.status == 200
            assert response.headers["X-PWFL-Round"] == "3"
            tensors = load_safetensors(await response.read())
        async with session.get(url + "/slots/0/model?format=pwfl") as response:
            wire = decode(await response.read())[0]
        assert torch.equal(tensors["w"], torch.arange(6.0).reshape(2, 3))
        assert all(torch.equal(wire[k], tensors[k]) for k in ("w", "b"))
        for path, code in [("/slots/7/model", 404), ("/slots/x/model", 400),
                           ("/slots/0/model?format=pickle", 400)]:
            async with session.get(url + path) as response:
                assert response.status == code


async def test_model_route_needs_the_token(
        served: tuple[str, Observability, RunStatus]) -> None:
    """No token or a wrong one: 401, never the model, and the refusal is counted."""
    url, obs, _ = served
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            async with session.get(url + "/slots/0/model", headers=headers) as response:
                assert response.status == 401
                assert b"nope" not in await response.read()
    got = samples(obs.metrics.render().decode())
    assert got[("pwfl_http_unauthorized_total", (("route", "/slots/{slot_id}/model"),))] == 2


async def test_dashboard_files_are_served_and_only_they(
        served: tuple[str, Observability, RunStatus]) -> None:
    """GET / is the page; its script, styles and uPlot come from the package; other names 404."""
    url, _, _ = served
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/") as response:
            page = await response.text()
            assert response.content_type == "text/html"
        for name in STATIC_FILES:
            if name != "index.html":
                assert f"/static/{name}" in page or name == "LICENSE.uPlot"
            async with session.get(f"{url}/static/{name}") as response:
                assert response.status == 200
        for name in ("nope.js", "..%2Fhttp.py", "%2E%2E/__init__.py"):
            async with session.get(f"{url}/static/{name}") as response:
                assert response.status == 404
    assert b"MIT License" in (static_file("LICENSE.uPlot") or b"")


def test_agent_metrics_count_jobs_restarts_cache_and_shared_memory() -> None:
    """Agent events become its counters; its shared-memory segments are measured by kind."""
    metrics = AgentMetrics()
    for event in [{"event": "job_finished", "client_id": "3", "status": "ok", "train_s": 1.5},
                  {"event": "job_finished", "client_id": "3", "status": "failed"},
                  {"event": "trainer_exited", "device": "cpu", "job_id": "j1"},
                  {"event": "trainer_exited", "device": "cpu", "job_id": ""},
                  {"event": "model_fetched", "cached": False, "nbytes": 100},
                  {"event": "model_fetched", "cached": True, "nbytes": 100}]:
        metrics.observe(event)
    memory = shm.create(8192, prefix=shm.owned_prefix("m"))
    try:
        got = samples(generate_latest(metrics.registry).decode())
    finally:
        shm.release(memory, unlink=True)
    assert got[("pwfl_agent_jobs_total", (("client", "3"), ("status", "ok")))] == 1
    assert got[("pwfl_agent_jobs_total", (("client", "3"), ("status", "failed")))] == 1
    assert got[("pwfl_agent_train_seconds_total", (("client", "3"),))] == 1.5
    assert got[("pwfl_agent_trainer_restarts_total", (("device", "cpu"),))] == 1
    assert got[("pwfl_agent_model_fetches_total", (("cache", "hit"),))] == 1
    assert got[("pwfl_agent_transfer_bytes_total", (("direction", "down"),))] == 100
    assert got[("pwfl_agent_shared_memory_bytes", (("kind", "model"),))] >= 8192



async def test_result_route_serves_the_final_model_with_the_token(tmp_path: Path) -> None:
    """GET /runs/RUN/result: 404 before --merge final wrote checkpoints/result.pwfl, then
    the model as safetensors (or the wire format), only with the token."""
    from coordinator.checkpoints import CheckpointStore
    from serialization import encode

    store = CheckpointStore(tmp_path, 2)
    status = RunStatus("unit")
    obs = Observability(status, lambda: status.as_dict({}), checkpoints=lambda: store)
    server = StatusServer(lambda: status.as_dict({}), "127.0.0.1", 0, token=TOKEN,
                          observability=obs)
    url = await server.start()
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/runs/unit/result", headers=auth) as response:
                assert response.status == 404
            state = {"w": torch.arange(4.0)}
            (tmp_path / "checkpoints").mkdir()
            (tmp_path / "checkpoints" / "result.pwfl").write_bytes(encode(state))
            async with session.get(url + "/runs/unit/result") as response:
                assert response.status == 401
            async with session.get(url + "/runs/unit/result", headers=auth) as response:
                assert (response.status, response.headers["X-PWFL-Slot"]) == (200, "merged")
                assert torch.equal(load_safetensors(await response.read())["w"], state["w"])
            async with session.get(url + "/runs/unit/result?format=pwfl",
                                   headers=auth) as response:
                assert torch.equal(decode(await response.read())[0]["w"], state["w"])
            async with session.get(url + "/runs/other/result", headers=auth) as response:
                assert response.status == 404
    finally:
        await server.stop()
