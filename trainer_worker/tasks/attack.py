"""Byzantine clients as a task plugin: a real task whose chosen clients corrupt their update.

``trainer_worker.tasks.attack:AttackTask`` wraps a task (``inner``, by alias or
``module:factory``, loaded through the trainer's allowlist like any job's task) and,
for the client ids in ``attackers``, replaces the update (weights after training
minus the weights received) before the trainer returns it.
Nothing in the agent or the coordinator knows about attacks: to them this is a
task like any other, which is what makes it a fair test of the aggregation rules.

Attacks (``attack=``), with ``delta`` the attacker's honest update:

- ``sign_flip``: ``-scale * delta`` (scale 10 by default);
- ``scaling``: ``scale * delta``;
- ``gaussian``: the update is replaced by ``N(0, sigma^2)`` noise per coordinate (the
  "Gaussian Byzantine" client of Blanchard et al. 2017 and Fang et al. 2020);
- ``alie``: "A little is enough" (Baruch et al. 2019): ``mean - z * std`` of benign
  updates, coordinate-wise, every attacker sending the same vector; ``z`` defaults to
  the paper's ``z_max`` for n clients and f attackers.
- ``count_lie``: the honest update, but ``num_examples`` claimed at ``claim`` (10^9, the
  most a result may claim) and the partition size declared as much: a silo that lies
  only about its weight;
- ``scaled_claim``: ``scale * delta`` with the same claim and declaration;
- ``none``: every client honest (the clean baseline through the same code path).

The two claiming attacks test the coordinator's caps (`coordinator.results.claims`) and
the robust rules' refusal to let counts choose: each attacker's count is capped at
what its job could train, and no robust rule reads it to select.

What ALIE's attackers know: the paper's attackers estimate the benign updates'
statistics from the benign clients' data or from their own honest updates. A plugin
sees only what a client sees, so here the attackers collude and pool their own data:
each attacker trains an honest update on every attacker's partition from the weights
it received, and uses their mean and (sample) standard deviation. All attackers start
these honest runs from the same seed, derived from the received weights, so they send
identical vectors as in the paper. The cost is f trainings per attacker job, and with
f = 1 the standard deviation is 0 (the attack degenerates to the honest update).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from serialization.tasks import TaskPlugin, load_task
from trainer_worker.task import (
    Task,
    TaskError,
    TrainConfig,
    TrainOutcome,
    outcome_of,
    partition_size_of,
)

ATTACKS = ("none", "sign_flip", "scaling", "gaussian", "alie", "count_lie", "scaled_claim")
CLAIMING = ("count_lie", "scaled_claim")  # attacks that also lie about their example count
MAX_CLAIM = 10**9  # the most a result may claim (the coordinator's bound on num_examples)

Update = dict[str, torch.Tensor]


def parse_attackers(value: object) -> frozenset[str]:
    """Client ids from a list, one int, or a comma-separated string ("6,7")."""
    if value is None or value == "":
        return frozenset()
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return frozenset(str(item).strip() for item in items if str(item).strip())


def alie_z(num_clients: int, num_attackers: int) -> float:
    """Baruch et al.'s z_max: s = floor(n/2 + 1) - f attackers' worth of benign clients
    must sit farther from the mean than the attackers; z = Phi^-1((n - s) / n)."""
    s = math.floor(num_clients / 2 + 1) - num_attackers
    quantile = (num_clients - s) / num_clients
    if not 0 < quantile < 1:
        raise TaskError(f"alie: no z for n={num_clients} clients and f={num_attackers}")
    return statistics.NormalDist().inv_cdf(quantile)


def float_state(model: nn.Module) -> Update:
    """A detached copy of the model's floating-point tensors (what an attack may change)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if v.is_floating_point()}


def difference(after: Update, before: Update) -> Update:
    return {k: after[k] - before[k] for k in before}


def sign_flip(delta: Update, scale: float) -> Update:
    """The honest update reversed and scaled: -scale * delta."""
    return {k: v * -scale for k, v in delta.items()}


def scaling(delta: Update, scale: float) -> Update:
    """The honest update scaled: scale * delta."""
    return {k: v * scale for k, v in delta.items()}


