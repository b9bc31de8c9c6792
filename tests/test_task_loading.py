"""The one `load_task`: the coordinator and the trainers accept the same plugins, and a
process's allowlist holds for every task loaded in it, a task's own loads included."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from serialization.errors import TaskError, TaskNotAllowed
from serialization.tasks import BUILTIN_TASKS, allow_tasks, allowed_tasks, load_task
from trainer_worker.task import error_text

ATTACK = "trainer_worker.tasks.attack:AttackTask"
OPTIONS = {"num_clients": 2, "examples_per_client": 8}


class NoTrain:
    """Has build_model and evaluate but no train: a half task."""

    def build_model(self, seed: int) -> Any:
        return None

    def evaluate(self, model: Any, device: Any) -> dict[str, float]:
        return {}


def half_task() -> NoTrain:
    return NoTrain()


def broken_factory(**_options: Any) -> None:
    raise KeyError("features")


@pytest.fixture
def allowlist() -> Iterator[None]:
    """Restore the process's allowlist (none) after the test."""
    yield
    allow_tasks(None)


def test_a_short_name_loads_its_builtin() -> None:
    """A built-in short name and its import path give the same kind of task."""
    assert type(load_task("synthetic", OPTIONS)) is type(load_task(BUILTIN_TASKS["synthetic"],
                                                                  OPTIONS))


@pytest.mark.parametrize(("spec", "message"), [
    ("nocolon", "not of the form"),
    ("no_such_module:Task", "cannot import task"),
    ("tests.test_task_loading:half_task", r"not a task \(no train\)"),
    ("tests.test_task_loading:broken_factory", "could not be built: KeyError"),
])
def test_what_is_not_a_task_is_one_clear_error(spec: str, message: str) -> None:
    """A bad spec, a failed import, a factory that raises or returns a half task: TaskError."""
    with pytest.raises(TaskError, match=message):
        load_task(spec)


def test_the_allowlist_refuses_before_importing(allowlist: None) -> None:
    """A spec off the allowlist is refused as task_not_allowed, short names resolved."""
    allow_tasks(["synthetic"])
    assert allowed_tasks() == {BUILTIN_TASKS["synthetic"]}
    load_task("synthetic", OPTIONS)
    with pytest.raises(TaskNotAllowed) as info:
        load_task("os:system")
    assert error_text(info.value).startswith("task_not_allowed: task 'os:system' is not allowed")


def test_an_allowed_wrapper_refuses_a_disallowed_inner_task(allowlist: None) -> None:
    """The attack wrapper's inner task goes through the same allowlist: allowed, the
    wrapper loads; its inner task not allowed, the wrapper is refused."""
    allow_tasks([ATTACK, "synthetic"])
    load_task(ATTACK, {"inner": "synthetic", **OPTIONS})
    with pytest.raises(TaskNotAllowed, match="SlowClientTask"):
        load_task(ATTACK, {"inner": "tests.e2e_tasks:SlowClientTask", **OPTIONS})
