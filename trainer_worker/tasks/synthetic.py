"""Gaussian-blob classification generated from a seed: tiny, fast, deterministic.

Each class has a centroid; an example is its class centroid plus unit Gaussian
noise. Inputs take the shape the chosen model wants (a feature vector for the
MLP, 1x28x28 for the CNN, 3x32x32 for ResNet-18), so the same task drives unit
tests (``mlp``) and framework benchmarks (``cnn``, ``resnet18`` with noop jobs).
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch
from torch import nn

from trainer_worker import models
from trainer_worker.task import TaskError
from trainer_worker.tasks import Examples, TensorClassificationTask, check_val_fraction

_CENTROIDS, _CLIENTS, _TEST = 0, 1, 2  # streams of the seed's random sequence


class SyntheticTask(TensorClassificationTask):
    """`num_clients` IID clients of `examples_per_client` blob examples each; of those,
    `val_fraction` are held out as the client's validation split (never trained on)."""

    def __init__(
        self,
        num_clients: int = 6,
        examples_per_client: int = 64,
        features: int = 16,
        classes: int = 10,
        seed: int = 0,
        model: str = "mlp",
        test_examples: int = 512,
        separation: float = 2.0,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        self.val_fraction = check_val_fraction(val_fraction)
        if model not in models.MODEL_NAMES:
            raise TaskError(f"model must be one of {models.MODEL_NAMES}, not {model!r}")
        if min(num_clients, examples_per_client, features, classes, test_examples) < 1:
            raise TaskError("num_clients, examples_per_client, features, classes and "
                            "test_examples must all be positive")
        self.num_clients = num_clients
        self.examples_per_client = examples_per_client
        self.classes = classes
        self.seed = seed
        self.partition_seed = seed  # the validation split follows the data's seed
        self.model = model
        self.test_count = test_examples
        self.separation = separation
        self.eval_batch_size = eval_batch_size
        self.shape = models.input_shape(model, features)

    def build_model(self, seed: int) -> nn.Module:
        return models.build(self.model, seed=seed, num_classes=self.classes,
                            features=self.shape[0])

    def train_examples(self) -> Examples:
        return self._train

    def test_examples(self) -> Examples:
        return self._test

    def client_indices(self, partition: int) -> torch.Tensor:
        start = partition * self.examples_per_client
        return torch.arange(start, start + self.examples_per_client)

    @cached_property
    def _centroids(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _CENTROIDS])
        dims = math.prod(self.shape)
        # Two centroids lie about 2.8 * separation noise standard deviations apart,
        # whatever the input size.
        return rng.standard_normal((self.classes, dims)) * (2 * self.separation / math.sqrt(dims))

    @cached_property
    def _train(self) -> Examples:
        return self._blobs(self.num_clients * self.examples_per_client, _CLIENTS)

    @cached_property
    def _test(self) -> Examples:
        return self._blobs(self.test_count, _TEST)

    def _blobs(self, count: int, stream: int) -> Examples:
        rng = np.random.default_rng([self.seed, stream])
        labels = rng.integers(0, self.classes, size=count)
        inputs = self._centroids[labels] + rng.standard_normal((count, self._centroids.shape[1]))
        return Examples(
            torch.from_numpy(inputs.astype(np.float32)).reshape(count, *self.shape),
            torch.from_numpy(labels.astype(np.int64)),
        )
