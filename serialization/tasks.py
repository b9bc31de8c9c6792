"""The built-in task specs: the coordinator's short `--task` names, and the tasks every
agent runs without being told (`--allow-task` adds more).

Here, not in `trainer_worker`, because the coordinator never imports the trainer
package and the agent never imports the coordinator; both import `serialization`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

BUILTIN_TASKS = MappingProxyType({
    "fashion_mnist": "trainer_worker.tasks.fashion_mnist:FashionMnistTask",
    "synthetic": "trainer_worker.tasks.synthetic:SyntheticTask",
})


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
