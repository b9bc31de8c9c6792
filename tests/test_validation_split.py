"""Federated evaluation's task half: each client's held-out validation split (disjoint from
what it trains on, fixed by the partition seed), `Task.validate`, and the figures a result
carries (`trainer_worker.task.validation_metrics`)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

from trainer_worker.task import (
    VALIDATION_KEYS,
    TaskError,
    TrainConfig,
    load_task,
    validation_metrics,
)
from trainer_worker.tasks import (
    Examples,
    TensorClassificationTask,
    evaluate_batches,
    validation_count,
)
from trainer_worker.tasks.attack import AttackTask
from trainer_worker.tasks.synthetic import SyntheticTask

CPU = torch.device("cpu")
PER_CLIENT = 40


class Recorder(nn.Module):
    """A linear classifier that notes the example index (input feature 0) of every input it
    sees: which examples training, gradient batches and validation read."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.extend(int(v) for v in x[:, 0])
        return self.linear(x)


class IndexedTask(TensorClassificationTask):
    """Three clients of PER_CLIENT examples whose first feature is the example's index."""

    num_clients = 3

    def __init__(self, partition_seed: int = 0, val_fraction: float = 0.1) -> None:
        super().__init__()
        self.partition_seed, self.val_fraction = partition_seed, val_fraction
        count = self.num_clients * PER_CLIENT
        inputs = torch.randn(count, 4, generator=torch.Generator().manual_seed(0))
        inputs[:, 0] = torch.arange(count, dtype=torch.float32)
        self._train = Examples(inputs, torch.arange(count) % 3)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return Recorder()

    def train_examples(self) -> Examples:
        return self._train

    def client_indices(self, partition: int) -> torch.Tensor:
        return torch.arange(partition * PER_CLIENT, (partition + 1) * PER_CLIENT)

    def test_examples(self) -> Examples:
        return self._train


def _ids(indices: torch.Tensor) -> set[int]:
    return set(indices.tolist())


@pytest.mark.parametrize(("size", "fraction", "held_out"), [
    (40, 0.1, 4), (45, 0.1, 4), (50, 0.25, 12), (2, 0.1, 1), (10, 0.01, 1), (10, 0.99, 9),
    (1, 0.5, 0), (0, 0.1, 0), (40, 0.0, 0),
])
def test_the_validation_part_is_rounded_at_least_one_and_leaves_one_to_train(
        size: int, fraction: float, held_out: int) -> None:
    """round(n * val_fraction) examples, at least 1 when there is a fraction and n >= 2, at
    most n - 1; none for a fraction of 0 or a partition of one example."""
    assert validation_count(size, fraction) == held_out


def test_each_partition_splits_into_disjoint_training_and_validation_parts() -> None:
    """Training and validation parts are disjoint and together the client's partition."""
    task = IndexedTask()
    for partition in range(task.num_clients):
        split = task.split(partition)
        assert _ids(split.train) | _ids(split.validation) == _ids(task.client_indices(partition))
        assert not _ids(split.train) & _ids(split.validation)
        assert len(split.validation) == 4
        assert task.partition_size(str(partition)) == PER_CLIENT - 4


def test_the_split_is_fixed_by_the_partition_seed() -> None:
    """Two task instances with one partition seed hold out the same examples (every process
    draws the same split); another partition seed holds out others."""
    first, again, other = IndexedTask(partition_seed=5), IndexedTask(5), IndexedTask(6)
    for partition in range(3):
        assert torch.equal(first.validation_indices(partition),
                           again.validation_indices(partition))
    assert any(not torch.equal(first.validation_indices(p), other.validation_indices(p))
               for p in range(3))
    # Not the same relative positions in every partition either.
    offsets = {tuple((first.validation_indices(p) - p * PER_CLIENT).tolist()) for p in range(3)}
    assert len(offsets) > 1


def test_training_never_reads_a_validation_example() -> None:
    """Whole epochs, a step budget and gradient batches read the training part only (all
    of it); validation reads exactly the validation part."""
    task = IndexedTask()
    train_ids, held_out = _ids(task.training_indices(1)), _ids(task.validation_indices(1))
    model = task.build_model(0)
    task.train(model, "1", TrainConfig(epochs=3, batch_size=8), CPU)
    assert set(model.seen) == train_ids
    model.seen.clear()
    task.train(model, "1", TrainConfig(local_steps=25, batch_size=8), CPU)
    assert set(model.seen) == train_ids
    batches = itertools.islice(task.gradient_batches("1", TrainConfig(batch_size=8), CPU), 30)
    assert set().union(*(_ids(inputs[:, 0].long()) for (inputs, _), _ in batches)) == train_ids
    model.seen.clear()
    figures = task.validate(model, "1", CPU)
    assert figures is not None
    assert sorted(model.seen) == sorted(held_out)
    assert figures["num_examples"] == len(held_out) == 4


