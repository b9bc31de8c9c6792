"""Example counts a client cannot inflate (issue 23): the caps, the signed declarations
they rest on, and the trainer that declares a task's partition sizes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from bus.credentials import Keyring
from coordinator.delivery import Delivery
from coordinator.job_table import JobRecord
from coordinator.results.claims import (
    ExampleClaims,
    capped_batch,
    capped_examples,
    example_bound,
)
from coordinator.settings import TrainingSettings
from serialization import Registration, Result
from serialization.signing import declaration_problem, declaration_signature
from trainer_worker import protocol
from trainer_worker.tasks.synthetic import SyntheticTask
from trainer_worker.worker import Trainer

KEY, OTHER = b"k" * 32, b"o" * 32
STEPS = {"local_steps": 80, "batch_size": 32, "epochs": 1, "max_steps": 0}
EPOCHS = {"local_steps": 0, "batch_size": 32, "epochs": 2, "max_steps": 0}


def _registration(sizes: dict[str, Any], signatures: dict[str, Any] | None = None
                  ) -> Registration:
    return Registration(agent_id="silo-a", client_ids=sorted(sizes), num_examples=sizes,
                        examples_signatures=signatures or {})


def _signed(run_id: str, sizes: dict[str, int], key: bytes = KEY) -> Registration:
    return _registration(sizes, {c: declaration_signature(run_id, c, n, key)
                                 for c, n in sizes.items()})


def _delivery(num_examples: int, client_id: str = "3") -> Delivery:
    record = JobRecord("j1", 0, 1, client_id)
    result = Result(job_id="j1", run_id="run", slot_id=0, round=1, client_id=client_id,
                    status="ok", num_examples=num_examples)
    return Delivery(record, result, "results:0", "1-0")


def test_a_step_budget_bounds_a_job_by_steps_times_batch() -> None:
    """80 steps of 32 train at most 2,560 examples, whatever the client declared."""
    assert example_bound(STEPS, declared=10_000) == 2560
    assert example_bound(STEPS, declared=None) == 2560
    assert example_bound(TrainingSettings().job_config(7), declared=None) == 2560


def test_epochs_bound_a_job_by_epochs_times_the_declared_size() -> None:
    """Whole epochs: epochs x declared, and max_steps x batch when max_steps caps them."""
    assert example_bound(EPOCHS, declared=500) == 1000
    assert example_bound(EPOCHS, declared=None) is None
    assert example_bound(EPOCHS | {"max_steps": 30}, declared=7500) == 960
    assert example_bound(EPOCHS | {"max_steps": 30}, declared=None) == 960


def test_a_claim_counts_up_to_the_lower_bound_and_lies_are_flagged() -> None:
    """The counted value is min(claim, declared, job bound); only a claim above the
    declared size (or, undeclared, above the job's bound) is suspicious."""
    honest = capped_examples(7500, 7500, STEPS)
    assert (honest.counted, honest.suspicious) == (2560, False)
    lie = capped_examples(10**9, 7500, STEPS)
    assert (lie.counted, lie.suspicious) == (2560, True)
    small = capped_examples(300, 300, EPOCHS)
    assert (small.counted, small.suspicious) == (300, False)
    assert capped_examples(10**9, 300, EPOCHS).counted == 300
    undeclared = capped_examples(10**9, None, EPOCHS | {"max_steps": 30})
    assert (undeclared.counted, undeclared.suspicious) == (960, True)
    assert capped_examples(10**9, None, EPOCHS).counted == 10**9  # nothing bounds it


@settings(max_examples=200, deadline=None)
@given(claimed=st.integers(1, 10**9), declared=st.none() | st.integers(1, 10**9),
       steps=st.integers(0, 500), batch=st.integers(1, 512), epochs=st.integers(1, 5),
       max_steps=st.integers(0, 500))
def test_a_cap_never_exceeds_the_claim_the_declaration_or_the_job(
    claimed: int, declared: int | None, steps: int, batch: int, epochs: int, max_steps: int,
) -> None:
    """Whatever is claimed, the counted value is positive and within every bound."""
    config = {"local_steps": steps, "batch_size": batch, "epochs": epochs,
              "max_steps": max_steps}
    cap = capped_examples(claimed, declared, config)
    assert 0 < cap.counted <= claimed
    if declared is not None:
        assert cap.counted <= declared
    if steps:
        assert cap.counted <= steps * batch
    elif declared is not None:
        assert cap.counted <= epochs * declared
    assert cap.suspicious == (claimed > (declared or cap.job_bound or claimed))


def test_a_gradient_step_counts_at_most_the_session_batch() -> None:
    """A gradient's claimed batch is capped by the batch size and the declared size."""
    assert capped_batch(10**9, 32, None) == 32
    assert capped_batch(20, 32, None) == 20
    assert capped_batch(10**9, 32, 10) == 10


def test_signed_declarations_bind_run_client_and_size() -> None:
    """A declaration verifies with its client's key only, for its run, client and size."""
    sig = declaration_signature("run", "3", 7500, KEY)
    assert declaration_problem("run", "3", 7500, sig, KEY) is None
    assert declaration_problem("run", "3", 7501, sig, KEY) is not None
    assert declaration_problem("other", "3", 7500, sig, KEY) is not None
    assert declaration_problem("run", "4", 7500, sig, KEY) is not None
    assert declaration_problem("run", "3", 7500, sig, OTHER) is not None
    assert declaration_problem("run", "3", 7500, b"", KEY) == "declaration is not signed"
    assert declaration_problem("run", "3", 7500, "text", KEY) == "declaration is not signed"
    assert declaration_problem("run", "3", 7500, sig, None) is not None


def test_a_registration_carries_its_declarations_over_the_wire() -> None:
    """The sizes and signatures survive msgpack; an old agent's registration has none."""
    sent = _signed("run", {"3": 7500})
    got = Registration.from_bytes(sent.to_bytes())
    assert got.num_examples == {"3": 7500}
    assert got.examples_signatures == sent.examples_signatures
    assert Registration.from_bytes(
        Registration(agent_id="old", client_ids=["1"]).to_bytes()).num_examples == {}


def test_unsigned_declarations_are_taken_when_keys_are_off() -> None:
    """Without keys a declaration is taken as it is, and the first of the run holds."""
    claims = ExampleClaims(run_id="run", keyring=None)
    assert claims.declare("3", _registration({"3": 7500})) == 7500
    assert claims.declare("3", _registration({"3": 10**9})) == 7500
    assert claims.declare("4", _registration({"3": 1})) is None


@pytest.mark.parametrize("registration", [
    _registration({"3": 7500}),  # unsigned
    _signed("run", {"3": 7500}, key=OTHER),  # another silo's key
    _signed("earlier-run", {"3": 7500}),  # replayed from another run
    _registration({"3": "7500"}), _registration({"3": 0}), _registration({"3": True}),
    _registration({"3": 10**9 + 1}),
])
def test_with_keys_a_bad_declaration_is_rejected_and_logged(registration: Registration
                                                            ) -> None:
    """With keys, an unsigned, wrongly keyed, replayed or out-of-range declaration is not
    taken (``examples_declaration_rejected``): the client counts as undeclared."""
    claims = ExampleClaims(run_id="run", keyring=Keyring({"3": KEY}))
    with capture_logs() as logs:
        assert claims.declare("3", registration) is None
    assert [e["event"] for e in logs] == ["examples_declaration_rejected"]
    assert claims.declared("3") is None


def test_a_claim_above_the_declaration_is_capped_and_logged() -> None:
    """The issue's claim of 1e9 by a client that declared 7,500 counts 2,560 (the step
    budget), logged as ``num_examples_capped`` with what was claimed, declared, counted."""
    claims = ExampleClaims(run_id="run", keyring=Keyring({"3": KEY}))
    claims.declare("3", _signed("run", {"3": 7500}))
    delivery = _delivery(10**9)
    with capture_logs() as logs:
        capped = claims.capped(delivery, STEPS)
    assert capped.result.num_examples == 2560
    assert dataclasses.replace(capped, result=delivery.result) == delivery  # nothing else
    (event,) = logs
    assert (event["event"], event["claimed"], event["declared"], event["counted"]) == (
        "num_examples_capped", 10**9, 7500, 2560)


def test_an_honest_claim_under_a_step_budget_is_capped_silently() -> None:
    """An honest trainer reports its partition size: counted as steps x batch, no event."""
    claims = ExampleClaims(run_id="run", keyring=None)
    claims.declare("3", _registration({"3": 7500}))
    with capture_logs() as logs:
        assert claims.capped(_delivery(7500), STEPS).result.num_examples == 2560
        assert claims.capped(_delivery(400), STEPS).result.num_examples == 400
    assert logs == []


def test_a_gradient_claim_above_the_batch_is_capped_and_logged() -> None:
    """capped_step counts at most the batch size and says so when the claim was above."""
    claims = ExampleClaims(run_id="run", keyring=None)
    with capture_logs() as logs:
        assert claims.capped_step("3", 10**9, 32) == 32
        assert claims.capped_step("3", 16, 32) == 16
    assert [e["event"] for e in logs] == ["num_examples_capped"]


def test_the_trainer_describes_partition_sizes_and_keeps_the_task() -> None:
    """A trainer's `Describe` reports each client's partition size from the task, and a
    task that fails to load is a failed reply, not a crash."""
    trainer = Trainer(torch.device("cpu"))
    task = "trainer_worker.tasks.synthetic:SyntheticTask"
    options = {"num_clients": 4, "examples_per_client": 50}
    reply = trainer.describe(protocol.Describe(task=task, task_options=options,
                                               client_ids=["0", "3"]))
    # 50 examples a client, less its validation split (10%): 45 to train on.
    assert reply == protocol.Described(status="ok", num_examples={"0": 45, "3": 45})
    assert SyntheticTask(**options).partition_size("2") == 45
    bad = trainer.describe(protocol.Describe(task="no.such:Task", client_ids=["0"]))
    assert bad.status == "failed"
    wire = protocol.Describe(task=task, task_options=options, client_ids=["0"])
    assert protocol.unpack(protocol.pack(wire)) == wire
