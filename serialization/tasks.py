"""Task plugins by name: the built-in short names, the one `load_task`, and the allowlist.

Here, not in `trainer_worker`, because the coordinator never imports the trainer
package and the agent never imports the coordinator; both import `serialization`.
So the coordinator (initial models, evaluation) and every trainer load a task the
same way and accept the same plugins: a `module:factory` whose factory, called
with the task options, returns an object with callable `build_model`, `train` and
`evaluate` (`trainer_worker.task.Task` is the base class users subclass).

A process may set an allowlist (`allow_tasks`): a trainer sets its agent's
(`--allow-task` plus the built-ins) when it starts, the coordinator sets none.
Every `load_task` in that process obeys it, including the ones a task makes
itself (the attack wrapper's `inner`), so a job can never make a silo import code
its operator did not choose, however deep the spec is nested.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from serialization.errors import TaskError, TaskNotAllowed

if TYPE_CHECKING:  # the coordinator's replay side imports serialization without torch
    import torch

BUILTIN_TASKS = MappingProxyType({
    "fashion_mnist": "trainer_worker.tasks.fashion_mnist:FashionMnistTask",
    "synthetic": "trainer_worker.tasks.synthetic:SyntheticTask",
})
# What a task must offer, on both sides; gradient mode's methods are optional.
REQUIRED_METHODS = ("build_model", "train", "evaluate")

_allowed: frozenset[str] | None = None  # None: every spec may be loaded


class TaskPlugin(Protocol):
    """The structural contract `load_task` checks (`trainer_worker.task.Task` fulfils it)."""

    def build_model(self, seed: int) -> torch.nn.Module: ...
    def train(self, model: torch.nn.Module, client_id: str, config: Any,
              device: torch.device) -> Any: ...
    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]: ...


def task_spec(name: str) -> str:
    """The import path of a built-in task's short name; any other name unchanged."""
    return BUILTIN_TASKS.get(name, name)


# A Flower client run unchanged: `flower:module:client_fn` names the user's client_fn,
# and the agents' allowlist names exactly that (`--allow-task flower:module:client_fn`),
# so allowing one Flower client never allows another.
FLOWER_PREFIX = "flower:"
FLOWER_ADAPTER = "trainer_worker.tasks.flower:FlowerTask"


def loadable(spec: str, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The factory to import and its options: ``flower:module:client_fn`` is the Flower
    adapter with the client_fn as its ``client_fn`` option; any other spec unchanged."""
    if spec.startswith(FLOWER_PREFIX):
        return FLOWER_ADAPTER, {**options, "client_fn": spec[len(FLOWER_PREFIX):]}
    return spec, dict(options)


def allow_tasks(specs: Iterable[str] | None) -> None:
    """Let this process load only these specs (short names resolved) from now on; None
    lifts the allowlist."""
    global _allowed  # one allowlist per process, by design (see the module docstring)
    _allowed = None if specs is None else frozenset(task_spec(s) for s in specs)


def allowed_tasks() -> frozenset[str] | None:
    """The allowlist this process obeys (None: none is set)."""
    return _allowed


def check_allowed(spec: str) -> None:
    """TaskNotAllowed unless this process may load `spec`."""
    if _allowed is not None and task_spec(spec) not in _allowed:
        raise TaskNotAllowed(f"task {spec!r} is not allowed on this agent (--allow-task)")


def load_task(spec: str, options: Mapping[str, Any] | None = None) -> TaskPlugin:
    """Check the allowlist, import ``module:factory`` (or a built-in short name, or the
    Flower adapter for ``flower:module:client_fn``: the allowlist names the client), call
    the factory with the options and check that it returned a task; TaskError otherwise."""
    check_allowed(task_spec(spec))
    resolved, kwargs = loadable(task_spec(spec), options or {})
    factory = _factory(resolved)
    try:
        task = factory(**kwargs)
    except TaskError:
        raise
    except Exception as exc:  # a plugin may raise anything: say which task failed
        raise TaskError(f"task {resolved!r} could not be built: "
                        f"{type(exc).__name__}: {exc}") from exc
    missing = [name for name in REQUIRED_METHODS if not callable(getattr(task, name, None))]
    if missing:
        raise TaskError(f"{resolved!r} returned {type(task).__name__}, not a task "
                        f"(no {', '.join(missing)})")
    return task  # type: ignore[no-any-return]


def takes_option(spec: str, name: str) -> bool:
    """Whether the task factory `spec` names the keyword option `name` (a ``**options``
    catch-all does not count: it may pass everything on to user code); imports the
    factory's module, builds nothing. TaskError when it cannot be imported."""
    resolved, _options = loadable(task_spec(spec), {})
    factory = _factory(resolved)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    parameter = parameters.get(name)
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TaskError(f"task {spec!r} is not of the form 'module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise TaskError(f"cannot import task {spec!r}: {exc}") from exc
    if not callable(factory):
        raise TaskError(f"task {spec!r} names {type(factory).__name__}, not a factory")
    return factory  # type: ignore[no-any-return]
