"""The trainer's speed-ups keep the maths: fused SGD steps as the for-loop SGD did."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from trainer_worker.task import TrainConfig
from trainer_worker.tasks import _can_fuse
from trainer_worker.tasks.synthetic import SyntheticTask

CPU = torch.device("cpu")


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in model.state_dict().values()])


def _train(model_name: str, *, fused: bool) -> torch.Tensor:
    task = SyntheticTask(model=model_name, examples_per_client=96, seed=1)
    model = task.build_model(seed=0)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-4,
                         proximal_mu=0.1, seed=3)
    with mock.patch("trainer_worker.tasks._can_fuse", return_value=fused):
        task.train(model, "0", config, CPU)
    return _flat(model)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_fused_sgd_trains_the_same_weights_as_the_for_loop(model_name: str) -> None:
    """Twelve steps with momentum, weight decay and FedProx: the same weights within 1e-5."""
    fused, loop = _train(model_name, fused=True), _train(model_name, fused=False)
    assert torch.allclose(fused, loop, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused, _flat(SyntheticTask(model=model_name).build_model(0)))


def test_fused_only_for_floating_point_on_cpu_or_cuda() -> None:
    """No parameters, or integer ones, keep the default optimiser."""
    assert _can_fuse([torch.zeros(2, requires_grad=True)])
    assert not _can_fuse([])
    assert not _can_fuse([torch.zeros(2, dtype=torch.int64)])