def test_validate_is_the_models_figures_on_the_validation_part_and_changes_nothing() -> None:
    """A SyntheticTask's validate evaluates the model on the client's validation examples
    (as `evaluate_batches` does), leaves the weights alone, and trains on the other 90%."""
    task = SyntheticTask(num_clients=2, examples_per_client=PER_CLIENT, seed=3)
    model = task.build_model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    figures = task.validate(model, "1", CPU)
    data, held_out = task.train_examples(), task.validation_indices(1)
    want = evaluate_batches(model, Examples(data.inputs[held_out], data.labels[held_out]), 1000)
    assert figures == want
    assert figures["num_examples"] == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    outcome = task.train(model, "1", TrainConfig(epochs=1, batch_size=8), CPU)
    assert outcome.num_examples == task.partition_size("1") == PER_CLIENT - 4
    assert validation_metrics(task, model, "1", CPU) == {
        "val_accuracy": pytest.approx(task.validate(model, "1", CPU)["accuracy"]),
        "val_loss": pytest.approx(task.validate(model, "1", CPU)["loss"]),
        "val_examples": 4.0}


def test_synthetic_split_follows_the_task_seed_and_options() -> None:
    """SyntheticTask: the split follows its seed; val_fraction is an option (0: no split,
    every example trains and validate reports nothing)."""
    spec = "trainer_worker.tasks.synthetic:SyntheticTask"
    one, same = (load_task(spec, {"seed": 1, "examples_per_client": 50}) for _ in range(2))
    other = load_task(spec, {"seed": 2, "examples_per_client": 50})
    assert isinstance(one, SyntheticTask)
    assert isinstance(same, SyntheticTask)
    assert isinstance(other, SyntheticTask)
    assert torch.equal(one.validation_indices(0), same.validation_indices(0))
    assert not torch.equal(one.validation_indices(0), other.validation_indices(0))
    assert one.partition_size("0") == 45
    wide = SyntheticTask(examples_per_client=50, val_fraction=0.3)
    assert wide.partition_size("0") == 35
    none = SyntheticTask(examples_per_client=50, val_fraction=0)
    assert none.partition_size("0") == 50
    assert none.validate(none.build_model(0), "0", CPU) is None
    assert validation_metrics(none, none.build_model(0), "0", CPU) == {}


@pytest.mark.parametrize("value", [-0.1, 1, 1.5, "0.1", True, None])
def test_a_bad_val_fraction_is_a_task_error(value: Any) -> None:
    """val_fraction must be a number in [0, 1)."""
    with pytest.raises(TaskError, match="val_fraction"):
        SyntheticTask(val_fraction=value)


def test_the_attack_wrapper_validates_with_its_inner_task() -> None:
    """AttackTask scores a model with the inner task's validation split, attackers too."""
    task = AttackTask(inner="synthetic", attackers="1", attack="sign_flip", num_clients=2,
                      examples_per_client=PER_CLIENT)
    inner = SyntheticTask(num_clients=2, examples_per_client=PER_CLIENT)
    model = task.build_model(seed=0)
    assert task.validate(model, "1", CPU) == inner.validate(model, "1", CPU)
    assert task.partition_size("0") == PER_CLIENT - 4


class _Plugin:
    """A structural plugin (no `Task` base) whose validate returns what it is given."""

    def __init__(self, figures: object) -> None:
        self.figures = figures

    def validate(self, model: nn.Module, client_id: str, device: torch.device) -> object:
        return self.figures


def test_validation_metrics_are_the_val_keys_or_nothing() -> None:
    """The helper renames a split's figures to val_accuracy, val_loss, val_examples; a
    plugin without validate, or one returning None, gives no keys; accuracy may be missing
    (a Flower client may not measure it); anything malformed is a TaskError."""
    model = nn.Linear(1, 1)
    full = {"accuracy": 0.5, "loss": 1.25, "num_examples": 8, "other": 3.0}
    assert validation_metrics(_Plugin(full), model, "0", CPU) == {
        "val_accuracy": 0.5, "val_loss": 1.25, "val_examples": 8.0}
    assert tuple(validation_metrics(_Plugin(full), model, "0", CPU)) == VALIDATION_KEYS
    assert validation_metrics(object(), model, "0", CPU) == {}
    assert validation_metrics(_Plugin(None), model, "0", CPU) == {}
    assert validation_metrics(_Plugin({"loss": 2, "num_examples": 3}), model, "0", CPU) == {
        "val_loss": 2.0, "val_examples": 3.0}
    for bad in ([1, 2], {"accuracy": 0.5, "num_examples": 3},
                {"loss": float("nan"), "num_examples": 3}, {"loss": 1.0, "num_examples": True},
                {"loss": 1.0, "num_examples": -1}, {"loss": 1.0, "num_examples": 3,
                                                    "accuracy": "high"}):
        with pytest.raises(TaskError, match="validate"):
            validation_metrics(_Plugin(bad), model, "0", CPU)


def test_config_keys_default_off_and_parse_from_a_job() -> None:
    """validate and validate_only are TrainConfig keys, off unless a job sets them."""
    assert (TrainConfig().validate, TrainConfig().validate_only) == (False, False)
    config = TrainConfig.from_dict({"validate": True, "validate_only": True, "lr": 0.1})
    assert (config.validate, config.validate_only, config.lr) == (True, True, 0.1)
