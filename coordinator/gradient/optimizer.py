"""The server optimiser of a gradient slot: one flat parameter vector, one torch optimiser.

The slot keeps its parameters as one float32 vector (`named_parameters` order)
and steps it with `torch.optim.SGD` or `torch.optim.Adam` on the batch-size
weighted mean of the clients' gradients. Elementwise, this is the same
arithmetic torch applies to the model's own parameters, so one client in
gradient mode reproduces plain SGD (or Adam) on that client's batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

OPTIMIZERS = ("sgd", "adam")
SGD_OPTIONS = {"lr", "momentum", "dampening", "nesterov", "weight_decay"}
ADAM_OPTIONS = {"lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad"}


class OptimizerError(ValueError):
    """An unknown server optimiser or option."""


@dataclass(frozen=True)
class ServerOptimizer:
    """Which optimiser and its options (torch's defaults where not given)."""

    name: str = "sgd"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise OptimizerError(f"server optimiser must be one of {OPTIMIZERS}, not "
                                 f"{self.name!r}")
        known = SGD_OPTIONS if self.name == "sgd" else ADAM_OPTIONS
        unknown = set(self.options) - known
        if unknown:
            raise OptimizerError(f"unknown {self.name} option(s) {sorted(unknown)}; "
                                 f"known: {sorted(known)}")

    def build(self, flat: torch.Tensor) -> torch.optim.Optimizer:
        """The optimiser over `flat` (a leaf tensor)."""
        o = dict(self.options)
        if self.name == "sgd":
            return torch.optim.SGD([flat], lr=float(o.get("lr", 0.01)),
                                   momentum=float(o.get("momentum", 0.0)),
                                   dampening=float(o.get("dampening", 0.0)),
                                   nesterov=bool(o.get("nesterov", False)),
                                   weight_decay=float(o.get("weight_decay", 0.0)))
        betas = (float(o.get("beta1", 0.9)), float(o.get("beta2", 0.999)))
        return torch.optim.Adam([flat], lr=float(o.get("lr", 0.001)), betas=betas,
                                eps=float(o.get("eps", 1e-8)),
                                weight_decay=float(o.get("weight_decay", 0.0)),
                                amsgrad=bool(o.get("amsgrad", False)))


def weighted_mean(gradients: Sequence[tuple[np.ndarray, int]],
                  out: np.ndarray | None = None, scratch: np.ndarray | None = None) -> np.ndarray:
    """The mean of float32 gradients weighted by their batch sizes (one gradient: itself,
    bit for bit). `out` and `scratch`, when given, are reused instead of allocating (a
    fresh 2 MB array costs page faults every step)."""
    total = sum(n for _, n in gradients)
    if not gradients or total <= 0:
        raise ValueError("no examples to average")
    (first, n0), rest = gradients[0], gradients[1:]
    mean: np.ndarray = np.multiply(first, np.float32(n0 / total), out=out)
    for values, n in rest:
        mean += np.multiply(values, np.float32(n / total), out=scratch)
    return mean


class FlatModel:
    """A slot's parameters as one vector, its optimiser, and its state dict for the rest."""

    def __init__(self, state: dict[str, torch.Tensor],
                 shapes: list[tuple[str, tuple[int, ...]]], optimizer: ServerOptimizer) -> None:
        self.state = {k: v.clone() for k, v in state.items()}
        self.shapes = shapes
        parts = [state[name].detach().reshape(-1).float() for name, _ in shapes]
        self.flat = torch.cat(parts).requires_grad_(True)
        self.optimizer = optimizer.build(self.flat)
        # The mean's buffers, reused every step (the optimiser does not keep the gradient).
        self.mean = np.empty(self.flat.numel(), dtype=np.float32)
        self.scratch = np.empty_like(self.mean)

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def weights_bytes(self) -> memoryview:
        """The current weights as bytes: a view (valid until the next `step`)."""
        return self.flat.detach().numpy().data.cast("B")

    def step(self, gradient: np.ndarray) -> None:
        """One optimiser step with this gradient."""
        self.flat.grad = torch.from_numpy(gradient)
        self.optimizer.step()
        self.flat.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the current parameters (a copy)."""
        flat = self.flat.detach()
        state = {k: v.clone() for k, v in self.state.items()}
        offset = 0
        for name, shape in self.shapes:
            n = int(np.prod(shape)) if shape else 1
            state[name] = flat[offset:offset + n].view(shape).to(state[name].dtype).clone()
            offset += n
        return state

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The optimiser's tensors (momentum, moments, step), for the checkpoint."""
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
                for k, v in self.optimizer.state.get(self.flat, {}).items()}

    def load_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `optimizer_state` saved (a resumed run)."""
        self.optimizer.state[self.flat] = {k: v.clone() for k, v in tensors.items()}
