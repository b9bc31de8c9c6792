"""End to end, batch-gradient federation: the real coordinator, agent and trainer processes.

The reference is plain torch SGD in this process on the same client's batches,
drawn in the order the job's seed fixes (read back from the run's event log).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from serialization import decode
from tests.e2e import Run, by_slot_round, lease_violations
from trainer_worker.tasks.synthetic import SyntheticTask

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROUNDS, STEPS, BATCH, LR, MOMENTUM = 2, 7, 8, 0.1, 0.9
EXAMPLES = 20  # not a multiple of BATCH: epochs end on a short batch, and 7 steps span 3 epochs


def plain_sgd(seeds: list[int]) -> dict[str, torch.Tensor]:
    """Torch SGD with momentum on client 0's batches: per round STEPS batches drawn from a
    generator seeded by that round's job seed, one permutation per epoch."""
    task = SyntheticTask(num_clients=1, examples_per_client=EXAMPLES)
    model = task.build_model(seed=0)  # the coordinator's slot 0 starts from run seed 0 + 0
    data, indices = task.train_examples(), task.training_indices(0)  # not its validation split
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for seed in seeds:
        order = torch.Generator().manual_seed(seed)
        batches: list[torch.Tensor] = []
        while len(batches) < STEPS:
            batches += torch.split(indices[torch.randperm(len(indices), generator=order)], BATCH)
        for batch in batches[:STEPS]:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.inputs[batch]), data.labels[batch]).backward()
            optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_one_client_equals_plain_sgd(launch: Callable[..., Run]) -> None:
    """One client in gradient mode ends, step for step, where plain SGD on its batches does."""
    run = launch("gradient-sgd", "--mode", "gradient", "--task", "synthetic", "--task-option",
                 f"examples_per_client={EXAMPLES}", "--slots", "1", "--clients", "1",
                 "--rounds", str(ROUNDS), "--gradient-steps", str(STEPS), "--batch-size",
                 str(BATCH), "--lr", str(LR), "--momentum", str(MOMENTUM), "--local-agents",
                 "1", "--keep-checkpoints", "10")
    assert run.wait(240) == 0, run.output()[-4000:]
    seeds = [e["seed"] for e in run.events("job_published")]
    assert len(seeds) == ROUNDS
    steps = run.events("gradient_step")
    assert [(e["round"], e["step"]) for e in steps] == [
        (r, s) for r in range(1, ROUNDS + 1) for s in range(1, STEPS + 1)]
    final = run.events("checkpoint_written")[-1]
    assert final["round"] == ROUNDS
    got = decode(Path(final["path"]).read_bytes())[0]
    want = plain_sgd(seeds)
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    print(f"max abs difference from plain SGD after {ROUNDS * STEPS} steps: {diff:.3g}")  # noqa: T201 - reported with pytest -s
    assert diff <= 1e-6
    moved = max(float((want[k] - plain_sgd([])[k]).abs().max()) for k in want)
    assert moved > 1e-2  # the comparison is not between two untrained models


def test_gradient_slots_beside_a_weight_slot(launch: Callable[..., Run]) -> None:
    """Two gradient slots and a weight slot, up to two clients each, share six clients
    without overlapping leases, and all finish every round; every step of a gradient
    round averages the gradients of all the clients its lease holds."""
    run = launch("gradient-mixed", "--gradient-slots", "2", "--task", "synthetic", "--slots",
                 "3", "--clients", "6", "--clients-per-round", "2", "--rounds", "2",
                 "--gradient-steps", "5", "--local-agents", "2")
    assert run.wait(240) == 0, run.output()[-4000:]
    events = run.events()
    closed = set(by_slot_round(events, "round_closed"))
    assert closed == {(s, r) for s in range(3) for r in range(1, 3)}
    assert lease_violations(events) == []
    steps = run.events("gradient_step")
    assert sorted((e["slot_id"], e["round"], e["step"]) for e in steps) == [
        (s, r, k) for s in (0, 1) for r in (1, 2) for k in range(1, 6)]
    leased = {(e["slot_id"], e["round"]): len(e["clients"])
              for e in run.events("round_started")}
    assert all(e["clients"] == leased[e["slot_id"], e["round"]] for e in steps)
    assert run.events("gradient_client_dropped") == []
    assert {e["slot_id"] for e in run.events("update_folded")} == {2}
    assert all(e["accuracy"] is not None for e in run.events("evaluation_finished"))


