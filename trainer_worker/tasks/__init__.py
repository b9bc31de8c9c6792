"""Built-in tasks, and the in-memory classification base they share.

`TensorClassificationTask` holds a task's data as tensors (the whole training
set once, each client as an index tensor into it) and implements `train` and
`evaluate` once: batches are gathered by index from pre-built tensors (no
DataLoader, no worker processes), the epoch order comes from a generator seeded
by the job's seed, and FedProx adds ``mu * (w - w_global)`` to each gradient
(the gradient of ``mu/2 * ||w - w_global||^2``). Each client's partition is split
once into a held-out validation part (`val_fraction` of it) and a training part,
fixed by the task's partition seed: `train`, `gradient_batches` and `partition_size`
see the training part only, `validate` scores a model on the validation part
(federated evaluation). The built-in tasks:

- ``trainer_worker.tasks.fashion_mnist:FashionMnistTask``
- ``trainer_worker.tasks.synthetic:SyntheticTask``
- ``trainer_worker.tasks.attack:AttackTask`` (wraps another task; its chosen clients
  send corrupted updates, for robustness benchmarks)
- ``trainer_worker.tasks.flower:FlowerTask`` (a Flower NumPyClient run unchanged; named
  ``flower:module:client_fn``)
"""

from __future__ import annotations

import hashlib
import itertools
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer_worker.task import Task, TaskError, TrainConfig, TrainOutcome


def partition_index(client_id: str, num_clients: int) -> int:
    """The partition of a client id ("0" .. "N-1"); TaskError for any other id."""
    try:
        partition = int(client_id)
    except ValueError:
        raise TaskError(f"client id {client_id!r} is not an integer") from None
    if not 0 <= partition < num_clients:
        raise TaskError(f"client id {client_id!r} is outside 0..{num_clients - 1}")
    return partition


@dataclass(frozen=True)
class Examples:
    """Inputs and int64 labels, first dimension aligned."""

    inputs: torch.Tensor
    labels: torch.Tensor


def check_val_fraction(value: object) -> float:
    """A task's `val_fraction` option: a number in [0, 1); TaskError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise TaskError(f"val_fraction must be a number in [0, 1), not {value!r}")
    return float(value)


def validation_count(size: int, val_fraction: float) -> int:
    """How many of a partition's `size` examples are held out for validation:
    round(size * val_fraction) (Python's round: half to even), at least 1 when
    val_fraction > 0 and size >= 2, and at most size - 1 (a client always keeps an example
    to train on)."""
    if val_fraction <= 0 or size < 2:
        return 0
    return min(max(round(size * val_fraction), 1), size - 1)


def split_seed(partition_seed: int, partition: int) -> int:
    """The seed of one partition's validation split (a 63-bit int from both numbers, so
    every process draws the same split, and another partition seed another one)."""
    text = f"pwfl-validation-split:{int(partition_seed)}:{int(partition)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Split:
    """One client's partition: indices (into `train_examples()`) to train on and to
    validate on, disjoint, each in the partition's order."""

    train: torch.Tensor
    validation: torch.Tensor


def split_partition(indices: torch.Tensor, val_fraction: float, seed: int) -> Split:
    """A partition's indices split into training and validation parts: the validation
    part is `validation_count` indices drawn by a generator seeded with `seed`."""
    count = validation_count(len(indices), val_fraction)
    held_out = torch.zeros(len(indices), dtype=torch.bool)
    if count:
        chosen = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed))
        held_out[chosen[:count]] = True
    held_out = held_out.to(indices.device)
    return Split(train=indices[~held_out], validation=indices[held_out])


class TensorClassificationTask(Task):
    """A classification task whose data fit in memory as tensors.

    `val_fraction` of each client's partition is held out for validation (0: none);
    `partition_seed` fixes which examples (with the partition's index)."""

    eval_batch_size: int = 1000
    num_clients: int = 1
    val_fraction: float = 0.1
    partition_seed: int = 0

    def __init__(self) -> None:
        self._on_device: dict[tuple[str, str], Examples] = {}
        self._splits: dict[int, Split] = {}

    @abstractmethod
    def train_examples(self) -> Examples:
        """Every client's training examples together (built once, then cached)."""

    @abstractmethod
    def client_indices(self, partition: int) -> torch.Tensor:
        """Indices into `train_examples()` of one client's partition (int64)."""

    @abstractmethod
    def test_examples(self) -> Examples:
        """The held-out test set."""

    def partition_of(self, client_id: str) -> int:
        """The partition index of a client id ("0" .. "N-1")."""
        return partition_index(client_id, self.num_clients)

    def split(self, partition: int) -> Split:
        """One partition's training and validation parts (drawn once, then cached)."""
        if partition not in self._splits:
            seed = split_seed(self.partition_seed, partition)
            self._splits[partition] = split_partition(self.client_indices(partition),
                                                      self.val_fraction, seed)
        return self._splits[partition]

    def training_indices(self, partition: int) -> torch.Tensor:
        """Indices of the partition's training part (what `train` learns from)."""
        return self.split(partition).train

    def validation_indices(self, partition: int) -> torch.Tensor:
        """Indices of the partition's held-out validation part (never trained on)."""
        return self.split(partition).validation

    def train(self, model: nn.Module, client_id: str, config: TrainConfig,
              device: torch.device) -> TrainOutcome:
        indices = self.training_indices(self.partition_of(client_id))
        data = self._examples_on("train", device)
        metrics = train_sgd(model, data, indices.to(device), config)
        return TrainOutcome(num_examples=len(indices), metrics=metrics)

    def partition_size(self, client_id: str) -> int:
        return len(self.training_indices(self.partition_of(client_id)))

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        data = self._examples_on("test", device)
        return evaluate_batches(model, data, self.eval_batch_size)

    def validate(self, model: nn.Module, client_id: str,
                 device: torch.device) -> dict[str, float] | None:
        partition = self.partition_of(client_id)
        if not len(self.validation_indices(partition)):
            return None  # val_fraction 0, or a partition too small to hold one out
        key = (f"validation:{partition}", str(device))
        if key not in self._on_device:  # gathered once per partition, not once per job
            data = self._examples_on("train", device)
            held_out = self.validation_indices(partition).to(device)
            self._on_device[key] = Examples(data.inputs[held_out], data.labels[held_out])
        return evaluate_batches(model, self._on_device[key], self.eval_batch_size)

    def gradient_batches(self, client_id: str, config: TrainConfig,
                         device: torch.device) -> Iterator[tuple[Any, int]]:
        indices = self.training_indices(self.partition_of(client_id)).to(device)
        data = self._examples_on("train", device)
        torch.manual_seed(config.seed)  # as `train_sgd`
        for batch in batch_order(indices, config.batch_size, config.seed):
            yield (data.inputs[batch], data.labels[batch]), len(batch)

    def batch_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(model(inputs), labels)

    def _examples_on(self, split: str, device: torch.device) -> Examples:
        key = (split, str(device))
        if key not in self._on_device:
            data = self.train_examples() if split == "train" else self.test_examples()
            self._on_device[key] = Examples(data.inputs.to(device), data.labels.to(device))
        return self._on_device[key]


