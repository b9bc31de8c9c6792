"""What a client's example counts may weigh: capped by its declaration and by its job.

A silo controls every number it sends, its example counts included, and a count is
an update's weight in FedAvg (and in every rule that weights). So a count counts
only up to two bounds, whichever is lower:

- what the client *declared* when its agent registered it: its partition size, once
  per run, signed with the client's key when keys are configured (a declaration that
  fails its signature is ignored and logged, ``examples_declaration_rejected``);
- what its *job* could have trained: ``local_steps x batch_size`` for a step budget,
  otherwise ``epochs x declared`` (and at most ``max_steps x batch_size`` when the
  epochs are capped). A gradient step counts at most the session's batch size.

A claim above the declared size (or, for a client that declared nothing, above its
job's bound) is logged as ``num_examples_capped``; an honest trainer under a step
budget reports its partition size, above the job's bound, and is capped silently
(the counted weight is ``update_folded``'s ``weight``).

`example_bound`, `capped_examples` and `capped_batch` are the pure rules;
`ExampleClaims` holds the run's declarations and applies them to deliveries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from bus.credentials import Keyring
from coordinator.delivery import Delivery
from serialization import Registration
from serialization.signing import declaration_problem

log = structlog.get_logger()

MAX_DECLARED = 10**9  # as the bound on a result's claim


def _positive_int(value: Any) -> int | None:
    """`value` if it is a positive int (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def example_bound(config: Mapping[str, Any], declared: int | None) -> int | None:
    """The most examples a job with this training config could have trained (None: nothing
    bounds it): steps x batch for a step budget, else epochs x declared, and at most
    max_steps x batch when max_steps caps the epochs."""
    batch = _positive_int(config.get("batch_size"))
    steps = _positive_int(config.get("local_steps"))
    if steps is not None:
        return steps * batch if batch is not None else None
    bounds = []
    epochs = _positive_int(config.get("epochs")) or 1
    if declared is not None:
        bounds.append(epochs * declared)
    max_steps = _positive_int(config.get("max_steps"))
    if max_steps is not None and batch is not None:
        bounds.append(max_steps * batch)
    return min(bounds) if bounds else None


@dataclass(frozen=True)
class Cap:
    """One claim against its bounds: what is counted, and whether that is a lie caught."""

    claimed: int
    counted: int
    declared: int | None
    job_bound: int | None

    @property
    def suspicious(self) -> bool:
        """The claim exceeds the declared size (or, undeclared, the job's bound)."""
        limit = self.declared if self.declared is not None else self.job_bound
        return limit is not None and self.claimed > limit


def capped_examples(claimed: int, declared: int | None, config: Mapping[str, Any]) -> Cap:
    """The count a claim is worth: at most the declared size and the job's bound."""
    job_bound = example_bound(config, declared)
    limits = [b for b in (declared, job_bound) if b is not None]
    return Cap(claimed, min([claimed, *limits]), declared, job_bound)


def capped_batch(claimed: int, batch_size: int, declared: int | None) -> int:
    """A gradient step's count: at most the session's batch size and the declared size."""
    return min(claimed, batch_size, declared if declared is not None else claimed)


class ExampleClaims:
    """The run's declared partition sizes, and the caps they set on results."""

    def __init__(self, *, run_id: str, keyring: Keyring | None) -> None:
        self._run_id = run_id
        self._keyring = keyring  # None: declarations are not signed
        self._declared: dict[str, int] = {}

    def declared(self, client_id: str) -> int | None:
        """The client's declared partition size, None when it declared none."""
        return self._declared.get(client_id)

    def declare(self, client_id: str, registration: Registration) -> int | None:
        """Take the client's declaration from its registration (checked; the first good one
        of the run holds); the size now declared."""
        raw = registration.num_examples.get(client_id)
        size = _positive_int(raw)
        if raw is None or client_id in self._declared:
            return self._declared.get(client_id)
        problem = self._problem(client_id, size, registration)
        if problem is not None:
            log.warning("examples_declaration_rejected", client_id=client_id[:200],
                        agent_id=registration.agent_id[:200], reason=problem)
            return None
        assert size is not None  # _problem refuses anything else
        self._declared[client_id] = size
        return size

    def _problem(self, client_id: str, size: int | None,
                 registration: Registration) -> str | None:
        if size is None or size > MAX_DECLARED:
            return f"declared size {registration.num_examples.get(client_id)!r} is not in " \
                   f"1..{MAX_DECLARED}"
        if self._keyring is None:
            return None
        signature = registration.examples_signatures.get(client_id, b"")
        return declaration_problem(self._run_id, client_id, size, signature,
                                   self._keyring.get(client_id))

    def capped(self, delivery: Delivery, config: Mapping[str, Any]) -> Delivery:
        """The delivery with its result's num_examples capped (logged when suspicious)."""
        record, result = delivery.record, delivery.result
        cap = capped_examples(result.num_examples, self.declared(record.client_id), config)
        if cap.suspicious:
            log.warning("num_examples_capped", slot_id=record.slot_id, round=record.round,
                        client_id=record.client_id, job_id=record.job_id, claimed=cap.claimed,
                        declared=cap.declared, job_bound=cap.job_bound, counted=cap.counted)
        if cap.counted == result.num_examples:
            return delivery
        return dataclasses.replace(
            delivery, result=dataclasses.replace(result, num_examples=cap.counted))

    def capped_step(self, client_id: str, claimed: int, batch_size: int) -> int:
        """A gradient step's count, capped by `capped_batch` (logged when it was above)."""
        counted = capped_batch(claimed, batch_size, self.declared(client_id))
        if counted < claimed:
            log.warning("num_examples_capped", client_id=client_id, claimed=claimed,
                        declared=self.declared(client_id), job_bound=batch_size, counted=counted)
        return counted
