"""A Flower NumPyClient runs unchanged on PWFL: the adapter, the allowlist, and equivalence
with Flower's own simulation engine on the same partitions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import redis.asyncio as aioredis
import torch

from bus.keys import Keys
from serialization.tasks import FLOWER_ADAPTER, loadable
from tests.e2e import ROOT, Run
from tests.test_agent_refusals import _job, _refused
from trainer_worker.task import TaskError, TrainConfig, load_task

HAS_FLWR = importlib.util.find_spec("flwr") is not None
TestFn = TypeVar("TestFn", bound=Callable[..., Any])


def needs_flwr(test: TestFn) -> TestFn:
    """The adapter's tests need Flower itself (the spec mapping and the allowlist do not);
    importing flwr 1.41 warns about click's deprecations, which are not ours to fix."""
    ignore = pytest.mark.filterwarnings(
        "ignore:'click.utils.get_[a-z]+_stream' is deprecated:DeprecationWarning")
    skip = pytest.mark.skipif(not HAS_FLWR, reason="needs flwr (pip install 'pwfl[flower]')")
    return skip(ignore(test))  # type: ignore[no-any-return]
CLIENT_FN = "examples.flower_client:client_fn"
SPEC = "flower:" + CLIENT_FN
RUN_CONFIG = {"examples-per-partition": 120, "test-examples": 200}
OPTIONS = {"num_clients": 3, "evaluate_fn": "examples.flower_client:evaluate_fn", **RUN_CONFIG}
CPU = torch.device("cpu")


def test_a_flower_spec_loads_the_adapter_with_the_client_fn_as_an_option() -> None:
    """flower:module:client_fn is the adapter with client_fn=module:client_fn."""
    assert loadable(SPEC, {"a": 1}) == (FLOWER_ADAPTER, {"a": 1, "client_fn": CLIENT_FN})
    assert loadable("x.y:Task", {"a": 1}) == ("x.y:Task", {"a": 1})


@needs_flwr
def test_the_model_is_the_clients_parameters_in_get_parameters_order() -> None:
    """build_model is get_parameters of partition 0 under the seed: same seed, same arrays."""
    task = load_task(SPEC, OPTIONS)
    first, again, other = (task.build_model(s).state_dict() for s in (0, 0, 1))
    assert list(first) == [f"p{i:03d}" for i in range(10)]
    assert first["p000"].shape == (6, 1, 5, 5)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["p000"], other["p000"])


@needs_flwr
def test_fit_gets_the_jobs_settings_and_its_count_and_metrics_are_the_updates() -> None:
    """train runs the client's fit with the TrainConfig as config; the returned arrays
    become the model, the example count and numeric metrics the outcome."""
    task = load_task(SPEC, OPTIONS)
    model = task.build_model(0)
    before = model.state_dict()["p000"].clone()
    outcome = task.train(model, "2", TrainConfig(local_steps=3, batch_size=16, lr=0.1), CPU)
    assert outcome.num_examples == 96  # 80% of the partition's 120
    assert set(outcome.metrics) == {"train_loss"}
    assert not torch.equal(before, model.state_dict()["p000"])


@needs_flwr
def test_evaluation_uses_evaluate_fn_or_the_clients_evaluate() -> None:
    """Central evaluation: the evaluate_fn option on the test set, else the client's own
    evaluate on partition evaluate_partition; both give accuracy, loss, num_examples."""
    central = load_task(SPEC, OPTIONS)
    metrics = central.evaluate(central.build_model(0), CPU)
    assert metrics["num_examples"] == 200
    assert 0 <= metrics["accuracy"] <= 1
    local = load_task(SPEC, {**RUN_CONFIG, "num_clients": 3, "evaluate_partition": 1})
    assert local.evaluate(local.build_model(0), CPU)["num_examples"] == 24


