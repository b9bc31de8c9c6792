"""The default job's pieces: step-budget local training, how the CLI picks it, and the
evaluation thread that yields the CPU to trainers."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable

import pytest
import structlog
import torch

from coordinator import cli
from coordinator.evaluation import Evaluator, evaluate_round, lower_thread_priority
from coordinator.population.config import Base, resolve
from coordinator.settings import CoordinatorSettings, TrainingSettings
from tests.e2e import Run
from trainer_worker.task import TrainConfig
from trainer_worker.tasks.synthetic import SyntheticTask

CPU = torch.device("cpu")


def _steps(task: SyntheticTask, client: str, config: TrainConfig) -> int:
    model = task.build_model(seed=0)
    return int(task.train(model, client, config, CPU).metrics["steps"])


def test_local_steps_is_exact_for_small_and_big_clients() -> None:
    """local_steps=N: every client takes exactly N steps, cycling through a small partition;
    epochs and max_steps are then ignored."""
    task = SyntheticTask(num_clients=2, examples_per_client=40)
    budget = TrainConfig(batch_size=16, local_steps=7, epochs=1, max_steps=2)
    assert _steps(task, "0", budget) == 7  # 36 examples to train = 3 batches: 2+ epochs
    assert _steps(task, "0", TrainConfig(batch_size=16)) == 3  # whole epochs as before
    big = SyntheticTask(num_clients=2, examples_per_client=400)
    assert _steps(big, "1", budget) == 7  # well under one epoch


def test_local_steps_follow_the_epoch_order_and_weights_stay_data_sized() -> None:
    """The first epoch's batches are the ones whole-epoch training uses, so a budget of one
    epoch's steps gives the same weights; FedAvg's weight stays the partition size."""
    task = SyntheticTask(num_clients=1, examples_per_client=48)
    a, b = task.build_model(seed=0), task.build_model(seed=0)
    out_a = task.train(a, "0", TrainConfig(batch_size=16, seed=3), CPU)
    out_b = task.train(b, "0", TrainConfig(batch_size=16, seed=3, local_steps=3), CPU)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    # 48 examples less the 10% validation split: 43 (three batches, the last short).
    assert out_a.num_examples == out_b.num_examples == task.partition_size("0") == 43


@pytest.mark.parametrize(("argv", "local_steps", "epochs", "max_steps"), [
    ([], TrainingSettings().local_steps, 1, 0),
    (["--epochs", "2"], 0, 2, 0),
    (["--max-steps", "50"], 0, 1, 50),
    (["--epochs", "2", "--local-steps", "30"], 30, 2, 0),
    (["--local-steps", "0"], 0, 1, 0),
])
def test_cli_picks_steps_unless_epochs_are_asked_for(argv: list[str], local_steps: int,
                                                     epochs: int, max_steps: int) -> None:
    """The default is a step budget; --epochs or --max-steps alone mean whole epochs."""
    training = cli.training_from_args(cli.build_parser().parse_args(argv))
    assert (training.local_steps, training.epochs, training.max_steps) == (
        local_steps, epochs, max_steps)


def test_default_job_is_a_step_budget() -> None:
    """The default job balances rounds with a step budget (the measured choice)."""
    assert TrainingSettings().local_steps > 0


def test_slot_that_asks_for_epochs_trains_epochs() -> None:
    """A --slot-config/--sweep slot that sets epochs (not local_steps) trains whole epochs."""
    base = Base(training=TrainingSettings(local_steps=40), strategy="fedavg",
                strategy_options={}, clients_per_round=2, seed=0)
    assert resolve(base, 0, {"epochs": 2}).training.local_steps == 0
    assert resolve(base, 1, {"epochs": 2, "local_steps": 9}).training.local_steps == 9
    assert resolve(base, 2, {"lr": 0.1}).training.local_steps == 40


def test_run_saved_before_step_budgets_resumes_with_epochs() -> None:
    """A state.json without local_steps (an older run) resumes training whole epochs."""
    saved = json.loads(CoordinatorSettings(run_id="old").to_json())
    saved["training"].pop("local_steps")
    settings = CoordinatorSettings.from_json(json.dumps(saved))
    assert settings.training.local_steps == 0


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priority here")
def test_lower_thread_priority_changes_only_the_calling_thread() -> None:
    """The evaluation thread's nice value goes up by the increment; the caller's does not."""
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []

    def worker() -> None:
        assert lower_thread_priority(5)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [min(before + 5, 19)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert not lower_thread_priority(0)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priority here")
def test_evaluations_run_one_at_a_time_on_a_niced_thread() -> None:
    """Every slot's evaluation, and a merge's from another worker thread, goes to the one
    evaluation thread, niced, off the loop."""
    task = SyntheticTask(num_clients=1, examples_per_client=8, test_examples=64)
    threads: list[tuple[str, int]] = []
    original = task.evaluate

    def spy(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        tid = threading.get_native_id()
        threads.append((threading.current_thread().name, os.getpriority(os.PRIO_PROCESS, tid)))
        return original(model, device)

    task.evaluate = spy  # type: ignore[method-assign]
    evaluator = Evaluator(task, nice=3)
    state = evaluator.initial_state(0)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def main() -> list[dict[str, float]]:
        return await asyncio.gather(
            *(evaluator.evaluate_in_background(i, state) for i in range(3)),
            evaluator.evaluate_in_background(-1, state))  # as --merge final's test does

    results = asyncio.run(main())
    evaluator.close()
    assert all(r["num_examples"] == 64 for r in results)
    assert len(threads) == 4
    assert len({name for name, _ in threads}) == 1
    assert threads[0][0].startswith("pwfl-eval")
    assert {nice for _, nice in threads} == {min(base + 3, 19)}


def test_evaluate_round_skips_a_round_a_newer_due_round_overtook() -> None:
    """A due round is skipped only when a newer due round has closed; the last never is."""
    task = SyntheticTask(num_clients=1, examples_per_client=8, test_examples=16)
    evaluator = Evaluator(task)
    state = evaluator.initial_state(0)

    def run(round_: int, newest: int, every: int = 1) -> dict[str, float]:
        return asyncio.run(evaluate_round(evaluator, 0, round_, state, eval_every=every,
                                          last_round=10, newest_round=newest))

    with structlog.testing.capture_logs() as logs:
        assert run(3, 3)
        assert run(3, 0)
        assert run(3, 4) == {}
        assert run(10, 12)  # the last round is always evaluated
        assert run(5, 9, every=5)  # rounds 6-9 are not due: round 5 is the newest due one
        assert run(5, 10, every=5) == {}
    evaluator.close()
    skipped = [(e["round"], e["newer_round"]) for e in logs if e["event"] == "evaluation_skipped"]
    assert skipped == [(3, 4), (5, 10)]


@pytest.mark.slow
def test_slow_evaluation_does_not_hold_the_rounds(launch: Callable[..., Run]) -> None:
    """With evaluation slower than a round, rounds go on: stale evaluations are skipped, the
    last round is evaluated, and every round is still checkpointed in order."""
    run = launch("e2e-slow-eval", "--task", "tests.e2e_tasks:SlowEvalTask",
                 "--task-option", "eval_s=1.5", "--slots", "1", "--clients", "2",
                 "--rounds", "8", "--local-agents", "1", "--local-steps", "5")
    assert run.wait(120) == 0, run.output()[-4000:]
    evaluated = [e["round"] for e in run.events("evaluation_finished")]
    skipped = [e["round"] for e in run.events("evaluation_skipped")]
    assert skipped
    assert evaluated[-1] == 8
    assert sorted(evaluated + skipped) == list(range(1, 9))
    assert [e["round"] for e in run.events("checkpoint_written")] == list(range(1, 9))
    published = {e["round"]: e["ts"] for e in run.events("model_published")}
    first_eval = run.events("evaluation_finished")[0]
    assert published[first_eval["round"] + 2] < first_eval["ts"]  # two rounds ran meanwhile


def test_evaluation_yields_only_when_several_slots_share_the_machine() -> None:
    """Default: one slot evaluates at the trainers' priority, several 10 nice steps below;
    --eval-nice N is taken as given."""
    assert CoordinatorSettings(run_id="a", slots=1).evaluation_nice == 0
    assert CoordinatorSettings(run_id="b", slots=3).evaluation_nice == 10
    assert CoordinatorSettings(run_id="c", slots=3, eval_nice=4).evaluation_nice == 4
    assert CoordinatorSettings(run_id="d", slots=1, eval_nice=7).evaluation_nice == 7
