"""A Flower client in the style of Flower's quickstart: a small CNN on Fashion-MNIST.

Plain Flower code: a `NumPyClient` with get_parameters, fit and evaluate, a `client_fn`
that reads its partition from ``context.node_config`` and a `ClientApp`. It runs on
Flower's engines as it is, and on PWFL with one changed command (docs/from-flower.md):

    python -m coordinator --task flower:examples.flower_client:client_fn \\
        --task-option evaluate_fn=examples.flower_client:evaluate_fn --local-agents 2

Each partition is an IID slice of Fashion-MNIST's training set (80% to train on, 20% to
validate), read from the local copy PWFL's loader finds (Debian's dataset-fashion-mnist).
The run config's ``examples-per-partition`` (0: all) and ``test-examples`` (0: all)
keep tests quick. fit reads ``lr``, ``momentum``, ``batch_size``, ``epochs``,
``local_steps`` (> 0: exactly that many steps instead of epochs) and ``seed`` (the
shuffle) from its config, with Flower-quickstart defaults where a key is missing.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer_worker.data import load_split

SPLIT_SEED = 42  # the IID split of the training set, the same on every node


class Net(nn.Module):
    """LeNet-style CNN for 1x28x28 images (Flower's quickstart model, one input channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def get_weights(net: nn.Module) -> list[np.ndarray]:
    return [val.cpu().numpy() for _, val in net.state_dict().items()]


def set_weights(net: nn.Module, parameters: list[np.ndarray]) -> None:
    params_dict = zip(net.state_dict().keys(), parameters, strict=True)
    net.load_state_dict(OrderedDict({k: torch.tensor(v) for k, v in params_dict}), strict=True)


@functools.cache
def load_data(partition_id: int, num_partitions: int,
              examples: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """This partition's train and validation sets (80/20), an IID slice of the train split."""
    split = load_split("train")
    order = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    part = torch.tensor_split(order, num_partitions)[partition_id]
    part = part[:examples] if examples else part
    cut = int(0.8 * len(part))
    return (TensorDataset(split.images[part[:cut]], split.labels[part[:cut]]),
            TensorDataset(split.images[part[cut:]], split.labels[part[cut:]]))


def train(net: nn.Module, trainset: TensorDataset, config: dict[str, Any]) -> float:
    """Local SGD as the config asks; the mean training loss."""
    shuffle = torch.Generator().manual_seed(int(config.get("seed", 0)))
    loader = DataLoader(trainset, batch_size=int(config.get("batch_size", 32)), shuffle=True,
                        generator=shuffle)
    optimizer = torch.optim.SGD(net.parameters(), lr=float(config.get("lr", 0.01)),
                                momentum=float(config.get("momentum", 0.9)))
    steps = int(config.get("local_steps", 0))
    epochs = int(config.get("epochs", 1))
    batches = (itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)
               if steps > 0 else itertools.chain.from_iterable(loader for _ in range(epochs)))
    net.train()
    total, count = 0.0, 0
    for images, labels in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item(), count + 1
    return total / max(count, 1)


def test(net: nn.Module, dataset: TensorDataset) -> tuple[float, float]:
    """Mean loss and accuracy on a dataset."""
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=500):
            outputs = net(images)
            loss += nn.functional.cross_entropy(outputs, labels, reduction="sum").item()
            correct += int((outputs.argmax(1) == labels).sum())
    return loss / max(len(dataset), 1), correct / max(len(dataset), 1)


class FlowerClient(NumPyClient):
    def __init__(self, trainset: TensorDataset, valset: TensorDataset) -> None:
        self.net = Net()
        self.trainset, self.valset = trainset, valset

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return get_weights(self.net)

    def fit(self, parameters: list[np.ndarray],
            config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        set_weights(self.net, parameters)
        train_loss = train(self.net, self.trainset, config)
        return get_weights(self.net), len(self.trainset), {"train_loss": train_loss}

    def evaluate(self, parameters: list[np.ndarray],
                 config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        set_weights(self.net, parameters)
        loss, accuracy = test(self.net, self.valset)
        return loss, len(self.valset), {"accuracy": accuracy}


def client_fn(context: Context) -> Any:
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    examples = int(context.run_config.get("examples-per-partition", 0))
    trainset, valset = load_data(partition_id, num_partitions, examples)
    return FlowerClient(trainset, valset).to_client()


def evaluate_fn(server_round: int, parameters: list[np.ndarray],
                config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Central evaluation on the test split, as a Flower strategy's ``evaluate_fn``."""
    split = load_split("test")
    limit = int(config.get("test-examples", 0)) or len(split.labels)
    net = Net()
    set_weights(net, parameters)
    loss, accuracy = test(net, TensorDataset(split.images[:limit], split.labels[:limit]))
    return loss, {"accuracy": accuracy, "num_examples": limit}


app = ClientApp(client_fn=client_fn)