@needs_flwr
def test_federated_evaluation_is_each_clients_own_evaluate_on_its_partition() -> None:
    """validate runs the client's evaluate for that client's partition (its 20% validation
    set here) on the model given: loss, example count, and the accuracy it reports."""
    task = load_task(SPEC, OPTIONS)
    model = task.build_model(0)
    figures = task.validate(model, "2", CPU)
    assert figures is not None
    assert figures["num_examples"] == 24  # 20% of the partition's 120
    assert 0 <= figures["accuracy"] <= 1
    loss, count, metrics = task.client(2).evaluate(model.arrays(), {})  # type: ignore[attr-defined]
    assert figures == {"loss": loss, "num_examples": count, "accuracy": metrics["accuracy"]}


@needs_flwr
def test_a_client_fn_that_gives_no_numpy_client_is_a_task_error() -> None:
    """Only NumPyClients run: anything else is refused with a clear TaskError."""
    task = load_task("flower:builtins:repr", {"num_clients": 1})
    with pytest.raises(TaskError, match="not a NumPyClient"):
        task.build_model(0)


async def test_an_agent_refuses_a_flower_client_it_was_not_allowed(
        redis_client: aioredis.Redis, run_keys: Keys) -> None:
    """The allowlist names the wrapped client: a job for another client_fn, or for the
    adapter itself, is refused task_not_allowed without importing anything."""
    for task in ("flower:evil.client:client_fn", FLOWER_ADAPTER):
        result, _ = await _refused(redis_client, run_keys, _job(run_keys, task), keyring=None)
        assert result.error.startswith("task_not_allowed: "), task


def _pwfl_run(launch: Callable[..., Run]) -> Run:
    options = [x for k, v in OPTIONS.items() if k != "num_clients"
               for x in ("--task-option", f"{k}={v}")]
    run = launch("flower-eq", "--task", SPEC, *options, "--slots", "1", "--rounds", "1",
                 "--clients", "3", "--local-agents", "1", "--local-steps", "0", "--epochs",
                 "1", "--batch-size", "16", "--lr", "0.05", "--keep-checkpoints", "2")
    assert run.wait(180) == 0, run.output()[-3000:]
    return run


def _flower_aggregate(run: Run, tmp_path: Path) -> list[np.ndarray]:
    seeds = {e["client_id"]: e["seed"] for e in run.events("job_published")}
    state = json.loads((run.runs_dir / run.run_id / "state.json").read_text())
    config = {**state["settings"]["training"], "seed": 0}  # seeds: each client's own
    spec = {"client_fn": CLIENT_FN, "num_clients": 3, "run_config": RUN_CONFIG,
            "config": config, "seeds": seeds, "initial_seed": 0}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "flower.npz"
    done = subprocess.run([sys.executable, "-m", "tests.flower_sim", str(tmp_path / "spec.json"),
                           str(out)], cwd=ROOT, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    with np.load(out) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@needs_flwr
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_first_round_aggregate_matches_flowers_simulation_engine(
        launch: Callable[..., Run], tmp_path: Path) -> None:
    """The same client on the same partitions, same initial model, settings and seeds:
    PWFL's first-round FedAvg aggregate equals Flower 1.41's simulation engine's to 1e-6."""
    pytest.importorskip("ray")
    run = _pwfl_run(launch)
    pwfl = [t.numpy() for t in run.checkpoint(1).values()]
    flower = _flower_aggregate(run, tmp_path)
    initial = load_task(SPEC, OPTIONS).build_model(0).state_dict()
    diffs = [float(np.max(np.abs(a - b))) for a, b in zip(pwfl, flower, strict=True)]
    moved = max(float(np.max(np.abs(a - t.numpy()))) for a, t in zip(pwfl, initial.values(),
                                                                      strict=True))
    print(f"max abs difference {max(diffs):.3g} over {len(diffs)} arrays; "  # noqa: T201
          f"largest move from the initial model {moved:.3g}")
    assert moved > 1e-3  # training happened
    assert max(diffs) <= 1e-6