def batch_order(indices: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of `indices`: each epoch a permutation drawn from a generator seeded
    by `seed`, split into `batch_size` pieces (the last may be smaller), as `train_sgd`."""
    order = torch.Generator().manual_seed(seed)
    while len(indices):
        perm = torch.randperm(len(indices), generator=order).to(indices.device)
        yield from torch.split(indices[perm], batch_size)


def train_sgd(model: nn.Module, data: Examples, indices: torch.Tensor,
              config: TrainConfig) -> dict[str, float]:
    """Local SGD over the examples at `indices`: mean loss, accuracy and step count."""
    torch.manual_seed(config.seed)  # dropout and friends, if a user's model has any
    order = torch.Generator().manual_seed(config.seed)
    step = _Stepper(model, config)
    model.train()
    if config.local_steps > 0:
        batches = batch_order(indices, config.batch_size, config.seed)
        for batch in itertools.islice(batches, config.local_steps):
            step(data.inputs[batch], data.labels[batch])
        return step.metrics()
    for _ in range(config.epochs):
        perm = torch.randperm(len(indices), generator=order).to(indices.device)
        for batch in torch.split(indices[perm], config.batch_size):
            if config.max_steps and step.steps >= config.max_steps:
                return step.metrics()
            step(data.inputs[batch], data.labels[batch])
    return step.metrics()


def _can_fuse(params: Sequence[torch.Tensor]) -> bool:
    """Whether SGD(fused=True) takes these parameters: floating point on CPU or CUDA.

    The fused kernel does the same update in one pass; measured by `bench.trainer_speed`
    (default CNN, one CPU thread, interleaved): 1.05x steps/s at batch 16, 1.04x at 32.
    """
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                for p in params)


class _Stepper:
    """One SGD step per call (with the FedProx pull when mu > 0), and running totals."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay,
                                         fused=_can_fuse(self.params) or None)
        self.mu = config.proximal_mu
        # FedProx anchors on the weights the job received, i.e. the model before training.
        self.anchor = [p.detach().clone() for p in self.params] if self.mu > 0 else []
        device = self.params[0].device if self.params else torch.device("cpu")
        # Summed on the device: no host sync per step.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0
        self.steps = 0

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(inputs)
        loss = nn.functional.cross_entropy(logits, labels)
        torch.autograd.backward(loss)
        if self.anchor:
            self._pull_to_anchor()
        self.optimizer.step()
        with torch.no_grad():
            self.loss_sum += loss.detach() * len(labels)
            self.correct += (logits.argmax(1) == labels).sum()
        self.seen += len(labels)
        self.steps += 1

    def _pull_to_anchor(self) -> None:
        grads: list[torch.Tensor] = []
        weights: list[torch.Tensor] = []
        anchors: list[torch.Tensor] = []
        for param, anchor in zip(self.params, self.anchor, strict=True):
            if param.grad is not None:
                grads.append(param.grad)
                weights.append(param.detach())
                anchors.append(anchor)
        if grads:
            torch._foreach_add_(grads, torch._foreach_sub(weights, anchors), alpha=self.mu)

    def metrics(self) -> dict[str, float]:
        seen = max(self.seen, 1)
        return {
            "train_loss": float(self.loss_sum) / seen,
            "train_accuracy": int(self.correct) / seen,
            "steps": float(self.steps),
        }


def evaluate_batches(model: nn.Module, data: Examples, batch_size: int) -> dict[str, float]:
    """Accuracy, mean loss and example count over `data`, in eval mode without autograd."""
    model.eval()
    device = data.labels.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.inference_mode():
        batches = zip(torch.split(data.inputs, batch_size), torch.split(data.labels, batch_size),
                      strict=True)
        for inputs, labels in batches:
            logits = model(inputs)
            loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
    count = len(data.labels)
    return {
        "accuracy": int(correct) / max(count, 1),
        "loss": float(loss_sum) / max(count, 1),
        "num_examples": float(count),
    }
