"""The attack task plugin: honest clients untouched, attackers' updates corrupted as named."""

from __future__ import annotations

import pytest
import torch

from trainer_worker.task import TaskError, TrainConfig, load_task
from trainer_worker.tasks import attack
from trainer_worker.tasks.attack import AttackTask

CPU = torch.device("cpu")
SPEC = "trainer_worker.tasks.attack:AttackTask"
CONFIG = TrainConfig(lr=0.05, max_steps=3, seed=7)


def _task(kind: str, **options: object) -> AttackTask:
    return AttackTask(inner="synthetic", attackers="2,3", attack=kind, num_clients=4,
                      examples_per_client=32, **options)


def _update(task: AttackTask, client: str, config: TrainConfig = CONFIG) -> attack.Update:
    """The update (weights after minus before) the task returns for one client's job."""
    model = task.build_model(seed=0)
    before = attack.float_state(model)
    task.train(model, client, config, CPU)
    return attack.difference(attack.float_state(model), before)


def _flat(update: attack.Update) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in update.values()])


def _honest(client: str, config: TrainConfig = CONFIG) -> torch.Tensor:
    return _flat(_update(_task("none"), client, config))


def test_loads_by_import_path_with_inner_options() -> None:
    """The task loads by import path; options it does not know go to the inner task."""
    task = load_task(SPEC, {"inner": "synthetic", "attackers": [1], "num_clients": 3,
                            "examples_per_client": 8})
    assert isinstance(task, AttackTask)
    assert task.attackers == {"1"}
    assert task.inner.num_clients == 3  # type: ignore[attr-defined]


def test_attackers_parse_from_list_int_or_string() -> None:
    """Attacker ids come as a JSON list, one int, or a comma-separated string."""
    assert attack.parse_attackers([6, 7]) == attack.parse_attackers("6, 7") == {"6", "7"}
    assert attack.parse_attackers(3) == {"3"}
    assert attack.parse_attackers("") == frozenset()


def test_unknown_attack_is_rejected() -> None:
    """A misspelt attack name fails at load, not silently as an honest run."""
    with pytest.raises(TaskError, match="attack must be one of"):
        _task("signflip")


def test_honest_client_update_is_untouched() -> None:
    """A client outside `attackers` returns exactly what the inner task trains."""
    assert torch.equal(_flat(_update(_task("sign_flip"), "0")), _honest("0"))


def test_sign_flip_reverses_and_scales() -> None:
    """sign_flip sends -10 x the honest update."""
    torch.testing.assert_close(_flat(_update(_task("sign_flip"), "2")), -10 * _honest("2"))


def test_scaling_scales() -> None:
    """scaling sends scale x the honest update (scale option)."""
    torch.testing.assert_close(_flat(_update(_task("scaling", scale=5), "3")), 5 * _honest("3"))


def test_gaussian_is_noise_of_sigma() -> None:
    """gaussian sends N(0, sigma^2) noise, unrelated to the honest update, seeded by the job."""
    update = _flat(_update(_task("gaussian", sigma=0.5), "2"))
    assert abs(float(update.std()) - 0.5) < 0.05
    assert abs(float(update.mean())) < 0.05
    assert torch.equal(update, _flat(_update(_task("gaussian", sigma=0.5), "2")))


def test_alie_is_mean_minus_z_std_of_attackers_honest_updates() -> None:
    """alie: both attackers send mean - z*std of honest updates on their pooled partitions."""
    task = _task("alie", z=1.5)
    first, second = _flat(_update(task, "2")), _flat(_update(task, "3"))
    assert torch.equal(first, second)
    start = attack.float_state(task.build_model(seed=0))
    shared = TrainConfig(lr=0.05, max_steps=3, seed=attack.weights_seed(start))
    honest = torch.stack([_honest("2", shared), _honest("3", shared)])
    torch.testing.assert_close(first, honest.mean(0) - 1.5 * honest.std(0))


def test_alie_default_z_is_the_papers_z_max() -> None:
    """Without z, alie uses z_max of Baruch et al.: n=8, f=2 gives Phi^-1(5/8) ~ 0.319;
    n=50, f=12 gives s = 26 - 12 = 14 and Phi^-1(36/50) ~ 0.583."""
    assert attack.alie_z(8, 2) == pytest.approx(0.3186, abs=1e-4)
    assert attack.alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)
    assert _task("alie").z == pytest.approx(attack.alie_z(4, 2))


def test_evaluate_and_model_are_the_inner_tasks() -> None:
    """The coordinator sees the inner task's model and test metrics unchanged."""
    task = _task("scaling")
    model = task.build_model(seed=1)
    assert task.evaluate(model, CPU) == task.inner.evaluate(model, CPU)


def test_count_lie_sends_the_honest_update_with_the_largest_claim() -> None:
    """count_lie changes nothing but the count: the honest update, num_examples 10^9, and
    a declared partition size of 10^9; honest clients declare and claim their own."""
    task = _task("count_lie")
    assert torch.allclose(_flat(_update(task, "2")), _honest("2"))
    outcome = task.train(task.build_model(seed=0), "2", CONFIG, CPU)
    assert outcome.num_examples == attack.MAX_CLAIM
    assert task.partition_size("2") == attack.MAX_CLAIM
    assert task.partition_size("0") == 29  # 32 less the 10% validation split
    assert task.train(task.build_model(seed=0), "0", CONFIG, CPU).num_examples == 29


def test_scaled_claim_scales_the_update_and_claims_the_most() -> None:
    """scaled_claim sends scale x the honest update with a claim of 10^9."""
    task = _task("scaled_claim", scale=10.0)
    assert torch.allclose(_flat(_update(task, "3")), _honest("3") * 10.0, atol=1e-5)
    assert task.train(task.build_model(seed=0), "3", CONFIG, CPU).num_examples == (
        attack.MAX_CLAIM)
    assert task.partition_size("3") == attack.MAX_CLAIM
