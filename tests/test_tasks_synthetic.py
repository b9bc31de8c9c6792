"""The built-in models and the synthetic Gaussian-blob task."""

from __future__ import annotations

import pytest
import torch

from trainer_worker import models
from trainer_worker.task import TaskError, TrainConfig, load_task
from trainer_worker.tasks.synthetic import SyntheticTask

CPU = torch.device("cpu")
SPEC = "trainer_worker.tasks.synthetic:SyntheticTask"


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in model.state_dict().values()])


def test_cnn_has_582k_parameters() -> None:
    """The default CNN: conv 1->32 k5, conv 32->64 k5, fc 1024->512->10, 582,026 parameters."""
    cnn = models.build("cnn", seed=0)
    assert models.count_params(cnn) == models.CNN_PARAMS == 582_026
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_is_torchvisions_with_ten_classes() -> None:
    """The benchmark model: torchvision ResNet-18 (11.7M parameters) on 3x32x32 blobs."""
    task = SyntheticTask(model="resnet18", num_clients=1, examples_per_client=2, test_examples=2)
    resnet = task.build_model(seed=0)
    assert 11_100_000 < models.count_params(resnet) < 11_800_000
    assert task.evaluate(resnet, CPU)["num_examples"] == 2
    assert resnet(task.train_examples().inputs).shape == (2, 10)


def test_build_is_seeded_and_leaves_global_rng_alone() -> None:
    """Same seed, same weights; another seed, other weights; torch's global RNG is untouched."""
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first, again = models.build("mlp", seed=5, features=8), models.build("mlp", seed=5, features=8)
    assert torch.equal(torch.rand(1), expected)
    assert torch.equal(_flat(first), _flat(again))
    assert not torch.equal(_flat(first), _flat(models.build("mlp", seed=6, features=8)))


def test_load_task_by_import_path() -> None:
    """The task loads by `module:factory` with its options."""
    task = load_task(SPEC, {"num_clients": 3, "examples_per_client": 10})
    assert isinstance(task, SyntheticTask)
    assert task.num_clients == 3


def test_training_improves_test_accuracy() -> None:
    """A few local epochs on every client raise test accuracy and lower test loss."""
    task = SyntheticTask(num_clients=4, examples_per_client=64, seed=1)
    model = task.build_model(seed=0)
    before = task.evaluate(model, CPU)
    for client in "0123":
        task.train(model, client, TrainConfig(epochs=3, lr=0.05), CPU)
    after = task.evaluate(model, CPU)
    assert after["accuracy"] > before["accuracy"] + 0.3
    assert after["loss"] < before["loss"]
    assert after["num_examples"] == 512


def test_outcome_reports_partition_size_and_metrics() -> None:
    """num_examples is the partition size (the examples it trains on: 50 less the 10%
    validation split); metrics carry loss, accuracy and steps."""
    task = SyntheticTask(examples_per_client=50)
    outcome = task.train(task.build_model(0), "2", TrainConfig(epochs=2, batch_size=16), CPU)
    assert outcome.num_examples == task.partition_size("2") == 45
    assert outcome.metrics["steps"] == 6  # 2 epochs x ceil(45 / 16)
    assert 0 <= outcome.metrics["train_accuracy"] <= 1
    assert outcome.metrics["train_loss"] > 0


def test_max_steps_caps_training() -> None:
    """max_steps stops training early, across epochs."""
    task = SyntheticTask(examples_per_client=64)
    config = TrainConfig(epochs=10, batch_size=8, max_steps=5)
    assert task.train(task.build_model(0), "0", config, CPU).metrics["steps"] == 5


def test_same_seed_trains_the_same_model() -> None:
    """The same config seed gives identical weights; another seed different ones."""
    task = SyntheticTask(seed=2)
    results = []
    for seed in (7, 7, 8):
        model = task.build_model(seed=0)
        task.train(model, "1", TrainConfig(epochs=2, seed=seed), CPU)
        results.append(_flat(model))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_data_are_deterministic_per_seed() -> None:
    """Two tasks built with the same seed hold the same examples."""
    first, again = SyntheticTask(seed=4), SyntheticTask(seed=4)
    assert torch.equal(first.train_examples().inputs, again.train_examples().inputs)
    assert torch.equal(first.test_examples().labels, again.test_examples().labels)
    other = SyntheticTask(seed=5)
    assert not torch.equal(first.train_examples().inputs, other.train_examples().inputs)


def test_fedprox_term_pulls_towards_the_received_weights() -> None:
    """With mu > 0 the result differs, and lies closer to the starting weights."""
    task = SyntheticTask(seed=3)
    start = _flat(task.build_model(seed=0))
    drift = {}
    for mu in (0.0, 1.0):
        model = task.build_model(seed=0)
        task.train(model, "0", TrainConfig(epochs=5, lr=0.1, proximal_mu=mu), CPU)
        drift[mu] = float((_flat(model) - start).norm())
    assert drift[1.0] != drift[0.0]
    assert drift[1.0] < drift[0.0]


@pytest.mark.parametrize("client_id", ["6", "-1", "x"])
def test_client_outside_partition_is_a_task_error(client_id: str) -> None:
    """Client ids are "0".."N-1"; anything else raises TaskError."""
    task = SyntheticTask(num_clients=6)
    with pytest.raises(TaskError, match="client id"):
        task.train(task.build_model(0), client_id, TrainConfig(), CPU)


def test_cnn_gets_image_shaped_blobs() -> None:
    """With the CNN, inputs are 1x28x28 images, and a training step runs."""
    task = SyntheticTask(model="cnn", num_clients=2, examples_per_client=4, test_examples=4)
    assert task.train_examples().inputs.shape == (8, 1, 28, 28)
    outcome = task.train(task.build_model(0), "1", TrainConfig(batch_size=4, max_steps=1), CPU)
    assert outcome.metrics["steps"] == 1


def test_bad_options_are_task_errors() -> None:
    """An unknown model or a non-positive size raises TaskError."""
    with pytest.raises(TaskError, match="model"):
        SyntheticTask(model="vgg")
    with pytest.raises(TaskError, match="positive"):
        SyntheticTask(examples_per_client=0)
    with pytest.raises(TaskError, match="val_fraction"):
        SyntheticTask(val_fraction=1.0)