def test_lease_larger_than_the_agents_trainers(launch: Callable[..., Run]) -> None:
    """Three clients of one gradient lease on an agent with one trainer take turns on it:
    every step averages all three gradients, well before any step deadline."""
    run = launch("gradient-shared", "--mode", "gradient", "--task", "synthetic", "--slots", "1",
                 "--clients", "3", "--rounds", "1", "--gradient-steps", "4", "--local-agents",
                 "1", "--deadline", "60")
    assert run.wait(240) == 0, run.output()[-4000:]
    steps = run.events("gradient_step")
    assert [e["clients"] for e in steps] == [3, 3, 3, 3]
    assert run.events("gradient_client_dropped") == []


def test_failing_client_leaves_the_session(launch: Callable[..., Run]) -> None:
    """A client whose gradient step fails leaves its session with a failed result; the
    slot steps on with the other client and finishes its rounds."""
    run = launch("gradient-broken", "--mode", "gradient", "--task",
                 "tests.e2e_tasks:BrokenGradientTask", "--task-option", 'fail_clients=["1"]',
                 "--task-option", "fail_at=3", "--slots", "1", "--clients", "2", "--rounds",
                 "2", "--gradient-steps", "5", "--local-agents", "2")
    assert run.wait(240) == 0, run.output()[-4000:]
    steps = run.events("gradient_step")
    assert len(steps) == 10
    round1 = [e["clients"] for e in steps if e["round"] == 1]
    assert round1[:2] == [2, 2]
    assert round1[2:] == [1, 1, 1]
    failed = run.events("job_failed")
    assert {e["client_id"] for e in failed} == {"1"}
    assert "injected failure" in failed[0]["error"]
    assert [e["round"] for e in run.events("round_closed")] == [1, 2]


def test_a_hung_step_is_bounded_by_the_step_deadline(launch: Callable[..., Run],
                                                      tmp_path: Path) -> None:
    """With no --train-timeout-s, a gradient step that never returns is killed after the
    session's step deadline (twice --deadline, at least 60 s, the floor of a derived
    bound, which spares ordinary stragglers): the slot drops the client at --deadline
    and steps on with the other, the hung session fails with train_timeout, its lease
    returns and the client is averaged in every step of the next round."""
    run = launch("gradient-hang", "--mode", "gradient", "--task",
                 "tests.e2e_tasks:HangingGradientTask", "--task-option", 'hang_clients=["1"]',
                 "--task-option", "hang_at=2", "--task-option",
                 f'once_file="{tmp_path / "hung"}"', "--slots", "1", "--clients", "2",
                 "--rounds", "2", "--gradient-steps", "4", "--local-agents", "2",
                 "--deadline", "4", "--min-clients", "2")
    assert run.wait(240) == 0, run.output()[-4000:]
    # The session's result may come after its round closed: the dispatcher logs it anyway.
    [failed] = [e for e in run.events("update_received") if e["status"] == "failed"]
    assert (failed["client_id"], failed["round"]) == ("1", 1)
    assert failed["error"].startswith("train_timeout: no result within 60 s")
    assert any(e["reason"] == "failed" for e in run.events("lease_returned")
               if e["client_id"] == "1")
    dropped = run.events("gradient_client_dropped")
    assert [(e["client_id"], e["round"], e["reason"]) for e in dropped] == [
        ("1", 1, "step_deadline")]
    assert [e["round"] for e in run.events("round_closed")] == [1, 2]
    steps = [e["clients"] for e in run.events("gradient_step")]
    assert steps == [2, 1, 1, 1, 2, 2, 2, 2]  # round 2 waited for the client's lease
