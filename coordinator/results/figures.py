"""Federated evaluation: the validation figures a round's clients report.

A job with ``validate`` in its config evaluates the model it received on its client's
held-out validation split before training and returns ``val_accuracy``, ``val_loss``
and ``val_examples`` in its result's metrics (signed with the result). A slot's
validation accuracy for a model is the example-weighted mean over the clients that
reported. The figures are a client's claims like its example count: a figure that is
not a finite accuracy in [0, 1] with a positive count is ignored (and counted), and a
client's weight is capped at its declared partition size, so one client cannot
outweigh the others by claiming a huge validation split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger()

ACCURACY, LOSS, EXAMPLES = "val_accuracy", "val_loss", "val_examples"


@dataclass(frozen=True)
class Validation:
    """A model's federated evaluation (see the module docstring)."""

    round: int  # the round of the model evaluated (0: the initial model)
    accuracy: float
    loss: float | None
    num_examples: int
    clients: int


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def figures_of(metrics: Mapping[str, Any]) -> tuple[float, float | None, int] | None:
    """(accuracy, loss, examples) from a result's metrics; None when it reports none or
    they are malformed."""
    accuracy, loss = _finite(metrics.get(ACCURACY)), _finite(metrics.get(LOSS))
    examples = _finite(metrics.get(EXAMPLES))
    if accuracy is None or not 0.0 <= accuracy <= 1.0 or examples is None or examples < 1:
        return None
    return accuracy, (loss if loss is not None and loss >= 0 else None), int(examples)


class ValidationTally:
    """The figures of one round's clients for the model they received."""

    def __init__(self, model_round: int) -> None:
        self.model_round = model_round
        self._weight = 0
        self._correct = 0.0
        self._loss = 0.0
        self._loss_weight = 0
        self._clients = 0
        self.malformed = 0

    def add(self, client_id: str, metrics: Mapping[str, Any], declared: int | None) -> bool:
        """One client's figures (`declared`: its partition size, caps its weight); False
        when it reported none, or malformed ones (logged ``validation_malformed``)."""
        if ACCURACY not in metrics:
            return False
        figures = figures_of(metrics)
        if figures is None:
            self.malformed += 1
            log.warning("validation_malformed", client_id=client_id, model_round=self.model_round,
                        figures={k: repr(metrics.get(k))[:40] for k in (ACCURACY, LOSS, EXAMPLES)})
            return False
        accuracy, loss, examples = figures
        weight = min(examples, declared) if declared else examples
        self._weight += weight
        self._correct += accuracy * weight
        if loss is not None:
            self._loss += loss * weight
            self._loss_weight += weight
        self._clients += 1
        return True

    def result(self) -> Validation | None:
        if not self._weight:
            return None
        loss = self._loss / self._loss_weight if self._loss_weight else None
        return Validation(self.model_round, self._correct / self._weight, loss, self._weight,
                          self._clients)