def gaussian(delta: Update, sigma: float, seed: int) -> Update:
    """An update of pure N(0, sigma^2) noise, shaped like the honest one."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=gen, dtype=torch.float32) * sigma)
            .to(dtype=v.dtype, device=v.device) for k, v in delta.items()}


def alie(deltas: list[Update], z: float) -> Update:
    """Coordinate-wise mean - z * std of the given honest updates (sample std; 0 for one)."""
    out: Update = {}
    for key in deltas[0]:
        stacked = torch.stack([d[key] for d in deltas])
        std = stacked.std(dim=0) if len(deltas) > 1 else torch.zeros_like(stacked[0])
        out[key] = stacked.mean(dim=0) - z * std
    return out


def weights_seed(state: Update) -> int:
    """A seed every attacker derives alike from the weights they all received."""
    crc = 0
    for key in sorted(state):
        crc = zlib.crc32(state[key].cpu().contiguous().numpy().tobytes(), crc)
    return crc & 0x7FFFFFFF


class AttackTask(Task):
    """`inner` with the clients in `attackers` sending a corrupted update (see module doc)."""

    def __init__(self, inner: str = "fashion_mnist", attackers: object = "",
                 attack: str = "sign_flip", scale: float = 10.0, sigma: float = 1.0,
                 z: float | None = None, claim: int = MAX_CLAIM,
                 **inner_options: Any) -> None:
        if attack not in ATTACKS:
            raise TaskError(f"attack must be one of {ATTACKS}, not {attack!r}")
        # The same load_task as the trainer's, so the trainer's allowlist holds for `inner`.
        self.inner: TaskPlugin = load_task(inner, inner_options)
        self.attackers = parse_attackers(attackers)
        self.attack, self.scale, self.sigma = attack, float(scale), float(sigma)
        num_clients = int(inner_options.get("num_clients", getattr(self.inner, "num_clients", 0)))
        if attack == "alie" and z is None:
            z = alie_z(num_clients, len(self.attackers))
        self.z = float(z or 0.0)
        self.claim = int(claim)

    def _claims(self, client_id: str) -> bool:
        """Whether this client lies about its example count."""
        return self.attack in CLAIMING and client_id in self.attackers

    def partition_size(self, client_id: str) -> int | None:
        if self._claims(client_id):
            return self.claim  # the declaration lies as much as the claims
        return partition_size_of(self.inner, client_id)

    def build_model(self, seed: int) -> nn.Module:
        return self.inner.build_model(seed)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return self.inner.evaluate(model, device)

    def validate(self, model: nn.Module, client_id: str,
                 device: torch.device) -> dict[str, float] | None:
        """The inner task's validation (attackers corrupt updates, not evaluations)."""
        method = getattr(self.inner, "validate", None)
        figures: dict[str, float] | None = (method(model, client_id, device)
                                            if callable(method) else None)
        return figures

    def train(self, model: nn.Module, client_id: str, config: TrainConfig,
              device: torch.device) -> TrainOutcome:
        if self.attack == "none" or client_id not in self.attackers:
            return outcome_of(self.inner.train(model, client_id, config, device))
        if self.attack == "count_lie":
            outcome = outcome_of(self.inner.train(model, client_id, config, device))
            return dataclasses.replace(outcome, num_examples=self.claim)
        start = float_state(model)
        if self.attack == "alie":
            outcome, update = self._alie(model, client_id, config, device, start)
        else:
            outcome = outcome_of(self.inner.train(model, client_id, config, device))
            update = self._corrupt(difference(float_state(model), start), config.seed)
        model.load_state_dict({k: start[k] + update[k] for k in start}, strict=False)
        if self._claims(client_id):
            return dataclasses.replace(outcome, num_examples=self.claim)
        return outcome

    def _corrupt(self, delta: Update, seed: int) -> Update:
        attacks: dict[str, Callable[[], Update]] = {
            "sign_flip": lambda: sign_flip(delta, self.scale),
            "scaling": lambda: scaling(delta, self.scale),
            "scaled_claim": lambda: scaling(delta, self.scale),
            "gaussian": lambda: gaussian(delta, self.sigma, seed),
        }
        return attacks[self.attack]()

    def _alie(self, model: nn.Module, client_id: str, config: TrainConfig,
              device: torch.device, start: Update) -> tuple[TrainOutcome, Update]:
        shared = dataclasses.replace(config, seed=weights_seed(start))
        deltas, own = [], None
        for attacker in sorted(self.attackers):
            model.load_state_dict(start, strict=False)
            outcome = outcome_of(self.inner.train(model, attacker, shared, device))
            deltas.append(difference(float_state(model), start))
            if attacker == client_id:
                own = outcome
        assert own is not None  # client_id is one of the attackers
        return own, alie(deltas, self.z)
